"""The train steps against a network written out in numpy: the loss they report, the BatchNorm
mode of the attack and of the update, and the running averages they leave."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ntk_scale import parallel
from ntk_scale.attacks import build_attack
from ntk_scale.base_config import base_config
from ntk_scale.cost_analysis import all_equations
from ntk_scale.data import load_digits
from ntk_scale.data.augment import crop_flip
from ntk_scale.models import build_model
from ntk_scale.train.experiment import build_train_steps
from ntk_scale.train.state import TrainState, count_parameters, create_train_state, logits_fn
from ntk_scale.train.steps import make_train_step
from random_variables import random_variables
from test_train import load_config

WIDTH, LR, EPS, BN_EPS, BN_MOMENTUM = 8, 0.5, 0.1, 1e-5, 0.9


@pytest.fixture(scope="module")
def setup():
  """A one-hidden-layer BatchNorm MLP with random variables, and 16 digits on the 4-device mesh."""
  c = base_config()
  c.model.name, c.model.width, c.model.depth, c.model.batch_norm = "mlp", WIDTH, 1, True
  model = build_model(c.model, 10)
  variables = random_variables(model, (8, 8, 1), seed=3)
  mesh = parallel.make_mesh()
  digits = load_digits()
  rows = np.arange(16)
  batch = parallel.global_batch(mesh, {"images": digits.train.images, "labels": digits.train.labels}, rows)

  def make_state():  # fresh buffers: the steps donate their state
    fresh = jax.tree.map(lambda a: np.array(a), variables)
    state = TrainState.create(apply_fn=model.apply, params=fresh["params"],
                              batch_stats=fresh["batch_stats"], tx=optax.sgd(LR))
    return jax.device_put(state, parallel.replicated_sharding(mesh))

  numpy_vars = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
  return model, numpy_vars, batch, digits.train.images[rows], digits.train.labels[rows], make_state


def _hidden(v, x):
  return x.reshape(len(x), -1) @ v["params"]["dense1"]["kernel"]


def _numpy_logits(v, x, train: bool):
  """The MLP by hand: dense1 (no bias) -> BatchNorm -> ReLU -> head."""
  h = _hidden(v, x)
  bn, stats = v["params"]["BatchNorm_0"], v["batch_stats"]["BatchNorm_0"]
  mean, var = (h.mean(0), h.var(0)) if train else (stats["mean"], stats["var"])
  z = (h - mean) / np.sqrt(var + BN_EPS) * bn["scale"] + bn["bias"]
  head = v["params"]["head"]
  return np.maximum(z, 0) @ head["kernel"] + head["bias"], z


def _numpy_cross_entropy(logits, labels):
  shifted = logits - logits.max(1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  return -log_softmax[np.arange(len(labels)), labels].mean()


def _numpy_running_averages(v, x):
  """BatchNorm's running averages after one training-mode pass on `x` (biased batch variance)."""
  h, stats = _hidden(v, x), v["batch_stats"]["BatchNorm_0"]
  return {"mean": BN_MOMENTUM * stats["mean"] + (1 - BN_MOMENTUM) * h.mean(0),
          "var": BN_MOMENTUM * stats["var"] + (1 - BN_MOMENTUM) * h.var(0)}


def _numpy_input_gradient(v, x, labels):
  """d(sum of cross-entropies)/dx of the inference-mode network, by the chain rule."""
  logits, z = _numpy_logits(v, x, train=False)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(labels)), labels] -= 1  # d(sum of cross-entropies)/d logits
  stats, bn = v["batch_stats"]["BatchNorm_0"], v["params"]["BatchNorm_0"]
  dz = (p @ v["params"]["head"]["kernel"].T) * (z > 0) * bn["scale"] / np.sqrt(stats["var"] + BN_EPS)
  return (dz @ v["params"]["dense1"]["kernel"].T).reshape(x.shape)


def _numpy_fgsm_inference(v, x, labels):
  """FGSM against the inference-mode network."""
  return np.clip(x + EPS * np.sign(_numpy_input_gradient(v, x, labels)), 0, 1)


