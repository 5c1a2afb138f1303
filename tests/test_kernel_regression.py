"""Kernel regression (ntk_scale/kernel_regression.py): the ridge formula, ridgeless interpolation,
and training-free attacks against the predictor."""

import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ntk_scale import attacks, nt_compat
from ntk_scale.cost_analysis import all_equations
from ntk_scale.data import load_digits
from ntk_scale.kernel_regression import (SOLVERS, KernelRegression, check_regression_config,
                                         kernel_scores, predictor, regression_targets,
                                         ridge_coefficients, ridge_coefficients_cg,
                                         spectral_preconditioner)


def _rbf(x1, x2):
  """A positive-definite kernel needing no neural-tangents (the regression math is kernel-agnostic)."""
  a, b = x1.reshape(len(x1), -1), x2.reshape(len(x2), -1)
  squared = jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None] - 2 * a @ b.T
  return jnp.exp(-squared / a.shape[1])


def _problem(n_train=30, n_test=7, seed=0):
  rng = np.random.default_rng(seed)
  x, xt = rng.uniform(size=(n_train, 3, 3, 1)), rng.uniform(size=(n_test, 3, 3, 1))
  return x, rng.integers(0, 4, n_train), xt


@pytest.mark.parametrize("solver", SOLVERS)
def test_ridgeless_regression_interpolates_its_training_set(solver):
  with jax.enable_x64(True):
    x, labels, _ = _problem()
    k = np.asarray(_rbf(x, x))
    model = KernelRegression.fit(k, labels, 4, regularizer=0.0, solver=solver)
    np.testing.assert_allclose(model.predict(k), regression_targets(labels, 4, np.float64), atol=1e-6)
    assert model.accuracy(k, labels) == 1.0


