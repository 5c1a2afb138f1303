"""The infinite-width pipeline against independent float64 references: the fully connected ReLU NTK
by its arc-cosine recursion (Jacot et al. 2018; Cho and Saul 2009) written in numpy, kernel
regression and its input gradient (training-free adversarial examples, Tsilivis and Kempe 2022)
by numpy solves and central finite differences, the robust-dataset outer gradient (Tsilivis, Su
and Kempe) by finite differences at fixed adversarial targets, the robust set's reuse on a rerun,
and transfer evaluation of a saved set by a per-example loop."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ntk_scale import attack_steps, attacks, parallel
from ntk_scale.kernel_regression import KernelRegression, predictor

from conftest import neural_tangents_or_skip

W_STD, B_STD, DEPTH, NUM_CLASSES, RIDGE = 1.5, 0.1, 2, 3, 1e-2


def _relu_ntk(x1: np.ndarray, x2: np.ndarray, depth: int = DEPTH) -> np.ndarray:
  """NTK of Flatten, depth x (Dense, ReLU), Dense in NTK parameterisation, by hand in float64:
  Sigma_0 = w^2 x.x'/d + b^2; per ReLU layer Sigma' = w^2 E[relu relu] + b^2,
  Theta' = w^2 (E[relu relu] + E[relu' relu'] Theta) + b^2 (arc-cosine kernels of degree 1 and 0)."""
  a, b = x1.reshape(len(x1), -1), x2.reshape(len(x2), -1)
  d = a.shape[1]
  k12 = W_STD**2 * a @ b.T / d + B_STD**2
  k11 = W_STD**2 * np.sum(a * a, 1) / d + B_STD**2
  k22 = W_STD**2 * np.sum(b * b, 1) / d + B_STD**2
  theta = k12.copy()
  for _ in range(depth):
    norm = np.sqrt(np.outer(k11, k22))
    cos = np.clip(k12 / norm, -1.0, 1.0)
    if x1 is x2:  # exactly 1 on the diagonal: arccos near 1 would amplify rounding to 1e-8
      np.fill_diagonal(cos, 1.0)
    angle = np.arccos(cos)
    relu = norm * (np.sin(angle) + (np.pi - angle) * cos) / (2 * np.pi)
    relu_derivative = (np.pi - angle) / (2 * np.pi)
    theta = W_STD**2 * (relu + relu_derivative * theta) + B_STD**2
    k12 = W_STD**2 * relu + B_STD**2
    k11, k22 = W_STD**2 * k11 / 2 + B_STD**2, W_STD**2 * k22 / 2 + B_STD**2
  return theta


def _numpy_scores(test: np.ndarray, train: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """K(test, X) (K(X, X) + lambda I)^{-1} (one-hot - 1/C), lambda = RIDGE * mean diag K."""
  k = _relu_ntk(train, train)
  targets = np.eye(NUM_CLASSES)[labels] - 1.0 / NUM_CLASSES
  alpha = np.linalg.solve(k + RIDGE * np.mean(np.diag(k)) * np.eye(len(k)), targets)
  return _relu_ntk(test, train) @ alpha


def _cross_entropy(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  shifted = scores - scores.max(-1, keepdims=True)
  return np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(labels)), labels]


def _section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(architecture="fc", depth=DEPTH, w_std=W_STD, b_std=B_STD,
                                        kernel="ntk", dtype="float64", batch_size=4))


def _problem(seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(12, 3, 3, 1))
  xt = rng.uniform(0.2, 0.8, size=(5, 3, 3, 1))  # inside [0, 1] by more than eps
  return x, np.arange(12) % NUM_CLASSES, xt, np.array([0, 1, 2, 1, 0])


@pytest.fixture(scope="module")
def ntk_fn():
  from ntk_scale import infinite
  neural_tangents_or_skip(infinite.FEATURE)
  return infinite.kernel_function(_section(), NUM_CLASSES)


def test_analytic_fc_ntk_is_the_arc_cosine_recursion(ntk_fn):
  from ntk_scale import infinite
  x, _, xt, _ = _problem()
  with jax.enable_x64(True):
    np.testing.assert_allclose(np.asarray(ntk_fn(xt, x)), _relu_ntk(xt, x), rtol=1e-12)
  # Blocked by nt.batch (12 = 3 x 4 rows, 5 padded to 8): the same values.
  np.testing.assert_allclose(infinite.kernel_matrix(_section(), NUM_CLASSES, xt, x), _relu_ntk(xt, x),
                             rtol=1e-12)
  # On the diagonal stax takes arccos of a cosine within rounding of 1 (angle ~1e-8), so it is off
  # the exact value by a few 1e-9 relative; off the diagonal by rounding.
  square, exact = infinite.kernel_matrix(_section(), NUM_CLASSES, x), _relu_ntk(x, x)
  np.testing.assert_allclose(np.diag(square), np.diag(exact), rtol=1e-8)
  off_diagonal = ~np.eye(len(x), dtype=bool)
  np.testing.assert_allclose(square[off_diagonal], exact[off_diagonal], rtol=1e-12)


