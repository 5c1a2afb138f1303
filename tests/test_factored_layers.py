"""Kernels with layers formed from the Grams of their inputs and output cotangents equal the
explicit float64 Jacobian contraction, across convolution strides, padding, dilation, layouts and
dense layers over several positions; the engine runs them on 4 devices as on 1; auto chooses by
hand-counted multiply-adds; the plan counts them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh

from ntk_scale import parallel
from ntk_scale.ntk import empirical_ntk, plan_for
from ntk_scale.ntk.factored_layers import FactoredLayer, choose
from ntk_scale.ntk.plan import rows_flops
from ntk_scale.ntk.tile_math import contract, factored_layers_of, jacobian_rows, parse_logits
from test_kernel_regression import all_highest
from test_ntk_engine import _kernel_on

NUM_CLASSES = 3


def _model(p, x):
  """Every kind of layer factoring handles: a strided, dilated, unevenly padded convolution (NHWC,
  HWIO), one with other layouts (OIHW kernel, NCHW output), a dense layer applied at 20 positions
  and a dense head; plus biases, which stay ordinary rows."""
  h = lax.conv_general_dilated(x, p["w1"], (2, 1), ((1, 2), (0, 1)), rhs_dilation=(1, 2),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jnp.tanh(h + p["b1"])
  h = lax.conv_general_dilated(h, p["w2"], (1, 1), "SAME",
                               dimension_numbers=("NHWC", "OIHW", "NCHW"))
  h = jnp.tanh(h).reshape(h.shape[0], h.shape[1], -1)  # [N, C, positions]
  h = jnp.tanh(jnp.einsum("ncs,cd->nsd", h, p["w3"])).mean(1)
  return h @ p["w4"] + p["b4"]


def _params(dtype=np.float64):
  rng = np.random.default_rng(0)
  shapes = {"w1": (3, 2, 3, 5), "b1": (5,), "w2": (4, 5, 3, 3), "w3": (4, 6), "w4": (6, 3),
            "b4": (3,)}
  return {k: (rng.normal(size=s) / np.sqrt(np.prod(s[:-1]) or 1)).astype(dtype)
          for k, s in shapes.items()}


def _images(n, seed=1):
  return np.random.default_rng(seed).normal(size=(n, 7, 6, 3))


@functools.lru_cache(maxsize=None)
def _whole_jacobian(n, seed):
  """[n, C, P]: the float64 per-example Jacobians of _images(n, seed), jitted, once per test file."""
  with jax.enable_x64(True):
    jac = jax.jit(jax.vmap(jax.jacrev(lambda p, e: _model(p, e[None])[0]), (None, 0)))(
        _params(), _images(n, seed))
    return np.concatenate([np.asarray(a).reshape(n, NUM_CLASSES, -1)
                           for a in jax.tree.leaves(jac)], -1)


def _reference(images1, images2, logits):
  """J(x1) J(x2)^T from whole per-example jax.jacrev Jacobians, in float64; images as (n, seed)."""
  full = np.einsum("icp,jdp->ijcd", _whole_jacobian(*images1), _whole_jacobian(*images2))
  return np.einsum("ijcc->ij", full) if logits == "trace" else full[:, :, logits, logits]


def _relative_error(a, b):
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("logits", ["trace", 1])
def test_factored_rows_contract_to_the_float64_jacobian_kernel(logits):
  spec = parse_logits(logits, NUM_CLASSES)
  x1, x2 = _images(5), _images(4, seed=2)
  with jax.enable_x64(True):
    params = _params()
    layers = factored_layers_of(_model, params, x1[:1], spec, "all")
    # Both convolutions, the dense layer at 20 positions and the head; every weight factored.
    assert [(layer.in_positions, layer.out_positions) for layer in layers] == [
        ((1, 7, 6), (1, 4, 5)), ((1, 4, 5), (1, 4, 5)), ((1, 20), (1, 20)), ((1,), (1,))]
    form = jax.jit(lambda x: jacobian_rows(_model, params, x, spec, factoring="all"))
    rows, cols = form(x1), form(x2)
    assert sum(g.shape[-1] for g in rows.groups) == 5 + 3  # the biases alone stay rows
    kernel = np.asarray(jax.jit(contract, static_argnums=(2, 3))(rows, cols, spec,
                                                                 lax.Precision.HIGHEST))
  assert _relative_error(kernel, _reference((5, 1), (4, 2), logits)) < 1e-10


def test_factored_layers_are_contracted_at_the_tiles_precision():
  """Every matmul of a tile's contraction, the factored layers' input and cotangent Grams
  included, runs at the precision the kernel asks for: HIGHEST, where a GPU's default (TF32) or a
  TPU's (bfloat16 passes) rounds each Gram to 1e-3. Read from the traced program (on this CPU it
  changes nothing)."""
  spec = parse_logits("trace", NUM_CLASSES)
  params, x = _params(np.float32), _images(3).astype(np.float32)
  rows = jax.jit(lambda x: jacobian_rows(_model, params, x, spec, factoring="all"))(x)
  assert len(factored_layers_of(_model, params, x[:1], spec, "all")) == 4
  assert all_highest(lambda r, c: contract(r, c, spec, lax.Precision.HIGHEST), rows, rows)


@pytest.mark.parametrize("logits", ["trace", 0])
def test_engine_with_factored_layers_on_four_devices_equals_one_and_the_reference(logits):
  """Tiles of 2 over 4 devices (padded edges, diagonal pieces; a trace a logit at a time), and
  the rows rotating over the ring of 4 devices (factors sent between devices) against 1 device."""
  params, x = _params(), _images(7)
  reference = _reference((7, 1), (7, 1), logits)
  k64 = empirical_ntk(_model, params, x, logits=logits, method="jacobian", tile_size=2,
                      factored_layers="all", dtype="float64",
                      logit_chunk=1 if logits == "trace" else None)
  assert _relative_error(k64, reference) < 1e-10
  assert jax.device_count() == 4
  params32, x32 = _params(np.float32), x.astype(np.float32)
  k4, plan, _ = _kernel_on(parallel.make_mesh(), _model, params32, x32, logits=logits,
                          factored_layers="all", rotate=True)
  assert plan.rotate and "4 layers factored" in plan.describe()
  one = Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
  k1, _, _ = _kernel_on(one, _model, params32, x32, logits=logits, factored_layers="all")
  np.testing.assert_allclose(k4, k1, rtol=1e-6, atol=1e-6 * np.abs(k1).max())
  assert _relative_error(k4, reference) < 1e-5


def _conv(cin, cout, size, stride=1, kernel=3):
  """A convolution on size x size maps (SAME padding) as find_layers describes it."""
  out = -(-size // stride)
  pad = max((out - 1) * stride + kernel - size, 0) // 2
  return FactoredLayer(equation=0, leaf=0, in_channels=cin, out_channels=cout,
                       in_positions=(1, size, size), out_positions=(1, out, out),
                       filter_shape=(1, kernel, kernel), strides=(1, stride, stride),
                       low_padding=(0, pad, pad), dilation=(1, 1, 1),
                       input_permutation=(3, 0, 1, 2), output_permutation=(3, 0, 1, 2),
                       permuted_output_shape=(cout, 1, out, out))


def test_auto_factors_where_it_saves_multiply_adds():
  last_stage = _conv(512, 512, 4)  # ResNet-18's 512-channel convolutions on 4x4 maps
  # Per pair of examples: inputs 16^2 * 512 + cotangents 16^2 * 512 + combination 16^2 * 9,
  # against 9 * 512 * 512 for the weight gradients: 9x fewer.
  assert last_stage.pair_macs(1) == 16 ** 2 * 512 + 16 ** 2 * (512 + 9) == 264_448
  assert last_stage.num_params == 2_359_296
  assert last_stage.row_numbers(10) == 16 * 512 + 10 * 16 * 512
  first_stage = _conv(64, 64, 32)  # 1024 positions: 36,864 parameters, 143 million factored
  downsample = _conv(256, 512, 8, stride=2)  # break-even per logit, 5x fewer traced
  dense = _dense(1024, 1024)
  layers = (last_stage, first_stage, downsample, dense)
  assert choose(layers, 1, "class", "auto") == (last_stage, dense)
  assert choose(layers, 10, "trace", "auto") == (last_stage, downsample, dense)
  assert choose(layers, 10, "full", "auto") == choose(layers, 10, "trace", "none") == ()
  assert choose(layers, 1, "class", "all") == layers
  with pytest.raises(ValueError, match="factored_layers='some'"):
    choose(layers, 1, "class", "some")


def _dense(cin, cout):
  return FactoredLayer(equation=0, leaf=0, in_channels=cin, out_channels=cout, in_positions=(1,),
                       out_positions=(1,), filter_shape=(1,), strides=(1,), low_padding=(0,),
                       dilation=(1,), input_permutation=(1, 0), output_permutation=(1, 0),
                       permuted_output_shape=(cout, 1))


def test_plan_counts_factored_rows_and_multiply_adds():
  """A 2-layer MLP (64 -> 32 -> 3, biases): per logit auto factors both weights; multiply-adds
  per pair of examples and numbers per example hand-counted; the kernel that of plain rows."""
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(64, 32)).astype(np.float32), "b1": np.zeros(32, np.float32),
            "w2": rng.normal(size=(32, 3)).astype(np.float32), "b2": np.zeros(3, np.float32)}
  mlp = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  x = rng.normal(size=(50, 64)).astype(np.float32)
  factored = plan_for(mlp, params, x, None, 0, method="jacobian", tile_size=50, num_devices=1)
  plain = plan_for(mlp, params, x, None, 0, method="jacobian", tile_size=50, num_devices=1,
                   factored_layers="none")
  spec = parse_logits(0, 3)
  # Biases 35; w1: inputs 64, cotangents 32, combination 1; w2: inputs 32, cotangents 3, 1.
  assert factored.cost.pair_macs(spec) == 35 + (64 + 32 + 1) + (32 + 3 + 1)
  assert plain.cost.pair_macs(spec) == 64 * 32 + 32 + 32 * 3 + 3
  assert factored.cost.row_numbers(spec, 1) == 35 + (64 + 32) + (32 + 3)
  # Its reverse pass forms no weight gradient: one matmul per factored layer less.
  assert rows_flops(spec, plain.cost) - rows_flops(spec, factored.cost) == 2 * (64 * 32 + 32 * 3)
  assert factored.flops < plain.flops and "2 layers factored (2,144 parameters)" in factored.describe()
  kernel = empirical_ntk(mlp, params, x, logits=0)
  reference = empirical_ntk(mlp, params, x, logits=0, factored_layers="none")
  np.testing.assert_allclose(kernel, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def _unfactorable_model(p, x):
  """Weights factoring must leave as rows beside ones it must factor: a stride-2 convolution on a
  2 x 2 map whose last filter row and column read only padding (ResNet's last downsampling on a
  small image); per-position weights (a locally connected layer: a matmul batched over
  positions); and a weight used twice (tied), whose gradient sums over both uses."""
  n = x.shape[0]
  a = lax.conv_general_dilated(x, p["conv"], (2, 2), ((0, 1), (0, 1)),
                               dimension_numbers=("NHWC", "HWIO", "NHWC")).reshape(n, 4)
  b = jnp.matmul(x.reshape(n, 4, 3).transpose(1, 0, 2), p["local"])  # [positions, n, 2]
  b = b.transpose(1, 0, 2).reshape(n, 8)
  h = jnp.tanh(jnp.concatenate([a, b], -1))
  h = jnp.tanh(h @ p["tied"]) @ p["tied"]
  return jnp.tanh(h) @ p["head"]


def test_tied_and_per_position_weights_stay_rows_and_padding_only_filter_offsets_add_nothing():
  """Against the float64 jax.jacrev Jacobian contraction: factoring "all" takes the convolution
  and the head, and leaves the per-position and the tied weights as rows (factored, the first has
  no single weight gradient per example and position, the second would drop the cross terms of
  its two uses)."""
  rng = np.random.default_rng(3)
  shapes = {"conv": (3, 3, 3, 4), "local": (4, 3, 2), "tied": (12, 12), "head": (12, NUM_CLASSES)}
  x = rng.normal(size=(6, 2, 2, 3))
  spec = parse_logits("trace", NUM_CLASSES)
  with jax.enable_x64(True):
    params = {k: rng.normal(size=s) / np.sqrt(np.prod(s[:-1])) for k, s in shapes.items()}
    layers = factored_layers_of(_unfactorable_model, params, x[:1], spec, "all")
    assert [(layer.in_positions, layer.out_positions) for layer in layers] == [
        ((1, 2, 2), (1, 1, 1)), ((1,), (1,))]
    form = jax.jit(lambda x: jacobian_rows(_unfactorable_model, params, x, spec, factoring="all"))
    kernel = np.asarray(contract(form(x[:3]), form(x[3:]), spec, lax.Precision.HIGHEST))
    jacobian = jax.jit(jax.vmap(jax.jacrev(lambda p, e: _unfactorable_model(p, e[None])[0]),
                                (None, 0)))(params, x)
    jacobian = np.concatenate([np.asarray(a).reshape(6, NUM_CLASSES, -1)
                               for a in jax.tree.leaves(jacobian)], -1)
    reference = np.einsum("icp,jcp->ij", jacobian[:3], jacobian[3:])
  assert _relative_error(kernel, reference) < 1e-10


def test_auto_asks_the_factored_count_to_win_by_the_elementwise_overhead():
  """A 96-channel 3x3 convolution on 4x4 maps: 51,456 factored multiply-adds per pair against
  82,944 for its weight gradients, fewer but not half: not factored (the combination step is
  elementwise, slower per multiply-add); at 128 channels (67,840 against 147,456) it is.
  A tile holds, per pair of examples, both Grams and their product: 16^2 + 2 * 16^2 numbers."""
  narrow, wide = _conv(96, 96, 4), _conv(128, 128, 4)
  assert narrow.pair_macs(1) == 16 ** 2 * 96 + 16 ** 2 * (96 + 9) == 51_456
  assert narrow.num_params == 82_944
  assert wide.pair_macs(1) == 67_840 and wide.num_params == 147_456
  assert choose((narrow, wide), 1, "class", "auto") == (wide,)
  assert narrow.pair_workspace() == 16 ** 2 + 2 * 16 ** 2
  assert _conv(256, 512, 8, stride=2).pair_workspace() == 64 ** 2 + 2 * 16 ** 2