def test_benign_step_reports_the_cross_entropy_and_moves_the_running_averages(setup):
  model, v, batch, images, labels, make_state = setup
  state, metrics = make_train_step("none", seed=0)(make_state(), batch)
  logits, _ = _numpy_logits(v, images.astype(np.float64), train=True)
  np.testing.assert_allclose(float(metrics["loss"]), _numpy_cross_entropy(logits, labels), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(logits.argmax(1) == labels))
  expected = _numpy_running_averages(v, images.astype(np.float64))
  for k in ("mean", "var"):
    np.testing.assert_allclose(np.asarray(state.batch_stats["BatchNorm_0"][k]), expected[k], rtol=1e-5,
                               atol=1e-6)
  assert int(state.step) == 1


@pytest.mark.parametrize("attack_batch_norm", ["inference", "train"])
def test_adversarial_step_attacks_as_configured_and_updates_in_training_mode(setup, attack_batch_norm):
  model, v, batch, images, labels, make_state = setup
  fgsm = build_attack(ml_collections.ConfigDict(dict(name="fgsm", eps=EPS)))
  step = make_train_step("none", seed=0, attack=fgsm, attack_batch_norm=attack_batch_norm)
  state, metrics = step(make_state(), batch)

  x = images.astype(np.float64)
  if attack_batch_norm == "inference":
    adversarial = _numpy_fgsm_inference(v, x, labels)
  else:  # the batch's own statistics, differentiated through (flax's model, not the project's attack)
    loss = lambda xs: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(v, xs, train=True, mutable=["batch_stats"])[0], labels).sum()
    adversarial = np.clip(x + EPS * np.sign(np.asarray(jax.grad(loss)(jnp.asarray(x)))), 0, 1)
  # The two modes craft different examples here, so the check tells them apart.
  other = _numpy_fgsm_inference(v, x, labels)
  assert (attack_batch_norm == "inference") == bool(np.all(adversarial == other))

  # One training-mode SGD update on the adversarial batch: loss, gradient, running averages.
  logits, _ = _numpy_logits(v, adversarial, train=True)
  np.testing.assert_allclose(float(metrics["loss"]), _numpy_cross_entropy(logits, labels), rtol=1e-5)
  with jax.enable_x64(True):
    train_loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p, "batch_stats": v["batch_stats"]}, jnp.asarray(adversarial), train=True,
                    mutable=["batch_stats"])[0], labels).mean()
    grads = jax.grad(train_loss)(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v["params"]))
    expected = jax.tree.map(lambda w, g: np.asarray(w) - LR * np.asarray(g), v["params"], grads)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  averages = _numpy_running_averages(v, adversarial)
  for k in ("mean", "var"):
    np.testing.assert_allclose(np.asarray(state.batch_stats["BatchNorm_0"][k]), averages[k], rtol=1e-5,
                               atol=1e-6)


def _moved_apart(state, reference, start) -> tuple[list[float], float]:
  """How far `state`'s update of `start` is from `reference`'s, relative to the latter: per leaf
  (parameters and running averages), and over all leaves at once."""
  per_leaf, apart, moved = [], 0.0, 0.0
  for got, want, before in zip(jax.tree.leaves((state.params, state.batch_stats)),
                               jax.tree.leaves((reference.params, reference.batch_stats)),
                               jax.tree.leaves(start), strict=True):
    difference, expected = np.asarray(got) - np.asarray(want), np.asarray(want) - before
    per_leaf.append(float(np.linalg.norm(difference) / np.linalg.norm(expected)))
    apart, moved = apart + np.sum(difference ** 2), moved + np.sum(expected ** 2)
  return per_leaf, float(np.sqrt(apart / moved))


