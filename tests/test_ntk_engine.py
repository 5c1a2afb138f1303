"""The empirical NTK engine against an explicit float64 Jacobian contraction (jax.jacrev), across
logits modes, methods, tile sizes, device counts, the on-disk store and kill-and-resume."""

import collections
import contextlib
import dataclasses
import functools
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ntk_scale import device_rates, parallel
from ntk_scale.base_config import base_config
from ntk_scale.cost_analysis import all_equations, memory_per_device
from ntk_scale.linearize import LinearizedModel
from ntk_scale.matmul_precision import default_precision
from ntk_scale.models import build_model
from ntk_scale.models.layers import batch_norm, full_precision_logits
from ntk_scale.nt_compat import NeuralTangentsUnavailableError, load_neural_tangents
from ntk_scale.ntk import KernelPlanError, empirical_ntk, fit_plan, plan_for, run_tiles
from ntk_scale.ntk import compiled_memory as compiled_memory_module, engine, plan as plan_module
from ntk_scale.ntk.engine import tile_slices
from ntk_scale.ntk.plan import MIN_BANDED_TILE, ModelCost, make_plan
from ntk_scale.ntk.programs import program_of, step_programs
from ntk_scale.ntk.schedule import (in_logit_chunks, jacobian_schedule, ring_schedule, round_lengths,
                                   tile_schedule)
from ntk_scale.ntk.tile_math import (JacobianRows, contract, contract_symmetric, parameter_groups,
                                    parse_logits)
from ntk_scale.ntk.store import KernelStore, KernelStoreMismatchError
from random_variables import random_variables

SHAPE = (6, 6, 1)
NUM_CLASSES = 3


class TwoConvCNN(nn.Module):
  """The small CNN (models/cnn.py) with two of its six convolutions: its every kind of layer (3x3
  convolutions without bias, BatchNorm, ReLU, the 2x2 max-pool, the global average pool, the dense
  head) and the same layers factored, at a third of its compile time, which was most of this file's."""
  num_classes: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    for i, features in enumerate((2, 4)):
      x = nn.Conv(features, (3, 3), padding="SAME", use_bias=False, name=f"conv{i + 1}")(x)
      x = nn.relu(batch_norm(True, train)(x))
      if i == 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.mean(axis=(1, 2))
    return full_precision_logits(nn.Dense(self.num_classes, name="head")(x))


def _mlp():
  c = base_config()
  c.model.name, c.model.width, c.model.depth, c.model.batch_norm = "mlp", 2, 2, False
  return build_model(c.model, NUM_CLASSES)


def _apply(model, batch_stats):
  return lambda params, x: model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)


def _images(n, seed=1):
  return np.random.default_rng(seed).uniform(size=(n, *SHAPE)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jacobian_fn(apply_fn):
  """jax.jacrev of the model, jitted (op by op, the eager Jacobian compiled each of its hundreds of
  primitives, most of a test's time); called an example at a time, one compilation in all."""
  return jax.jit(jax.jacrev(apply_fn))


def reference_kernel(apply_fn, params, x1, x2, logits):
  """J(x1) J(x2)^T in float64 from full jax.jacrev Jacobians, contracted with numpy."""
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    def flat(x):  # [N, C, P]
      jacs = [_jacobian_fn(apply_fn)(params, example[None]) for example in np.asarray(x, np.float64)]
      return np.concatenate([np.concatenate([np.asarray(l).reshape(1, l.shape[1], -1)
                                             for l in jax.tree.leaves(jac)], -1) for jac in jacs])
    full = np.einsum("icp,jdp->ijcd", flat(x1), flat(x2))
  if logits == "full":
    return full
  if logits == "trace":
    return np.einsum("ijcc->ij", full)
  return full[:, :, logits, logits]


@pytest.fixture(scope="module")
def network():
  model = TwoConvCNN(NUM_CLASSES)
  variables = random_variables(model, SHAPE, seed=3)
  apply_fn = _apply(model, jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"]))
  return model, variables, apply_fn


def _relative_error(a, b):
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("method", ["jacobian", "ntvp"])
@pytest.mark.parametrize("logits", ["trace", 1, "full"])
def test_kernel_matches_float64_jacobian_contraction(network, method, logits):
  _, variables, apply_fn = network
  x = _images(7)
  reference = reference_kernel(apply_fn, variables["params"], x, x, logits)
  # Tile 3 over 4 devices: padded edge tiles, diagonal and off-diagonal tiles, row switches.
  k64 = empirical_ntk(apply_fn, variables["params"], x, logits=logits, method=method, tile_size=3,
                      dtype="float64")
  assert k64.dtype == np.float64 and k64.shape == reference.shape
  assert _relative_error(k64, reference) < 1e-10
  k32 = empirical_ntk(apply_fn, variables["params"], x, logits=logits, method=method)
  assert k32.dtype == np.float32
  assert _relative_error(k32, reference) < 1e-5


def test_a_model_state_keeps_its_integer_leaves_in_a_float64_kernel():
  """model_state is cast to the kernel's dtype leaf by leaf, its floats only: an index stays an
  integer (indices must be)."""
  def apply_fn(params, x, state):
    logits = jnp.tanh(x.reshape(len(x), -1) @ params["w"]) * state["scale"]
    return logits[:, (jnp.arange(NUM_CLASSES) + state["shift"]) % NUM_CLASSES]

  params = {"w": np.random.default_rng(0).normal(size=(int(np.prod(SHAPE)), NUM_CLASSES))}
  state = {"scale": np.float32(1.5), "shift": np.int32(3)}
  x = _images(5)
  kernel = empirical_ntk(apply_fn, params, x, logits=2, dtype="float64", model_state=state)
  reference = reference_kernel(lambda p, x: apply_fn(p, x, state), params, x, x, 2)
  assert _relative_error(kernel, reference) < 1e-10


class GroupedCNN(nn.Module):
  """A depthwise convolution (MobileNet) and one of 2 feature groups (ResNeXt), then a dense head."""
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding="SAME", feature_group_count=2)(x[..., :2].repeat(2, -1))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding="SAME", feature_group_count=4)(x))
    return nn.Dense(NUM_CLASSES)(x.reshape(len(x), -1))


