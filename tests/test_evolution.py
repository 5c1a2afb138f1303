"""The `evolution` job on a tiny digits run: the kernel of one subset at every saved checkpoint, its
metrics table and plots; a rerun recomputes no kernel; bad settings fail before any compute."""

import csv
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from ntk_scale import jobs, parallel
from ntk_scale.checkpoint import CheckpointNotFoundError
from ntk_scale.ntk import metrics
from ntk_scale.ntk import evolution, kernel_eigenpairs
from ntk_scale.ntk.evolution import evolution_metrics
from ntk_scale.ntk.spectrum import as_matrix, eigh
from ntk_scale.ntk.store import KernelStore

from test_spectrum import write_store
from test_train import load_config

EPOCHS = [0.0, 0.125, 0.25, 0.375]  # the checkpoints of 3/8 of an epoch, the initialisation first


def evolution_config(**evolution):
  c = load_config("digits", "smoke")
  c.num_epochs = 0.375
  c.checkpoint.fractional_epochs = (0.125, 0.25)
  c.model.width = 4
  c.phase2.num_epochs = 0
  c.eval_attacks = ml_collections.ConfigDict()  # not needed here: spare the time
  c.job = "evolution"
  c.kernel.num_examples = 20
  c.kernel.tile_size = 20  # one tile: one compiled program per checkpoint
  c.evolution.top_k = 3
  for k, v in evolution.items():
    setattr(c.evolution, k, v)
  return c