def test_bfloat16_step_computes_in_bfloat16_and_moves_float32_variables_as_float32_does(setup):
  """config.train.compute_dtype='bfloat16': the step (attack included) runs the model's bfloat16
  twin on the same variables; the update lands on float32 parameters and running averages, close to
  the float32 step's, and the state keeps the float32 model that evaluations use.

  Benign, each leaf moves within 3% of the float32 step (~0.5% measured). FGSM takes the sign of
  each input gradient, and in bfloat16 a component near zero can take the other sign: the attacked
  step is compared over all leaves, within 10% (0.7% on jax 0.10.2, 5% on jax 0.12.0.1, whose CPU
  bfloat16 gradients round differently), where not attacking at all is 30% or more away."""
  model, v, batch, images, labels, make_state = setup
  twin = model.clone(dtype=jnp.bfloat16)
  start = (v["params"], v["batch_stats"])
  fgsm = build_attack(ml_collections.ConfigDict(dict(name="fgsm", eps=EPS)))
  plain = make_train_step("none", seed=0, attack=fgsm)
  mixed = make_train_step("none", seed=0, attack=fgsm, compute_apply_fn=twin.apply)
  assert "bf16" not in plain.lower(make_state(), batch).as_text()
  assert "bf16" in mixed.lower(make_state(), batch).as_text()

  full, full_metrics = plain(make_state(), batch)
  half, half_metrics = mixed(make_state(), batch)
  assert half.apply_fn == model.apply
  np.testing.assert_allclose(float(half_metrics["loss"]), float(full_metrics["loss"]), rtol=2e-2)
  for got in jax.tree.leaves((half.params, half.batch_stats)):
    assert got.dtype == jnp.float32
  _, attacked_apart = _moved_apart(half, full, start)
  assert attacked_apart <= 0.1
  benign, _ = make_train_step("none", seed=0)(make_state(), batch)
  assert _moved_apart(benign, full, start)[1] >= 0.3  # so the bound above tells attacking apart

  benign_half, _ = make_train_step("none", seed=0, compute_apply_fn=twin.apply)(make_state(), batch)
  per_leaf, _ = _moved_apart(benign_half, benign, start)
  assert max(per_leaf) <= 0.03


def test_each_phase_steps_compute_in_its_sections_compute_dtype(setup):
  model, _, batch, _, _, make_state = setup
  config = load_config("digits", "adversarial")
  config.train.compute_dtype = "bfloat16"
  for step in build_train_steps(config, config.train, config.seed, adversarial=True, model=model):
    assert "bf16" in step.lower(make_state(), batch).as_text()
  for step in build_train_steps(config, config.phase2, config.seed, adversarial=True, model=model):
    assert "bf16" not in step.lower(make_state(), batch).as_text()  # config.phase2.compute_dtype
  config.phase2.compute_dtype = "bfloat16"
  for step in build_train_steps(config, config.phase2, config.seed, adversarial=True, model=model):
    assert "bf16" in step.lower(make_state(), batch).as_text()


@pytest.mark.parametrize("section", ["train", "phase2"])
def test_each_phase_steps_run_their_matmuls_at_its_sections_precision(setup, section):
  """config.<section>.matmul_precision: every matmul of the steps, the attack's and the gradients'
  included, asks for that level (on a TPU "default" is one bfloat16 pass, "high" three); the
  default leaves them to the backend. Read from the traced programs: a CPU computes all alike."""
  model, _, batch, _, _, make_state = setup
  config = load_config("digits", "adversarial")
  levels = lambda step: {e.params["precision"] for e in all_equations(
      jax.make_jaxpr(step)(make_state(), batch).jaxpr)
      if e.primitive.name in ("dot_general", "conv_general_dilated")}
  for step in build_train_steps(config, config[section], config.seed, adversarial=True, model=model):
    assert levels(step) == {None}
  config[section].matmul_precision = "high"
  high = (jax.lax.Precision.HIGH, jax.lax.Precision.HIGH)
  for step in build_train_steps(config, config[section], config.seed, adversarial=True, model=model):
    assert levels(step) == {high}


def test_default_precision_leaves_a_global_setting_in_force(setup):
  """matmul_precision "default" enters no context: JAX_DEFAULT_MATMUL_PRECISION (or an enclosing
  jax.default_matmul_precision) still governs the steps."""
  model, _, batch, _, _, make_state = setup
  step = make_train_step("none", seed=0)
  with jax.default_matmul_precision("highest"):
    precisions = {e.params["precision"] for e in all_equations(
        jax.make_jaxpr(step)(make_state(), batch).jaxpr) if e.primitive.name == "dot_general"}
  assert precisions == {(jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)}


