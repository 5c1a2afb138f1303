"""Eigen-images (Loo et al. 2022): the parameter direction J_c(X)^T u against an explicit float64
Jacobian, the cosine objective and its input gradient against float64 finite differences, the ascent
raising (and the negative run lowering) the cosine, the closed-form optimum of a linear model, and the
`eigen_images` job end to end on a tiny digits run."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import matplotlib.image
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_scale import jobs, parallel
from ntk_scale.data import load_digits
from ntk_scale.kernel_regression import ridge_coefficients_cg
from ntk_scale.models import build_model
from ntk_scale.ntk import eigen_images_job, kernel_eigenpairs
from ntk_scale.ntk.eigen_features import parameter_directions
from ntk_scale.ntk.eigen_images import class_logit, cosine_fn, optimise_images
from ntk_scale.ntk.spectrum import StoredKernelOperator, eigh
from ntk_scale.ntk.store import KernelStore
from ntk_scale.ntk.tile_math import LogitSpec

from test_spectrum import write_store
from test_kernel_regression import all_highest
from test_train import load_config

IMAGES = load_digits().train.images


def tiny_logit(name: str, class_index: int, dtype=jnp.float32, **model):
  """A digits model's logit f_c with random parameters and BatchNorm statistics (inference mode).
  Drawn by numpy on the shapes of `init`: compiling flax's initialisers takes longer than the tests."""
  net = build_model(ml_collections.ConfigDict(dict(name=name, **model)), 10)
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    value = {"kernel": lambda: rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1])),
             "scale": lambda: rng.uniform(0.5, 1.5, shape), "var": lambda: rng.uniform(0.5, 1.5, shape),
             }.get(name, lambda: 0.1 * rng.standard_normal(shape))()  # bias, BatchNorm mean
    return jnp.asarray(value, dtype)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  stats = variables.get("batch_stats", {})
  apply_fn = lambda p, x: net.apply({"params": p, "batch_stats": stats}, x, train=False)
  return class_logit(apply_fn, class_index), variables["params"]


def explicit_jacobian(logit_fn, params, images) -> np.ndarray:
  """[N, P] rows grad_theta f_c(x_n), float64, by jacrev over the raveled parameters."""
  theta, unravel = ravel_pytree(params)
  return np.asarray(jax.jit(jax.jacrev(lambda t: logit_fn(unravel(t), images)))(theta), np.float64)


def directions_of(logit_fn, params, images, weights) -> jax.Array:
  """v = J_c(X)^T u for each column of `weights` [N, M]: [M, P], by the job's function (that of
  eigen_features, over the 4 devices) on a model of the one logit f_c."""
  one_logit = lambda p, x: logit_fn(p, x)[:, None]
  return jnp.asarray(parameter_directions(one_logit, params, np.asarray(images),
                                          np.asarray(weights, np.float32)[None], LogitSpec("class", 1, 0))[0, 0])