@pytest.mark.parametrize("full", [False, True])
def test_metrics_of_a_linear_path_of_stored_kernels(tmp_path, full):
  """K_t = (1 - t) K_0 + t K_1 on disk (tiles smaller than the kernel): movement t, the streamed
  Gram and restricted kernels equal the in-memory metrics, also for full [N, N, C, C] kernels."""
  n, c = 12, 3
  rng = np.random.default_rng(0)
  labels = np.arange(n) % c
  jac0, jac1 = rng.standard_normal((2, n, c, 40))
  if full:
    k0, k1 = (np.einsum("iap,jbp->ijab", j, j) for j in (jac0, jac1))
  else:
    k0, k1 = (np.einsum("iap,jap->ij", j, j) for j in (jac0, jac1))
  times = [0.0, 0.25, 1.0]
  kernels = [(1 - t) * k0 + t * k1 for t in times]
  stores = [write_store(tmp_path / f"k{t}", k, tile=5, labels=labels, num_classes=c)
            for t, k in zip(times, kernels)]
  result = evolution_metrics(stores, [0.5, 1.0, 2.0], top_k=4, num_eigenvalues=7)
  rows = result["checkpoints"]
  np.testing.assert_allclose([r["relative_movement"] for r in rows], times, atol=1e-9)
  np.testing.assert_allclose(result["similarity_matrix"], metrics.similarity_matrix(kernels), rtol=1e-9)
  top = eigh(kernels[-1]).vectors[:, :4]
  restricted = [metrics.restrict_to_eigenspace(k, top) for k in kernels]
  np.testing.assert_allclose([r["relative_movement_top_k"] for r in rows], times, atol=1e-9)
  np.testing.assert_allclose([r["distance_to_final_top_k"] for r in rows],
                             [metrics.distance(k, restricted[-1]) for k in restricted], atol=1e-9)
  for row, k in zip(rows, kernels):
    assert row["label_alignment"] == pytest.approx(metrics.label_alignment(k, labels, c))
    assert row["trace"] == pytest.approx(np.trace(as_matrix(k)))
  assert [len(v) for v in result["eigenvalues"]] == [7, 7, 7]


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("eigenspace_of", ["final", "initial"])
def test_eigenspace_metrics_and_spectral_mass_match_numpy(tmp_path, full, eigenspace_of):
  """Three kernels of different eigenspaces (no path, unlike the test above, on which any fixed
  subspace moves by t): the top- and bottom-k restrictions, in the eigenspace of the kernel
  eigenspace_of names, and the spectral mass equal numpy's eigh/eigvalsh of the stored kernels."""
  n, c, top_k = 10, 3, 3
  rng = np.random.default_rng(3)
  jacobians = rng.standard_normal((3, n, c if full else 1, 40))
  jacobians[1] = 0.5 * (jacobians[0] + jacobians[2]) + 0.3 * rng.standard_normal(jacobians[1].shape)
  kernels = [np.einsum("iap,jbp->ijab", j, j) if full else j[:, 0] @ j[:, 0].T for j in jacobians]
  stores = [write_store(tmp_path / f"k{t}", k, tile=4, labels=np.arange(n) % c, num_classes=c)
            for t, k in enumerate(kernels)]
  result = evolution_metrics(stores, [0.0, 1.0, 3.0], top_k, eigenspace_of, num_eigenvalues=5)
  rows = result["checkpoints"]

  matrices = [as_matrix(s.read()).astype(np.float64) for s in stores]
  _, vectors = np.linalg.eigh(matrices[0 if eigenspace_of == "initial" else -1])  # ascending
  cosine = lambda a, b: np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
  for space, v in (("top_k", vectors[:, -top_k:]), ("bottom_k", vectors[:, :top_k])):
    r = [v.T @ m @ v for m in matrices]
    np.testing.assert_allclose([row[f"distance_to_final_{space}"] for row in rows],
                               [1 - cosine(x, r[-1]) for x in r], rtol=1e-6, atol=1e-9,
                               err_msg=space)
    np.testing.assert_allclose([row[f"relative_movement_{space}"] for row in rows],
                               [np.linalg.norm(x - r[0]) / np.linalg.norm(r[-1] - r[0]) for x in r],
                               rtol=1e-6, atol=1e-9, err_msg=space)
    np.testing.assert_allclose([row[f"angle_{space}"] for row in rows],
                               [np.arccos(min(cosine(x, r[0]), 1.0)) for x in r], rtol=1e-6,
                               atol=1e-6, err_msg=space)
  for row, m in zip(rows, matrices):
    values = np.linalg.eigvalsh(m)[::-1]
    assert row["spectral_mass_top_k"] == pytest.approx(values[:top_k].sum() / np.trace(m), rel=1e-9)
    assert row["top_eigenvalue"] == pytest.approx(values[0], rel=1e-9)
  assert result["eigenspace_of"] == eigenspace_of
  assert result["null_space_size"] == 0  # 40 parameters, at most 30 rows: full rank


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bottom_k_columns_are_empty_when_the_null_space_fills_the_bottom_k(tmp_path, dtype):
  """12 examples, 6 parameters: every kernel has a null space of 6 dimensions, in which eigh's
  bottom-3 eigenvectors are an arbitrary choice; with 9 parameters the null space is the bottom-3
  eigenspace, on which the final kernel is zero. Either way the bottom-3 metrics would compare
  rounding noise. With 10 parameters the bottom-3 eigenspace holds one real eigenvector."""
  rng = np.random.default_rng(5)
  for parameters, null in ((6, 6), (9, 3), (10, 2)):
    jacobians = rng.standard_normal((2, 12, parameters))
    stores = [write_store(tmp_path / f"{parameters}_{t}", (j @ j.T).astype(dtype), tile=5)
              for t, j in enumerate(jacobians)]
    result = evolution_metrics(stores, [0.0, 1.0], top_k=3, num_eigenvalues=5)
    assert result["null_space_size"] == null
    rows = result["checkpoints"]
    assert all(r["distance_to_final_top_k"] is not None for r in rows)
    bottom = [r["distance_to_final_bottom_k"] for r in rows]
    assert (bottom == [None, None]) == (null >= 3), bottom


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_small_real_eigenvalues_are_not_null_space(tmp_path, dtype):
  """A full-rank kernel of 500 rows whose eigenvalues fall from 1 to 1e-5: every one is far above
  the rounding of its stored dtype (float32: ~1e-7 of the top one), so there is no null space and
  the bottom-10 metrics are computed. numpy's matrix_rank tolerance (500 * eps * lambda_1 = 6e-5 in
  float32) counted the smallest ~90 as null. A rank-480 kernel of the same spectrum has 20, which
  fill its bottom 10."""
  rng = np.random.default_rng(7)
  n, values = 500, np.geomspace(1.0, 1e-5, 500)
  for rank in (n, 480):
    stores = []
    for t in range(2):
      basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
      kernel = (basis[:, :rank] * values[:rank]) @ basis[:, :rank].T
      stores.append(write_store(tmp_path / f"{rank}_{t}", ((kernel + kernel.T) / 2).astype(dtype),
                                tile=128))
    result = evolution_metrics(stores, [0.0, 1.0], top_k=10, num_eigenvalues=5)
    assert result["null_space_size"] == n - rank
    bottom = {r["distance_to_final_bottom_k"] is None for r in result["checkpoints"]}
    assert bottom == {rank < n}, bottom


def test_one_class_subset_has_no_label_alignment(tmp_path):
  """A kernel of one class (config.kernel.classes=(c,)): alignment is undefined (None), the other
  metrics are computed."""
  kernels = [x @ x.T for x in np.random.default_rng(1).standard_normal((2, 6, 9))]
  stores = [write_store(tmp_path / f"k{i}", k, tile=4, labels=np.full(6, 3), num_classes=10)
            for i, k in enumerate(kernels)]
  rows = evolution_metrics(stores, [1.0, 2.0], top_k=2, num_eigenvalues=3)["checkpoints"]
  assert [r["label_alignment"] for r in rows] == [None, None]
  assert [r["relative_movement"] for r in rows] == pytest.approx([0.0, 1.0])