def _step_keys(seed, step):
  """The step's (augmentation key, attack key), derived here by hand: split(fold_in(key(seed), step))."""
  return tuple(jax.random.split(jax.random.fold_in(jax.random.key(seed), step)))


def test_each_step_draws_its_augmentation_and_attack_key_from_the_step_number(setup):
  """The step's randomness is fold_in(key(seed), state.step): what the attack receives at steps 0
  and 1 is the batch cropped and flipped with each step's own key, and each step's attack key (one
  key for every step repeated the same crops and attack starts all run long)."""
  _, _, batch, images, _, make_state = setup
  seen = []

  def recording_attack(logits_fn, x, labels, key):
    jax.debug.callback(lambda *a: seen.append([np.asarray(b) for b in a]), x, jax.random.key_data(key))
    return x

  step = make_train_step("crop_flip", seed=7, attack=recording_attack)
  for number in (0, 1):
    state = make_state()
    step(state.replace(step=jax.device_put(state.step + number, state.step.sharding)), batch)
  jax.effects_barrier()
  assert len(seen) == 2
  for number, (attacked, attack_key) in enumerate(seen):
    augment_key, expected_attack_key = _step_keys(7, number)
    np.testing.assert_array_equal(attacked, np.asarray(crop_flip(augment_key, jnp.asarray(images))))
    np.testing.assert_array_equal(attack_key, np.asarray(jax.random.key_data(expected_attack_key)))
  assert not np.array_equal(seen[0][0], seen[1][0])


def test_adversarial_step_attacks_the_augmented_batch(setup):
  """FGSM training with crop_flip trains on FGSM of the cropped and flipped batch, not of the raw
  one: the loss reported is the numpy network's on the numpy FGSM of the batch augmented with the
  step's key (an attack on the raw images would perturb images the model never trains on)."""
  _, v, batch, images, labels, make_state = setup
  fgsm = build_attack(ml_collections.ConfigDict(dict(name="fgsm", eps=EPS)))
  _, metrics = make_train_step("crop_flip", seed=3, attack=fgsm)(make_state(), batch)
  augmented = np.asarray(crop_flip(_step_keys(3, 0)[0], jnp.asarray(images)), np.float64)
  assert not np.array_equal(augmented, images)
  logits, _ = _numpy_logits(v, _numpy_fgsm_inference(v, augmented, labels), train=True)
  np.testing.assert_allclose(float(metrics["loss"]), _numpy_cross_entropy(logits, labels), rtol=1e-5)
  raw_logits, _ = _numpy_logits(v, _numpy_fgsm_inference(v, images.astype(np.float64), labels), True)
  assert abs(_numpy_cross_entropy(raw_logits, labels) - _numpy_cross_entropy(logits, labels)) > 1e-3


def test_grad_align_penalty_is_measured_at_the_clean_batch(setup):
  """GradAlign aligns grad_x L at the clean x with grad_x L at x + eta (eta uniform in the eps-box,
  drawn from fold_in(attack key, 1)): the penalty reported is 1 - cos of the numpy network's two
  input gradients, averaged; measured at the adversarial batch it regularised the wrong points."""
  _, v, batch, images, labels, make_state = setup
  fgsm = build_attack(ml_collections.ConfigDict(dict(name="fgsm", eps=EPS)))
  step = make_train_step("none", seed=5, attack=fgsm, grad_align=0.5, grad_align_eps=EPS)
  _, metrics = step(make_state(), batch)
  noise_key = jax.random.fold_in(_step_keys(5, 0)[1], 1)
  eta = np.asarray(jax.random.uniform(noise_key, images.shape, jnp.float32, -EPS, EPS), np.float64)
  x = images.astype(np.float64)
  clean, noisy = (_numpy_input_gradient(v, x + d, labels).reshape(len(x), -1) for d in (0, eta))
  cosine = np.sum(clean * noisy, 1) / np.linalg.norm(clean, axis=1) / np.linalg.norm(noisy, axis=1)
  expected = np.mean(1 - cosine)
  assert expected > 1e-3
  np.testing.assert_allclose(float(metrics["grad_align"]), expected, rtol=1e-3, atol=1e-6)


