"""Eigen-features: the groups partition the numerical rank, their predictors sum to ridgeless kernel
regression, each equals the explicit float64 Jacobian formula, and the job reports them."""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType, Mesh

from ntk_scale import infinite, jobs, parallel
from ntk_scale.data import load_digits
from ntk_scale.kernel_regression import KernelRegression
from ntk_scale.models import build_model
from ntk_scale.ntk import eigen_features_job, empirical_ntk, kernel_eigenpairs
from ntk_scale.ntk.eigen_features import (directions_program, examples_per_device, feature_groups,
                                          feature_logits_fn, group_coefficients, most_rows,
                                          parameter_directions)
from ntk_scale.ntk.job import inference_apply, select_examples
from ntk_scale.ntk.spectrum import eigh, rounding_floor
from ntk_scale.ntk.store import KernelStore
from ntk_scale.ntk.tile_math import LogitSpec
from ntk_scale.preemption import Preempted
from ntk_scale.restore import restore_for_inference

from conftest import notices_from
from test_infinite import nt  # noqa: F401  (fixture)
from test_kernel_regression import all_highest
from test_train import load_config


def _targets(labels, c):
  return np.eye(c)[labels] - 1.0 / c


def test_groups_are_singles_then_doubling_up_to_the_numerical_rank():
  values = np.concatenate([np.logspace(3, -3, 40), [1e-14, 0.0]])
  groups = feature_groups(values, num_single=5, floor=rounding_floor("float64", values.sum()))
  assert [g.name for g in groups] == ["0", "1", "2", "3", "4", "5-9", "10-19", "20-39"]
  np.testing.assert_array_equal(np.concatenate([g.indices for g in groups]), np.arange(40))


def test_groups_stop_at_the_rounding_of_the_kernels_dtype():
  """A float32 kernel of rank 40 in 120 rows: its other 80 eigenvalues are float32 rounding (up to
  about 1e-7 of the trace), which the old rule (above 1e-10 lambda_1) grouped as features: their
  1/lambda made a noise "feature" look useful and non-robust and spoilt the "all" row."""
  rng = np.random.default_rng(0)
  z = rng.normal(size=(120, 40)) * np.geomspace(1, 1e-2, 40)
  kernel = (z @ z.T).astype(np.float32)
  values = eigh(kernel).values  # in float64, as the jobs solve it
  assert np.sum(values > 1e-10 * values[0]) > 40  # rounding the old rule kept
  groups = feature_groups(values, 5, rounding_floor("float32", np.trace(kernel.astype(np.float64))))
  np.testing.assert_array_equal(np.concatenate([g.indices for g in groups]), np.arange(40))


def test_features_sum_to_ridgeless_kernel_regression_and_match_the_definition():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(30 + 7, 12))
  kernel_all = z @ z.T + 1e-3 * np.eye(37)  # train 30 + test 7, one PSD kernel
  k_train, cross = kernel_all[:30, :30], kernel_all[30:, :30]
  targets = _targets(rng.integers(0, 3, 30), 3)
  pairs = eigh(k_train)
  groups = feature_groups(pairs.values, num_single=4)
  a = group_coefficients(pairs.values, pairs.vectors, targets, groups)
  np.testing.assert_allclose(np.einsum("bn,gnc->bc", cross, a), cross @ np.linalg.solve(k_train, targets),
                             rtol=1e-8, atol=1e-10)
  # Feature 2 by its definition: lambda^-1 K(x, X) v v^T Y.
  v = pairs.vectors[:, 2]
  np.testing.assert_allclose(cross @ a[2], np.outer(cross @ v, v @ targets) / pairs.values[2], rtol=1e-10)