def test_metrics_on_process_0_of_several_need_no_other_process(tmp_path, monkeypatch):
  """The job computes the metrics on process 0 alone, so with several processes its streamed
  products read every panel themselves: a collective would wait forever for the others."""
  kernels = [x @ x.T for x in np.random.default_rng(2).standard_normal((2, 9, 5))]
  labels = np.arange(9) % 3
  stores = [write_store(tmp_path / f"k{i}", k, tile=4, labels=labels, num_classes=3)
            for i, k in enumerate(kernels)]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(parallel, "gather_from_processes",
                      lambda array: pytest.fail("a collective on process 0 alone"))
  rows = evolution_metrics(stores, [1.0, 2.0], top_k=2, num_eigenvalues=3)["checkpoints"]
  for row, k in zip(rows, kernels):
    assert row["label_alignment"] == pytest.approx(metrics.label_alignment(k, labels, 3), rel=1e-12)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("evolution"))
  c = evolution_config()
  c.job = "train"
  jobs.run(c, path)
  return path


def test_evolution_job_writes_metrics_and_plots_then_recomputes_nothing(workdir, capsys, monkeypatch):
  result = jobs.run(evolution_config(), workdir)
  assert "kernel evolution: 4 checkpoints of phase 1" in capsys.readouterr().out
  directory = result["directory"]  # configs/digits.py: the kernel of logit 0, as Loo et al.
  assert directory == os.path.join(workdir, "kernel_evolution", "phase1_train20_class0")
  for name in ("metrics.json", "metrics.csv", "distance_to_final.png", "polar.png", "spectra.png"):
    assert os.path.getsize(os.path.join(directory, name)) > 0, name
  assert result["tiles_computed"] == 4
  with open(os.path.join(directory, "metrics.json")) as f:
    saved = json.load(f)
  assert saved["epochs"] == EPOCHS
  rows = saved["checkpoints"]
  assert [r["kernel"] for r in rows] == [f"phase1_epoch{e:g}_train20_class0" for e in EPOCHS]
  kernels = [KernelStore.open(os.path.join(workdir, "kernels", r["kernel"])).read() for r in rows]
  s = np.array(saved["similarity_matrix"])
  np.testing.assert_allclose(s, metrics.similarity_matrix(kernels), rtol=1e-9)
  np.testing.assert_allclose(np.diag(s), 1.0)
  for t, row in enumerate(rows):
    assert row["distance_to_final"] == pytest.approx(metrics.distance(kernels[t], kernels[-1]), abs=1e-9)
    assert row["relative_movement"] == pytest.approx(
        metrics.relative_movement(kernels[t], kernels[0], kernels[-1]), abs=1e-9)
    assert row["angle"] == pytest.approx(metrics.movement_angle(kernels[t], kernels[0]), abs=1e-6)
    assert -1 <= row["label_alignment"] <= 1 and 0 < row["spectral_mass_top_k"] <= 1
  for space in ("", "_top_k", "_bottom_k"):
    assert rows[0][f"relative_movement{space}"] == pytest.approx(0.0, abs=1e-9)
    assert rows[-1][f"relative_movement{space}"] == pytest.approx(1.0)
    assert rows[-1][f"distance_to_final{space}"] == pytest.approx(0.0, abs=1e-9)
  assert rows[0]["velocity"] is None
  # Velocity per epoch trained: a fractional epoch's checkpoint is at a whole step (epoch 0.25 of
  # 1437 // 64 = 22 steps is step 6: 0.273 epochs), which the nominal epochs made up to 27% off.
  steps = [KernelStore.open(os.path.join(workdir, "kernels", r["kernel"])).meta["source"]["step"]
           for r in rows]
  steps_per_epoch = 1437 // evolution_config().batch_size
  assert steps == [round(e * steps_per_epoch) for e in EPOCHS] and saved["elapsed_epochs"] == [
      s / steps_per_epoch for s in steps] != EPOCHS
  np.testing.assert_allclose([r["velocity"] for r in rows[1:]],
                             metrics.kernel_velocity(kernels, saved["elapsed_epochs"]), rtol=1e-9)
  assert len(saved["eigenvalues"]) == 4 and len(saved["eigenvalues"][0]) == 20
  with open(os.path.join(directory, "metrics.csv")) as f:
    table = list(csv.DictReader(f))
  assert [float(r["epoch"]) for r in table] == EPOCHS and table[0]["velocity"] == ""

  # Read back: each eigendecomposition and the Gram matrix's pass over the kernels were made again.
  monkeypatch.setattr(evolution, "evolution_metrics", lambda *a, **k: pytest.fail("recomputed"))
  again = jobs.run(evolution_config(), workdir)
  assert again["tiles_computed"] == 0
  assert again["metrics"]["checkpoints"] == rows and again["plots"] == result["plots"]
  monkeypatch.undo()