def test_grad_norm_is_the_global_norm_of_the_gradient_the_update_applied(setup):
  """The logged train/grad_norm is the L2 norm of the whole gradient: with plain SGD it equals the
  parameters' displacement over the learning rate, measured here in float64. A squared or
  per-leaf norm would misreport exploding or vanishing gradients by orders of magnitude."""
  _, v, batch, _, _, make_state = setup
  state, metrics = make_train_step("none", seed=0)(make_state(), batch)
  moved = [(np.asarray(new, np.float64) - old) / LR
           for new, old in zip(jax.tree.leaves(state.params), jax.tree.leaves(v["params"]), strict=True)]
  expected = np.sqrt(sum(np.sum(m ** 2) for m in moved))
  assert abs(expected - 1.0) > 0.1  # a norm of 1 would not tell the norm from its square
  np.testing.assert_allclose(float(metrics["grad_norm"]), expected, rtol=1e-4)


def test_grad_align_without_its_eps_is_refused_when_the_step_is_made():
  """GradAlign's noise needs an eps: a step made without one is refused at once, naming what is
  missing, rather than failing inside jit at the first batch of a launched run."""
  fgsm = build_attack(ml_collections.ConfigDict(dict(name="fgsm", eps=EPS)))
  for attack, eps in ((fgsm, None), (None, EPS)):
    with pytest.raises(ValueError, match=r"GradAlign .* needs an attack and the eps of its noise"):
      make_train_step("none", seed=0, attack=attack, grad_align=0.5, grad_align_eps=eps)


def _flax_input_gradients(model, v, x, labels, train: bool):
  """d(sum of cross-entropies)/dx of flax's model with BatchNorm in `train` mode, [N, D] (float64
  under enable_x64): in training mode the batch statistics are differentiated through."""
  def total(xs):
    logits = (model.apply(v, xs, train=True, mutable=["batch_stats"])[0] if train
              else model.apply(v, xs, train=False))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
  return jax.grad(total)(x).reshape(len(x), -1)


def _one_minus_cosine(clean, noisy):
  return 1 - jnp.sum(clean * noisy, 1) / jnp.linalg.norm(clean, axis=1) / jnp.linalg.norm(noisy, axis=1)


def test_grad_align_penalty_sees_batch_norm_as_the_attack_does(setup):
  """attack_batch_norm='train': GradAlign's input gradients are taken with BatchNorm on the batch's
  own statistics, as the attack's are (flax's model in float64 as reference); measured with the
  running averages instead it would regularise a model the attack never saw."""
  model, v, batch, images, labels, make_state = setup
  fgsm = build_attack(ml_collections.ConfigDict(dict(name="fgsm", eps=EPS)))
  step = make_train_step("none", seed=5, attack=fgsm, attack_batch_norm="train", grad_align=0.5,
                         grad_align_eps=EPS)
  _, metrics = step(make_state(), batch)
  noise_key = jax.random.fold_in(_step_keys(5, 0)[1], 1)
  eta = np.asarray(jax.random.uniform(noise_key, images.shape, jnp.float32, -EPS, EPS), np.float64)
  x = images.astype(np.float64)
  with jax.enable_x64(True):
    gradients = jax.jit(lambda xs: _flax_input_gradients(model, v, xs, labels, train=True))
    clean, noisy = (gradients(jnp.asarray(x + d)) for d in (0, eta))
    expected = float(jnp.mean(_one_minus_cosine(clean, noisy)))
  inference = [_numpy_input_gradient(v, x + d, labels).reshape(len(x), -1) for d in (0, eta)]
  other = float(np.mean(_one_minus_cosine(*inference)))
  assert abs(expected - other) > 1e-2 * expected  # the two modes' penalties are far apart here
  np.testing.assert_allclose(float(metrics["grad_align"]), expected, rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def grad_align_updates(setup):
  """The parameters after one SGD step (lr LR) on CE(FGSM batch) + (1 - cos(grad_x L(x + eta),
  grad_x L(x))), GradAlign at weight 1 and eps EPS with the noise of step 0 of seed 5, written out in
  float64 with flax's model: {True: grad_x L(x) held constant, False: differentiated}."""
  model, v, _, images, labels, _ = setup
  noise_key = jax.random.fold_in(_step_keys(5, 0)[1], 1)
  eta = np.asarray(jax.random.uniform(noise_key, images.shape, jnp.float32, -EPS, EPS), np.float64)
  x = images.astype(np.float64)
  adversarial = _numpy_fgsm_inference(v, x, labels)
  with jax.enable_x64(True):
    def objective(params, hold_clean):
      variables = {"params": params, "batch_stats": v["batch_stats"]}
      logits = model.apply(variables, jnp.asarray(adversarial), train=True, mutable=["batch_stats"])[0]
      clean, noisy = (_flax_input_gradients(model, variables, jnp.asarray(x + d), labels, train=False)
                      for d in (0, eta))
      clean = jax.lax.stop_gradient(clean) if hold_clean else clean
      return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
              + jnp.mean(_one_minus_cosine(clean, noisy)))
    both = jax.jit(lambda p: {hold: jax.grad(objective)(p, hold) for hold in (True, False)})
    gradients = both(jax.tree.map(jnp.asarray, v["params"]))
    return {hold: jax.tree.map(lambda w, g: np.asarray(w) - LR * np.asarray(g), v["params"], g_hold)
            for hold, g_hold in gradients.items()}