def test_direction_is_jacobian_transpose_times_weights():
  logit_fn, params = tiny_logit("cnn", 3, width=4, batch_norm=True)
  x, weights = IMAGES[:7], np.random.default_rng(0).standard_normal((7, 2))
  directions = np.asarray(directions_of(logit_fn, params, x, weights))
  with jax.enable_x64(True):
    logit64, params64 = tiny_logit("cnn", 3, jnp.float64, width=4, batch_norm=True)
    expected = explicit_jacobian(logit64, params64, jnp.asarray(x, jnp.float64)).T @ weights  # [P, 2]
  assert directions.shape == expected.T.shape
  np.testing.assert_allclose(directions, expected.T, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_cosine_and_its_input_gradient_match_float64_references():
  """cos(g(x), v) against an explicit jacrev gradient; d cos / dx against central differences."""
  with jax.enable_x64(True):
    logit_fn, params = tiny_logit("mlp", 1, jnp.float64, width=5, depth=1)
    rng = np.random.default_rng(1)
    v = rng.standard_normal((2, ravel_pytree(params)[0].size))
    x = rng.uniform(0.2, 0.8, (2, 8, 8, 1))

    theta, unravel = ravel_pytree(params)
    gradient = jax.jit(jax.jacrev(lambda t, image: logit_fn(unravel(t), image[None])[0]))

    def reference(image, direction):
      g = np.asarray(gradient(theta, jnp.asarray(image)), np.float64)
      return g @ direction / np.linalg.norm(g) / np.linalg.norm(direction)

    cos = cosine_fn(logit_fn, params)
    np.testing.assert_allclose(cos(jnp.asarray(x), jnp.asarray(v)),
                               [reference(x[m], v[m]) for m in range(2)], rtol=1e-12)
    grad = np.asarray(jax.grad(lambda images: cos(images, jnp.asarray(v))[0])(jnp.asarray(x)))[0]
    h, numeric = 1e-6, np.zeros(64)
    for p in range(64):
      step = np.zeros(64)
      step[p] = h
      numeric[p] = (reference(x[0] + step.reshape(8, 8, 1), v[0])
                    - reference(x[0] - step.reshape(8, 8, 1), v[0])) / (2 * h)
    np.testing.assert_allclose(grad.ravel(), numeric, rtol=0, atol=1e-7 * np.abs(numeric).max() + 1e-9)
    assert np.abs(numeric).max() > 1e-3  # the test sees a real gradient


def test_ascent_raises_and_descent_lowers_the_cosine_pixels_in_range():
  """Random weights u on ten images; and u = e_3, whose v = g(x_3) is reached (cos 1) at x = x_3."""
  logit_fn, params = tiny_logit("mlp", 0, width=16, depth=1)
  weights = np.concatenate([np.random.default_rng(2).standard_normal((10, 1)), np.eye(10)[:, 3:4]], 1)
  directions = directions_of(logit_fn, params, IMAGES[:10], weights)
  directions = jnp.repeat(directions, 2, axis=0)
  signs = jnp.array([1.0, -1.0, 1.0, -1.0])
  grey = jnp.full((4, 8, 8, 1), 0.5)
  images, final = optimise_images(logit_fn, params, directions, signs, grey, 100, learning_rate=0.05)
  _, start = optimise_images(logit_fn, params, directions, signs, grey, 0, learning_rate=0.05)
  np.testing.assert_allclose(final, cosine_fn(logit_fn, params)(images, directions), atol=1e-6)
  assert final[0] > start[0] + 0.3 and final[1] < start[1] - 0.05, (start, final)
  assert final[2] > 0.999 and final[3] < start[3] - 0.3, (start, final)
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
  assert float(images.min()) == 0.0 or float(images.max()) == 1.0  # the clip was needed


def test_linear_model_optimum_is_the_eigenvector_weighted_mean_image():
  """f_c(x) = w_c . x + b_c: g(x) = [x, 1] on class c's weights (0 elsewhere), K_c = X X^T + 1, and
  v = [X^T u, sum u]. The top eigenvector u of this positive matrix is positive (Perron), so
  x* = X^T u / sum u, a convex combination of images (inside [0, 1]), has g(x*) parallel to v:
  cos = 1 there and nowhere else."""
  c, x = 2, IMAGES[:30]
  logit_fn, params = tiny_logit("mlp", c, depth=0)  # the MLP without hidden layers is linear
  flat = x.reshape(30, -1).astype(np.float64)
  values, vectors = np.linalg.eigh(flat @ flat.T + 1.0)
  u = vectors[:, -1] * np.sign(vectors[:, -1].sum())
  assert np.all(u > 0)
  optimum = (flat.T @ u / u.sum()).reshape(8, 8, 1)

  direction = directions_of(logit_fn, params, x, u[:, None])
  head = ravel_pytree(params)[1](direction[0])["head"]
  expected_kernel = np.zeros((64, 10))
  expected_kernel[:, c] = flat.T @ u
  np.testing.assert_allclose(head["kernel"], expected_kernel, atol=1e-4)
  np.testing.assert_allclose(head["bias"], np.eye(10)[c] * u.sum(), atol=1e-5)
  assert np.sum(np.asarray(direction, np.float64) ** 2) == pytest.approx(values[-1], rel=1e-5)

  images, final = optimise_images(logit_fn, params, direction, jnp.ones(1),
                                  jnp.full((1, 8, 8, 1), 0.5), 400, learning_rate=0.01)
  assert float(final[0]) > 0.9999
  np.testing.assert_allclose(images[0], optimum, atol=0.03)


def images_config(**eigen_images):
  c = load_config("digits", "smoke")
  c.num_epochs = 0.125
  c.checkpoint.fractional_epochs = ()
  c.model.name, c.model.width, c.model.depth = "mlp", 8, 1  # compiles in a fraction of the CNN's time
  c.phase2.num_epochs = 0
  c.eval_attacks = ml_collections.ConfigDict()  # not needed here: spare the time
  c.job = "eigen_images"
  c.kernel.num_examples = 20
  c.kernel.tile_size = 20
  c.kernel.logits = "0"
  c.eigen_images.num_eigenvectors = 2
  c.eigen_images.steps = 30
  c.eigen_images.learning_rate = 0.05
  for k, v in eigen_images.items():
    setattr(c.eigen_images, k, v)
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("eigen_images"))
  c = images_config()
  c.job = "train"
  jobs.run(c, path)
  return path