def test_chosen_epochs_reuse_the_kernels_on_disk(workdir):
  result = jobs.run(evolution_config(epochs=(0.375, 0.125), name="ends", eigenspace_of="initial"),
                    workdir)
  assert result["tiles_computed"] == 0
  assert result["metrics"]["epochs"] == [0.125, 0.375]
  assert result["directory"].endswith(os.path.join("kernel_evolution", "ends"))


def test_top_eigenpairs_of_kernels_above_the_dense_limit(workdir, monkeypatch, capsys):
  """Kernels above DENSE_MAX_ROWS (here 10 rows; these have 20): each checkpoint's spectrum comes
  from the spectrum job (LOBPCG on the devices, float64 here) and every metric but the bottom-k
  eigenspace's equals the dense job's; a rerun reads the spectra back. Three of the four checkpoints
  (the ends and one between, whose movement is neither 0 nor 1): one solve fewer."""
  monkeypatch.setattr(kernel_eigenpairs, "DENSE_MAX_ROWS", 10)
  chosen = (0.0, 0.125, 0.375)
  dense = jobs.run(evolution_config(name="dense", eigensolver="dense", epochs=chosen), workdir)["metrics"]

  def config():
    c = evolution_config(name="top", num_eigenvalues=3, epochs=chosen)
    c.spectrum.oversample, c.spectrum.dtype = 0, "float64"  # a block of 3 of 20 rows: LOBPCG
    return c
  top = jobs.run(config(), workdir)
  out = capsys.readouterr().out
  assert "the top 3 eigenpairs of each kernel by the spectrum job (20 rows, above 10)" in out
  assert out.count("spectrum plan: sharded LOBPCG") == 3
  metrics_top = top["metrics"]
  assert metrics_top["eigensolver"] == "top" and dense["eigensolver"] == "dense"
  for mine, theirs in zip(metrics_top["checkpoints"], dense["checkpoints"]):
    for key, value in theirs.items():
      if key == "kernel" or value is None:
        assert mine[key] == value, key
      elif key.endswith("_bottom_k"):
        assert mine[key] is None, key
      else:  # an angle of a kernel to itself is arccos of 1 - O(1e-16): up to ~2e-8
        close = 1e-7 if key.startswith("angle") else 1e-9
        assert mine[key] == pytest.approx(value, rel=1e-6, abs=close), key
  np.testing.assert_allclose(metrics_top["eigenvalues"], np.array(dense["eigenvalues"])[:, :3],
                             rtol=1e-8)
  directory = top["directory"]
  for name in ("metrics.csv", "distance_to_final.png", "polar.png", "spectra.png"):
    assert os.path.getsize(os.path.join(directory, name)) > 0, name
  with open(os.path.join(directory, "metrics.csv")) as f:
    assert {r["distance_to_final_bottom_k"] for r in csv.DictReader(f)} == {""}

  again = jobs.run(config(), workdir)
  assert capsys.readouterr().out.count("already computed") == 3
  assert again["metrics"]["checkpoints"] == metrics_top["checkpoints"]
  with pytest.raises(ValueError, match="config.spectrum.method='fast'"):
    c = config()
    c.spectrum.method = "fast"
    jobs.run(c, workdir)


def test_bad_evolution_settings_fail_before_compute(workdir):
  kernels = os.path.join(workdir, "kernels")
  before = sorted(os.listdir(kernels)) if os.path.isdir(kernels) else []
  with pytest.raises(ValueError, match=r"config.evolution.epochs includes 7.*saved epochs: \[0.0, 0.125"):
    jobs.run(evolution_config(epochs=(0.125, 7.0)), workdir)
  with pytest.raises(ValueError, match="config.evolution.epochs selects 1 checkpoint"):
    jobs.run(evolution_config(epochs=(0.25,)), workdir)
  with pytest.raises(ValueError, match="config.evolution.top_k=21 must be at most 20"):
    jobs.run(evolution_config(top_k=21), workdir)
  with pytest.raises(ValueError, match="config.evolution.phase=3"):
    jobs.run(evolution_config(phase=3), workdir)
  with pytest.raises(CheckpointNotFoundError, match="no phase-2 experiment 'centered_C_from1'"):
    jobs.run(evolution_config(phase=2), workdir)  # this workdir has no phase 2
  with pytest.raises(ValueError, match="config.evolution.eigensolver='lanczos'"):
    jobs.run(evolution_config(eigensolver="lanczos"), workdir)
  with pytest.raises(ValueError, match="config.evolution.eigenspace_of='middle'"):
    jobs.run(evolution_config(eigenspace_of="middle"), workdir)
  with pytest.raises(ValueError, match="config.kernel.num_examples=25"):
    c = evolution_config()
    c.kernel.num_examples = 25
    jobs.run(c, workdir)
  assert (sorted(os.listdir(kernels)) if os.path.isdir(kernels) else []) == before


