"""Single-step adversarial training: FGSM / RS-FGSM / N-FGSM from config.train.attack, GradAlign."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ntk_scale import attacks, parallel
from ntk_scale.base_config import base_config
from ntk_scale.data import load_dataset
from ntk_scale.models import build_model
from ntk_scale.train.experiment import build_train_steps, check_train_config
from ntk_scale.train.grad_align import grad_align_penalty, gradient_cosine, input_gradients
from ntk_scale.train.state import create_train_state

EPS = 0.1


def test_penalty_is_zero_when_gradients_are_aligned():
  # Two classes, linear logits: grad_x CE = (w1 - w0) * (p1 - [y = 1]), whose sign is fixed by y,
  # so the gradients at x and at x + eta are parallel and 1 - cos = 0 whatever eta.
  w = jnp.asarray(np.random.default_rng(0).normal(size=(12, 2)), jnp.float32)
  logits_fn = lambda x: x.reshape(len(x), -1) @ w
  images = jnp.asarray(np.random.default_rng(1).uniform(size=(6, 3, 4, 1)), jnp.float32)
  labels = jnp.asarray([0, 1, 0, 1, 1, 0])
  # Under jit, as training computes it (and one compile, not one per operation).
  penalty = jax.jit(lambda: grad_align_penalty(logits_fn, images, labels, jax.random.key(0), eps=0.5))()
  assert abs(float(penalty)) < 1e-6
  # Hand-made cosines: parallel 1, opposite -1, orthogonal 0.
  a = jnp.asarray([[1.0, 2.0], [1.0, 0.0], [1.0, 0.0]])
  b = jnp.asarray([[2.0, 4.0], [-3.0, 0.0], [0.0, 5.0]])
  np.testing.assert_allclose(jax.jit(gradient_cosine)(a, b), [1.0, -1.0, 0.0], atol=1e-7)


def test_the_cosine_of_a_confident_examples_tiny_gradients_is_exact():
  """A confident float32 example's input gradient can be 1e-12 and less: its squared norms'
  product (1e-48) is below any float32 floor, which used to pull the cosine to 0 and the penalty
  to 1 for two parallel gradients. Each gradient is normalised on its own, as in GradAlign's code."""
  g = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8)), jnp.float32)
  for scale in (1.0, 1e-8, 1e-12, 1e-20, 1e-30):  # 1e-30: still normal in float32
    tiny = g * scale
    np.testing.assert_allclose(jax.jit(gradient_cosine)(tiny, 3.0 * tiny), [1.0], rtol=1e-6)
    np.testing.assert_allclose(jax.jit(gradient_cosine)(tiny, -tiny), [-1.0], rtol=1e-6)
  one_entry = jnp.asarray([[0.0, 2.0, 0.0]])  # a squared norm of exactly 1 once scaled
  direction = jnp.asarray([[1.0, 1.0, 0.0]])
  expected = jax.grad(lambda a: (a @ direction.T)[0, 0] / jnp.linalg.norm(a) / jnp.sqrt(2.0))(one_entry)
  np.testing.assert_allclose(jax.grad(lambda a: gradient_cosine(a, direction)[0])(one_entry), expected,
                             atol=1e-7)


def test_penalty_gradient_is_finite_when_an_input_gradient_is_zero():
  # The second example never activates the ReLU: its input gradients are exactly zero.
  images = jnp.asarray([[1.0, 2.0], [-1.0, -2.0]])
  labels = jnp.asarray([0, 1])
  w = {"v": jnp.asarray([0.5, 1.0]), "u": jnp.asarray([1.0, -1.0])}
  f = jax.jit(lambda w, n=2: grad_align_penalty(lambda x: jax.nn.relu(x @ w["v"])[:, None] * w["u"],
                                                images[:n], labels[:n], jax.random.key(0), 0.1),
              static_argnums=1)  # as training computes it (and one compile, not one per operation)
  assert np.isfinite(float(f(w)))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(jax.grad(f)(w)))
  # As in the authors' code, the mean leaves out examples with a zero gradient.
  assert float(f(w)) == pytest.approx(float(f(w, 1)), abs=1e-7)


def _tiny_mlp(params, x):
  return jnp.tanh(x.reshape(len(x), -1) @ params["w1"]) @ params["w2"]


