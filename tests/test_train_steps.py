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
from ntk_scale.train.state import TrainState
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


def test_bfloat16_step_computes_in_bfloat16_and_moves_float32_variables_as_float32_does(setup):
  """config.train.compute_dtype='bfloat16': the step (attack included) runs the model's bfloat16
  twin on the same variables; the update lands on float32 parameters and running averages, close to
  the float32 step's, and the state keeps the float32 model that evaluations use."""
  model, v, batch, images, labels, make_state = setup
  twin = model.clone(dtype=jnp.bfloat16)
  fgsm = build_attack(ml_collections.ConfigDict(dict(name="fgsm", eps=EPS)))
  plain = make_train_step("none", seed=0, attack=fgsm)
  mixed = make_train_step("none", seed=0, attack=fgsm, compute_apply_fn=twin.apply)
  assert "bf16" not in plain.lower(make_state(), batch).as_text()
  assert "bf16" in mixed.lower(make_state(), batch).as_text()

  full, full_metrics = plain(make_state(), batch)
  half, half_metrics = mixed(make_state(), batch)
  assert half.apply_fn == model.apply
  np.testing.assert_allclose(float(half_metrics["loss"]), float(full_metrics["loss"]), rtol=2e-2)
  for got, want, start in zip(jax.tree.leaves((half.params, half.batch_stats)),
                              jax.tree.leaves((full.params, full.batch_stats)),
                              jax.tree.leaves((v["params"], v["batch_stats"])), strict=True):
    assert got.dtype == jnp.float32
    moved, expected = np.asarray(got) - start, np.asarray(want) - start
    assert np.linalg.norm(moved - expected) <= 0.03 * np.linalg.norm(expected)  # ~0.01 measured


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