def test_kernels_around_a_recorded_collapse(workdir):
  """config.evolution.around_collapse picks the saved epochs near the CO monitor's collapse."""
  path = os.path.join(workdir, "catastrophic_overfitting.json")
  config = evolution_config(around_collapse=0.1)
  with pytest.raises(ValueError, match=r"around_collapse needs .*catastrophic_overfitting.json"):
    jobs.run(config, workdir)
  point = lambda epoch: {"step": int(epoch * 24), "epoch": epoch, "robust_accuracy": 0.1,
                         "train_clean_accuracy": 0.9}
  summary = {"collapsed": False, "last": point(0.375)}
  with open(path, "w") as f:
    json.dump(summary, f)
  with pytest.raises(ValueError, match="records no collapse"):
    jobs.run(config, workdir)
  summary = {"collapsed": True, "sustained": True, "last": point(0.375),
             "collapse": dict(point(0.25), peak=point(0.125), before=point(0.125)),
             "checkpoint_epochs": {"before": 0.125, "after": 0.25}}
  with open(path, "w") as f:
    json.dump(summary, f)
  with pytest.raises(ValueError, match="leave config.evolution.epochs empty"):
    jobs.run(evolution_config(around_collapse=0.1, epochs=(0.125, 0.25)), workdir)
  result = jobs.run(config, workdir)
  assert result["metrics"]["epochs"] == [0.125, 0.25]  # within 0.1 epochs of [0.125, 0.25]; not 0.375
  assert result["metrics"]["collapse"] == {"epoch": 0.25, "before": 0.125, "after": 0.25,
                                           "sustained": True, "peak_epoch": 0.125}
  assert result["directory"].endswith("_collapse") and result["tiles_computed"] == 0
  os.remove(path)


@pytest.mark.parametrize("epochs, scale, ticks", [
    ([0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0, 1.5], "linear", ["0.0", "1.0"]),
    ([0.0, 1.0, 2.0, 3.0], "linear", ["0.0", "1.0", "2.0", "3.0"]),  # past epoch 2, a span of 3 only
    ([0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0], "symlog", ["0", "0.1", "1", "10"])])
def test_distance_to_final_plot_has_ticks_between_its_ends(monkeypatch, epochs, scale, ticks):
  """A symlog axis linear up to matplotlib's default epoch 2 labelled only its ends for a run of
  1.5 epochs (the CO evolution around a collapse)."""
  from ntk_scale.ntk import evolution_plots  # pylint: disable=import-outside-toplevel
  figures = []
  monkeypatch.setattr(evolution_plots, "_save", lambda fig, path: figures.append(fig) or path)
  rows = [{"epoch": e, "distance_to_final": 1.0 - e / epochs[-1], "distance_to_final_top_k": None,
           "distance_to_final_bottom_k": None} for e in epochs]
  evolution_plots.plot_distance_to_final({"checkpoints": rows, "phase": 1, "top_k": 4}, "unused.png")
  ax = figures[0].axes[0]
  figures[0].canvas.draw()
  low, high = ax.get_xlim()
  shown = [t.get_text() for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high]
  assert ax.get_xscale() == scale and len(shown) >= 4 and set(ticks) <= set(shown), shown


def test_one_or_a_repeated_epoch_is_refused_before_the_workdir_is_read(tmp_path):
  """select_epochs refuses them only after the data and the checkpoints are read; the settings
  check refuses them first, in the same words, so the dry run refuses them too."""
  from ntk_scale.ntk.evolution import check_evolution_settings

  cases = (((0.25,), r"config\.evolution\.epochs selects 1 checkpoint"),
           ((0.25, 0.125, 0.25), r"config\.evolution\.epochs lists epoch 0\.25 twice"),
           ((0.125, 0.125 + 1e-12), r"lists epoch 0\.125 twice"))  # as select_epochs matches
  for i, (epochs, message) in enumerate(cases):
    c = evolution_config(epochs=epochs)
    with pytest.raises(ValueError, match=message):
      check_evolution_settings(c)
    with pytest.raises(ValueError, match=message):
      jobs.dry_run(c)
    with pytest.raises(ValueError, match=message):  # an empty workdir: refused before it is read
      jobs.run(c, str(tmp_path / str(i)))
  check_evolution_settings(evolution_config(epochs=()))  # every saved checkpoint
  check_evolution_settings(evolution_config(epochs=(0.125, 0.25)))


