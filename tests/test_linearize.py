"""The linearized models of phase 2 checked against Taylor's theorem, finite differences and the trainer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntk_scale import attacks, parallel
from ntk_scale.base_config import base_config
from ntk_scale.cost_analysis import all_equations
from ntk_scale.linearize import LinearizedModel, output_components
from ntk_scale.models import build_model
from ntk_scale.train.state import create_train_state, logits_fn
from ntk_scale.train.steps import cross_entropy, make_train_step
from random_variables import random_variables
from test_kernel_regression import all_highest

SHAPE = (8, 8, 1)


def _model(name, width, depth=2, batch_norm=True):
  c = base_config()
  c.model.name, c.model.width, c.model.depth, c.model.batch_norm = name, width, depth, batch_norm
  return build_model(c.model, 10)


def _init(model, seed=0, dtype=np.float32):
  return random_variables(model, SHAPE, seed, dtype)


def _images(n=8, seed=1, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, *SHAPE)).astype(dtype))


def _direction(params, seed=2, scale=0.1):
  """A random parameter-space direction, `scale` times each leaf's own RMS (in numpy: no compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) * scale * (np.sqrt(np.mean(np.square(
          np.asarray(p, np.float64)))) + 0.1), p.dtype), params)


def _axpy(t, d, params):
  return jax.tree.map(lambda p, v: p + t * v, params, d)