def test_penalty_gradient_matches_finite_differences_held_or_differentiated():
  """By central differences in float64: the parameter gradient is that of 1 - cos(grad_x L(x + eta;
  p), g0) with g0 = grad_x L(x; p0) a constant (the authors' code detaches it), or with
  clean_gradient "differentiated" that of the penalty's value itself."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(6, 5))), "w2": jnp.asarray(rng.normal(size=(5, 3)))}
    images = jnp.asarray(rng.uniform(size=(4, 3, 2, 1)))
    labels = jnp.asarray([0, 1, 2, 1])
    key, eps = jax.random.key(3), 0.3
    # Each function under jit, as training computes it (and one compile, not one per operation).
    penalty = jax.jit(lambda p: grad_align_penalty(lambda x: _tiny_mlp(p, x), images, labels, key, eps))
    assert float(penalty(params)) > 1e-3  # a nonlinear model is not aligned
    grads = jax.jit(jax.grad(penalty))(params)

    @jax.jit
    def f(p):
      eta = jax.random.uniform(key, images.shape, images.dtype, -eps, eps)  # the penalty's draw
      clean = input_gradients(lambda x: _tiny_mlp(params, x), images, labels)  # at p0, constant
      return jnp.mean(1 - gradient_cosine(
          input_gradients(lambda x: _tiny_mlp(p, x), images + eta, labels), clean))

    assert float(f(params)) == pytest.approx(float(penalty(params)), rel=1e-12)
    direction = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape)), params)
    h = 1e-5
    shifted = lambda t: jax.tree.map(lambda w, d: w + t * d, params, direction)
    numeric = (f(shifted(h)) - f(shifted(-h))) / (2 * h)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)
    # "differentiated" (the paper's formula): the gradient of the penalty's value itself.
    both = jax.jit(lambda p: grad_align_penalty(lambda x: _tiny_mlp(p, x), images, labels, key, eps,
                                                clean_gradient="differentiated"))
    grads = jax.jit(jax.grad(both))(params)
    numeric = (both(shifted(h)) - both(shifted(-h))) / (2 * h)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)


def _config(attack_name: str, grad_align: float = 0.0, transform: str = "none"):
  c = base_config()
  c.model.name, c.model.width, c.model.depth = "mlp", 8, 1
  c.batch_size = 64
  c.train.mode = "A"
  c.train.attack = ml_collections.ConfigDict(dict(name=attack_name, eps=EPS))
  c.train.grad_align = grad_align
  c.data.transform.name = transform
  c.data.transform.beta = EPS
  return c


@pytest.fixture(scope="module")
def setup():
  mesh = parallel.make_mesh()
  model = build_model(_config("fgsm").model, 10)
  make_state = lambda: create_train_state(model, optax.sgd(0.1), (8, 8, 1), seed=0, mesh=mesh)
  return mesh, make_state, model


@pytest.mark.parametrize("attack_name, grad_align, transform", [
    ("fgsm", 0.0, "inject"), ("rs_fgsm", 0.0, "low_pass"), ("n_fgsm", 0.0, "none"),
    ("fgsm", 0.5, "none")])
def test_one_training_step_with_each_single_step_option(setup, attack_name, grad_align, transform):
  mesh, make_state, model = setup
  config = _config(attack_name, grad_align, transform)
  check_train_config(config, mesh.devices.size)
  dataset = load_dataset(config.data)
  batch = parallel.global_batch(mesh, {"images": dataset.train.images, "labels": dataset.train.labels},
                                np.arange(64))
  _, step = build_train_steps(config, config.train, config.seed, adversarial=True, model=model)
  state, metrics = step(make_state(), batch)
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
  if grad_align:
    assert 0.0 < float(metrics["grad_align"]) < 2.0
  else:
    assert "grad_align" not in metrics


def test_the_grad_align_weight_scales_its_penalty_in_the_update(setup):
  """Plain SGD: the update is -lr * (grad CE(adversarial) + w * grad penalty), linear in GradAlign's
  weight w with the same adversarial examples (FGSM from zero does not depend on w). So the update
  at w = 1 differs from w = 0 by twice what w = 0.5 does, and not by nothing: the penalty reaches the
  parameters with its weight (the penalty's own gradient is checked above, by finite differences)."""
  mesh, make_state, model = setup
  raveled = {}
  for weight in (0.0, 0.5, 1.0):
    config = _config("fgsm", weight)
    dataset = load_dataset(config.data)
    batch = parallel.global_batch(mesh, {"images": dataset.train.images, "labels": dataset.train.labels},
                                  np.arange(64))
    _, step = build_train_steps(config, config.train, config.seed, adversarial=True, model=model)
    state, _ = step(make_state(), batch)
    raveled[weight] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)]).astype(np.float64)
  half, whole = raveled[0.5] - raveled[0.0], raveled[1.0] - raveled[0.0]
  assert np.abs(half).max() > 1e-4 * np.abs(raveled[0.0]).max()
  np.testing.assert_allclose(whole, 2 * half, rtol=0, atol=2e-3 * np.abs(half).max())


@pytest.mark.parametrize("mode, weight, clean, message", [
    ("C", 0.5, "constant", r"config\.train\.grad_align=0\.5 regularises adversarial training"),
    ("A", -1.0, "constant", r"config\.train\.grad_align=-1\.0 must be a finite number >= 0"),
    ("A", float("inf"), "constant", r"config\.train\.grad_align=inf must be a finite number >= 0"),
    ("A", 0.5, "detached", r"config\.train\.grad_align_clean='detached'; expected one of constant")])