@pytest.mark.parametrize("solver", SOLVERS)
def test_prediction_is_the_ridge_formula(solver):
  with jax.enable_x64(True):
    x, labels, xt = _problem()
    k, kt = np.asarray(_rbf(x, x)), np.asarray(_rbf(xt, x))
    reg = 0.1
    model = KernelRegression.fit(k, labels, 4, regularizer=reg, solver=solver)
    y = np.eye(4)[labels] - 0.25
    expected = kt @ np.linalg.solve(k + reg * np.mean(np.diag(k)) * np.eye(len(k)), y)
    np.testing.assert_allclose(model.predict(kt), expected, rtol=1e-8, atol=1e-10)
    # The jittable forms used by the attacks give the same scores.
    np.testing.assert_allclose(jax.jit(model.logits_fn(_rbf, x))(xt), expected, rtol=1e-8, atol=1e-10)
    in_jax = predictor(_rbf, jnp.asarray(x), jnp.asarray(labels), 4, regularizer=reg, solver=solver)
    np.testing.assert_allclose(in_jax(xt), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_ridge_is_relative_to_the_kernels_scale(solver):
  """lambda = regularizer * mean(diag K): predictions of 37 K (diagonal 37 * 1.2 to 37 * 1.8) are
  those of K. An absolute lambda was the same on a kernel of unit diagonal (every other test's)
  only; the diagonal varies, so its max or first entry is not its mean."""
  with jax.enable_x64(True):
    x, labels, xt = _problem()
    k = np.asarray(_rbf(x, x)) + np.diag(np.linspace(0.2, 0.8, len(x)))  # diagonal: mean 1.5
    kt = np.asarray(_rbf(xt, x))
    reg, y = 0.1, np.eye(4)[labels] - 0.25
    expected = kt @ np.linalg.solve(k + reg * 1.5 * np.eye(len(k)), y)
    for scale in (1.0, 37.0):
      model = KernelRegression.fit(scale * k, labels, 4, regularizer=reg, solver=solver)
      np.testing.assert_allclose(model.predict(scale * kt), expected, rtol=1e-8, atol=1e-10)


def test_ridgeless_eigh_of_a_singular_kernel_is_the_pseudo_inverse():
  """The eigh solver drops the eigenvalues of a rank-5 kernel of 30 examples that are round-off
  (below N * eps * lambda_max): kept, or given 1 / cutoff, they made coefficients of 1e12 to 1e16
  where numpy's pseudo-inverse gives 0.03."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(30, 5))
    k = features @ features.T  # a linear kernel: rank 5
    labels = rng.integers(0, 4, 30)
    y = np.eye(4)[labels] - 0.25
    expected = np.linalg.pinv(k, rcond=1e-10, hermitian=True) @ y  # a gap of 1e10: any cutoff
    model = KernelRegression.fit(k, labels, 4, regularizer=0.0, solver="eigh")
    assert np.all(np.isfinite(model.coefficients))
    np.testing.assert_allclose(model.coefficients, expected, rtol=1e-6,
                               atol=1e-8 * np.abs(expected).max())
    np.testing.assert_allclose(model.predict(k), k @ expected, atol=1e-8)


def test_spectral_preconditioner_is_the_inverse_on_the_top_space_and_scaled_identity_off_it():
  """V diag(1 / (lambda_i + s)) V^T + (I - V V^T) / (lambda_k + s), lambda_k the smallest of the
  top k given: applied to the identity, the dense matrix (with lambda_1, CG's condition number
  was no better than unpreconditioned)."""
  rng = np.random.default_rng(2)
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  values = np.geomspace(100.0, 0.01, 12)
  top, vectors, shift = values[:4], q[:, :4], 0.3
  operator = spectral_preconditioner(top, vectors, shift)
  outside = np.eye(12) - vectors @ vectors.T
  expected = (vectors * (1 / (top + shift))) @ vectors.T + outside / (top[-1] + shift)
  np.testing.assert_allclose(operator.matmat(np.eye(12)), expected, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(operator.matvec(q[:, 7]), q[:, 7] / (top[-1] + shift), rtol=1e-12)


def test_ridgeless_eigh_is_differentiable_at_an_exact_zero_eigenvalue():
  """The dropped eigenvalue's 1 / lambda is taken of 1, not of 0: K = diag(2, 1, 0) gives the
  pseudo-inverse's coefficients and a finite gradient (1 / 0 in the branch where() discards made
  it NaN), d sum(c) / dK_ii = -sum_c y_ic / K_ii^2 on the kept ones (-2 / 4 and -2.5 / 1)."""
  with jax.enable_x64(True):
    k = jnp.diag(jnp.array([2.0, 1.0, 0.0]))
    y = jnp.array([[1.0, 1.0], [0.5, 2.0], [3.0, -1.0]])
    np.testing.assert_allclose(ridge_coefficients(k, y, 0.0, "eigh"),
                               [[0.5, 0.5], [0.5, 2.0], [0.0, 0.0]], atol=1e-15)
    grad = np.asarray(jax.grad(lambda m: jnp.sum(ridge_coefficients(m, y, 0.0, "eigh")))(k))
    assert np.all(np.isfinite(grad)), grad
    np.testing.assert_allclose(np.diag(grad)[:2], [-0.5, -2.5], rtol=1e-12)


def test_an_unknown_solver_is_refused_not_solved_by_lstsq():
  """ridge_coefficients names the solvers it knows; any other name used to fall through to the
  lstsq branch, solving silently with a solver nobody asked for."""
  with pytest.raises(ValueError, match="solver='qr'; expected one of cholesky, eigh, lstsq"):
    ridge_coefficients(jnp.eye(3), jnp.ones((3, 2)), 0.0, "qr")


def test_cg_edge_cases_zero_target_singular_top_space_and_the_last_iteration():
  """Conjugate gradients on diagonal kernels with known answers: a zero target is the zero solution
  at residual 0 (not 0 / 0); top eigenpairs ending at lambda_k + shift = 0 make no preconditioner
  (its 1 / (lambda_k + shift) would be infinite) and K = diag(4, 2, 0, 0) still solves y = (1, 1,
  0, 0) to (1/4, 1/2, 0, 0); two distinct eigenvalues converge in exactly 2 iterations, which
  max_iters=2 allows: scipy then reports info=2 but the recomputed residual meets rtol; max_iters=0
  is no solve."""
  solution, solve = ridge_coefficients_cg(np.diag([3.0, 1.0]), np.zeros(2), 0.1)
  np.testing.assert_array_equal(solution, [0.0, 0.0])
  assert solve["relative_residual"] == 0.0 and solve["converged"]
  k = np.diag([4.0, 2.0, 0.0, 0.0])
  solution, solve = ridge_coefficients_cg(k, np.array([1.0, 1.0, 0.0, 0.0]), 0.0,
                                          (np.array([4.0, 2.0, 0.0]), np.eye(4)[:, :3]), rtol=1e-10)
  np.testing.assert_allclose(solution, [0.25, 0.5, 0.0, 0.0], atol=1e-12)
  assert solve["converged"]
  solution, solve = ridge_coefficients_cg(np.diag([4.0, 4.0, 1.0, 1.0]), np.ones(4), 0.0,
                                          rtol=1e-6, max_iters=2)
  np.testing.assert_allclose(solution, [0.25, 0.25, 1.0, 1.0], rtol=1e-12)
  assert solve["iterations"] == 2 and solve["relative_residual"] < 1e-6 and solve["converged"]
  # max_iters=0 runs no iteration (scipy still says info=0): x = 0 at residual 1, not converged.
  solution, solve = ridge_coefficients_cg(np.diag([4.0, 1.0]), np.ones(2), 0.0, rtol=1e-6,
                                          max_iters=0)
  np.testing.assert_array_equal(solution, [0.0, 0.0])
  assert solve["iterations"] == 0 and solve["relative_residual"] == 1.0 and not solve["converged"]


def test_evaluator_scores_a_kernel_regression_logits_fn_like_numpy():
  """evaluate() takes any logits_fn: on kernel regression its accuracy, loss and per-class accuracy
  (over a padded, 4-device batch loop) equal numpy's float64 ones, and an attack lowers them."""
  from ntk_scale import parallel
  from ntk_scale.data import Split
  from ntk_scale.evaluate import evaluate
  with jax.enable_x64(True):
    digits = load_digits()
    x, y = digits.train.images[:100].astype(np.float64), digits.train.labels[:100]
    xt, yt = digits.test.images[:50].astype(np.float64), digits.test.labels[:50]
    model = KernelRegression.fit(np.asarray(_rbf(x, x)), y, 10, regularizer=1e-3)
    scores = np.asarray(_rbf(xt, x)) @ model.coefficients  # float64 numpy from here on
    predictions = scores.argmax(-1)
    log_softmax = scores - scores.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    mesh = parallel.make_mesh()
    result = evaluate(model.logits_fn(_rbf, x), Split(xt, yt), 16, mesh, 10)  # 50 = 3 x 16 + 2 padded
    assert result["accuracy"] == np.mean(predictions == yt)
    np.testing.assert_allclose(result["loss"], -np.mean(log_softmax[np.arange(50), yt]), rtol=1e-6)
    expected_per_class = [np.mean(predictions[yt == c] == c) if np.any(yt == c) else 0.0 for c in range(10)]
    np.testing.assert_allclose(result["per_class_accuracy"], expected_per_class)
    pgd = attacks.build_attack(ml_collections.ConfigDict(dict(
        name="pgd", norm="linf", eps=0.2, num_steps=5, step_size=0.1, restarts=1, random_start=True)))
    attacked = evaluate(model.logits_fn(_rbf, x), Split(xt, yt), 16, mesh, 10, attack=pgd,
                        keep_examples=True)
    assert np.max(np.abs(attacked["examples"]["images"] - xt)) <= 0.2 + 1e-9
    assert attacked["accuracy"] < result["accuracy"]