def test_job_writes_images_and_cosines_and_a_rerun_reloads_them(workdir, monkeypatch):
  # The directions' Jacobian rows at config.kernel.precision (HIGHEST), as the kernel's own: on a
  # TPU the default precision would round them to bfloat16 (read from the traced programs here).
  highest, directions = [], eigen_images_job.parameter_directions
  def checked(apply_fn, params, images, *args, **kwargs):
    logits = lambda p: jnp.sum(apply_fn(p, images[:2]))
    highest.append(all_highest(logits, params) and all_highest(jax.grad(logits), params))
    return directions(apply_fn, params, images, *args, **kwargs)
  monkeypatch.setattr(eigen_images_job, "parameter_directions", checked)
  result = jobs.run(images_config(logit="4"), workdir)
  assert highest == [True]
  directory = os.path.join(workdir, "eigen_images", "phase1_epoch0.125_train20_class4")
  assert result["eigen_images"] == directory and result["class"] == 4
  assert KernelStore.open(result["source_kernel"]).meta["logits"] == "class 4"
  png = matplotlib.image.imread(os.path.join(directory, "eigen_images.png"))
  assert png.ndim == 3 and png.shape[0] > png.shape[1] > 100  # 3 rows of 2 images
  with np.load(os.path.join(directory, "images.npz")) as saved:
    images = saved["images"]
  assert images.shape == (6, 8, 8, 1) and images.min() >= 0 and images.max() <= 1
  with open(os.path.join(directory, "cosines.json")) as f:
    record = json.load(f)
  assert [r["name"] for r in record["rows"]] == ["eigenvector 0", "eigenvector 1", "dual weights"]
  for row in record["rows"]:
    assert row["positive_cosine"] > row["grey_cosine"] > row["negative_cosine"], row
  # |J^T u|^2 = u^T K u = lambda: the kernel on disk belongs to the restored model.
  np.testing.assert_allclose(record["direction_norm_over_eigenvalue"], 1.0, rtol=1e-3)

  monkeypatch.setattr(eigen_images_job, "optimise_images", lambda *a, **k: pytest.fail("recomputed"))
  again = jobs.run(images_config(logit="4"), workdir)
  assert again["rows"] == record["rows"]
  # Other settings (more steps) are not answered with the saved images: they are recomputed.
  monkeypatch.undo()
  longer = jobs.run(images_config(logit="4", steps=40), workdir)
  assert longer["settings"]["steps"] == 40 and longer["rows"] != record["rows"]


def test_a_kernel_computed_again_under_its_name_is_not_taken_for_the_old_one(workdir):
  """A kernel deleted and computed again from another subset under the same name
  (config.kernel.subset_seed is a runtime field): its images are recomputed, not read back."""
  c = images_config(logit="4")
  c.kernel.name = "recomputed"
  first = jobs.run(c, workdir)
  indices = KernelStore.open(first["source_kernel"]).indices()
  shutil.rmtree(first["source_kernel"])
  c.kernel.subset_seed = 1
  again = jobs.run(c, workdir)
  assert again["source_kernel"] == first["source_kernel"]
  assert not np.array_equal(KernelStore.open(again["source_kernel"]).indices(), indices)
  assert again["settings"]["kernel"] != first["settings"]["kernel"]
  assert again["rows"] != first["rows"]