def test_elapsed_epochs_fall_back_to_the_nominal_ones_when_the_steps_do_not_match():
  """A checkpoint's step over the steps per epoch, while each step is its epoch's rounded step;
  steps of another batch size (here twice the steps, or one checkpoint 3 steps off) are not those
  epochs' at all, and the nominal epochs are kept (the fallback's loss made velocities 2x off)."""
  from types import SimpleNamespace

  stores = lambda steps: [SimpleNamespace(meta={"source": {"step": s}}) for s in steps]
  steps_per_epoch = 22  # 1437 digits in batches of 64
  assert evolution.elapsed_epochs(stores([0, 3, 6, 8]), EPOCHS, steps_per_epoch) == [
      0.0, 3 / 22, 6 / 22, 8 / 22]
  assert evolution.elapsed_epochs(stores([0, 6, 11, 17]), EPOCHS, steps_per_epoch) == EPOCHS
  assert evolution.elapsed_epochs(stores([0, 3, 6, 11]), EPOCHS, steps_per_epoch) == EPOCHS


class _FakeStore:
  """A kernel on disk as stored_gram reads it: its shape and row panels."""

  def __init__(self, kernel: np.ndarray):
    self.kernel, self.shape = kernel, kernel.shape

  def read(self, rows: slice) -> np.ndarray:
    return self.kernel[rows]


def test_the_stored_gram_sums_every_row_panel():
  """Panels of one row each (the tests' kernels fit one panel of the 256 MiB default): the Gram
  matrix of the kernels is the sum over all panels, as metrics.frobenius_gram gives it whole."""
  from ntk_scale.ntk.evolution import stored_gram
  rng = np.random.RandomState(0)
  kernels = [rng.randn(6, 6).astype(np.float32) for _ in range(3)]
  expected = metrics.frobenius_gram(kernels)
  for panel_bytes in (6 * 8, 2 * 6 * 8, 1 << 28):
    np.testing.assert_allclose(stored_gram([_FakeStore(k) for k in kernels], panel_bytes), expected,
                               rtol=1e-12)


def test_settings_refuse_a_zero_count_a_dot_name_and_a_phase_2_collapse():
  """Counts are >= 1 (top_k=0 has no eigenspace to restrict to), a name is a plain directory name
  ("." and ".." are the parent's directories), and around_collapse picks phase-1 epochs only."""
  from ntk_scale.ntk.evolution import check_evolution_settings

  for field in ("top_k", "num_eigenvalues"):
    with pytest.raises(ValueError, match=f"config.evolution.{field}=0 must be an integer >= 1"):
      check_evolution_settings(evolution_config(**{field: 0}))
  for name in (".", ".."):
    with pytest.raises(ValueError, match="must be a plain directory name"):
      check_evolution_settings(evolution_config(name=name))
  with pytest.raises(ValueError, match="config.evolution.phase=1"):
    check_evolution_settings(evolution_config(around_collapse=0.1, phase=2))


def test_collapse_epochs_span_the_kept_checkpoints_ends_included(tmp_path):
  """The epochs within `span` of the checkpoints the CO monitor kept around the collapse, both ends
  included (1.25 = 1.0 + 0.25 is in); without a record of kept checkpoints, from the collapse's
  "before" point to the collapse itself."""
  from ntk_scale.train.collapse import CO_FILE

  point = lambda epoch: {"epoch": epoch}
  summary = {"collapsed": True, "sustained": False,
             "collapse": dict(point(0.75), peak=point(0.25), before=point(0.5)),
             "checkpoint_epochs": {"before": 0.5, "after": 1.0}}
  saved = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
  with open(tmp_path / CO_FILE, "w") as f:
    json.dump(summary, f)
  epochs, record = evolution.collapse_epochs(str(tmp_path), saved, 0.25)
  assert epochs == [0.25, 0.5, 0.75, 1.0, 1.25]
  assert record == {"epoch": 0.75, "before": 0.5, "after": 1.0, "sustained": False, "peak_epoch": 0.25}
  del summary["checkpoint_epochs"]
  with open(tmp_path / CO_FILE, "w") as f:
    json.dump(summary, f)
  assert evolution.collapse_epochs(str(tmp_path), saved, 0.0)[0] == [0.5, 0.75]