def test_singular_kernel_with_cholesky_says_what_to_do():
  x, labels, _ = _problem()
  k = np.ones((len(x), len(x)))
  with pytest.raises(FloatingPointError, match="raise the regularizer or use eigh/lstsq"):
    KernelRegression.fit(k, labels, 4, solver="cholesky")



@pytest.mark.parametrize("labels", [[0, 1, 3], [0, -1, 1]])
def test_labels_outside_the_classes_are_refused(labels):
  """one_hot turns a label outside [0, C) into a row of zeros: a constant target that fits
  without complaint (a KernelStore of classes 3 and 7 keeps those ids)."""
  with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):
    KernelRegression.fit(np.eye(3), np.array(labels), 3)
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    predictor(lambda a, b: a @ b.T, jnp.eye(3), jnp.array([3, 7, 3]), 2)


def test_scores_a_block_of_training_images_at_a_time_equal_the_whole_row():
  """kernel_scores in blocks of 4 of 10 training images (the last padded with zero coefficients)
  equals K(x, X) A in one call, and so do its gradients with respect to the images."""
  x, labels, xt = _problem(n_train=10)
  coefficients = jnp.asarray(np.random.default_rng(1).normal(size=(10, 4)), jnp.float32)
  x, xt = jnp.asarray(x, jnp.float32), jnp.asarray(xt, jnp.float32)
  whole = lambda images: kernel_scores(_rbf, images, x, coefficients)
  blocked = lambda images: kernel_scores(_rbf, images, x, coefficients, block_size=4)
  np.testing.assert_allclose(blocked(xt), whole(xt), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_rbf(xt, x) @ coefficients, whole(xt), rtol=1e-6)
  loss = lambda f: jax.grad(lambda images: jnp.sum(jnp.sin(f(images))))(xt)
  np.testing.assert_allclose(loss(blocked), loss(whole), rtol=1e-4, atol=1e-6)
  model = KernelRegression(np.asarray(coefficients))
  np.testing.assert_allclose(model.logits_fn(_rbf, x, block_size=3)(xt), whole(xt), rtol=1e-5, atol=1e-6)