class _Affine(nn.Module):
  """A lone Dense layer with the `train` argument of the project's models."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


MODELS = {"mlp": lambda: _model("mlp", 16), "cnn": lambda: _model("cnn", 4)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_at_theta0_linear_is_the_network_and_centered_forms_vanish(name):
  model = MODELS[name]()
  variables, x = _init(model), _images()
  # Each form jitted: one compile, not one per operation.
  expected = jax.jit(lambda x: model.apply(variables, x, train=False))(x)
  for kind in ("linear", "centered", "centered_nonlinear"):
    lin = LinearizedModel(model, variables["params"], variables["batch_stats"], kind=kind)
    start = lin.init(jax.random.key(0), x)
    out = jax.jit(lambda start, x: lin.apply(start, x, train=False))(start, x)
    if kind == "linear":
      np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    else:
      np.testing.assert_array_equal(out, np.zeros_like(expected))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_linearization_error_is_quadratic_in_the_step(name):
  """f(theta0 + t d) - f_lin(theta0 + t d) = O(t^2): halving t divides the gap by ~4.

  The steps are small enough that no ReLU or max-pool switches (a switch adds an O(t) term: the
  CNN's first one is near t = 5e-4 for these seeds).
  """
  with jax.enable_x64(True):
    model = MODELS[name]()
    variables, x = _init(model, dtype=np.float64), _images(dtype=np.float64)
    lin = LinearizedModel(model, variables["params"], variables["batch_stats"])
    d = _direction(variables["params"])

    @jax.jit
    def gap(t):
      theta = {"params": _axpy(t, d, variables["params"]), "batch_stats": variables["batch_stats"]}
      return jnp.max(jnp.abs(model.apply(theta, x, train=False) - lin.apply(theta, x, train=False)))

    gaps = [float(gap(t)) for t in (1e-4, 5e-5, 2.5e-5)]
  assert gaps[-1] > 1e-12  # well above float64 rounding of O(1) logits
  for big, small in zip(gaps, gaps[1:]):
    assert 3.5 < big / small < 4.5, gaps


@pytest.mark.parametrize("linear_model", ["dense", "mlp_depth0"])
def test_linearization_is_exact_for_a_model_linear_in_its_parameters(linear_model):
  with jax.enable_x64(True):
    x = _images(dtype=np.float64)
    model = _Affine() if linear_model == "dense" else _model("mlp", 16, depth=0, batch_norm=False)
    variables = _init(model, dtype=np.float64)
    lin = LinearizedModel(model, variables["params"], variables["batch_stats"])
    theta = {"params": _axpy(3.0, _direction(variables["params"], scale=1.0), variables["params"])}
    np.testing.assert_allclose(lin.apply(theta, x, train=False), model.apply(theta, x, train=False),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_centered_forms(name):
  with jax.enable_x64(True):
    model = MODELS[name]()
    variables, x = _init(model, dtype=np.float64), _images(dtype=np.float64)
    p0, bs = variables["params"], variables["batch_stats"]
    theta = {"params": _axpy(1.0, _direction(p0, scale=0.3), p0), "batch_stats": bs}
    make = lambda kind: LinearizedModel(model, p0, bs, kind=kind)
    f = lambda v, x: model.apply(v, x, train=False)

    @jax.jit  # one program: one compile, not one per operation
    def outputs(variables, theta, x):
      return dict(f0=f(variables, x), f=f(theta, x), linear=make("linear").apply(theta, x, train=False),
                  components=output_components(make("linear"), theta["params"], x),
                  nonlinear_components=output_components(make("centered_nonlinear"),
                                                         theta["params"], x),
                  **{kind: make(kind).apply(theta, x, train=False)
                     for kind in ("centered", "centered_nonlinear")})

    out = outputs(variables, theta, x)
    linear, components = out["linear"], out["components"]
    np.testing.assert_allclose(components["f0"], out["f0"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(components["f0"] + components["jvp"], linear, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["centered"], linear - out["f0"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["centered_nonlinear"], out["f"] - out["f0"], rtol=1e-12, atol=1e-12)
    # centered_nonlinear's components also hold its output, which jvp (its first-order term) is not
    nonlinear = out["nonlinear_components"]
    assert set(components) == {"f0", "jvp"} and set(nonlinear) == {"f0", "jvp", "output"}
    np.testing.assert_allclose(nonlinear["output"], out["f"] - out["f0"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(nonlinear["jvp"], components["jvp"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "centered"])
def test_gradients_match_finite_differences(kind):
  """Parameter gradients (training) and input gradients (attacks) of the linearized loss."""
  with jax.enable_x64(True):
    model = MODELS["cnn"]()
    variables, x = _init(model, dtype=np.float64), _images(dtype=np.float64)
    labels = jnp.asarray(np.random.default_rng(3).integers(0, 10, size=len(x)))
    lin = LinearizedModel(model, variables["params"], variables["batch_stats"], kind=kind)
    theta = _axpy(1.0, _direction(variables["params"], scale=0.3), variables["params"])
    bs = variables["batch_stats"]
    loss_and_grads = jax.jit(jax.value_and_grad(lambda p, x: cross_entropy(
        lin.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])[0], labels),
        argnums=(0, 1)))  # one program: the differences below take its values only
    loss = lambda p, x: loss_and_grads(p, x)[0]
    grad_p, grad_x = loss_and_grads(theta, x)[1]

    d = _direction(theta, seed=4, scale=1.0)
    h = 1e-4
    fd = (loss(_axpy(h, d, theta), x) - loss(_axpy(-h, d, theta), x)) / (2 * h)
    analytic = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grad_p), jax.tree.leaves(d)))
    assert abs(fd - analytic) < 1e-6 * abs(analytic), (fd, analytic)

    # ReLU kinks make the loss piecewise smooth in x: a smaller step stays within one piece.
    dx = jnp.asarray(np.random.default_rng(5).normal(size=x.shape))
    h = 1e-6
    fd = (loss(theta, x + h * dx) - loss(theta, x - h * dx)) / (2 * h)
    analytic = jnp.vdot(grad_x, dx)
    assert abs(fd - analytic) < 1e-6 * abs(analytic), (fd, analytic)


def _others_replaced(x):
  """`x` with every example but the first replaced."""
  return x.at[1:].set(_images(len(x) - 1, seed=9, dtype=x.dtype))


def test_frozen_batch_norm_ignores_the_batch_and_keeps_the_statistics():
  model = MODELS["mlp"]()
  variables, x = _init(model), _images()
  lin = LinearizedModel(model, variables["params"], variables["batch_stats"])
  theta = {"params": _axpy(1.0, _direction(variables["params"]), variables["params"]),
           "batch_stats": variables["batch_stats"]}
  train = jax.jit(lambda theta, x: lin.apply(theta, x, train=True, mutable=["batch_stats"]))  # one compile
  out, updates = train(theta, x)
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
  out_other, _ = train(theta, _others_replaced(x))
  np.testing.assert_allclose(out_other[0], out[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda theta, x: lin.apply(theta, x, train=False))(theta, x), out,
                             rtol=1e-6, atol=1e-6)
  # The statistics kept are those given (a train state's), not batch_stats0 (the same above).
  moved = jax.tree.map(lambda a: a * 2.0 + 0.5, variables["batch_stats"])
  out_moved, updates = train({**theta, "batch_stats": moved}, x)
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], moved)
  # ... yet it normalises with batch_stats0's, whatever statistics the state holds.
  np.testing.assert_allclose(out_moved, out, rtol=1e-6, atol=1e-6)


def test_output_components_of_frozen_batch_norm_ignore_the_statistics_given():
  """Frozen BatchNorm is theta0's: f0 and the jvp evaluation records use batch_stats0 whatever
  running averages are passed (they were used when given); loose uses those given."""
  model = MODELS["mlp"]()
  variables, x = _init(model), _images()
  p0, bs0 = variables["params"], variables["batch_stats"]
  moved = jax.tree.map(lambda a: a * 2.0 + 0.5, bs0)  # means shifted, variances doubled and more
  params = _axpy(1.0, _direction(p0), p0)
  network = jax.jit(lambda stats, x: model.apply({"params": p0, "batch_stats": stats}, x,
                                                 train=False))
  frozen = LinearizedModel(model, p0, bs0)
  assert frozen.batch_norm == "frozen"
  given, default = (output_components(frozen, params, x, stats) for stats in (moved, None))
  np.testing.assert_allclose(given["f0"], network(bs0, x), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(given["jvp"], default["jvp"])
  assert np.abs(network(moved, x) - network(bs0, x)).max() > 1e-2  # the statistics matter
  loose = output_components(LinearizedModel(model, p0, bs0, kind="centered_nonlinear", batch_norm="loose"),
                            params, x, moved)
  np.testing.assert_allclose(loose["f0"], network(moved, x), rtol=1e-5, atol=1e-6)
  # centered_nonlinear's own output on those statistics too
  moved_network = model.apply({"params": params, "batch_stats": moved}, x, train=False)
  np.testing.assert_allclose(loose["output"], moved_network - network(moved, x), rtol=1e-5, atol=1e-5)


def test_loose_batch_norm_uses_the_batch_and_updates_the_statistics():
  model = MODELS["mlp"]()
  variables, x = _init(model), _images()
  lin = LinearizedModel(model, variables["params"], variables["batch_stats"], batch_norm="loose")
  theta = {"params": _axpy(1.0, _direction(variables["params"]), variables["params"]),
           "batch_stats": variables["batch_stats"]}
  train = jax.jit(lambda theta, x: lin.apply(theta, x, train=True, mutable=["batch_stats"]))  # one compile
  out, updates = train(theta, x)
  out_other, _ = train(theta, _others_replaced(x))
  assert np.abs(out_other[0] - out[0]).max() > 1e-3
  changed = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), updates["batch_stats"],
                         variables["batch_stats"])
  assert min(jax.tree.leaves(changed)) > 1e-4
  # Inference mode uses the running averages it is given.
  moved = {"params": theta["params"], "batch_stats": updates["batch_stats"]}
  infer = jax.jit(lambda theta, x: lin.apply(theta, x, train=False))
  assert np.abs(infer(moved, x) - infer(theta, x)).max() > 1e-4


@pytest.mark.parametrize("kind,batch_norm", [("linear", "frozen"), ("centered", "loose")])
def test_trains_and_is_attacked_like_a_flax_model(kind, batch_norm):
  model = MODELS["mlp"]()
  variables = _init(model)
  lin = LinearizedModel(model, variables["params"], variables["batch_stats"], kind=kind,
                        batch_norm=batch_norm)
  mesh = parallel.make_mesh()
  state = create_train_state(lin, optax.sgd(0.1), SHAPE, seed=0, mesh=mesh)
  start = jax.tree.map(np.asarray, state.params)
  jax.tree.map(np.testing.assert_array_equal, start, variables["params"])
  rng = np.random.default_rng(6)
  data = {"images": rng.uniform(size=(16, *SHAPE)).astype(np.float32),
          "labels": rng.integers(0, 10, size=16).astype(np.int32)}
  batch = parallel.global_batch(mesh, data, np.arange(16))
  step = make_train_step("none", seed=0)
  losses = []
  for _ in range(4):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0], losses
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, start)
  assert max(jax.tree.leaves(moved)) > 1e-4
  stats_moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                             state.batch_stats, variables["batch_stats"])
  assert (max(jax.tree.leaves(stats_moved)) > 0) == (batch_norm == "loose")
  # theta0 survives the donated train steps.
  jax.tree.map(np.testing.assert_array_equal, lin.params0, variables["params"])

  eps = 0.1
  attack = jax.jit(lambda state, batch, key: attacks.pgd(
      logits_fn(state), batch["images"], batch["labels"], key, eps=eps, step_size=eps / 4,
      num_steps=5))
  x_adv = attack(state, batch, jax.random.key(7))
  assert np.abs(np.asarray(x_adv) - data["images"]).max() <= eps + 1e-6
  clean = cross_entropy(logits_fn(state)(batch["images"]), batch["labels"])
  assert cross_entropy(logits_fn(state)(x_adv), batch["labels"]) > clean


def test_invalid_settings_name_the_config_field():
  model = MODELS["mlp"]()
  variables = _init(model)
  with pytest.raises(ValueError, match=r"config\.phase2\.linearization"):
    LinearizedModel(model, variables["params"], variables["batch_stats"], kind="quadratic")
  with pytest.raises(ValueError, match=r"config\.phase2\.batch_norm"):
    LinearizedModel(model, variables["params"], variables["batch_stats"], batch_norm="free")


@pytest.mark.parametrize("batch_norm", ["frozen", "loose"])
@pytest.mark.parametrize("kind", ["linear", "centered", "centered_nonlinear"])
def test_gradient_at_theta0_is_the_networks_jacobian_transposed(kind, batch_norm):
  """d/dtheta <w, g(x; theta)> at theta0 is J(x; theta0)^T w for all three forms: checked against
  central differences of the network itself along a random direction. Training mode: frozen
  BatchNorm is the network in inference mode on batch_stats0, loose the network on the batch's
  statistics (through which J then differentiates)."""
  with jax.enable_x64(True):
    model = MODELS["cnn"]()
    variables, x = _init(model, dtype=np.float64), _images(dtype=np.float64)
    p0, bs = variables["params"], variables["batch_stats"]
    lin = LinearizedModel(model, p0, bs, kind=kind, batch_norm=batch_norm)
    w = jnp.asarray(np.random.default_rng(7).normal(size=(len(x), 10)))
    network_train = batch_norm == "loose"
    network = jax.jit(lambda p: jnp.vdot(w, model.apply(
        {"params": p, "batch_stats": bs}, x, train=network_train, mutable=["batch_stats"])[0]))
    linearized = lambda p: jnp.vdot(w, lin.apply({"params": p, "batch_stats": bs}, x, train=True,
                                                 mutable=["batch_stats"])[0])
    grad = jax.jit(jax.grad(linearized))(p0)
    for seed in (4, 5):
      d = _direction(p0, seed=seed, scale=1.0)
      h = 1e-6
      fd = (network(_axpy(h, d, p0)) - network(_axpy(-h, d, p0))) / (2 * h)
      analytic = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grad), jax.tree.leaves(d)))
      assert abs(fd - analytic) < 1e-6 * abs(analytic), (fd, analytic)


@pytest.mark.parametrize("kind", ["linear", "centered", "centered_nonlinear"])
def test_loose_running_averages_are_those_of_the_documented_pass(kind):
  """Loose BatchNorm in training mode updates the running averages as the network's own training
  pass would: at theta0 for the linear kinds (their only forward pass), at theta for
  centered_nonlinear; frozen returns them unchanged."""
  model = MODELS["cnn"]()
  variables, x = _init(model), _images()
  p0, bs = variables["params"], variables["batch_stats"]
  theta = _axpy(1.0, _direction(p0, scale=0.3), p0)
  # One program per form (one compile, not one per operation).
  updated = jax.jit(lambda theta, x: {batch_norm: LinearizedModel(
      model, p0, bs, kind=kind, batch_norm=batch_norm).apply(
          {"params": theta, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])[1]
      for batch_norm in ("loose", "frozen")})(theta, x)
  network_pass = jax.jit(lambda params, x: model.apply(
      {"params": params, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])[1])
  for batch_norm, updates in updated.items():
    at = theta if kind == "centered_nonlinear" else p0
    expected = network_pass(at, x)["batch_stats"] if batch_norm == "loose" else bs
    for got, want in zip(jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(expected), strict=True):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "centered"])
def test_bfloat16_clone_shares_theta0_and_computes_in_bfloat16(kind):
  """config.phase2.compute_dtype='bfloat16': the train steps run `clone(dtype=bfloat16)`, the same
  linearization around the same theta0 buffers, its forward pass and JVP in bfloat16, its logits
  float32 and within bfloat16's rounding of the float32 model's, away from theta0 too."""
  model = MODELS["cnn"]()
  variables, x = _init(model), _images()
  lin = LinearizedModel(model, variables["params"], variables["batch_stats"], kind=kind)
  twin = lin.clone(dtype=jnp.bfloat16)
  assert twin.params0 is lin.params0 and twin.batch_stats0 is lin.batch_stats0
  assert (twin.kind, twin.batch_norm, lin.model.dtype) == (lin.kind, lin.batch_norm, None)
  moved = {"params": _axpy(1.0, _direction(variables["params"]), variables["params"]),
           "batch_stats": variables["batch_stats"]}
  products = lambda m: {v.aval.dtype for e in all_equations(
      jax.make_jaxpr(lambda v: m.apply(v, x, train=False))(moved).jaxpr)
      if e.primitive.name in ("dot_general", "conv_general_dilated") for v in e.invars}
  assert products(lin) == {jnp.dtype(jnp.float32)} and products(twin) == {jnp.dtype(jnp.bfloat16)}
  full, half = jax.jit(lambda v: (lin.apply(v, x, train=False), twin.apply(v, x, train=False)))(moved)
  assert half.dtype == jnp.float32
  # Measured 0.012 (linear: f0 dominates) and 0.050 (centered: the JVP adds the layers' terms,
  # which partly cancel, each rounded to bfloat16), both forms in one jitted program (0.010 and
  # 0.042 op by op).
  assert jnp.max(jnp.abs(half - full)) <= {"linear": 0.02, "centered": 0.08}[kind] * jnp.max(jnp.abs(full))


@pytest.mark.parametrize("kind", ["linear", "centered", "centered_nonlinear"])
def test_centered_nonlinear_computes_at_highest_precision(kind):
  """f(theta) - f(theta0) lives in theta - theta0, which the backend's default matmul precision
  rounds away (one bfloat16 pass on TPUs; on this CPU precision changes nothing, so the traced
  programs are read): its forward pass and parameter gradient ask for HIGHEST; the JVP forms keep
  the default, as the network's own training does."""
  model = MODELS["cnn"]()
  variables, x = _init(model), _images()
  lin = LinearizedModel(model, variables["params"], variables["batch_stats"], kind=kind)
  forward = lambda params: lin.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                     train=False)
  gradient = jax.grad(lambda params: jnp.sum(forward(params) ** 2))
  assert all_highest(forward, variables["params"]) == (kind == "centered_nonlinear")
  assert all_highest(gradient, variables["params"]) == (kind == "centered_nonlinear")