def test_empirical_features_equal_the_explicit_jacobian_formula():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(5, 7)), rng.normal(size=(7, 3))
    params = {"w1": jnp.asarray(w1), "w2": jnp.asarray(w2)}
    apply_fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    x_train, x_test = jnp.asarray(rng.normal(size=(9, 5))), jnp.asarray(rng.normal(size=(4, 5)))
    coefficients = jnp.asarray(rng.normal(size=(2, 9, 3)))
    def jac(x):  # [B, C, P]: every logit's Jacobian row
      j = jax.jacrev(lambda p: apply_fn(p, x))(params)
      return np.concatenate([np.asarray(j[k]).reshape(len(x), 3, -1) for k in sorted(j)], 2)

    one_device = Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,), axis_types=(AxisType.Auto,))
    # Trace: rows of 3 x 56 float64 parameters (1344 bytes), a sum of 2 x 3 of them per device
    # (twice: the devices' sums are added into a copy); a budget for these and two examples' rows
    # (twice: the cotangents) gives chunks of 2.
    budget = (2 * 2 * 3 + 2 * 2) * 1344
    with pytest.raises(ValueError, match=r"\(config.kernel.memory_budget_gb\).*config.kernel.logits"):
      parameter_directions(apply_fn, params, np.asarray(x_train), np.asarray(coefficients),
                           LogitSpec("trace", 3), memory_budget_bytes=2 * 2 * 3 * 1344 + 2687)
    # 9 examples: chunks of 2 on 4 devices (one step padded to 16), of 3 on 1 device (3 steps).
    for spec, mesh, chunk in [(LogitSpec("class", 3, 1), None, 2), (LogitSpec("trace", 3), None, None),
                              (LogitSpec("trace", 3), one_device, 3)]:
      directions = parameter_directions(apply_fn, params, np.asarray(x_train), np.asarray(coefficients),
                                        spec, chunk=chunk, mesh=mesh, memory_budget_bytes=budget)
      assert isinstance(directions, np.ndarray) and directions.dtype == np.float64
      got = feature_logits_fn(apply_fn, params, jnp.asarray(directions), spec)(x_test)
      # K(x, X) = sum_c J_c(x) J_c(X)^T over the kernel's logits: the trace kernel is the sum of
      # the per-logit kernels (not the kernel of the summed logit), as the kernel job computes it.
      logits = [spec.index] if spec.kind == "class" else [0, 1, 2]
      cross = np.einsum("bcp,ncp->bn", jac(x_test)[:, logits], jac(x_train)[:, logits])
      engine = empirical_ntk(apply_fn, params, np.asarray(x_test), np.asarray(x_train), dtype="float64",
                             logits=spec.index if spec.kind == "class" else "trace")
      np.testing.assert_allclose(engine, cross, rtol=1e-10)
      np.testing.assert_allclose(got, np.einsum("bn,gnc->gbc", cross, coefficients), rtol=1e-10)


def test_a_cnns_group_predictors_on_a_sharded_batch_equal_one_devices():
  """The predictors run under jit with the test batch over the devices (the job's evaluation).
  With JAX's per-example convolution weight gradients (one feature group per example), XLA's
  partitioner made every example off the first device's wrong (jax 0.10.2: a CNN's "all" group
  scored 0.333 on 4 devices, 0.9 on 1)."""
  model = build_model(load_config("digits", "smoke").model, 10)  # the CNN, with BatchNorm
  x = np.random.default_rng(0).uniform(size=(8, 8, 8, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), jnp.asarray(x[:1]), train=False)
  apply_fn = lambda p, images: model.apply({"params": p, "batch_stats": variables["batch_stats"]},
                                           images, train=False)
  theta, _ = ravel_pytree(variables["params"])
  directions = jax.random.normal(jax.random.key(1), (2, 1, 3, theta.size)) / theta.size ** 0.5
  predictors = jax.jit(feature_logits_fn(apply_fn, variables["params"], directions,
                                         LogitSpec("class", 10, 1)))
  mesh = parallel.make_mesh()
  assert mesh.size == 4
  sharded = predictors(jax.device_put(x, parallel.batch_sharding(mesh)))
  one = np.concatenate([predictors(jax.device_put(x[i:i + 1], jax.devices()[0])) for i in range(8)], 1)
  np.testing.assert_allclose(sharded, one, rtol=1e-4, atol=1e-5)