def all_highest(program, *args) -> bool:
  """Whether every matmul and convolution of the traced program, nested ones (scan, checkpoint,
  jit, custom derivatives) included, asks for HIGHEST precision."""
  traced = jax.make_jaxpr(program)(*args).jaxpr
  precisions = [eqn.params["precision"] for eqn in all_equations(traced)
                if eqn.primitive.name in ("dot_general", "conv_general_dilated")]
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  return bool(precisions) and all(p == highest for p in precisions)


@pytest.mark.parametrize("block_size", [None, 4])
def test_kernel_machines_compute_at_highest_precision(block_size):
  """On GPUs (TF32) and TPUs (bfloat16 passes) float32 matmuls default to less than float32: the
  predictions, the attacks' gradients and the fit ask for HIGHEST (on this CPU it changes
  nothing, so the programs are read instead)."""
  x, labels, xt = _problem(n_train=10)
  x, xt = jnp.asarray(x, jnp.float32), jnp.asarray(xt, jnp.float32)
  model = KernelRegression.fit(np.asarray(_rbf(x, x)), labels, 4, regularizer=0.1)
  logits_fn = model.logits_fn(_rbf, x, block_size=block_size)
  assert all_highest(logits_fn, xt)
  assert all_highest(jax.grad(lambda images: jnp.sum(logits_fn(images) ** 2)), xt)
  assert all_highest(lambda k: ridge_coefficients(k, jnp.ones((10, 4)), 0.1, "eigh"), _rbf(x, x))
  fitted = lambda train, images: predictor(_rbf, train, jnp.asarray(labels), 4, regularizer=0.1,
                                           solver="eigh")(images)
  assert all_highest(jax.grad(lambda train: jnp.sum(fitted(train, xt))), x)


@pytest.mark.parametrize("field,value", [("regularizer", -1.0), ("regularizer", float("inf")),
                                         ("solver", "qr")])