def test_kernel_regression_scores_and_input_gradient_match_numpy_finite_differences(ntk_fn):
  """The gradient the training-free attacks follow: d CE(f(x_t), y_t) / d x_t of kernel regression,
  against central differences of the numpy predictor; FGSM is the clipped sign step along it."""
  x, y, xt, yt = _problem()
  with jax.enable_x64(True):
    model = KernelRegression.fit(_relu_ntk(x, x), y, NUM_CLASSES, regularizer=RIDGE)
    logits_fn = model.logits_fn(ntk_fn, x)  # each use compiled whole (op by op took seconds)
    np.testing.assert_allclose(np.asarray(jax.jit(logits_fn)(jnp.asarray(xt))),
                               _numpy_scores(xt, x, y), rtol=1e-10, atol=1e-12)
    loss = lambda images: jnp.sum(attack_steps.cross_entropy(logits_fn(images), jnp.asarray(yt)))
    gradient = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(xt)))
    fgsm = np.asarray(jax.jit(lambda images, labels: attacks.fgsm(logits_fn, images, labels, eps=0.1))(
        jnp.asarray(xt), jnp.asarray(yt)))
  h, expected = 1e-6, np.zeros_like(xt)
  for index in np.ndindex(*xt.shape):
    step = np.zeros_like(xt)
    step[index] = h
    expected[index] = np.sum(_cross_entropy(_numpy_scores(xt + step, x, y), yt)
                             - _cross_entropy(_numpy_scores(xt - step, x, y), yt)) / (2 * h)
  np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(fgsm, np.clip(xt + 0.1 * np.sign(expected), 0.0, 1.0), rtol=0, atol=1e-15)


def _robust_section(**overrides) -> ml_collections.ConfigDict:
  attack = ml_collections.ConfigDict(dict(name="pgd", norm="linf", eps=0.1, num_steps=3, step_size=0.05,
                                          restarts=1, random_start=True))
  section = ml_collections.ConfigDict(dict(num_steps=4, learning_rate=0.02, target_batch_size=6,
                                           loss="mse", data_eps=None, attack=attack, target_holdout=0.0,
                                           checkpoint_every=2))
  section.update(overrides)
  return section


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_robust_dataset_gradient_is_the_outer_loss_gradient_at_fixed_adversarial_targets(ntk_fn, loss):
  """Danskin: the gradient in the training images is that of the outer loss of kernel regression
  refitted on them, at the PGD points of the targets (held fixed); numpy central differences."""
  from ntk_scale.robust_dataset import adversarial_objective
  x, y, targets, target_labels = _problem(seed=1)
  attack = attacks.build_attack(_robust_section().attack)
  key = jax.random.key(3)
  with jax.enable_x64(True):
    objective = lambda support: adversarial_objective(
        ntk_fn, support, jnp.asarray(y), jnp.asarray(targets), jnp.asarray(target_labels), key,
        attack=attack, num_classes=NUM_CLASSES, regularizer=RIDGE, solver="cholesky", loss=loss)
    value, gradient = jax.value_and_grad(objective)(jnp.asarray(x))
    fitted = predictor(ntk_fn, jnp.asarray(x), jnp.asarray(y), NUM_CLASSES, regularizer=RIDGE)
    x_adv = np.asarray(attack(fitted, jnp.asarray(targets), jnp.asarray(target_labels), key))
  assert np.max(np.abs(x_adv - targets)) <= 0.1 + 1e-12 and np.any(x_adv != targets)

  def numpy_objective(support):
    scores = _numpy_scores(x_adv, support, y)
    if loss == "cross_entropy":
      return np.mean(_cross_entropy(scores, target_labels))
    regression_targets = np.eye(NUM_CLASSES)[target_labels] - 1.0 / NUM_CLASSES
    return 0.5 * np.mean(np.sum((scores - regression_targets) ** 2, -1))

  assert float(value) == pytest.approx(numpy_objective(x), rel=1e-10)
  h, expected = 1e-6, np.zeros_like(x)
  for index in np.ndindex(*x.shape):
    step = np.zeros_like(x)
    step[index] = h
    expected[index] = (numpy_objective(x + step) - numpy_objective(x - step)) / (2 * h)
  np.testing.assert_allclose(np.asarray(gradient), expected, rtol=1e-5, atol=1e-10)


def _rbf(x1, x2):
  a, b = x1.reshape(len(x1), -1), x2.reshape(len(x2), -1)
  squared = jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None] - 2 * a @ b.T
  return jnp.exp(-squared / a.shape[1])