def features_config(**fields):
  c = load_config("digits", "smoke")
  c.model.name, c.model.width = "mlp", 16
  c.num_epochs = 1.0
  c.eval_attacks = ml_collections.ConfigDict()  # the job's own attack is what is tested: spare the time
  c.kernel.num_examples, c.kernel.logits = 40, "0"
  c.eigen_features.num_single, c.eigen_features.num_test, c.eigen_features.batch_size = 3, 30, 16
  c.eigen_features.attack.eps, c.eigen_features.attack.num_steps = 0.2, 3
  c.eigen_features.attack.step_size = 0.1
  for key, value in fields.items():
    c.eigen_features[key] = value
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One training run for the job tests; each copies it, as the jobs write into their workdir."""
  path = str(tmp_path_factory.mktemp("trained"))
  train = features_config()
  train.job = "train"
  jobs.run(train, path)
  return path


def _trained(trained: str, workdir: str) -> None:
  shutil.copytree(trained, workdir, dirs_exist_ok=True)


def _test_predictions(c, workdir, store, coefficients: np.ndarray) -> np.ndarray:
  """K(test, train) A for the first 30 test images, the cross kernel by the engine itself."""
  digits = load_digits()
  restored = restore_for_inference(c, workdir, phase=1, epoch=None, fields="config.kernel")
  apply = inference_apply(restored.model)
  stats = restored.variables.get("batch_stats", {})
  params = jax.tree.map(np.asarray, restored.variables["params"])
  cross = empirical_ntk(lambda p, x: apply(p, x, stats), params, digits.test.images[:30],
                        digits.train.images[store.indices()], logits=0)
  return cross @ coefficients


def small_features_config():
  """The job on a kernel of 10 examples: groups 0, 1, 2, 3-5 and 6-9, then the whole predictor."""
  c = features_config()
  c.job, c.kernel.num_examples = "eigen_features", 10
  return c


def test_job_reports_every_group_and_the_whole_predictor(trained, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  _trained(trained, workdir)
  c = small_features_config()
  highest, directions = [], eigen_features_job.parameter_directions
  def checked(apply_fn, params, images, *args, **kwargs):  # the rows at config.kernel.precision
    logits = lambda p: jnp.sum(apply_fn(p, images[:2]))
    highest.append(all_highest(logits, params) and all_highest(jax.grad(logits), params))
    return directions(apply_fn, params, images, *args, **kwargs)
  monkeypatch.setattr(eigen_features_job, "parameter_directions", checked)
  floors = []  # the groups' rank floor: the stored kernel's dtype and trace
  monkeypatch.setattr(eigen_features_job, "rounding_floor",
                      lambda dtype, trace: floors.append((dtype, trace)) or rounding_floor(dtype, trace))
  result = jobs.run(c, workdir)
  assert highest == [True]
  rows = {r["group"]: r for r in result["groups"]}
  assert list(rows)[:3] == ["0", "1", "2"] and list(rows)[-1] == "all"
  assert result["eigensolver"] == "dense" and result["num_eigenpairs"] == 10
  files = sorted(os.listdir(result["eigen_features"]))
  assert files == ["features.csv", "features.json", "usefulness_robustness.png"]
  # "all" is ridgeless kernel regression with the engine's own cross kernel K(test, train); group
  # "0" the rank-one predictor of the top eigenpair and "3-5" (the first doubling group) that of
  # eigenpairs 3 to 5: K(x, X) V_g diag(1 / lambda_g) V_g^T Y.
  assert list(rows)[:4] == ["0", "1", "2", "3-5"]
  store = KernelStore.open(result["source_kernel"])
  pairs = eigh(store.read())
  assert floors[0] == (store.meta["dtype"], pytest.approx(pairs.values.sum(), rel=1e-6))
  assert store.meta["dtype"] == "float32"
  targets = _targets(store.labels(), 10)
  checked = {"0": np.array([0]), "3-5": np.arange(3, 6),
             "all": np.flatnonzero(pairs.values > 1e-10 * pairs.values[0])}
  coefficients = [pairs.vectors[:, i] @ ((pairs.vectors[:, i].T @ targets) / pairs.values[i, None])
                  for i in checked.values()]
  predictions = _test_predictions(c, workdir, store, np.stack(coefficients))  # [3, 30, 10]
  y_test = load_digits().test.labels[:30]
  for name, p in zip(checked, predictions, strict=True):
    assert rows[name]["clean_accuracy"] == pytest.approx(np.mean(p.argmax(1) == y_test), abs=1 / 30), name
  assert all(r["robust_accuracy"] <= r["clean_accuracy"] + 1 / 30 for r in rows.values())
  assert sum(r["num_features"] for g, r in rows.items() if g != "all") == rows["all"]["num_features"]
  # A rerun reads the finished result back; one with another attack recomputes, and so does a
  # record of rows by JAX's rule for convolution weight gradients (wrong on several devices).
  assert jobs.run(c, workdir)["groups"] == result["groups"]
  assert result["settings"]["jacobian_rows"] == "patch_matmul"
  stronger = small_features_config()
  stronger.eigen_features.attack.eps = 0.3
  recomputed = jobs.run(stronger, workdir)
  assert recomputed["settings"]["attack"]["eps"] == 0.3 and recomputed["attack"]["eps"] == 0.3
  assert [r["clean_accuracy"] for r in recomputed["groups"]] == [r["clean_accuracy"] for r in result["groups"]]
  assert jobs.run(c, workdir)["attack"]["eps"] == 0.2  # and back
  # Evaluated data-parallel: 4 devices give what one gives.
  assert jax.device_count() == 4
  shutil.rmtree(result["eigen_features"])
  monkeypatch.setattr(parallel, "make_mesh", lambda: Mesh(np.array(jax.devices()[:1]),
                                                          (parallel.DATA_AXIS,)))
  one = jobs.run(c, workdir)
  for mine, theirs in zip(one["groups"], result["groups"]):
    assert mine["group"] == theirs["group"]
    for key in ("clean_accuracy", "robust_accuracy", "eigenvalue", "spectral_share"):
      assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-12), (mine["group"], key)
  # Preempted after its second group, the job keeps both and the rerun ends as an unbroken one.
  shutil.rmtree(result["eigen_features"])
  with monkeypatch.context() as patch:
    patch.setattr(eigen_features_job, "preemption_notices", notices_from(2))
    with pytest.raises(Preempted, match="2 evaluations are kept"):
      jobs.run(c, workdir)
  assert jobs.run(c, workdir)["groups"] == one["groups"]
  assert sorted(os.listdir(result["eigen_features"])) == files
  # The kernel deleted and computed again from another subset under its name (subset_seed is a
  # runtime field): the features are recomputed, not read back.
  shutil.rmtree(result["source_kernel"])
  c.kernel.subset_seed = 1
  other = jobs.run(c, workdir)
  assert other["source_kernel"] == result["source_kernel"]
  assert other["settings"]["kernel"] != result["settings"]["kernel"]
  assert [r["eigenvalue"] for r in other["groups"]] != [r["eigenvalue"] for r in result["groups"]]


def test_top_eigenpairs_of_a_large_kernel_give_the_dense_groups(trained, tmp_path, monkeypatch, capsys):
  """Above DENSE_MAX_ROWS (here 10; the kernel has 40 rows) the spectrum job's top 6 eigenpairs
  (LOBPCG, float64) replace the dense decomposition: the groups up to the 6th eigenvalue report
  what the dense job reports, the last row is the top-6 predictor, and no dense eigh runs."""
  workdir = str(tmp_path)
  _trained(trained, workdir)
  c = features_config()
  c.job = "eigen_features"
  dense = jobs.run(c, workdir)
  monkeypatch.setattr(kernel_eigenpairs, "DENSE_MAX_ROWS", 10)
  monkeypatch.setattr(kernel_eigenpairs, "dense_eigenpairs", None)  # called: a TypeError
  c = features_config()
  c.job = "eigen_features"
  c.spectrum.num_eigenpairs, c.spectrum.oversample, c.spectrum.dtype = 6, 0, "float64"
  c.spectrum.method = "sharded"  # LOBPCG, not the spectrum job's own dense choice for 40 rows
  shutil.rmtree(dense["eigen_features"])  # the same kernel: its result would be read back
  top = jobs.run(c, workdir)
  out = capsys.readouterr().out
  assert "the top 6 eigenpairs by the spectrum job (40 rows, above 10)" in out
  assert "spectrum plan: sharded LOBPCG" in out
  assert top["eigensolver"] == "top" and top["num_eigenpairs"] == 6
  # Other settings of the solve are another result, scored again; a looser tol is met by the
  # stored pairs, which are read back, not solved again.
  c.spectrum.tol = 1e-6
  looser = jobs.run(c, workdir)
  out = capsys.readouterr().out
  assert "spectrum plan:" not in out and "already computed" in out and "eigen-feature group" in out, out
  assert looser["settings"]["spectrum"]["tol"] == 1e-6 != top["settings"]["spectrum"]["tol"]
  assert looser["groups"] == top["groups"]
  names = [r["group"] for r in top["groups"]]
  assert names == ["0", "1", "2", "3-5", "top6"]
  for mine, theirs in zip(top["groups"][:-1], dense["groups"]):
    assert mine["group"] == theirs["group"]
    for key in ("first_index", "num_features"):
      assert mine[key] == theirs[key], key
    for key in ("eigenvalue", "spectral_share"):
      assert mine[key] == pytest.approx(theirs[key], rel=1e-8), key
    for key in ("clean_accuracy", "robust_accuracy"):
      assert mine[key] == pytest.approx(theirs[key], abs=1 / 30 + 1e-12), key
  store = KernelStore.open(top["source_kernel"])
  pairs = eigh(store.read())
  v = pairs.vectors[:, :6]
  predictions = _test_predictions(c, workdir, store,
                                  v @ ((v.T @ _targets(store.labels(), 10)) / pairs.values[:6, None]))
  y_test = load_digits().test.labels[:30]
  assert top["groups"][-1]["clean_accuracy"] == pytest.approx(np.mean(predictions.argmax(1) == y_test),
                                                              abs=1 / 30)
  assert top["groups"][-1]["spectral_share"] == pytest.approx(pairs.values[:6].sum() / pairs.values.sum(),
                                                              rel=1e-8)
  # The spectrum job's own dense solve (it keeps every eigenvalue and k vectors) gives the same.
  shutil.rmtree(top["eigen_features"])
  c.spectrum.method = "dense"
  again = jobs.run(c, workdir)
  assert [r["group"] for r in again["groups"]] == names
  for mine, theirs in zip(again["groups"], top["groups"]):
    assert mine["eigenvalue"] == pytest.approx(theirs["eigenvalue"], rel=1e-8)
    assert mine["clean_accuracy"] == pytest.approx(theirs["clean_accuracy"], abs=1 / 30 + 1e-12)


def test_bad_fields_are_named(tmp_path):
  for field, value in (("num_single", 0), ("num_test", -1), ("batch_size", 0)):
    c = features_config(**{field: value})
    c.job = "eigen_features"
    with pytest.raises(ValueError, match=f"config.eigen_features.{field}="):
      jobs.run(c, str(tmp_path))
  c = features_config()
  c.job, c.kernel.logits = "eigen_features", "full"
  with pytest.raises(ValueError, match="config.kernel.logits='full'"):
    jobs.run(c, str(tmp_path))
  c = features_config(eigensolver="lanczos")
  c.job = "eigen_features"
  with pytest.raises(ValueError, match="config.eigen_features.eigensolver='lanczos'"):
    jobs.run(c, str(tmp_path))
  c = features_config(eigensolver="top", source="infinite")
  c.job = "eigen_features"
  with pytest.raises(ValueError, match="config.eigen_features.eigensolver='top' needs"):
    jobs.run(c, str(tmp_path))
  # Parameter directions that cannot fit: refused before the kernel (no checkpoint is even needed).
  c = features_config()
  c.job, c.kernel.logits, c.kernel.memory_budget_gb = "eigen_features", "trace", 1 / 1024
  with pytest.raises(ValueError, match=r"parameter directions .* but the budget is 0.000977 GiB"):
    jobs.run(c, str(tmp_path))


def infinite_features_config(num_examples: int, num_single: int, num_test: int, num_steps: int,
                             step_size: float):
  """The infinite_width smoke config's eigen_features job on its analytic kernel (attack eps 0.2)."""
  c = load_config("infinite_width", "smoke")
  c.job = "eigen_features"
  c.eigen_features.source = "infinite"
  c.kernel.num_examples = num_examples
  c.eigen_features.num_single, c.eigen_features.num_test, c.eigen_features.batch_size = (
      num_single, num_test, 16)
  c.eigen_features.attack.eps, c.eigen_features.attack.num_steps = 0.2, num_steps
  c.eigen_features.attack.step_size = step_size
  return c