def test_bad_regression_field_is_named(field, value):
  section = ml_collections.ConfigDict(dict(regularizer=0.0, solver="cholesky"))
  section[field] = value
  with pytest.raises(ValueError, match=f"config.infinite.regression.{field}="):
    check_regression_config(section, "config.infinite.regression")


@pytest.fixture(scope="module")
def ntk_fn():
  """The analytic NTK of a 1-hidden-layer ReLU network; skips only when neural-tangents is absent."""
  if importlib.util.find_spec("neural_tangents") is None:
    pytest.skip(f"neural-tangents is not installed: {nt_compat.INSTALL_HINT}")
  from ntk_scale import infinite
  section = ml_collections.ConfigDict(dict(architecture="fc", depth=1, w_std=1.5, b_std=0.1,
                                           kernel="ntk", dtype="float32", batch_size=64))
  return infinite.kernel_function(section, 10)


def test_analytic_kernel_machines_compute_at_highest_precision(ntk_fn):
  x, _, xt = _problem(n_train=10)
  x, xt = jnp.asarray(x, jnp.float32), jnp.asarray(xt, jnp.float32)
  logits_fn = KernelRegression(np.ones((10, 10), np.float32)).logits_fn(ntk_fn, x, block_size=4)
  assert all_highest(jax.grad(lambda images: jnp.sum(logits_fn(images) ** 2)), xt)


def test_attacks_on_the_kernel_predictor_lower_accuracy_within_the_eps_ball(ntk_fn):
  digits = load_digits()
  x, y = digits.train.images[:200], digits.train.labels[:200]
  xt, yt = jnp.asarray(digits.test.images[:60]), jnp.asarray(digits.test.labels[:60])
  model = KernelRegression.fit(np.asarray(ntk_fn(x, x)), y, 10, regularizer=1e-3)
  logits_fn = model.logits_fn(ntk_fn, x)
  scores = jax.jit(logits_fn)  # one program for the four accuracies (op by op: seconds each)
  accuracy = lambda images: float(jnp.mean(jnp.argmax(scores(images), -1) == yt))
  clean, eps = accuracy(xt), 0.1
  assert clean > 0.8
  adversarial = {
      "fgsm": jax.jit(lambda a, b: attacks.fgsm(logits_fn, a, b, eps=eps))(xt, yt),
      "pgd": jax.jit(lambda a, b: attacks.pgd(logits_fn, a, b, jax.random.key(0), eps=eps,
                                              step_size=0.025, num_steps=10))(xt, yt)}
  for name, x_adv in adversarial.items():
    assert float(jnp.max(jnp.abs(x_adv - xt))) <= eps + 1e-6, name
    assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0, name
    assert accuracy(x_adv) < clean - 0.1, (name, clean, accuracy(x_adv))
  assert accuracy(adversarial["pgd"]) < accuracy(adversarial["fgsm"])


@pytest.mark.parametrize("field,value", [("infinite.num_train", 15), ("infinite.regression.solver", "qr"),
                                         ("infinite.robust_data.num_steps", -1),
                                         ("infinite.robust_data.data_eps", 0.0),
                                         ("infinite.robust_data.loss", "hinge"),
                                         ("infinite.robust_data.target_batch_size", 0),
                                         ("infinite.robust_data.checkpoint_every", 0),
                                         ("batch_size", 2000),
                                         ("infinite.transfer.widths", (0,)),
                                         ("infinite.architecture", "resnet")])
def test_bad_infinite_job_field_is_named_before_compute(field, value):
  from ntk_scale.infinite_job import check_infinite_config
  from test_train import load_config
  config = load_config("infinite_width", "digits")
  section, name = config, field.split(".")
  for part in name[:-1]:
    section = section[part]
  section[name[-1]] = value
  with pytest.raises(ValueError, match=f"config.{field}="):
    check_infinite_config(config, np.arange(1437) % 10, 10)