def test_selection_and_checkpoint_configs():
  """top_k may be the whole matrix (20 of 20); two asked epochs within 1e-9 of one saved checkpoint
  are refused as one listed twice; each checkpoint's kernel job has the evolution's phase and that
  epoch, and its spectrum solves for max(num_eigenvalues, top_k) pairs (at most every row)."""
  from ntk_scale.ntk.evolution import checkpoint_config, select_epochs

  assert select_epochs(evolution_config(top_k=20), [0.0, 0.125], 20) == [0.0, 0.125]
  with pytest.raises(ValueError, match="lists epoch 0.125 twice"):
    select_epochs(evolution_config(epochs=(0.125 - 9e-10, 0.125 + 9e-10)), [0.0, 0.125], 20)
  one = checkpoint_config(evolution_config(phase=2, top_k=6, num_eigenvalues=2), 0.25, 20)
  assert (one.kernel.phase, one.kernel.epoch, one.kernel.name) == (2, 0.25, "")
  assert one.spectrum.num_eigenpairs == 6
  many = checkpoint_config(evolution_config(top_k=6, num_eigenvalues=30), 0.25, 20)
  assert many.spectrum.num_eigenpairs == 20


def test_the_stored_gram_refuses_kernels_of_different_shapes():
  """Kernels of two subsets (12 and 10 examples) are not one evolution: refused by name, not by
  numpy's stacking error."""
  from ntk_scale.ntk.evolution import stored_gram

  with pytest.raises(ValueError, match=r"kernels of different shapes: \[\(12, 12\), \(10, 10\)\]"):
    stored_gram([_FakeStore(np.eye(12)), _FakeStore(np.eye(10))])


def test_null_space_is_at_or_below_the_dtypes_rounding_of_the_absolute_spectrum():
  """Hand-made spectra: 2^-52 beside 1 - 2^-52 is exactly float64's floor (eps * 1.0), so null; a
  negative eigenvalue counts by its magnitude, both in the floor (sum |lambda| = 1.5: 2^-52 is
  below 1.5 eps) and as a candidate (-0.5 is no null direction); 1e-10 is null in float32 only."""
  null = evolution.null_space_size
  assert null(np.array([1.0 - 2.0**-52, 2.0**-52]), "float64") == 1
  assert null(np.array([1.0, -0.5, 2.0**-52]), "float64") == 1
  assert null(np.array([1.0, -0.5]), "float64") == 0
  assert null(np.array([1.0, 1e-10]), "float64") == 0
  assert null(np.array([1.0, 1e-10]), "float32") == 1


def test_a_step_more_than_half_a_step_off_its_epoch_keeps_the_nominal_epochs():
  """Epoch 0.125 of 22 steps an epoch is step round(2.75) = 3: a checkpoint at step 2 (0.75 of a
  step off, within one step but not within rounding) is of another batch size."""
  from types import SimpleNamespace

  stores = [SimpleNamespace(meta={"source": {"step": s}}) for s in (0, 2, 6, 8)]
  assert evolution.elapsed_epochs(stores, EPOCHS, 22) == EPOCHS


def test_whole_kernel_columns_are_cosines_to_the_final_and_the_first_kernel(tmp_path):
  """Three stored kernels: similarity_to_final is cos(K_t, K_T), distance_to_final 1 minus it, and
  angle arccos cos(K_t, K_0), each from numpy's float64 sums; velocity is (1 - cos) per epoch
  elapsed between neighbours, None for the first."""
  rng = np.random.default_rng(9)
  kernels = [j @ j.T for j in rng.standard_normal((3, 8, 12))]
  stores = [write_store(tmp_path / f"k{t}", k, tile=3, labels=np.arange(8) % 2, num_classes=2)
            for t, k in enumerate(kernels)]
  result = evolution_metrics(stores, [0.0, 1.0, 3.0], top_k=2, num_eigenvalues=4)
  rows = result["checkpoints"]
  cosine = lambda a, b: np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))
  final = [cosine(k, kernels[-1]) for k in kernels]
  np.testing.assert_allclose([r["similarity_to_final"] for r in rows], final, rtol=1e-12)
  np.testing.assert_allclose([r["distance_to_final"] for r in rows], [1 - s for s in final], atol=1e-12)
  np.testing.assert_allclose([r["angle"] for r in rows],
                             [np.arccos(min(cosine(k, kernels[0]), 1.0)) for k in kernels], atol=1e-7)
  assert rows[0]["velocity"] is None
  steps = [1 - cosine(kernels[0], kernels[1]), (1 - cosine(kernels[1], kernels[2])) / 2]
  np.testing.assert_allclose([r["velocity"] for r in rows[1:]], steps, rtol=1e-9)
  assert [len(v) for v in result["eigenvalues"]] == [4, 4, 4]
  assert [r["top_eigenvalue"] for r in rows] == pytest.approx(
      [np.linalg.eigvalsh(k)[-1] for k in kernels], rel=1e-12)