def test_infinite_width_features_sum_to_analytic_kernel_regression_and_another_subset_recomputes_them(
    tmp_path, nt, monkeypatch):
  """The groups of the analytic kernel sum to its kernel regression. config.kernel's subset fields
  are runtime fields: another subset_seed is another kernel, whose features are computed (in the
  same directory), not the first subset's read back. One test: one run of the first subset serves
  both."""
  del nt  # requested only to skip when the optional neural-tangents extra is absent
  c = infinite_features_config(num_examples=40, num_single=3, num_test=30, num_steps=2, step_size=0.1)
  titles, plot = [], eigen_features_job._plot
  monkeypatch.setattr(eigen_features_job, "_plot",
                      lambda rows, path, title: (titles.append(title), plot(rows, path, title)))
  first = jobs.run(c, str(tmp_path))
  rows = {r["group"]: r for r in first["groups"]}
  assert first["eigen_features"].endswith("infinite_fc_ntk_train40")
  digits = load_digits()
  indices = select_examples(c, digits.train.labels)
  x, y = digits.train.images[indices], digits.train.labels[indices]
  model = KernelRegression.fit(infinite.kernel_matrix(c.infinite, 10, x), y, 10, regularizer=0.0,
                               solver="eigh")
  expected = model.accuracy(infinite.kernel_matrix(c.infinite, 10, digits.test.images[:30], x),
                            digits.test.labels[:30])
  assert rows["all"]["clean_accuracy"] == pytest.approx(expected, abs=1 / 30)
  assert all(r["robust_accuracy"] <= r["clean_accuracy"] + 1 / 30 for r in rows.values())

  def expected_eigenvalues(result):
    x = digits.train.images[select_examples(c, digits.train.labels)]
    values = eigh(infinite.kernel_matrix(c.infinite, 10, x)).values
    return values[[r["first_index"] for r in result["groups"]]]

  first_values = expected_eigenvalues(first)
  c.kernel.subset_seed = 1
  second = jobs.run(c, str(tmp_path))
  values = [r["eigenvalue"] for r in second["groups"]]
  np.testing.assert_allclose(values, expected_eigenvalues(second), rtol=1e-6)
  assert not np.allclose(values, first_values, rtol=1e-6)
  assert second["eigen_features"] == first["eigen_features"]
  assert os.path.basename(second["source_kernel"]) == second["settings"]["kernel"]
  assert titles == ["eigen-features of infinite_fc_ntk_train40, "
                    f"{c.eigen_features.attack.name} eps 0.2"] * 2

  def computed(*args):
    raise AssertionError("a finished result was computed again")

  monkeypatch.setattr(eigen_features_job, "_infinite", computed)  # the same subset: read back
  # What a kill between writing features.json and removing the kept groups leaves goes then.
  stale = os.path.join(second["eigen_features"], eigen_features_job.GROUPS_DIR)
  os.makedirs(stale)
  assert jobs.run(c, str(tmp_path))["groups"] == second["groups"]
  assert not os.path.exists(stale)
  c.eigen_features.batch_size *= 2  # each batch's random start: another attack, not read back
  with pytest.raises(AssertionError, match="a finished result was computed again"):
    jobs.run(c, str(tmp_path))