@pytest.mark.parametrize("clean_gradient", ["constant", "differentiated"])
def test_grad_align_update_differentiates_the_clean_gradient_as_configured(setup, grad_align_updates,
                                                                           clean_gradient):
  """One SGD step of FGSM training with GradAlign (weight 1): the parameters move by -lr times the
  float64 gradient of CE(FGSM batch) + (1 - cos(grad_x L(x + eta), grad_x L(x))), written out with
  flax's model, grad_x L(x) held constant ("constant", the authors' code) or differentiated too (the
  paper's formula). The two settings' updates differ, so a setting lost on the way to the penalty
  would train the other variant silently."""
  _, _, batch, _, _, make_state = setup
  fgsm = build_attack(ml_collections.ConfigDict(dict(name="fgsm", eps=EPS)))
  step = make_train_step("none", seed=5, attack=fgsm, grad_align=1.0, grad_align_eps=EPS,
                         grad_align_clean=clean_gradient)
  state, _ = step(make_state(), batch)
  apart = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(grad_align_updates[True]),
                                                 jax.tree.leaves(grad_align_updates[False]), strict=True))
  assert apart > 1e-3
  expected = grad_align_updates[clean_gradient == "constant"]
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_the_initial_state_is_the_models_init_for_its_seed_replicated_over_the_mesh(setup):
  """create_train_state(seed): flax's model.init with key(seed) on one zero image (so seeds 0 and 1
  differ), step 0, every leaf on all 4 devices of the mesh (each process builds the same copy, and
  the steps expect replicated state). The BatchNorm MLP has 64*8 + 2*8 + 8*10 + 10 = 618 parameters
  (dense1 has no bias), the count the train job logs."""
  model = setup[0]
  mesh = parallel.make_mesh()
  inits = []
  for seed in (0, 1):
    state = create_train_state(model, optax.sgd(LR), (8, 8, 1), seed, mesh)
    expected = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1), jnp.float32), train=False)
    for got, want in zip(jax.tree.leaves((state.params, state.batch_stats)),
                         jax.tree.leaves((expected["params"], expected["batch_stats"])), strict=True):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert int(state.step) == 0
    for leaf in jax.tree.leaves(state):
      assert leaf.sharding.is_fully_replicated and leaf.sharding.device_set == set(mesh.devices.flat)
    assert count_parameters(state.params) == 618
    inits.append(np.asarray(state.params["head"]["kernel"]))
  assert not np.array_equal(*inits)


def test_an_unknown_batch_norm_mode_is_refused(setup):
  """logits_fn knows BatchNorm's "inference" and "train" modes; any other is refused naming them,
  not silently taken as the running averages."""
  *_, make_state = setup
  with pytest.raises(ValueError, match=r"batch_norm='frozen'; expected one of inference, train"):
    logits_fn(make_state(), "frozen")