def test_robust_dataset_is_deterministic_in_its_seed():
  from ntk_scale.robust_dataset import optimise_dataset
  x, y, _, _ = _problem()
  regression = ml_collections.ConfigDict(dict(regularizer=RIDGE, solver="cholesky"))
  with jax.enable_x64(True):
    run = lambda seed: optimise_dataset(_robust_section(), _rbf, x, y, NUM_CLASSES, regression, seed)
    (first, first_record), (again, again_record), (other, _) = run(0), run(0), run(1)
  np.testing.assert_array_equal(first, again)
  assert first_record["objective"] == again_record["objective"]
  assert not np.array_equal(first, other)


def test_a_rerun_reuses_the_robust_dataset_bit_for_bit(tmp_path):
  """A rerun reads robust_dataset.npz back; kernel regression must then see the very images the
  first run optimised (the job's resume rule: the same result as an uninterrupted run), and only
  when they were optimised from these training images."""
  from ntk_scale.infinite_job import _robust_dataset
  x, y, _, _ = _problem()
  section = _section()
  section.robust_data = _robust_section()
  section.regression = ml_collections.ConfigDict(dict(regularizer=RIDGE, solver="cholesky"))
  rows = (np.arange(len(x)), np.arange(len(x)))
  path = str(tmp_path / "robust_dataset.npz")
  with jax.enable_x64(True):
    fresh, fresh_record = _robust_dataset(section, path, _rbf, x, y, rows, NUM_CLASSES, seed=0)
    reused, reused_record = _robust_dataset(section, path, _rbf, x, y, rows, NUM_CLASSES, seed=0)
  assert reused_record == fresh_record
  assert reused.dtype == fresh.dtype == x.dtype
  np.testing.assert_array_equal(reused, fresh)
  # Other pixels, the same labels and rows (say, another config.data.transform): optimised again,
  # as in a fresh directory; so is a set written before the file recorded its identity.
  other = np.clip(x * 0.5 + 0.25, 0, 1)
  with jax.enable_x64(True):
    again, _ = _robust_dataset(section, path, _rbf, other, y, rows, NUM_CLASSES, seed=0)
    expected, _ = _robust_dataset(section, str(tmp_path / "other.npz"), _rbf, other, y, rows,
                                  NUM_CLASSES, seed=0)
  assert not np.array_equal(again, fresh)
  np.testing.assert_array_equal(again, expected)
  with np.load(path, allow_pickle=False) as stored:
    older = {k: stored[k] for k in stored.files if k != "identity"}
  np.savez(path, **{**older, "images": np.zeros_like(older["images"])})
  with jax.enable_x64(True):
    recomputed, _ = _robust_dataset(section, path, _rbf, other, y, rows, NUM_CLASSES, seed=0)
  np.testing.assert_array_equal(recomputed, expected)


def test_transfer_evaluation_pairs_each_saved_image_with_its_own_label(tmp_path):
  """A saved set (format round trip) scored by another model: accuracy and transfer rate equal a
  per-example loop, over 4 devices with a padded last batch (11 = 2 x 4 + 3)."""
  from ntk_scale.adversarial_sets import load_adversarial_set, save_adversarial_set
  from ntk_scale.evaluate import evaluate_transfer
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(11, 2, 2, 1)).astype(np.float32)
  labels = rng.integers(0, 3, 11).astype(np.int32)
  source_predictions = np.where(rng.uniform(size=11) < 0.6, (labels + 1) % 3, labels).astype(np.int32)
  directory = str(tmp_path / "adversarial" / "pgd")
  # the source misclassifies examples 0 and 1 clean: they keep their clean image, no attack's doing
  source_clean = labels.copy()
  source_clean[:2] = (labels[:2] + 1) % 3
  source_predictions[:2] = source_clean[:2]
  arrays = {"images": images, "labels": labels, "predictions": source_predictions,
            "clean_predictions": source_clean}
  save_adversarial_set(directory, arrays, {"source": "kernel_regression", "accuracy": 0.5})
  loaded, meta = load_adversarial_set(directory)
  for name, array in arrays.items():
    assert loaded[name].dtype == array.dtype
    np.testing.assert_array_equal(loaded[name], array)
  assert meta == {"source": "kernel_regression", "accuracy": 0.5}

  def predict(image):  # the class of the brightest of the first three pixels
    return int(np.argmax(image.reshape(-1)[:3]))

  model = lambda batch: batch.reshape(len(batch), -1)[:, :3]
  result = evaluate_transfer(model, directory, 4, parallel.make_mesh(), 3)
  correct = [predict(images[i]) == labels[i] for i in range(11)]
  source_fooled = [i for i in range(2, 11) if source_predictions[i] != labels[i]]
  assert source_fooled and len(source_fooled) < 11 and 0 < sum(correct) < 11
  assert result["accuracy"] == pytest.approx(np.mean(correct), abs=1e-12)
  expected_rate = np.mean([not correct[i] for i in source_fooled])
  assert result["transfer_rate"] == pytest.approx(expected_rate, abs=1e-12)