def test_a_kernel_of_some_classes_is_scored_among_them_on_their_test_images():
  """config.kernel.classes=(3, 1): the test images of classes 3 and 1 only (labelled 0 and 1 by
  place), the predictor's logits of those two classes. Before, every test image was scored with
  every class's logit, which capped each group's accuracy near the two classes' share."""
  from ntk_scale.data import Dataset, Split
  from ntk_scale.ntk.eigen_features_job import _scored_test_split  # pylint: disable=protected-access
  labels = np.array([0, 3, 1, 2, 3, 1, 4])
  images = np.arange(7, dtype=np.float32).reshape(7, 1, 1, 1)
  dataset = Dataset("toy", Split(images, labels), Split(images, labels), 5)
  logits = lambda variables, x: jnp.asarray(x).reshape(len(x), 1) * jnp.arange(5.0) + variables
  test, apply, count = _scored_test_split(dataset, (3, 1), logits)
  assert count == 2
  np.testing.assert_array_equal(test.images.reshape(-1), [1, 2, 4, 5])
  np.testing.assert_array_equal(test.labels, [0, 1, 0, 1])  # class 3 is column 0, class 1 column 1
  np.testing.assert_allclose(apply(0.0, test.images), np.asarray(test.images).reshape(4, 1) * [3.0, 1.0])
  assert _scored_test_split(dataset, (), logits)[2] == 5