@pytest.fixture(scope="module")
def grouped_network():
  """GroupedCNN's apply function, parameters, images and float64 reference kernel, for both methods."""
  model = GroupedCNN()
  x = _images(5)
  params = model.init(jax.random.key(0), x[:1])["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  return apply_fn, params, x, reference_kernel(apply_fn, params, x, x, "trace")


@pytest.mark.parametrize("method", ["jacobian", "ntvp"])
def test_grouped_and_depthwise_convolutions(grouped_network, method):
  """JAX's own rule for a grouped convolution's per-example weight gradients failed inside the
  engine's shard_map programs (NotImplementedError, no message); they are split into plain ones."""
  apply_fn, params, x, reference = grouped_network
  kernel = empirical_ntk(apply_fn, params, x, method=method, tile_size=2, dtype="float64")
  assert _relative_error(kernel, reference) < 1e-10


@pytest.mark.filterwarnings("error:Explicitly requested dtype int64")
def test_integer_inputs_reach_the_model_as_integers():
  """Token ids stay integers (they were cast to the kernel's dtype, which nn.Embed refuses); numpy's
  int64 ids are taken as jit takes them, int32 without x64 (the probe's zeros warned)."""
  class Tokens(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      return nn.Dense(NUM_CLASSES)(jnp.tanh(nn.Embed(12, 6)(tokens).mean(1)))

  model, tokens = Tokens(), np.random.default_rng(0).integers(0, 12, size=(6, 5))
  params = model.init(jax.random.key(0), tokens[:1])["params"]
  apply_fn = lambda p, t: model.apply({"params": p}, t)
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    jac = jax.jit(jax.jacrev(apply_fn))(params64, tokens)  # [N, C, *leaf] per leaf
    rows = np.concatenate([np.asarray(l).reshape(6, NUM_CLASSES, -1) for l in jax.tree.leaves(jac)], -1)
  reference = np.einsum("icp,jcp->ij", rows, rows)
  for dtype, tolerance in (("float64", 1e-10), ("float32", 1e-5)):
    kernel = empirical_ntk(apply_fn, params, tokens, dtype=dtype)
    assert kernel.dtype == dtype and _relative_error(kernel, reference) < tolerance


def test_a_model_without_a_logit_axis_is_refused_naming_its_shape():
  """An output of [N] was read as one logit, then failed deep inside for a class or "full" kernel."""
  params = {"w": np.ones((int(np.prod(SHAPE)),), np.float32)}
  with pytest.raises(ValueError, match=r"apply_fn returns shape \(1,\) .* needs logits \[N, C\]"):
    empirical_ntk(lambda p, x: x.reshape(len(x), -1) @ p["w"], params, _images(3), logits=0)


def test_a_model_of_several_outputs_and_a_bool_logit_are_refused():
  """(logits, aux) and dicts failed with AttributeError: 'tuple' object has no attribute 'shape';
  logits=True was read as class 1 (int(True))."""
  params = {"w": np.ones((int(np.prod(SHAPE)), 3), np.float32)}
  logits = lambda p, x: x.reshape(len(x), -1) @ p["w"]
  for apply_fn, kind in ((lambda p, x: (logits(p, x), x), "tuple"),
                         (lambda p, x: {"logits": logits(p, x)}, "dict")):
    with pytest.raises(ValueError, match=f"apply_fn returns a {kind}, not one array; .* return only "
                                         f"the logits"):
      empirical_ntk(apply_fn, params, _images(3))
  with pytest.raises(ValueError, match="logits=True is not a logits mode"):
    empirical_ntk(logits, params, _images(3), logits=True)


@pytest.mark.parametrize("logits", ["trace", "full"])
def test_bands_of_row_tiles_give_the_same_kernel(network, logits):
  """A column block contracted with a band of 3 resident row tiles at once: the band's own tiles
  from its diagonal block, a last band padded past the kernel's edge; symmetric and cross (one
  column program, compiled once)."""
  _, variables, apply_fn = network
  x, x2 = _images(7), _images(3, seed=6)
  kernel = empirical_ntk(apply_fn, variables["params"], x, logits=logits, method="jacobian",
                         tile_size=2, band=3, dtype="float64")
  assert _relative_error(kernel, reference_kernel(apply_fn, variables["params"], x, x, logits)) < 1e-10
  kernel = empirical_ntk(apply_fn, variables["params"], x, x2, logits=logits, method="jacobian",
                         tile_size=2, band=3, dtype="float64")
  assert _relative_error(kernel, reference_kernel(apply_fn, variables["params"], x, x2, logits)) < 1e-10


def test_trace_kernel_formed_a_chunk_of_logits_at_a_time(network):
  """A logit per chunk: the kernel in one tile on one device (every chunk inside one program), and
  bands of square tiles on 4 devices (each round once per chunk, the partial tiles summed on the
  host), symmetric and cross."""
  _, variables, apply_fn = network
  x, x2 = _images(7), _images(3, seed=6)
  one = Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    x64 = x.astype(np.float64)
    plan = plan_for(apply_fn, params, x64, None, "trace", logit_chunk=1, num_devices=1)
    assert (plan.tile, plan.band, plan.logit_chunk) == (7, 1, 1)
    tiles = []
    run_tiles(apply_fn, params, x64, None, plan, lambda i, j, t: tiles.append(t), mesh=one)
  reference = reference_kernel(apply_fn, variables["params"], x, x, "trace")
  assert len(tiles) == 1 and tiles[0].dtype == np.float64
  assert _relative_error(tiles[0], reference) < 1e-10
  kernel = empirical_ntk(apply_fn, variables["params"], x, logits="trace", method="jacobian",
                         tile_size=2, band=2, logit_chunk=1, dtype="float64")
  assert _relative_error(kernel, reference) < 1e-10
  kernel = empirical_ntk(apply_fn, variables["params"], x, x2, logits="trace", tile_size=2,
                         logit_chunk=1, dtype="float64")
  assert _relative_error(kernel, reference_kernel(apply_fn, variables["params"], x, x2, "trace")) < 1e-10


def test_a_full_kernel_in_one_diagonal_step(network):
  """The kernel in one tile on one device: its diagonal step forms every logit's rows at once (a
  trace kernel's diagonal step alone sums chunks of logits)."""
  _, variables, apply_fn = network
  x = _images(5)
  one = Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
  plan = plan_for(apply_fn, variables["params"], x, None, "full", method="jacobian", num_devices=1)
  assert (plan.tile, plan.band, plan.logit_chunk, len(plan.tiles())) == (5, 1, NUM_CLASSES, 1)
  tiles = []
  run_tiles(apply_fn, variables["params"], x, None, plan, lambda i, j, t: tiles.append(t), mesh=one)
  reference = reference_kernel(apply_fn, variables["params"], x, x, "full")
  assert len(tiles) == 1 and _relative_error(tiles[0], reference) < 1e-5


class FourLogitMLP(nn.Module):
  """A dense tanh layer and a head of 4 logits: chunks of 2 logits start at logits 0 and 2."""
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(jnp.tanh(nn.Dense(5)(x.reshape(len(x), -1))))


@pytest.mark.parametrize("settings", [dict(tile_size=2, band=2), dict(rotate=True)],
                         ids=["bands", "ring"])
def test_trace_kernel_in_chunks_of_two_logits_covers_every_logit(settings):
  """Chunk c forms the rows of logits c * logit_chunk ..: a chunk's first logit taken as its index
  (right only for a logit at a time) summed logits 0, 1, 1, 2 of 4. Symmetric and cross kernels,
  bands of tiles and the ring of 4 devices, against the float64 Jacobian contraction."""
  model = FourLogitMLP()
  x, x2 = _images(7), _images(3, seed=6)
  params = model.init(jax.random.key(0), x[:1])["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  if "rotate" in settings:
    plan = plan_for(apply_fn, params, x, None, "trace", method="jacobian", logit_chunk=2,
                    num_devices=jax.device_count(), **settings)
    assert plan.rotate and plan.logit_chunk == 2 and plan.num_devices == 4
  for other in (None, x2):
    kernel = empirical_ntk(apply_fn, params, x, other, logits="trace", method="jacobian",
                           logit_chunk=2, dtype="float64", **settings)
    reference = reference_kernel(apply_fn, params, x, x if other is None else other, "trace")
    assert _relative_error(kernel, reference) < 1e-10


def test_cross_kernel_of_two_sets(network):
  _, variables, apply_fn = network
  x1, x2 = _images(5, seed=4), _images(4, seed=5)
  reference = reference_kernel(apply_fn, variables["params"], x1, x2, "full")
  kernel = empirical_ntk(apply_fn, variables["params"], x1, x2, logits="full", tile_size=2,
                         dtype="float64")
  assert kernel.shape == (5, 4, NUM_CLASSES, NUM_CLASSES)
  assert _relative_error(kernel, reference) < 1e-10


def test_kernels_of_the_same_shapes_reuse_their_plan(network, monkeypatch):
  """A plan depends on the model's shapes and the settings only: a second kernel of other images
  and parameters of the same shapes is planned once (and is its own kernel); another size is not."""
  _, variables, apply_fn = network
  empirical_ntk(apply_fn, variables["params"], _images(5, seed=6), logits=1)

  def refit(*args, **kwargs):
    raise AssertionError("planned again")

  monkeypatch.setattr(engine, "fit_plan", refit)
  params = jax.tree.map(lambda a: 1.5 * np.asarray(a), variables["params"])
  x = _images(5, seed=7)
  kernel = empirical_ntk(apply_fn, params, x, logits=1)
  assert _relative_error(kernel, reference_kernel(apply_fn, params, x, x, 1)) < 1e-5
  with pytest.raises(AssertionError, match="planned again"):
    empirical_ntk(apply_fn, params, _images(6, seed=7), logits=1)


def test_kernel_is_symmetric_positive_semidefinite(network):
  _, variables, apply_fn = network
  # The float64 kernel of the contraction test above: its programs are compiled.
  kernel = empirical_ntk(apply_fn, variables["params"], _images(7), logits="trace", tile_size=3,
                         dtype="float64")
  np.testing.assert_array_equal(kernel, kernel.T)
  assert np.linalg.eigvalsh(kernel).min() > -1e-12 * np.abs(kernel).max()
  full = empirical_ntk(apply_fn, variables["params"], _images(6), logits="full", tile_size=2,
                       dtype="float64")
  flat = full.transpose(0, 2, 1, 3).reshape(6 * NUM_CLASSES, 6 * NUM_CLASSES)
  np.testing.assert_array_equal(flat, flat.T)
  assert np.linalg.eigvalsh(flat).min() > -1e-12 * np.abs(flat).max()


def _kernel_on(mesh, apply_fn, params, x, done=(), logits="trace", **settings):
  """The symmetric kernel of x by the Jacobian method on `mesh` through run_tiles: (kernel, plan,
  tiles this process handed over)."""
  plan = plan_for(apply_fn, params, x, None, logits, method="jacobian", num_devices=mesh.size,
                  **settings)
  kernel = np.zeros((len(x), len(x)), np.result_type(x))

  def store(i, j, t):
    rows, cols = tile_slices(plan, i, j)
    kernel[rows, cols] = t
    kernel[cols, rows] = t.T

  handed = run_tiles(apply_fn, params, x, None, plan, store, mesh=mesh, done=done)
  return kernel, plan, handed


# Square tiles on 4 devices are the float64 contraction test's (tile 3, against the reference),
# and on one device the fitted plan's of test_plan_is_held_to_its_budget_by_its_compiled_programs.
# Bands run in float64, on the 4-device programs the bands and logit-chunk tests compiled (the
# same tile and band); the ring in float32, on those of test_plan_is_held_to_its_budget_by_its_
# compiled_programs (9 images: one device's one tile and its float32 reference's ring).
@pytest.mark.parametrize("settings,dtype", [(dict(tile_size=2, band=3), np.float64),
                                            (dict(), np.float32),
                                            (dict(tile_size=2, band=2, logit_chunk=1), np.float64),
                                            (dict(logit_chunk=1), np.float32)])
def test_four_devices_equal_one_device(network, settings, dtype):
  """Bands, (unset: every device's block fits) column rows rotating over the ring of devices, which
  on one device is the kernel in one tile, and both a logit at a time."""
  _, variables, apply_fn = network
  assert jax.device_count() == 4
  with jax.enable_x64(dtype == np.float64):
    params = jax.tree.map(lambda a: np.asarray(a, dtype), variables["params"])
    x = _images(9).astype(dtype)
    one = Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
    k1, _, _ = _kernel_on(one, apply_fn, params, x, **settings)
    k4, plan, _ = _kernel_on(parallel.make_mesh(), apply_fn, params, x, **settings)
    assert plan.rotate == ("tile_size" not in settings) and k4.dtype == dtype
    np.testing.assert_allclose(k4, k1, rtol=1e-6, atol=1e-7 * np.abs(k1).max())
    if plan.rotate or "logit_chunk" in settings:  # resumed: only the missing tiles, the same kernel
      done = set(plan.tiles()[::2])
      partial, _, handed = _kernel_on(parallel.make_mesh(), apply_fn, params, x, done=done, **settings)
      assert handed == len(plan.tiles()) - len(done)
      for i, j in set(plan.tiles()) - done:
        rows, cols = tile_slices(plan, i, j)
        np.testing.assert_array_equal(partial[rows, cols], k4[rows, cols])


HIGHEST, HIGH = jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGH


@pytest.mark.parametrize("precision,outer,expected", [("default", "highest", {(HIGHEST, HIGHEST)}),
                                                      ("default", None, {None}),
                                                      ("high", "highest", {(HIGH, HIGH)}),
                                                      ("highest", None, {(HIGHEST, HIGHEST)})])
def test_tile_programs_run_at_the_kernels_precision_and_default_leaves_it_to_the_caller(
    network, precision, outer, expected):
  """Every matmul of a tile program (the Jacobian rows' and the contraction's) asks for the
  kernel's precision; "default" enters no context and asks nothing of the matmuls (as the train
  and evaluation fields' "default"): a global jax_default_matmul_precision, here a surrounding
  context, governs."""
  _, variables, apply_fn = network
  mesh = Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
  spec = parse_logits("trace", NUM_CLASSES)
  programs = step_programs(apply_fn, False, spec, precision, mesh, NUM_CLASSES, "auto")
  with jax.default_matmul_precision(outer) if outer else contextlib.nullcontext():
    with default_precision(precision):  # as the tile loop runs them
      traced = lambda params, x: programs["row"](params, {}, np.int32(0), x)
      jaxpr = jax.make_jaxpr(traced)(variables["params"], _images(4)).jaxpr
  assert {eqn.params["precision"] for eqn in all_equations(jaxpr)
          if eqn.primitive.name in ("dot_general", "conv_general_dilated")} == expected


def test_linearized_model_kernel_is_the_frozen_kernel_of_theta0(network):
  model, variables, apply_fn = network
  x = _images(5)
  # theta0 in float32, as a checkpoint holds it: the float64 kernels below compute in float64
  # all the same (BatchNorm's statistics included), to the float64 reference's 1e-10.
  lin = LinearizedModel(model, variables["params"], variables["batch_stats"], kind="linear")
  lin_apply = _apply(lin, lin.batch_stats0)
  moved = jax.tree.map(lambda p: p + 0.3 * np.random.default_rng(0).normal(size=p.shape).astype(p.dtype),
                       variables["params"])
  theta0 = empirical_ntk(apply_fn, variables["params"], x, logits="full", dtype="float64")
  for params in (variables["params"], moved):  # the linear model's kernel never moves
    kernel = empirical_ntk(lin_apply, params, x, logits="full", dtype="float64")
    assert _relative_error(kernel, theta0) < 1e-10
  # ... while the network's own kernel at the moved parameters is a different one.
  assert _relative_error(empirical_ntk(apply_fn, moved, x, logits="full", dtype="float64"), theta0) > 1e-3


def test_float64_is_refused_on_tpus_before_any_compute(network, monkeypatch):
  _, variables, apply_fn = network
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # no float64 arithmetic there
  monkeypatch.setattr(engine, "plan_for", lambda *a, **k: pytest.fail("planned"))
  with pytest.raises(ValueError, match="dtype='float64' cannot run on TPUs"):
    empirical_ntk(apply_fn, variables["params"], _images(4), dtype="float64")


def test_tile_follows_memory_budget_and_method_falls_back(network):
  _, variables, apply_fn = network
  x = _images(40)
  roomy = plan_for(apply_fn, variables["params"], x, None, "trace", method="jacobian")
  tight_budget = roomy.bytes_per_device / 3
  tight = plan_for(apply_fn, variables["params"], x, None, "trace", method="jacobian",
                   memory_budget_bytes=tight_budget)
  assert tight.tile < roomy.tile and tight.bytes_per_device <= tight_budget
  assert len(tight.tiles()) == tight.row_blocks * (tight.row_blocks + 1) // 2
  with pytest.raises(KernelPlanError, match="memory_budget_bytes"):
    plan_for(apply_fn, variables["params"], x, None, "full", method="jacobian", memory_budget_bytes=1e3)
  # An MLP has far more parameters than activations: where not even one example's Jacobian
  # rows fit twice (resident and column), NTK-vector products still fit, and auto picks them.
  mlp = _mlp()
  mlp_params = random_variables(mlp, SHAPE, seed=1)["params"]
  mlp_apply = _apply(mlp, {})
  jacobian = plan_for(mlp_apply, mlp_params, x, None, "full", method="jacobian", tile_size=1, band=1)
  ntvp = plan_for(mlp_apply, mlp_params, x, None, "full", method="ntvp", tile_size=1)
  budget = (ntvp.bytes_per_device + jacobian.bytes_per_device) / 2
  assert plan_for(mlp_apply, mlp_params, x, None, "full", memory_budget_bytes=budget).method == "ntvp"
  with pytest.raises(KernelPlanError, match="method='ntvp'"):
    plan_for(mlp_apply, mlp_params, x, None, "full", method="jacobian", memory_budget_bytes=budget)
  with pytest.raises(ValueError, match="logits='sum'"):
    plan_for(apply_fn, variables["params"], x, None, "sum")


def test_plan_is_held_to_its_budget_by_its_compiled_programs(network, monkeypatch):
  """Where the memory model overestimates (CPU), a plan for more memory is kept when XLA's count
  fits the budget; where it underestimates (here: a model cost of a third of the real one, as
  XLA:GPU's allocations exceeded the model on an H100), XLA's analysis of the compiled programs
  sends the plan back for smaller tiles before any compute, and the kernel is the same; a fixed
  setting that cannot shrink is refused, naming the settings to change."""
  _, variables, apply_fn = network
  x, one = _images(9), Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
  whole = fit_plan(apply_fn, variables["params"], x, None, "trace", method="jacobian", mesh=one)
  assert whole.memory_compiled and whole.tile == 9 and "(compiled)" in whole.describe()
  model = plan_for(apply_fn, variables["params"], x, None, "trace", method="jacobian", num_devices=1)
  assert whole.bytes_per_device < model.bytes_per_device  # the model is conservative here
  # Its slack given back: a budget the model says all logits at once exceed, XLA's count does not.
  budget = 0.9 * model.bytes_per_device
  tight = plan_for(apply_fn, variables["params"], x, None, "trace", method="jacobian", num_devices=1,
                   memory_budget_bytes=budget)
  grown = fit_plan(apply_fn, variables["params"], x, None, "trace", method="jacobian", mesh=one,
                   memory_budget_bytes=budget)
  assert tight.layout() != whole.layout() == grown.layout() and grown.bytes_per_device <= budget
  assert grown.device_flops < tight.device_flops
  measure = engine._measure

  def a_third(*model):
    cost = measure(*model)
    return dataclasses.replace(cost, num_params=cost.num_params // 3, largest_group=cost.largest_group // 3,
                               activation_bytes=cost.activation_bytes / 3)

  monkeypatch.setattr(engine, "_measure", a_third)
  budget = 0.45 * whole.bytes_per_device
  optimistic = plan_for(apply_fn, variables["params"], x, None, "trace", method="jacobian",
                        memory_budget_bytes=budget, num_devices=1)
  fitted = fit_plan(apply_fn, variables["params"], x, None, "trace", method="jacobian",
                    memory_budget_bytes=budget, mesh=one)
  assert optimistic.tile == 9 and fitted.tile < 9
  assert fitted.memory_compiled and fitted.bytes_per_device <= budget == fitted.budget_bytes
  kernel = np.zeros((9, 9), np.float32)

  def store(i, j, tile):
    rows, cols = tile_slices(fitted, i, j)
    kernel[rows, cols], kernel[cols, rows] = tile, tile.T

  run_tiles(apply_fn, variables["params"], x, None, fitted, store, mesh=one)
  reference = empirical_ntk(apply_fn, variables["params"], x, logits="trace")
  np.testing.assert_allclose(kernel, reference, rtol=1e-5, atol=1e-6 * np.abs(reference).max())
  with pytest.raises(KernelPlanError, match="compiled programs need .* lower tile_size, band or"):
    fit_plan(apply_fn, variables["params"], x, None, "trace", method="jacobian", tile_size=9,
             logit_chunk=1, memory_budget_bytes=budget, mesh=one)


def test_a_timed_collective_makes_process_0s_number_of_calls(monkeypatch):
  """The ring probe's ppermute runs on every process: each makes the count process 0 sets (here 7),
  not as many as its own clock allows (100 s here), or one would start a call its peers never join."""
  monkeypatch.setattr(device_rates, "agreed", lambda value: 7.0)
  steps = []
  calls, _ = device_rates.timed(lambda s: steps.append(s) or s, jnp.zeros(()), 100.0, collective=True)
  assert calls == 7 and len(steps) == 1 + 7  # the warm-up, then process 0's count


def _fake_clock(monkeypatch, seconds_per_call: float):
  """device_rates' clock replaced by one that only a step advances, by `seconds_per_call`; returns
  the step (it counts its calls in the returned list)."""
  clock, calls = [0.0], []
  monkeypatch.setattr(device_rates, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

  def step(state):
    clock[0] += seconds_per_call
    calls.append(state)
    return state
  return step, calls


@pytest.mark.parametrize("seconds, calls, elapsed", [(0.0, 3, 1.5), (1.2, 3, 1.5), (2.2, 5, 2.5)])
def test_a_measured_step_runs_for_the_seconds_asked_and_at_least_three_calls(monkeypatch, seconds,
                                                                            calls, elapsed):
  """A step of 0.5 s on a clock it alone moves: after the untimed warm-up, calls continue until
  `seconds` have passed and at least 3 were made (hand-counted), and the time returned covers them
  all, so calls / elapsed is the step's rate, 2 per second, however short the budget."""
  step, made = _fake_clock(monkeypatch, 0.5)
  assert device_rates.timed(step, None, seconds) == (calls, pytest.approx(elapsed))
  assert len(made) == 1 + calls


@pytest.mark.parametrize("seconds, calls", [(0.1, 3), (1.8, 4)])
def test_a_measured_collective_sizes_its_calls_from_one_measured_call(monkeypatch, seconds, calls):
  """Collective timing on a 0.5 s step: one timed call sets the count, ceil(seconds / 0.5) and at
  least 3 (1.8 s: ceil(3.6) = 4), and the elapsed time returned includes that first call, so the
  rate is the step's 2 calls per second exactly."""
  step, made = _fake_clock(monkeypatch, 0.5)
  assert device_rates.timed(step, None, seconds, collective=True) == (calls, pytest.approx(0.5 * calls))
  assert len(made) == 1 + calls


def test_rates_are_counted_from_the_work_of_one_call(monkeypatch):
  """With timing fixed at 5 calls in 2 s: a size-n matmul is 2 n^3 FLOPs (8: 2560 FLOP/s), and the
  ring probe sends each device's `megabytes` MiB to its neighbour per call (1 MiB: 2.5 MiB/s). The
  probe's step is a rotation: device d's block lands on device d + 1, the kernel's ring order."""
  seen = []
  monkeypatch.setattr(device_rates, "timed", lambda step, state, seconds, collective=False: (
      seen.append((step, state)) or (5, 2.0)))
  mesh = parallel.make_mesh()
  device_rates.matmul_rate.cache_clear()
  device_rates.ring_bandwidth.cache_clear()
  try:
    assert device_rates.matmul_rate("highest", 8, 0.0) == pytest.approx(2560.0)
    assert device_rates.ring_bandwidth(mesh, 1, 0.0) == pytest.approx(2.5 * 2**20)
  finally:
    device_rates.matmul_rate.cache_clear()
    device_rates.ring_bandwidth.cache_clear()
  send, blocks = seen[-1]
  block = 2**20 // 4
  values = np.arange(mesh.size * block, dtype=np.float32)
  received = np.asarray(send(jax.device_put(values, blocks.sharding))).reshape(mesh.size, block)
  np.testing.assert_array_equal(received, np.roll(values.reshape(mesh.size, block), 1, axis=0))


def test_every_process_takes_process_0s_measurement(monkeypatch):
  """Two processes measuring 3.5 and 14: both plan with process 0's 3.5 (a float64 travels as two
  32-bit words, as in parallel.gather_from_processes)."""
  def allgather(words):
    value = float(words.view(np.float64)[0])
    return np.stack([words, np.array([value * 4]).view(np.uint32)])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(parallel.multihost_utils, "process_allgather", allgather)
  assert device_rates.agreed(3.5) == 3.5


def test_processes_plan_within_the_smallest_of_their_memory_budgets(monkeypatch):
  """Every process must make the same plan: with several, the default budget is the smallest
  process's (here a second host with a quarter of this one's memory)."""
  device = jax.local_devices()[0]
  alone = plan_module.device_budget_bytes(device)
  gathered = []

  def allgather(words):  # a float64 travels as two 32-bit words (parallel.gather_from_processes)
    value = float(words.view(np.float64)[0])
    gathered.append(value)
    return np.stack([words, np.array([value / 4]).view(np.uint32)])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(parallel.multihost_utils, "process_allgather", allgather)
  assert plan_module.device_budget_bytes(device) == alone / 4 and gathered == [alone]


def test_rotation_is_weighed_against_the_measured_ring(network, monkeypatch):
  """On 4 devices fit_plan weighs the rows each device would send round the ring, at the ring's
  measured bandwidth, against those it would recompute, at the measured rate of forming them: a
  ring as slow as 1 kB/s keeps the rows where they are."""
  _, variables, apply_fn = network
  x = _images(7)  # the shapes and logits of a float32 kernel above: its ring's programs are compiled
  monkeypatch.setattr(engine, "ring_bandwidth", lambda mesh: 1e15)
  fast = fit_plan(apply_fn, variables["params"], x, None, 1)
  monkeypatch.setattr(engine, "ring_bandwidth", lambda mesh: 1e3)
  slow = fit_plan(apply_fn, variables["params"], x, None, 1)
  assert fast.rotate and fast.transfer_bytes > 0 and not slow.rotate
  assert slow.device_flops > fast.device_flops  # what the slow ring's plan pays instead


# A ResNet-like model for the planner: 1M parameters (the largest group an eighth), 1 GFLOP forward.
RESNET_LIKE_COST = ModelCost(num_params=10**6, forward_flops=1e9, activation_bytes=1e5, itemsize=4,
                             largest_group=10**6 // 8)


def test_planner_chooses_a_tall_band_when_square_tiles_recompute_more():
  """A ResNet-like cost (1M parameters, 1 GFLOP forward, one class) whose 4096-row kernel does not
  fit one tile: bands of row tiles within the same budget form fewer Jacobian rows than the
  largest square tiles, counted from the schedule itself."""
  cost = RESNET_LIKE_COST
  spec, budget = parse_logits(0, 10), 4.5e9
  square = make_plan(cost, 4096, 4096, True, spec, num_devices=1, band=1, budget_bytes=budget)
  banded = make_plan(cost, 4096, 4096, True, spec, num_devices=1, budget_bytes=budget)
  assert banded.band > 1 and banded.tile >= MIN_BANDED_TILE and banded.bytes_per_device <= budget
  assert banded.flops < square.flops

  def rows_formed(plan):
    steps = jacobian_schedule(plan.tiles(), True, 1, plan.band)
    return sum(plan.tile * (plan.band if s.kind in ("row", "diagonal") else 1) for s in steps)

  assert rows_formed(banded) < 0.75 * rows_formed(square)
  # The largest square tile that fits (585 rows) leaves 292 of its 4th block padding; 4 blocks of
  # 512 form and contract fewer rows.
  balanced = make_plan(cost, 2048, 2048, True, spec, num_devices=1, band=1, budget_bytes=5.1e9)
  largest = make_plan(cost, 2048, 2048, True, spec, num_devices=1, tile=585, budget_bytes=5.1e9)
  assert balanced.tile == 512 and largest.method == "jacobian" and balanced.flops < largest.flops
  # 2,001 rows against 1,000 columns: 4 row blocks of 501 (of 500, a fifth block would hold one row).
  assert make_plan(cost, 2001, 1000, False, spec, num_devices=1, band=1, budget_bytes=5.1e9).tile == 501
  with pytest.raises(KernelPlanError, match="band=0 must be a positive integer"):
    make_plan(cost, 64, 64, True, spec, num_devices=1, band=0, budget_bytes=budget)
  with pytest.raises(KernelPlanError, match="band=2 needs method 'jacobian'"):
    make_plan(cost, 64, 64, True, spec, num_devices=1, band=2, method="ntvp", budget_bytes=budget)


def test_a_band_asked_of_method_auto_is_the_jacobian_methods_or_refused():
  """A full kernel of a wide, cheap model: within 0.5 GB "auto" picks NTK-vector products, which
  keep no band; bands of 2 asked for there do not fit and say so, and with 2 GB they are planned."""
  cost = ModelCost(num_params=10**7, forward_flops=1e8, activation_bytes=1e5, itemsize=4,
                   largest_group=1_250_000)
  spec = parse_logits("full", 10)
  assert make_plan(cost, 256, 256, True, spec, num_devices=1, budget_bytes=5e8).method == "ntvp"
  with pytest.raises(KernelPlanError, match="band 2 but memory_budget_bytes allows.*lower band"):
    make_plan(cost, 256, 256, True, spec, num_devices=1, band=2, budget_bytes=5e8)
  banded = make_plan(cost, 256, 256, True, spec, num_devices=1, band=2, budget_bytes=2e9)
  assert (banded.method, banded.band) == ("jacobian", 2)


def test_planner_rotates_column_rows_when_every_device_holds_its_block():
  cost = RESNET_LIKE_COST
  spec = parse_logits(0, 10)
  ring = make_plan(cost, 4096, 4096, True, spec, num_devices=4, budget_bytes=20e9)
  assert ring.rotate and ring.tile == 1024 and ring.bytes_per_device <= 20e9
  banded = make_plan(cost, 4096, 4096, True, spec, num_devices=4, band=1, budget_bytes=20e9)
  assert not banded.rotate and ring.flops < banded.flops
  assert not make_plan(cost, 4096, 4096, True, spec, num_devices=4, budget_bytes=4.5e9).rotate
  still = make_plan(cost, 4096, 4096, True, spec, num_devices=4, rotate=False, budget_bytes=20e9)
  assert not still.rotate
  # Its transfers weighed: each device sends its 1024 rows of 4 MB twice; at F FLOPs per byte sent
  # that costs 2 * 4.1e9 * F, against the FLOPs per device it saves.
  assert ring.transfer_bytes == 2 * 1024 * 10**6 * 4 and still.transfer_bytes == 0
  saved = still.device_flops - ring.device_flops
  assert make_plan(cost, 4096, 4096, True, spec, num_devices=4, budget_bytes=20e9,
                   flops_per_transfer_byte=0.9 * saved / ring.transfer_bytes).rotate
  assert not make_plan(cost, 4096, 4096, True, spec, num_devices=4, budget_bytes=20e9,
                       flops_per_transfer_byte=1.1 * saved / ring.transfer_bytes).rotate
  with pytest.raises(KernelPlanError, match="rotate=True does not fit: a block of 1024 examples"):
    make_plan(cost, 4096, 4096, True, spec, num_devices=4, rotate=True, budget_bytes=4.5e9)
  with pytest.raises(KernelPlanError, match="tile_size unset or 1024"):
    make_plan(cost, 4096, 4096, True, spec, num_devices=4, rotate=True, tile=512, budget_bytes=20e9)


def test_planner_forms_a_trace_kernel_in_logit_chunks_when_all_logits_do_not_fit():
  """A trace kernel whose Jacobian rows fit one tile two logits at a time but not all ten: formed
  in chunks (every row once, one forward pass more per chunk) rather than tiles; four times the
  examples fit no tile even a logit at a time, and bands of a logit at a time recompute fewer rows
  than bands of all ten."""
  cost = RESNET_LIKE_COST
  spec, budget = parse_logits("trace", 10), 12e9
  chunked = make_plan(cost, 1024, 1024, True, spec, num_devices=1, budget_bytes=budget)
  assert (chunked.tile, chunked.logit_chunk) == (1024, 2) and chunked.bytes_per_device <= budget
  assert chunked.layout() == "method jacobian, tile 1024, 2 logits at a time"
  tiled = make_plan(cost, 1024, 1024, True, spec, num_devices=1, logit_chunk=10, budget_bytes=budget)
  assert tiled.tile < 1024 and tiled.logit_chunk == 10 and chunked.flops < tiled.flops
  banded = make_plan(cost, 4096, 4096, True, spec, num_devices=1, budget_bytes=budget)
  assert banded.band > 1 and banded.logit_chunk == 1 and banded.bytes_per_device <= budget
  unchunked = make_plan(cost, 4096, 4096, True, spec, num_devices=1, logit_chunk=10,
                        budget_bytes=budget)
  assert banded.flops < 0.5 * unchunked.flops
  forced = make_plan(cost, 4096, 4096, False, spec, num_devices=2, tile=128, band=2, logit_chunk=5,
                     budget_bytes=budget)
  assert (forced.tile, forced.band, forced.logit_chunk) == (128, 2, 5)
  for bad, message in ((dict(logit_chunk=3), "a divisor of the 10 logits"),
                       (dict(logit_chunk=2, method="ntvp"), "by the Jacobian method"),
                       (dict(logit_chunk=5, tile=1024), "lower logit_chunk, set method='ntvp'")):
    with pytest.raises(KernelPlanError, match=message):
      make_plan(cost, 1024, 1024, True, spec, num_devices=1, budget_bytes=budget,
                **{"method": "jacobian", **bad})
  with pytest.raises(KernelPlanError, match="needs a trace kernel"):
    make_plan(cost, 1024, 1024, True, parse_logits("full", 10), num_devices=1, logit_chunk=2,
              budget_bytes=budget)


def test_runs_are_chosen_by_work_not_by_steps():
  """23 row blocks in bands of 8 on 4 devices (column blocks per band: 15, 7, 0): runs of 3 and of
  8 column blocks both take 9 steps, but runs of 3 take 3 rounds, each a row step forming 8
  blocks' rows, where runs of 8 take one. A row step weighs its FLOPs in column steps (about 6
  here), so the one round is chosen: 1.7x less work than the tie of steps broken for more rounds."""
  cost = RESNET_LIKE_COST
  plan = make_plan(cost, 23 * 128, 23 * 128, True, parse_logits("trace", 10), num_devices=4, tile=128,
                   band=8, rotate=False, budget_bytes=1e13)
  assert 6 < plan.row_step_weight < 8  # 8 blocks' rows and a diagonal block, against 1 and 8 tiles
  by_work = jacobian_schedule(plan.tiles(), True, 4, 8, plan.row_step_weight)
  by_steps = jacobian_schedule(plan.tiles(), True, 4, 8)
  assert [s.kind for s in by_work] == ["row"] + ["column"] * 8
  assert [s.kind for s in by_steps] == (["row"] + ["column"] * 3) * 2 + ["diagonal"]
  work = lambda steps: sum(plan.row_step_weight if s.kind != "column" else 1 for s in steps)
  assert work(by_steps) / work(by_work) == pytest.approx(1.74, abs=0.01)


@pytest.mark.parametrize("symmetric,num_devices,band,chunk", [
    (True, 1, 1, 10), (True, 3, 2, 10), (True, 4, 1, 2), (True, 8, 2, 1), (False, 3, 2, 5),
    (False, 4, 1, 10)])
def test_cost_model_counts_the_lockstep_steps_of_the_schedule(symmetric, num_devices, band, chunk):
  """FLOPs per device = the schedule the engine runs, walked step by step (every device runs every
  step, idle ones included), each row step charged its diagonal block; the exact count (only row
  steps with a diagonal tile contract one) is at most that. The schedule's runs, chosen weighing a
  row step by its FLOPs, do no more work than runs chosen counting steps alone."""
  F, P, T, C = 1e9, 10**6, 128, 10
  cost = ModelCost(num_params=P, forward_flops=F, activation_bytes=1e5, itemsize=4,
                   largest_group=P // 8)
  plan = make_plan(cost, 1000, 1000 if symmetric else 700, symmetric, parse_logits("trace", C),
                   num_devices=num_devices, tile=T, band=band, logit_chunk=chunk, rotate=False,
                   budget_bytes=1e13)
  rows = lambda n, logits: n * F * (1 + 2 * logits)  # a forward pass and two per logit
  tile = lambda logits: 2 * T * T * P * logits
  pieces = 2 if band * T >= 256 else 1  # symmetric_pieces: pieces of at least 128 rows
  diagonal = band * band * (pieces + 1) / (2 * pieces) * tile(chunk) if symmetric else 0

  def walked(row_step_weight):
    steps = in_logit_chunks(jacobian_schedule(plan.tiles(), symmetric, num_devices, band, row_step_weight),
                            C // chunk)
    charged = exact = 0.0
    for step in steps:
      if step.kind == "row":
        charged += rows(band * T, chunk) + diagonal
        exact += rows(band * T, chunk) + (diagonal if any(step.tiles) else 0)
      elif step.kind == "column":
        charged += rows(T, chunk) + band * tile(chunk)
        exact += rows(T, chunk) + band * tile(chunk)
      else:
        assert step.kind == "diagonal"
        charged += C // chunk * rows(band * T, chunk) + diagonal * C / chunk
        exact += C // chunk * rows(band * T, chunk) + diagonal * C / chunk
    return charged, exact

  charged, exact = walked(plan.row_step_weight)
  assert plan.device_flops == pytest.approx(charged, rel=1e-12)
  assert exact <= plan.device_flops
  assert charged <= walked(1.0)[0]
  if num_devices == 1:
    assert plan.device_flops == pytest.approx(plan.flops, rel=1e-12)
  else:  # lockstep: no device does less than its share
    assert plan.device_flops >= plan.flops / num_devices


def test_cost_model_counts_convolutions_from_the_lowered_program():
  """A 3x3 convolution (8 -> 16 channels, 10x10 input, 8x8 output) is 2*8*8*9*8*16 FLOPs however the backend
  runs it: XLA:GPU's compiled cost analysis counted cuDNN convolutions as 0 and the plan chose ntvp."""
  import flax.linen as nn
  from ntk_scale.ntk.plan import ModelCost
  conv = nn.Conv(16, (3, 3), padding="VALID", use_bias=False)
  params = jax.eval_shape(lambda: conv.init(jax.random.key(0), np.zeros((1, 10, 10, 8), np.float32)))
  cost = ModelCost.measure(lambda p, x: conv.apply(p, x).reshape(len(x), -1), params,
                           jax.ShapeDtypeStruct((10, 10, 8), np.float32))
  expected = 2 * 8 * 8 * 9 * 8 * 16
  assert cost.num_params == 9 * 8 * 16
  assert expected <= cost.forward_flops <= 1.1 * expected


class _Killed(Exception):
  pass


def _store(directory, plan, indices):
  meta = {"shape": [plan.num_rows, plan.num_cols, *plan.logits.tile_suffix], "tile": plan.tile,
          "dtype": "float32", "logits": plan.logits.describe()}
  return KernelStore.create_or_resume(str(directory), meta, ("logits", "shape"), indices,
                                      np.zeros(len(indices), np.int64))


def test_kernel_larger_than_budget_streams_to_disk_and_resumes_after_a_kill(network, tmp_path):
  _, variables, apply_fn = network
  params, x = variables["params"], _images(23)
  reference = reference_kernel(apply_fn, params, x, x, "full")
  # A budget that holds a fraction of the kernel: many tiles, assembled on disk only.
  probe = plan_for(apply_fn, params, x, None, "full", method="jacobian", tile_size=4, band=1)
  budget = probe.bytes_per_device * 1.01
  plan = plan_for(apply_fn, params, x, None, "full", method="jacobian", memory_budget_bytes=budget)
  assert plan.tile == 4 and len(plan.tiles()) == 21
  kernel_bytes = 23 * 23 * NUM_CLASSES ** 2 * 4
  assert plan.tile ** 2 * NUM_CLASSES ** 2 * 4 < kernel_bytes / 20

  indices = np.arange(23)
  store = _store(tmp_path / "k", plan, indices)
  written = []

  def killed_after_five(i, j, tile):
    if len(written) == 5:
      raise _Killed()
    store.write_tile(i, j, tile, mirror=True)
    written.append((i, j))

  with pytest.raises(_Killed):
    run_tiles(apply_fn, params, x, None, plan, killed_after_five)
  resumed = _store(tmp_path / "k", plan, indices)
  assert resumed.done_tiles() == set(written)
  computed = run_tiles(apply_fn, params, x, None, plan,
                       lambda i, j, t: resumed.write_tile(i, j, t, mirror=True),
                       done=resumed.done_tiles())
  assert computed == 21 - 5
  assert resumed.done_tiles() == set(plan.tiles())
  from_disk = KernelStore.open(str(tmp_path / "k")).read()
  assert _relative_error(from_disk, reference) < 1e-5

  uninterrupted = _store(tmp_path / "u", plan, indices)
  run_tiles(apply_fn, params, x, None, plan, lambda i, j, t: uninterrupted.write_tile(i, j, t, True))
  np.testing.assert_array_equal(from_disk, uninterrupted.read())
  # Blocks read back as they are.
  np.testing.assert_array_equal(resumed.read(slice(4, 9), slice(0, 23)), from_disk[4:9])

  with pytest.raises(KernelStoreMismatchError, match="indices"):
    _store(tmp_path / "k", plan, indices[::-1])


@pytest.mark.parametrize("num_blocks,num_devices,symmetric,band", [
    (1, 1, True, 1), (5, 1, True, 1), (5, 4, True, 1), (7, 3, True, 1), (4, 4, False, 1),
    (6, 8, True, 1), (7, 1, True, 3), (7, 3, True, 2), (5, 2, False, 2), (6, 4, True, 4)])
def test_schedule_hands_over_every_tile_once(num_blocks, num_devices, symmetric, band):
  tiles = [(i, j) for i in range(num_blocks) for j in range(i if symmetric else 0, num_blocks)]
  done = set(tiles[1::5])  # a resumed kernel: some tiles already on disk
  todo = [t for t in tiles if t not in done]
  steps = jacobian_schedule(todo, symmetric, num_devices, band)
  handed = [t for s in steps for placed in s.tiles for t, _, _ in placed]
  assert sorted(handed) == sorted(todo)
  resident = [None] * num_devices
  for step in steps:
    assert len(step.blocks) == len(step.tiles) == num_devices
    for d, (block, placed) in enumerate(zip(step.blocks, step.tiles)):
      if step.kind in ("row", "diagonal"):  # the band's own tiles, placed in its diagonal block
        resident[d] = block if step.kind == "row" else None
        for (i, j), (r, c), mirrored in placed:
          assert symmetric and i // band == j // band == block and not mirrored
          assert (r, c) == (i - block * band, j - block * band)
      else:  # a column block against the resident band: one tile per row tile of the band
        assert step.kind == "column"
        for (i, j), (r, c), mirrored in placed:
          assert i // band == resident[d] and j == block and (r, c) == (i % band, 0) and not mirrored
          assert not (symmetric and j < (resident[d] + 1) * band)
  if num_devices == 1:  # one device forms each band once and each column block once per band
    assert sum(s.kind in ("row", "diagonal") for s in steps) == len({i // band for i, _ in todo})
    columns = {(i // band, j) for i, j in todo if not (symmetric and j < (i // band + 1) * band)}
    assert sum(s.kind == "column" for s in steps) == len(columns)
  ntvp = tile_schedule(todo, num_devices)
  assert sorted(t for s in ntvp for placed in s.tiles for t, _, _ in placed) == sorted(todo)
  assert len(ntvp) == -(-len(todo) // num_devices)


@pytest.mark.parametrize("num_devices,symmetric", [(2, True), (3, True), (4, True), (5, True),
                                                   (3, False), (4, False)])
def test_ring_schedule_meets_every_pair_of_blocks_once(num_devices, symmetric):
  tiles = [(i, j) for i in range(num_devices) for j in range(i if symmetric else 0, num_devices)]
  for done in (set(), set(tiles[1::3])):
    todo = [t for t in tiles if t not in done]
    steps = ring_schedule(todo, symmetric, num_devices)
    assert steps[0].kind == "form" and all(s.kind == "rotate" for s in steps[1:])
    assert len(steps) <= (num_devices // 2 + 1 if symmetric else num_devices)
    handed = []
    for shift, step in enumerate(steps):  # device d holds row block d and column block d + shift
      for d, placed in enumerate(step.tiles):
        e = (d + shift) % num_devices
        assert step.kind == "form" or step.blocks[d] == e
        for tile, offset, mirrored in placed:
          assert offset == (0, 0) and tile == ((e, d) if mirrored else (d, e))
          handed.append(tile)
    assert sorted(handed) == sorted(todo)


@pytest.mark.parametrize("symmetric", [True, False])
def test_logit_chunks_run_each_round_once_per_chunk(symmetric):
  """Every tile handed over in chunks 0, 1, 2 (partial sums, the last completes it) or once by a
  diagonal step that sums its chunks itself; column and rotate steps use their own chunk's rows."""
  tiles = [(i, j) for i in range(7) for j in range(i if symmetric else 0, 7)]
  for steps in (jacobian_schedule(tiles, symmetric, 2, 2), ring_schedule(tiles[:9], symmetric, 3)):
    chunked = in_logit_chunks(steps, 3)
    assert in_logit_chunks(steps, 1) == steps
    chunks_of = collections.defaultdict(list)
    for step in chunked:
      if step.kind in ("row", "form", "diagonal"):
        formed = step.chunk
      assert step.chunk == formed and (step.chunk is None) == (step.kind == "diagonal")
      for placed in step.tiles:
        for tile, _, _ in placed:
          chunks_of[tile].append(step.chunk)
    assert sorted(chunks_of) == sorted({t for s in steps for p in s.tiles for t, _, _ in p})
    assert all(c in ([0, 1, 2], [None]) for c in chunks_of.values())
    diagonal = sum(s.kind == "diagonal" for s in steps)
    assert len(chunked) == diagonal + 3 * (len(steps) - diagonal)
  with pytest.raises(ValueError, match="NTK-vector products"):
    in_logit_chunks(tile_schedule(tiles, 2), 2)


@pytest.mark.parametrize("logits", ["trace", "full"])
def test_grouped_and_symmetric_contractions_equal_the_full_product(logits):
  spec = parse_logits(logits, NUM_CLASSES)
  rng = np.random.default_rng(0)
  groups = (rng.normal(size=(12, NUM_CLASSES, 11)), rng.normal(size=(12, NUM_CLASSES, 4)))
  rows = JacobianRows(groups)
  full = contract(rows, rows, spec, jax.lax.Precision.HIGHEST)
  explicit = np.concatenate(groups, axis=-1)
  if logits == "trace":
    np.testing.assert_allclose(full, np.einsum("icp,jcp->ij", explicit, explicit), rtol=1e-6, atol=1e-5)
  else:
    np.testing.assert_allclose(full, np.einsum("icp,jdp->ijcd", explicit, explicit), rtol=1e-6, atol=1e-5)
  for pieces in (2, 3, 4):
    np.testing.assert_allclose(contract_symmetric(rows, spec, jax.lax.Precision.HIGHEST, pieces), full,
                               rtol=1e-6, atol=1e-5)


def test_kernel_matches_neural_tangents(network):
  """An independent implementation: neural-tangents' empirical_ntk_fn (Jacobian contraction)."""
  try:
    nt = load_neural_tangents("the neural-tangents oracle of tests/test_ntk_engine.py")
  except NeuralTangentsUnavailableError as error:
    pytest.skip(str(error))
  _, variables, apply_fn = network
  x1, x2 = _images(6, seed=7), _images(5, seed=8)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    kernel_fn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0,
                                            implementation=nt.NtkImplementation.JACOBIAN_CONTRACTION))
    theirs = np.asarray(kernel_fn(x1.astype(np.float64), x2.astype(np.float64), params))
  ours = empirical_ntk(apply_fn, variables["params"], x1, x2, logits="full", dtype="float64")
  assert _relative_error(ours, theirs) < 1e-10
  trace = empirical_ntk(apply_fn, variables["params"], x1, x2, logits="trace", dtype="float64")
  assert _relative_error(trace, np.einsum("ijcc->ij", theirs)) < 1e-10


# A model of 1,000 parameters (its largest group half of them), 1 MFLOP forward and 100 bytes of
# activations per example: every number below is counted by hand from plan.py's cost model.
HAND_COST = ModelCost(num_params=1000, forward_flops=1e6, activation_bytes=100.0, itemsize=4,
                      largest_group=500)


def test_memory_per_device_counted_by_hand():
  """Bytes per device for a tile of 8 of a trace kernel of 10 logits (g = 1/2): the parameters
  (4,000 B), the Jacobian blocks (10 rows of 1,000 numbers per example), the vmapped reverse passes
  (1 + C' activations per example) and two steps' tiles."""
  spec = parse_logits("trace", 10)
  per_example = 10 * 1000 * 4  # one example's Jacobian rows, in bytes
  # Bands of 4: the band's 32 examples, and a column block of 8 with one group's per-array
  # gradients (1 + g) or the band's own per-array gradients (4 g = 2), whichever holds more.
  assert plan_module.bytes_per_device("jacobian", 8, spec, HAND_COST, band=4) == (
      4000 + (32 + 8 * 2) * per_example + 32 * 11 * 100 + 2 * 32 * 32 * 4)
  # One band without column blocks: its rows and one group's per-array gradients.
  assert plan_module.bytes_per_device("jacobian", 8, spec, HAND_COST, column_blocks=False) == (
      4000 + 8 * 1.5 * per_example + 8 * 11 * 100 + 2 * 8 * 8 * 4)
  # Rotation: the resident block, the block sent and the one received, and one group's gradients.
  assert plan_module.bytes_per_device("jacobian", 8, spec, HAND_COST, rotate=True) == (
      4000 + 8 * 3.5 * per_example + 8 * 11 * 100 + 2 * 8 * 8 * 4)
  # Two logits at a time: a fifth of the rows, 1 + 2 activations per example.
  assert plan_module.bytes_per_device("jacobian", 8, spec, HAND_COST, logit_chunk=2) == (
      4000 + (8 + 8 * 1.5) * per_example / 5 + 8 * 3 * 100 + 2 * 8 * 8 * 4)
  # NTK-vector products: one column example's 10 rows, a primal and 10 tangents over 8 rows; a
  # "full" tile holds C x C numbers per entry.
  assert plan_module.bytes_per_device("ntvp", 8, spec, HAND_COST) == (
      4000 + 10 * 4000 + 8 * 2 * 10 * 100 + 2 * 8 * 8 * 4)
  assert plan_module.bytes_per_device("ntvp", 8, parse_logits("full", 10), HAND_COST) == (
      4000 + 10 * 4000 + 8 * 2 * 10 * 100 + 2 * 8 * 8 * 100 * 4)
  # Refused, the Jacobian method is advised NTK-vector products; "auto" tried them already.
  with pytest.raises(KernelPlanError, match="method='ntvp'"):
    make_plan(HAND_COST, 32, 32, True, spec, num_devices=1, method="jacobian", budget_bytes=1e3)
  with pytest.raises(KernelPlanError, match="allows 9.31e-07 GiB; raise memory_budget_bytes, or use"):
    make_plan(HAND_COST, 32, 32, True, spec, num_devices=1, budget_bytes=1e3)


def test_flops_of_ntvp_and_ring_plans_counted_by_hand():
  """Rows of one example: F (1 + 2 C') = 21 MFLOP; a tile contracted from rows 2 T^2 C' P; an
  NTK-vector-product tile T rows plus 3 F T^2 C'. A symmetric ring of D = 4 blocks contracts each
  device's diagonal tile and D // 2 rotations of D tiles, a cross ring D rotations of D (twice
  the blocks formed); each device sends its block's rows, per chunk of logits, once a rotation."""
  spec, budget = parse_logits("trace", 10), 1e12
  rows, contraction = 21e6, 2 * 8 * 8 * 10 * 1000
  ntvp_tile = 8 * rows + 3 * 1e6 * 8 * 8 * 10
  one = make_plan(HAND_COST, 20, 20, True, spec, num_devices=1, method="ntvp", tile=8,
                  budget_bytes=budget)
  assert one.flops == 6 * ntvp_tile  # 3 row blocks: 6 tiles on and above the diagonal
  four = make_plan(HAND_COST, 20, 20, True, spec, num_devices=4, method="ntvp", tile=8,
                   budget_bytes=budget)
  assert four.device_flops == 2 * ntvp_tile  # 6 tiles over 4 devices: 2 lockstep steps
  # NTK-vector products asked for on several devices: never the (Jacobian) ring.
  ntvp = make_plan(HAND_COST, 32, 32, True, spec, num_devices=4, method="ntvp", budget_bytes=budget)
  assert ntvp.method == "ntvp" and not ntvp.rotate
  # 9 examples on 2 devices: 2 blocks (3 tiles, one for each device at least), of 5.
  assert make_plan(HAND_COST, 9, 9, True, spec, num_devices=2, method="ntvp", budget_bytes=budget).tile == 5
  ring = make_plan(HAND_COST, 32, 32, True, spec, num_devices=4, rotate=True, budget_bytes=budget)
  assert (ring.tile, ring.logit_chunk) == (8, 10)
  assert ring.flops == 4 * (1 + 2) * contraction + 4 * 8 * rows
  assert ring.device_flops == ring.flops / 4
  cross = make_plan(HAND_COST, 32, 32, False, spec, num_devices=4, rotate=True, budget_bytes=budget)
  assert cross.flops == 4 * 4 * contraction + 2 * 4 * 8 * rows
  assert cross.transfer_bytes == 3 * 8 * 10 * 1000 * 4  # D - 1 rotations
  # The ring's own tile may be asked for; two logits at a time send 5 chunks of a fifth each.
  chunked = make_plan(HAND_COST, 32, 32, True, spec, num_devices=4, rotate=True, tile=8,
                      logit_chunk=2, budget_bytes=budget)
  assert chunked.rotate and chunked.transfer_bytes == 5 * 2 * 8 * 2 * 1000 * 4
  full = make_plan(HAND_COST, 16, 16, False, parse_logits("full", 10), num_devices=1,
                   method="jacobian", tile=16, budget_bytes=budget)
  assert full.flops == 2 * 16 * 16 * 10 * 10 * 1000 + 2 * 16 * rows  # C^2 P per pair


def test_model_cost_counts_largest_group_factored_rows_and_a_floor_of_two_flops_per_parameter():
  """The largest parameter group (of 100 and 10), a gather's 0 FLOPs raised to 2 per parameter,
  and a factored layer's reverse pass, which forms no weight gradient, once per logit of a chunk."""
  shapes = {"a": jax.ShapeDtypeStruct((100,), np.float32), "b": jax.ShapeDtypeStruct((10,), np.float32)}
  cost = ModelCost.measure(lambda p, x: p["a"][:3] * x + p["b"][:3], shapes,
                           jax.ShapeDtypeStruct((3,), np.float32))
  assert (cost.num_params, cost.largest_group) == (110, 100)
  embedding = ModelCost.measure(lambda p, t: p["w"][t], {"w": jax.ShapeDtypeStruct((12, 3), np.float32)},
                                jax.ShapeDtypeStruct((), np.int32))
  assert embedding.forward_flops == 2 * 36
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(64, 32)).astype(np.float32), "b1": np.zeros(32, np.float32),
            "w2": rng.normal(size=(32, 3)).astype(np.float32), "b2": np.zeros(3, np.float32)}
  mlp = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  plan = plan_for(mlp, params, rng.normal(size=(8, 64)).astype(np.float32), None, "trace",
                  method="jacobian", tile_size=8, num_devices=1, factored_layers="all")
  spec, plain = parse_logits("trace", 3), dataclasses.replace(plan.cost, factoring="none")
  assert len(plan.factored_layers) == 2
  for chunk in (None, 1):  # all 3 logits at once, or a logit at a time: 3 reverse passes each
    assert (plan_module.rows_flops(spec, plain, chunk) - plan_module.rows_flops(spec, plan.cost, chunk)
            == 3 * 2 * (64 * 32 + 32 * 3))


def test_memory_budget_is_a_fraction_of_the_device_limit_or_of_host_memory_shared():
  """80% of a device's reported limit; for a device that reports none (CPU) half of host memory,
  divided among this host's 4 devices."""
  class Accelerator:
    def memory_stats(self):
      return {"bytes_limit": 10 * 2**30}

  class Host:
    def memory_stats(self):
      return None

  assert plan_module.device_budget_bytes(Accelerator()) == 0.8 * 10 * 2**30
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  assert plan_module.device_budget_bytes(Host()) == 0.5 * host / 4


def test_rows_are_formed_at_the_probe_blocks_rate(monkeypatch):
  """The rate that weighs rotation against recomputing rows: PROBE_EXAMPLES examples' rows per
  call, F (1 + 2 C) FLOPs each, F = 2 * 36 * 3 for a dense layer of 36 inputs and 3 logits."""
  monkeypatch.setattr(engine, "timed", lambda step, state, seconds: (5, 2.0))  # 5 calls in 2 s
  monkeypatch.setattr(engine, "agreed", lambda value: value)
  params = {"w": np.ones((int(np.prod(SHAPE)), NUM_CLASSES), np.float32)}
  apply_fn = lambda p, x: jnp.tanh(x.reshape(len(x), -1) @ p["w"])
  model = engine._model_signature(apply_fn, params, _images(2), None)
  rate = engine._formation_rate(*model, parse_logits("trace", NUM_CLASSES), "highest", "none")
  assert rate == 5 * engine.PROBE_EXAMPLES * (2 * 36 * 3) * (1 + 2 * NUM_CLASSES) / 2.0


def test_schedule_steps_form_no_rows_that_no_tile_needs():
  """A band without column blocks is one "diagonal" step (no rows kept resident); a band whose
  diagonal tiles are done forms its rows without contracting them ("resident"); a resumed ring
  whose last rotation's tiles are done stops rotating before it."""
  assert [s.kind for s in jacobian_schedule([(0, 0), (0, 1), (1, 1)], True, 1, 2)] == ["diagonal"]
  steps = jacobian_schedule([(0, 1)], True, 1)
  assert [(s.kind, program_of(s, True)) for s in steps] == [("row", "resident"), ("column", "column")]
  assert program_of(jacobian_schedule([(0, 0), (0, 1)], True, 1)[0], True) == "row"
  tiles = [(i, j) for i in range(4) for j in range(i, 4)]
  halfway = {(0, 2), (1, 3)}  # met at distance 2, the last rotation of 4 devices
  steps = ring_schedule([t for t in tiles if t not in halfway], True, 4)
  assert [s.kind for s in steps] == ["form", "rotate"]
  assert ring_schedule([(0, 2)], True, 4)[-1].tiles == ((((0, 2), (0, 0), False),), (), (), ())
  # Band 1's 2 column blocks on 2 devices: in runs of 1 or of 2 the same 3 steps; the tie goes to
  # the shorter runs (2 rounds: [1, 0] column steps), not one round of 2.
  assert round_lengths([0, 2], 2) == [1, 0]


def test_parameter_groups_cut_between_whole_arrays_near_equal_sizes():
  """Four arrays of 3 in 2 groups: 6 and 6 (a cut at 6 would make a group exceed 6, not reach it)."""
  assert parameter_groups([np.zeros(3)] * 4, 2) == (0, 6, 12)
  assert parameter_groups({"a": np.zeros((2, 5)), "b": np.zeros(1), "c": np.zeros(4)}, 2) == (0, 10, 15)


def test_memory_per_device_counts_an_output_in_a_donated_argument_once():
  class Compiled:
    def memory_analysis(self):
      return types.SimpleNamespace(argument_size_in_bytes=1000, output_size_in_bytes=300,
                                   temp_size_in_bytes=50, alias_size_in_bytes=200)

  class NoAnalysis:
    def memory_analysis(self):
      return None

  assert memory_per_device(Compiled()) == 1000 + 300 + 50 - 200
  assert memory_per_device(NoAnalysis()) is None


def test_compiled_memory_is_the_neediest_program_plus_the_previous_steps_tiles(network, monkeypatch):
  """XLA's count of each program (made up here: a different number for each), the largest, plus
  the previous step's tiles still on the device: a band of 3 tiles of 2, C x C float64 numbers per
  entry of a "full" kernel (the bands test's programs)."""
  _, variables, apply_fn = network
  needs = []

  def made_up(compiled):
    needs.append(1000.0 * (1 + len(needs) % 2) + len(needs))
    return needs[-1]

  monkeypatch.setattr(compiled_memory_module, "memory_per_device", made_up)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    x = _images(7).astype(np.float64)
    plan = plan_for(apply_fn, params, x, None, "full", method="jacobian", tile_size=2, band=3)
    measured = compiled_memory_module.compiled_memory(
        plan, apply_fn, params, jax.ShapeDtypeStruct(x.shape[1:], x.dtype), mesh=parallel.make_mesh(),
        precision="highest")
  assert len(needs) >= 2
  assert measured.bytes_per_device == max(needs) + (3 * 2) ** 2 * NUM_CLASSES ** 2 * 8


def test_empirical_ntk_runs_its_tiles_at_highest_precision_by_default(monkeypatch):
  """The design's default: float32 accumulated with HIGHEST matmul precision."""
  params = {"w": np.ones((int(np.prod(SHAPE)), NUM_CLASSES), np.float32)}
  apply_fn = lambda p, x: jnp.tanh(x.reshape(len(x), -1) @ p["w"])
  asked = []
  monkeypatch.setattr(engine, "fit_plan", lambda *args, precision, **kwargs: asked.append(precision)
                      or plan_for(*args, **{k: v for k, v in kwargs.items() if k != "mesh"}))
  monkeypatch.setattr(engine, "run_tiles", lambda *args, precision, **kwargs: asked.append(precision))
  empirical_ntk(apply_fn, params, _images(3))
  assert asked == ["highest", "highest"]


def test_a_plan_for_more_memory_is_kept_only_when_it_needs_fewer_flops(monkeypatch):
  """XLA counts half of the model's estimate: a plan for the budget scaled by budget / XLA's count,
  less a 5% margin, is tried, and kept only if it needs fewer FLOPs per device; here it needs
  more (tiles of 8 against the kernel in one tile), so the first plan stands, XLA's count its
  memory."""
  spec = parse_logits("trace", 10)
  whole, tiled = (make_plan(HAND_COST, 32, 32, True, spec, num_devices=1, tile=tile, budget_bytes=1e9)
                  for tile in (32, 8))
  assert tiled.device_flops > whole.device_flops
  asked = []

  def planned(*args, memory_budget_bytes, **kwargs):
    asked.append(memory_budget_bytes)
    return whole if len(asked) == 1 else tiled

  monkeypatch.setattr(engine, "plan_for", planned)
  monkeypatch.setattr(engine, "compiled_memory", lambda plan, *args, **kwargs: engine.CompiledMemory(
      plan.bytes_per_device / 2, "diagonal"))
  one = Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
  fitted = fit_plan(lambda p, x: x, {}, np.zeros((32, 1), np.float32), None, "trace", mesh=one,
                    memory_budget_bytes=1e9)
  assert asked == [1e9, pytest.approx(0.95 * 2 * 1e9)]
  assert (fitted.tile, fitted.memory_compiled) == (32, True)
  assert fitted.bytes_per_device == whole.bytes_per_device / 2