def test_the_stored_gram_reads_panels_within_its_byte_budget():
  """A budget of two float64 rows of a 6 x 6 kernel reads rows [0, 2), [2, 4), [4, 6): a panel of
  every kernel at a time, never more rows than the budget holds."""
  from ntk_scale.ntk.evolution import stored_gram

  reads = []

  class Counted(_FakeStore):
    def read(self, rows):
      reads.append((rows.start, rows.stop))
      return super().read(rows)

  stored_gram([Counted(np.eye(6)), Counted(2 * np.eye(6))], 2 * 6 * 8)
  assert reads == [(0, 2), (0, 2), (2, 4), (2, 4), (4, 6), (4, 6)]


def test_one_saved_checkpoint_is_no_evolution_and_old_records_are_made_again():
  """Every saved checkpoint (epochs empty) of a run that saved one is refused, not an evolution of
  one kernel; metrics.json without its settings (before 2026-12-02) is of earlier rules."""
  from ntk_scale.ntk.evolution import of_earlier_rules, select_epochs

  with pytest.raises(ValueError, match="selects 1 checkpoint"):
    select_epochs(evolution_config(), [0.5], 20)
  assert of_earlier_rules({"epochs": [0.0, 1.0]})
  assert not of_earlier_rules({"epochs": [0.0, 1.0], "settings": {}})


def test_each_plot_file_holds_its_own_figure_of_the_measured_spaces(monkeypatch):
  """plot_evolution's three files, each read back from its figure: the distance to the final kernel
  of each measured space (no bottom-k where only top eigenpairs were computed) with the collapse a
  red line at its epoch; the polar plot's angle (theta) against relative movement (r) on a quarter
  circle; one spectrum per checkpoint in the order of the epochs, a zero eigenvalue floored to
  1e-30 on the log axis."""
  from ntk_scale.ntk import evolution_plots  # pylint: disable=import-outside-toplevel
  figures = {}
  monkeypatch.setattr(evolution_plots, "_save",
                      lambda fig, path: figures.setdefault(os.path.basename(path), fig) and path)
  rows = [{"epoch": e, "distance_to_final": 1.0 - e, "distance_to_final_top_k": 0.5 * (1.0 - e),
           "distance_to_final_bottom_k": None, "angle": 0.3 * e, "angle_top_k": 0.2 * e,
           "relative_movement": e, "relative_movement_top_k": 0.5 * e} for e in (0.0, 0.5, 1.0)]
  results = {"checkpoints": rows, "phase": 1, "top_k": 3, "epochs": [0.0, 0.5, 1.0],
             "eigenvalues": [[3.0, 2.0, 1.0], [4.0, 2.0, 0.5], [5.0, 1.0, 0.0]], "collapse": {"epoch": 0.5}}
  paths = evolution_plots.plot_evolution(results, "plots")
  assert paths == [os.path.join("plots", name) for name in evolution_plots.PLOTS]
  distance = {line.get_label(): line for line in figures["distance_to_final.png"].axes[0].get_lines()}
  assert set(distance) == {"whole kernel", "top-3 eigenspace", "robustness collapse"}
  np.testing.assert_allclose(distance["top-3 eigenspace"].get_ydata(), [0.5, 0.25, 0.0])
  assert list(distance["robustness collapse"].get_xdata()) == [0.5, 0.5]
  polar = figures["polar.png"].axes[0]
  assert polar.name == "polar" and polar.get_thetamax() == 90
  whole = {line.get_label(): line for line in polar.get_lines()}["whole kernel"]
  np.testing.assert_allclose(whole.get_xdata(), [0.0, 0.15, 0.3])  # the angle
  np.testing.assert_allclose(whole.get_ydata(), [0.0, 0.5, 1.0])  # the relative movement
  spectra = figures["spectra.png"].axes[0]
  assert spectra.get_yscale() == "log" and [line.get_label() for line in spectra.get_lines()] == [
      "epoch 0", "epoch 0.5", "epoch 1"]
  np.testing.assert_array_equal(spectra.get_lines()[2].get_ydata(), [5.0, 1.0, 1e-30])
  for row in rows:  # a dense eigendecomposition measures the bottom-k eigenspace too
    row["distance_to_final_bottom_k"] = 0.25 * (1.0 - row["epoch"])
  evolution_plots.plot_distance_to_final(results, "bottom.png")
  assert [line.get_label() for line in figures["bottom.png"].axes[0].get_lines()] == [
      "whole kernel", "top-3 eigenspace", "bottom-3 eigenspace", "robustness collapse"]