def test_auto_eigensolver_is_dense_up_to_and_including_dense_max_rows():
  """"auto" decomposes a kernel of DENSE_MAX_ROWS matrix rows whole and only a larger one by the
  spectrum job's top eigenpairs; "dense" and "top" are kept whatever the size."""
  limit = kernel_eigenpairs.DENSE_MAX_ROWS
  assert kernel_eigenpairs.resolve_eigensolver("auto", limit) == "dense"
  assert kernel_eigenpairs.resolve_eigensolver("auto", limit - 1) == "dense"
  assert kernel_eigenpairs.resolve_eigensolver("auto", limit + 1) == "top"
  assert kernel_eigenpairs.resolve_eigensolver("dense", limit + 1) == "dense"
  assert kernel_eigenpairs.resolve_eigensolver("top", 10) == "top"


def test_a_job_needing_more_eigenpairs_than_configured_solves_for_them():
  """eigen_features / eigen_images read `needed` top pairs: the spectrum job is asked for
  max(config.spectrum.num_eigenpairs, needed) (at most every row), so 20 needed of a config's 5
  are 20, not 5 (the job then read pairs the solve never made)."""
  c = ml_collections.ConfigDict(dict(spectrum=dict(num_eigenpairs=5, tol=1e-7)))
  solver, more = kernel_eigenpairs.eigenpairs_config(c, "auto", 10_000, 20)
  assert solver == "top" and more.spectrum.num_eigenpairs == 20 and more.spectrum.tol == 1e-7
  assert kernel_eigenpairs.eigenpairs_config(c, "top", 10_000, 3)[1].spectrum.num_eigenpairs == 5
  solver, every = kernel_eigenpairs.eigenpairs_config(c, "auto", 12, 20)
  assert solver == "dense" and every.spectrum.num_eigenpairs == 12
  assert c.spectrum.num_eigenpairs == 5  # the caller's config is not changed