def test_cg_dual_weights_equal_a_dense_solve_and_the_preconditioner_cuts_iterations(tmp_path):
  """(K + r I)^{-1} y by CG on a kernel on disk with eigenvalues i^-2 (condition ~1e4 at this ridge):
  equal to np.linalg.solve, one pass over the kernel per iteration and one for the residual; the
  top-20 spectral preconditioner needs a third of the iterations (49 against 144 when written); a
  capped run says so."""
  n = 120
  q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((n, n)))
  matrix = (q * np.arange(1, n + 1, dtype=np.float64) ** -2.0) @ q.T
  store = write_store(tmp_path / "k", matrix, tile=16)
  y = np.random.default_rng(4).standard_normal(n)
  shift = 1e-3 * np.trace(matrix) / n
  expected = np.linalg.solve(matrix + shift * np.eye(n), y)
  pairs = eigh(matrix)
  top = (pairs.values[:20], pairs.vectors[:, :20])
  iterations = {}
  for name, eigenpairs in (("preconditioned", top), ("plain", None)):
    operator = StoredKernelOperator(store, "float64", max_block_bytes=40 * n * 8)  # 32-row panels
    x, info = ridge_coefficients_cg(operator, y, shift, eigenpairs, rtol=1e-10, max_iters=1000)
    np.testing.assert_allclose(x, expected, rtol=1e-7, atol=1e-7 * np.abs(expected).max())
    assert info["method"] == "cg" and info["converged"] and info["relative_residual"] <= 1e-10, info
    assert operator.passes == info["iterations"] + 1 and operator.panels_read == 4 * operator.passes
    iterations[name] = info["iterations"]
  assert iterations["preconditioned"] < iterations["plain"] / 2, iterations
  capped, info = ridge_coefficients_cg(matrix, y, shift, top, rtol=1e-10, max_iters=3)
  assert info["iterations"] == 3 and not info["converged"] and info["relative_residual"] > 1e-10
  assert np.linalg.norm(y - (matrix + shift * np.eye(n)) @ capped) / np.linalg.norm(y) == (
      pytest.approx(info["relative_residual"], rel=1e-9))


def test_dense_dual_weights_are_solved_on_the_host_cpu_where_the_devices_are_tpus(tmp_path, monkeypatch):
  matrix = np.random.default_rng(5).standard_normal((12, 12))
  store = write_store(tmp_path / "k", matrix @ matrix.T + np.eye(12), tile=4,
                      labels=np.arange(12) % 3, num_classes=3)
  section = ml_collections.ConfigDict(dict(regularizer=1e-3, solver="cholesky"))
  _, on_device, _ = eigen_images_job.dense_weights(store, 3, 1, section)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # no float64 arithmetic there
  assert parallel.float64_device() == jax.local_devices(backend="cpu")[0]
  _, on_host, _ = eigen_images_job.dense_weights(store, 3, 1, section)
  np.testing.assert_array_equal(on_host, on_device)


def test_unregularised_cholesky_on_a_singular_kernel_is_refused_not_written_as_nan(tmp_path):
  """A class kernel of rank 4 < N (fewer parameters than examples): Cholesky with regularizer 0
  breaks down, and the error names both fields; eigh gives the least-squares weights."""
  features = np.random.default_rng(6).standard_normal((12, 4))
  matrix = features @ features.T
  labels = np.arange(12) % 3
  store = write_store(tmp_path / "k", matrix, tile=4, labels=labels, num_classes=3)
  section = ml_collections.ConfigDict(dict(regularizer=0.0, solver="cholesky"))
  with pytest.raises(FloatingPointError, match="config.eigen_images.regularizer=0.0.*"
                                               "config.eigen_images.solver='cholesky'"):
    eigen_images_job.dense_weights(store, 3, 1, section)
  section.solver = "eigh"
  _, dual, _ = eigen_images_job.dense_weights(store, 3, 1, section)
  expected = np.linalg.pinv(matrix, rcond=1e-10) @ (np.eye(3)[labels][:, 1] - 1 / 3)
  np.testing.assert_allclose(matrix @ dual, matrix @ expected, atol=1e-9)