def test_running_averages_are_returned_for_each_form_of_mutable_and_none_without_batch_norm():
  """apply(mutable=...) returns the running averages when they are asked for in any of flax's forms
  (True, the collection's name, a list of names) and nothing otherwise; a network without BatchNorm
  trains with the empty updates flax's own apply returns."""
  model = MODELS["mlp"]()
  variables, x = _init(model), _images()
  lin = LinearizedModel(model, variables["params"], variables["batch_stats"], kind="centered_nonlinear",
                        batch_norm="loose")
  for mutable, returned in ((True, True), ("batch_stats", True), (["batch_stats"], True),
                            ("intermediates", False), (["intermediates"], False)):
    out, updates = lin.apply(variables, x, train=True, mutable=mutable)
    assert set(updates) == ({"batch_stats"} if returned else set()), mutable
  # At theta0, f(theta) - f(theta0) vanishes in training too: both passes on the batch's statistics.
  np.testing.assert_allclose(out, np.zeros_like(out), atol=1e-6)
  plain = _model("mlp", 16, batch_norm=False)
  params = _init(plain)["params"]
  lin = LinearizedModel(plain, params, None, batch_norm="loose")
  out, updates = lin.apply({"params": params}, x, train=True, mutable=["batch_stats"])
  expected, flax_updates = plain.apply({"params": params}, x, train=True, mutable=["batch_stats"])
  assert updates == flax_updates == {}
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_a_float32_checkpoint_linearized_in_float64_is_the_float64_network_at_theta0():
  """A kernel asked for in float64 passes float64 params to the linearization of a float32
  checkpoint: theta0 and its running averages are promoted (exactly), so at theta0 the linear form
  is the float64 network to float64's rounding, not float32's."""
  with jax.enable_x64(True):
    model = MODELS["mlp"]()
    variables, x = _init(model), _images(dtype=np.float64)  # the checkpoint in float32
    lin = LinearizedModel(model, variables["params"], variables["batch_stats"])
    wide = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    out = jax.jit(lambda params, x: lin.apply({"params": params}, x, train=False))(wide["params"], x)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, model.apply(wide, x, train=False), rtol=1e-12, atol=1e-12)


def test_theta0_survives_the_deletion_of_the_buffers_it_was_built_from_and_handed_out():
  """A train step donates its state, whose buffers an accelerator then deletes (this CPU keeps
  them, so they are deleted here by hand): theta0 must outlive both the variables it was built from
  and the copies init handed out."""
  model = MODELS["mlp"]()
  variables = _init(model)
  kept = jax.tree.map(np.array, variables)
  lin = LinearizedModel(model, variables["params"], variables["batch_stats"])
  start = lin.init(jax.random.key(0), None)
  for tree in (variables, start):
    jax.tree.map(lambda a: a.delete(), tree)
  again = lin.init(jax.random.key(0), None)
  for got in ({"params": lin.params0, "batch_stats": lin.batch_stats0}, again):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), kept)