def test_the_documented_dense_limit_and_how_a_choice_is_described():
  """base_config documents "every eigenpair up to 8192 kernel rows" for auto; a job's start-up line
  says what was chosen and why, from the choice and the setting that led to it."""
  assert kernel_eigenpairs.resolve_eigensolver("auto", 8192) == "dense"
  assert kernel_eigenpairs.resolve_eigensolver("auto", 8193) == "top"
  describe = kernel_eigenpairs.describe_choice
  field = "config.eigen_features.eigensolver"
  assert describe("dense", "auto", field, 100, 5) == "every eigenpair (100 rows)"
  assert describe("dense", "dense", field, 9000, 5, " of each kernel") == (
      "every eigenpair of each kernel (9000 rows)")
  assert describe("top", "auto", field, 9000, 5) == (
      "the top 5 eigenpairs by the spectrum job (9000 rows, above 8192)")
  assert describe("top", "top", field, 100, 5) == (
      "the top 5 eigenpairs by the spectrum job (config.eigen_features.eigensolver='top')")


def test_parameter_directions_are_summed_at_highest_precision():
  """W = J(X)^T A contracts Jacobian rows with the coefficients, large and of both signs: on GPUs
  (TF32) and TPUs (bfloat16 passes) the default precision would round them. Read from the traced
  program (on this CPU it changes nothing), a model whose own matmuls ask for HIGHEST."""
  highest = jax.lax.Precision.HIGHEST
  def apply_fn(params, x):
    hidden = jnp.tanh(jnp.matmul(x.reshape(len(x), -1), params["w1"], precision=highest))
    return jnp.matmul(hidden, params["w2"], precision=highest)

  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(6, 5)).astype(np.float32),
            "w2": rng.normal(size=(5, 3)).astype(np.float32)}
  theta, unravel = ravel_pytree(params)
  mesh = parallel.make_mesh()
  d, chunk, groups, k = mesh.size, 2, 2, 3
  program = directions_program(apply_fn, LogitSpec("trace", 3), unravel, mesh)
  x = rng.uniform(size=(d * chunk, 2, 3)).astype(np.float32)
  a = rng.normal(size=(d * chunk, groups, k)).astype(np.float32)
  total = np.zeros((d, groups, 3, k, theta.size), np.float32)
  assert all_highest(program, theta, x, a, total)


def test_groups_stop_before_eigenvalues_at_the_floor():
  """An eigenvalue equal to the floor (zero for an exactly singular kernel) is rounding, not a
  feature: 1/lambda of it is infinite."""
  groups = feature_groups(np.array([3.0, 2.0, 1.0, 0.0, 0.0]), 1, 0.0)
  assert [g.indices.tolist() for g in groups] == [[0], [1], [2]]
  groups = feature_groups(np.array([3.0, 2.0, 1.0, 0.5]), 1, 0.5)
  assert np.concatenate([g.indices for g in groups]).tolist() == [0, 1, 2]


def test_single_features_stop_at_the_rank_too():
  """num_single above the numerical rank: singles up to the rank only (an index past it has a zero
  eigenvalue, 1 / 0), and no group after them."""
  groups = feature_groups(np.array([3.0, 2.0, 0.0, 0.0]), num_single=4, floor=0.0)
  assert [(g.name, g.indices.tolist()) for g in groups] == [("0", [0]), ("1", [1])]


def test_examples_per_device_is_the_budget_after_the_sums_over_two_jacobian_rows_per_example():
  """Hand-worked: 2 logits x 100 float32 parameters make a row of 800 bytes per example, the
  directions 3 groups x 5 classes of rows (12,000 bytes), counted twice; a budget of 2 x 12,000 +
  7 x (2 x 800) + 100 bytes leaves 7 examples. Capped by a device's share of the examples, rounded
  up (10 on 4 devices: 3, not 2), and by MAX_CHUNK; a budget short of one example is refused.
  most_rows is every group of a rank plus their sum (rank 20, 5 singles: 5 + 5-9, 10-19, + 1)."""
  assert examples_per_device(2 * 12_000 + 7 * 1_600 + 100, 3, 2, 5, 100, 1000, 1) == 7
  assert examples_per_device(1e12, 3, 2, 5, 100, 10, 4) == 3
  assert examples_per_device(1e12, 3, 2, 5, 100, 10_000, 1) == 128
  with pytest.raises(ValueError, match="use a class kernel rather than the trace"):
    examples_per_device(2 * 12_000 + 1_599, 3, 2, 5, 100, 1000, 1)
  assert most_rows(20, 5) == 8