def test_bad_grad_align_is_named(mode, weight, clean, message):
  config = _config("fgsm", weight)
  config.train.mode, config.train.grad_align_clean = mode, clean
  with pytest.raises(ValueError, match=message):
    check_train_config(config, 4)


def test_single_step_attacks_are_checked_from_config_train_attack():
  config = _config("n_fgsm")
  config.train.attack.noise = -0.1
  with pytest.raises(ValueError, match=r"config\.train\.attack\.noise=-0\.1"):
    check_train_config(config, 4)


@pytest.mark.parametrize("name, paper", [
    ("rs_fgsm", lambda *args: attacks.rs_fgsm(*args, eps=EPS, step_size=1.25 * EPS)),
    ("n_fgsm", lambda *args: attacks.n_fgsm(*args, eps=EPS, noise=2 * EPS, step_size=EPS))])
def test_overriding_the_name_of_the_default_train_attack_runs_the_papers_step(name, paper):
  """README: single-step training sets config.train.attack.name alone. The default train.attack is
  pgd_linf, whose step 2.5 * eps / 10 RS-FGSM and N-FGSM ran with; now they run with their own."""
  config = base_config().lock()
  config.train.attack.eps, config.train.attack.name = EPS, name  # as --config.train.attack.* sets them
  assert config.train.attack.to_dict()["step_size"] is None  # what the workdir records
  w = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)))
  args = (lambda x: x @ w, jnp.full((4, 16), 0.5), jnp.array([0, 1, 2, 0]), jax.random.key(0))
  # Under jit, as training runs them: one compile per step size (the same program is loaded from
  # the compilation cache), not one per operation.
  run = lambda attack: jax.jit(lambda *data: attack(args[0], *data))(*args[1:])
  np.testing.assert_array_equal(run(attacks.build_attack(config.train.attack)), run(paper))
  config.train.attack.step_size = 0.03  # set explicitly, it stays
  explicit = run(lambda *a: (attacks.rs_fgsm(*a, eps=EPS, step_size=0.03) if name == "rs_fgsm"
                             else attacks.n_fgsm(*a, eps=EPS, step_size=0.03)))
  np.testing.assert_array_equal(run(attacks.build_attack(config.train.attack)), explicit)
  config.train.attack.name = "pgd"  # and PGD keeps its own
  assert config.train.attack.step_size == 0.03


def test_pgd_fields_a_single_step_attack_cannot_honour_are_refused():
  config = base_config().lock()
  config.train.attack.name, config.train.attack.restarts = "fgsm", 3
  with pytest.raises(ValueError, match=r"config\.train\.attack\.restarts=3: fgsm is a single-step attack"):
    attacks.build_attack(config.train.attack, prefix="config.train.attack")
  config.train.attack.name, config.train.attack.restarts = "rs_fgsm", 1
  config.train.attack.random_start = False
  with pytest.raises(ValueError, match=r"config\.train\.attack\.random_start=False: rs_fgsm always"):
    attacks.build_attack(config.train.attack, prefix="config.train.attack")
  assert base_config().train.attack.step_size == pytest.approx(2.5 * 8 / 255 / 10)  # PGD's default


def test_the_mean_counts_only_examples_with_both_gradients_nonzero():
  """As in the authors' code, an example is left out of the mean where either gradient is zero: at
  x (its ReLUs all off), or at both points. Here example 0 is counted, example 1 has a zero
  gradient at x only (x + eta turns a ReLU on), example 2 zero gradients at both."""
  u = jnp.asarray([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0]])
  logits_fn = lambda x: jax.nn.relu(x) @ u
  images = jnp.asarray([[1.0, 1.0], [-0.05, -0.05], [-1.0, -1.0]])
  labels = jnp.asarray([0, 1, 2])
  key, eps = jax.random.key(3), 0.2
  eta = jax.random.uniform(key, images.shape, images.dtype, -eps, eps)  # the penalty's draw
  grad = lambda x: np.asarray(jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(
      logits_fn(x), labels).sum())(x), np.float64)
  clean, noisy = grad(images), grad(images + eta)
  assert (clean != 0).any(axis=1).tolist() == [True, False, False]
  assert (noisy != 0).any(axis=1).tolist() == [True, True, False]
  expected = 1 - clean[0] @ noisy[0] / np.linalg.norm(clean[0]) / np.linalg.norm(noisy[0])
  assert expected > 1e-3
  penalty = jax.jit(lambda: grad_align_penalty(logits_fn, images, labels, key, eps))()
  np.testing.assert_allclose(float(penalty), expected, rtol=1e-4)