def test_top_mode_equals_the_dense_job_without_reading_the_kernel_whole(workdir, monkeypatch, capsys):
  """A kernel above DENSE_MAX_ROWS (here 10 rows; this one has 20): eigenvectors from the spectrum
  job (LOBPCG, float64) and dual weights by CG on the kernel on disk give the dense job's weights,
  images and cosines; the kernel is only ever read by row panels. A rerun reads the spectrum back,
  and CG stopped by config.eigen_images.cg_max_iters says so."""
  monkeypatch.setattr(kernel_eigenpairs, "DENSE_MAX_ROWS", 10)

  def config(**fields):
    c = images_config(logit="6", **fields)
    c.spectrum.num_eigenpairs, c.spectrum.oversample, c.spectrum.dtype = 3, 0, "float64"  # LOBPCG
    return c

  def saved(result):
    with np.load(os.path.join(result["eigen_images"], "images.npz")) as arrays:
      return arrays["weights"], arrays["images"]

  dense = jobs.run(config(eigensolver="dense"), workdir)
  assert "eigen-images of class 6: every eigenpair (20 rows), dual weights by cholesky" in (
      capsys.readouterr().out)
  dense_weights, dense_images = saved(dense)
  shutil.rmtree(dense["eigen_images"])  # else the next run reloads these

  read = KernelStore.read
  def panels_only(self, rows=slice(None), cols=slice(None)):
    assert (rows, cols) != (slice(None), slice(None)), "the kernel was read whole"
    return read(self, rows, cols)
  monkeypatch.setattr(KernelStore, "read", panels_only)
  operators = []
  class Counted(StoredKernelOperator):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      operators.append(self)
  monkeypatch.setattr(eigen_images_job, "StoredKernelOperator", Counted)

  top = jobs.run(config(), workdir)
  out = capsys.readouterr().out
  assert ("eigen-images of class 6: the top 3 eigenpairs by the spectrum job (20 rows, above 10), "
          "dual weights by conjugate gradients") in out
  assert "spectrum plan: sharded LOBPCG" in out and "warning" not in out
  assert dense["eigensolver"] == "dense" and dense["dual_solver"] == {"method": "cholesky"}
  solve = top["dual_solver"]
  assert top["eigensolver"] == "top" and solve["method"] == "cg" and solve["converged"], solve
  assert solve["relative_residual"] <= 1e-6 and operators[0].passes == solve["iterations"] + 1
  with open(os.path.join(top["eigen_images"], "cosines.json")) as f:
    assert json.load(f)["dual_solver"] == solve
  np.testing.assert_allclose(top["eigenvalues"], dense["eigenvalues"], rtol=1e-8)
  top_weights, top_images = saved(top)
  np.testing.assert_allclose(top_weights[:, :2], dense_weights[:, :2], rtol=0, atol=1e-9)
  np.testing.assert_allclose(top_weights[:, 2], dense_weights[:, 2], rtol=1e-6,
                             atol=1e-6 * np.abs(dense_weights[:, 2]).max())
  for mine, theirs in zip(top["rows"], dense["rows"]):
    assert mine["name"] == theirs["name"]
    for key in ("positive_cosine", "negative_cosine", "grey_cosine"):
      assert mine[key] == pytest.approx(theirs[key], abs=1e-4), (mine, theirs)
  np.testing.assert_allclose(top_images, dense_images, rtol=0, atol=1e-4)

  shutil.rmtree(top["eigen_images"])
  capped = jobs.run(config(cg_max_iters=2), workdir)
  out = capsys.readouterr().out
  assert "already computed" in out and "LOBPCG" not in out  # the spectrum is read back
  assert ("warning: CG for the dual weights stopped after 2 iterations" in out
          and "config.eigen_images.cg_max_iters" in out), out
  assert capped["dual_solver"]["iterations"] == 2 and not capped["dual_solver"]["converged"]