def test_feature_predictors_refuse_a_full_kernels_logits():
  """A full kernel's rows are (example, logit) pairs, which the group predictors do not model: the
  Jacobian rows refuse it whoever calls them, not only the job's config check."""
  params = {"w": jnp.ones((4, 3))}
  apply_fn = lambda p, x: x.reshape(len(x), -1) @ p["w"]
  with pytest.raises(ValueError, match="one logit or the trace; got logits 'full'"):
    feature_logits_fn(apply_fn, params, jnp.zeros((1, 3, 1, 12)), LogitSpec("full", 3))


def test_records_of_earlier_rules_are_made_again():
  """features.json is recomputed without a batch size, with another rank floor, or, for an
  empirical kernel only, without patch-matmul Jacobian rows (an infinite-width one has none)."""
  now = {"batch_size": 8, "rank_floor": "dtype_rounding"}
  stale = eigen_features_job.of_earlier_rules
  assert not stale({"settings": {**now, "source": "infinite"}})
  assert not stale({"settings": {**now, "source": "empirical", "jacobian_rows": "patch_matmul"}})
  assert stale({"settings": {**now, "source": "empirical"}})
  assert stale({"settings": {**now, "source": "infinite", "rank_floor": "1e-10 lambda_1"}})
  assert stale({"settings": {"rank_floor": "dtype_rounding", "source": "infinite"}})


def test_num_test_may_be_every_scored_test_image_of_the_kernels_classes():
  """num_test up to the test images of config.kernel.classes (there, 2 of class 0 of 5): equal is
  allowed, one more is refused, naming the classes."""
  config = ml_collections.ConfigDict({"eigen_features": {"num_test": 2}, "kernel": {"classes": (0,)}})
  labels = np.array([0, 1, 0, 1, 1])
  eigen_features_job.check_num_test(config, labels)
  config.eigen_features.num_test = 3
  with pytest.raises(ValueError, match=r"num_test=3 exceeds the 2 test images .*classes=\(0,\)"):
    eigen_features_job.check_num_test(config, labels)
  config.kernel.classes = ()
  eigen_features_job.check_num_test(config, labels)


def test_the_directions_budget_is_config_kernel_memory_budget_gb_before_a_dry_runs_target():
  """config.kernel.memory_budget_gb, when set, decides the directions' chunk and is the field a
  refusal names; a dry run's target budget (its flag named) applies only when it is 0."""
  config = load_config("digits")
  config.kernel.memory_budget_gb = 1e-6
  with pytest.raises(ValueError, match=r"budget is 1e-06 GiB \(config.kernel.memory_budget_gb\)"):
    eigen_features_job.directions_chunk(config, (8, 8, 1), 10, 100, 100, 1, 1e12, "--target")
  config.kernel.memory_budget_gb = 0.0
  with pytest.raises(ValueError, match=r"\(--target\)"):
    eigen_features_job.directions_chunk(config, (8, 8, 1), 10, 100, 100, 1, 1e3, "--target")
  assert eigen_features_job.directions_chunk(config, (8, 8, 1), 10, 100, 100, 1, 1e12) == 100


def test_groups_rows_and_shares_of_an_infinite_kernel_below_its_dtypes_rounding(tmp_path, nt,
                                                                               monkeypatch):
  """A float32 analytic kernel whose last 2 of 10 eigenvalues are set to 1e-9 of the trace: above
  float64's rounding (2.2e-16 of it) but below float32's (1.2e-7), so they are not features. The
  groups stop at index 7, the "all" row counts the 8 features the groups hold (not all 10
  eigenvalues), and each share is of the sum of every eigenvalue (numpy's, not lambda_1)."""
  del nt  # requested only to skip when the optional neural-tangents extra is absent
  c = infinite_features_config(num_examples=10, num_single=2, num_test=10, num_steps=1, step_size=0.1)
  c.infinite.dtype = "float32"
  solved = []

  def with_rounding_tail(matrix, **kwargs):
    pairs = eigh(matrix, **kwargs)
    values = pairs.values.copy()
    values[8:] = 1e-9 * values[:8].sum()
    solved.append(values)
    return dataclasses.replace(pairs, values=values)

  monkeypatch.setattr(eigen_features_job, "eigh", with_rounding_tail)
  rows = {r["group"]: r for r in jobs.run(c, str(tmp_path))["groups"]}
  values = solved[0]
  assert list(rows) == ["0", "1", "2-3", "4-7", "all"]
  assert rows["all"]["num_features"] == 8 and rows["4-7"]["num_features"] == 4
  assert rows["0"]["spectral_share"] == pytest.approx(values[0] / np.sum(values), rel=1e-6)
  assert rows["all"]["spectral_share"] == pytest.approx(np.sum(values[:8]) / np.sum(values), rel=1e-6)