def test_a_missing_epoch_is_named(workdir):
  with pytest.raises(Exception, match=r"config\.eigen_images\.epoch=7"):
    jobs.run(images_config(epoch=7.0), workdir)


@pytest.mark.parametrize("field,value", [
    ("num_eigenvectors", 0), ("num_eigenvectors", 21), ("steps", 0),
    ("learning_rate", 0.0), ("regularizer", -1.0), ("solver", "qr"), ("logit", "trace"),
    ("logit", "10"), ("eigensolver", "lanczos"), ("cg_tol", 0.0), ("cg_tol", -1e-6),
    ("cg_max_iters", 0)])
def test_bad_fields_are_named_before_compute(tmp_path, field, value):
  with pytest.raises(ValueError, match=rf"config\.eigen_images\.{field}"):
    jobs.run(images_config(**{field: value}), str(tmp_path))  # no checkpoint there: nothing ran


def test_a_kernel_of_no_single_class_is_named(tmp_path):
  config = images_config()
  config.kernel.logits = "trace"
  with pytest.raises(ValueError, match=r"config\.kernel\.logits='trace': eigen-images need"):
    jobs.run(config, str(tmp_path))


def test_epoch_0_of_eigen_images_is_the_initialisation_not_unset():
  """config.eigen_images.epoch=0.0 (the initial checkpoint) replaces config.kernel.epoch as any
  other epoch does: only None leaves config.kernel's."""
  c = load_config("digits")
  c.kernel.epoch, c.eigen_images.logit = 3.0, "2"
  c.eigen_images.epoch = 0.0
  k = eigen_images_job.kernel_config(c)
  assert (k.kernel.epoch, k.kernel.logits) == (0.0, "2")
  c.eigen_images.epoch = None
  assert eigen_images_job.kernel_config(c).kernel.epoch == 3.0


def test_as_many_eigenvectors_as_the_class_kernel_has_examples_are_allowed():
  """num_eigenvectors up to the class kernel's size: equal is every eigenvector, one more refused."""
  e = ml_collections.ConfigDict({"num_eigenvectors": 7})
  eigen_images_job.check_num_eigenvectors(e, 7)
  with pytest.raises(ValueError, match="num_eigenvectors=7 exceeds the 6 examples"):
    eigen_images_job.check_num_eigenvectors(e, 6)


def test_another_regularizer_is_not_answered_with_the_saved_images(workdir, monkeypatch):
  """The dual weights (K + lambda I)^{-1} y change with config.eigen_images.regularizer: a rerun
  with another one optimises its images again, while the same settings read them back."""
  first = jobs.run(images_config(logit="5", steps=1), workdir)

  class Recomputed(Exception):
    pass

  def refuse(*args, **kwargs):
    raise Recomputed

  monkeypatch.setattr(eigen_images_job, "optimise_images", refuse)
  assert jobs.run(images_config(logit="5", steps=1), workdir)["rows"] == first["rows"]
  with pytest.raises(Recomputed):
    jobs.run(images_config(logit="5", steps=1, regularizer=10 * first["regularizer"] + 1e-3), workdir)


def test_another_cg_tolerance_is_not_answered_with_the_saved_images(workdir, monkeypatch):
  """In top mode the dual weights are CG's to config.eigen_images.cg_tol: a rerun at another
  tolerance solves and optimises again (the same settings read the images back)."""
  monkeypatch.setattr(kernel_eigenpairs, "DENSE_MAX_ROWS", 10)

  def config(**fields):
    c = images_config(logit="7", steps=1, eigensolver="top", **fields)
    c.spectrum.num_eigenpairs, c.spectrum.oversample, c.spectrum.dtype = 3, 0, "float64"
    return c

  first = jobs.run(config(), workdir)
  assert first["eigensolver"] == "top"

  class Recomputed(Exception):
    pass

  def refuse(*args, **kwargs):
    raise Recomputed

  monkeypatch.setattr(eigen_images_job, "optimise_images", refuse)
  assert jobs.run(config(), workdir)["rows"] == first["rows"]
  with pytest.raises(Recomputed):
    jobs.run(config(cg_tol=config().eigen_images.cg_tol * 100), workdir)
