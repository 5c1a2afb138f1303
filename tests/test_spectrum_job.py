"""The `spectrum` job and its LOBPCG rounds: top eigenpairs of a stored kernel against numpy's dense
float64 solver, on the devices (rows split over 4 emulated devices, with padding) and streamed from
disk; 4 devices equal 1; a solve killed after a round resumes to the uninterrupted result bit for
bit; a finished spectrum is read back, not recomputed; bad settings are refused before compute."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import scipy.linalg
from jax.sharding import Mesh

from ntk_scale import data as data_module, jobs, parallel, writer_lock
from ntk_scale.ntk import job as job_module, kernel_eigenpairs, spectrum_job
from ntk_scale.ntk.spectrum import as_matrix
from ntk_scale.ntk.spectrum_job import load_spectrum
from ntk_scale.ntk.spectrum import Eigenpairs
from ntk_scale.ntk.spectrum_rounds import (ShardedKernel, StreamedKernel, first_state, run_rounds,
                                           start_block)
from ntk_scale.ntk.store import KernelStore
from ntk_scale.preemption import Preempted

from conftest import TAKER, notices_from
from test_kernel_job import kernel_config
from test_spectrum import full_kernel, random_psd


def stored(tmp_path, kernel):
  """`kernel` written to a KernelStore, as the kernel job leaves it."""
  n = kernel.shape[0]
  meta = {"shape": list(kernel.shape), "tile": 16, "dtype": str(kernel.dtype), "complete": True}
  store = KernelStore.create_or_resume(str(tmp_path), meta, ("shape",), np.arange(n), np.zeros(n, int))
  store._array.write(kernel).result()  # pylint: disable=protected-access
  return KernelStore.open(str(tmp_path))


def solve(engine, k, rounds):
  block = start_block(engine.size, k + 4, 0, np.dtype(np.float64))
  for _ in range(rounds):
    block, _ = engine.advance(block)
  return engine.ritz(block)


def assert_top_pairs(pairs, matrix, k, rtol, max_angle):
  values, vectors = np.linalg.eigh(matrix.astype(np.float64))
  values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
  np.testing.assert_allclose(pairs.values, values, rtol=rtol)
  assert np.max(scipy.linalg.subspace_angles(pairs.vectors.astype(np.float64), vectors)) < max_angle
  assert pairs.residuals.max() < 10 * rtol


@pytest.mark.parametrize("logits", ["one", "full"])
def test_sharded_rounds_match_numpy_and_one_device(tmp_path, logits):
  """69 examples (padded to 72 on 4 devices), or 23 examples x 3 logits (24 x 3 rows): the same
  69 rows, padded to 72, so both compile the same programs."""
  kernel = random_psd(69) if logits == "one" else full_kernel(23, 3)[0]
  store = stored(tmp_path, kernel)
  one = Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
  results = []
  with jax.enable_x64(True):
    for mesh in (parallel.make_mesh(), one):
      engine = ShardedKernel(store.shape, mesh, 10, 6, "float64", 10, "highest", 1e-12)
      assert engine.padded_size == (72 if mesh.size == 4 else 69)
      engine.load(store)
      assert engine.trace() == pytest.approx(np.trace(as_matrix(kernel)), rel=1e-12)
      results.append(solve(engine, 6, 3))
  assert_top_pairs(results[0], as_matrix(kernel), 6, rtol=1e-10, max_angle=1e-7)
  np.testing.assert_allclose(results[0].values, results[1].values, rtol=1e-12)
  assert np.max(scipy.linalg.subspace_angles(results[0].vectors, results[1].vectors)) < 1e-7


def test_sharded_float32_and_streamed_rounds(tmp_path):
  kernel = random_psd(80)
  store = stored(tmp_path, kernel.astype(np.float32))
  engine = ShardedKernel(store.shape, parallel.make_mesh(), 10, 6, "float32", 20, "highest", 1e-6)
  engine.load(store)
  pairs = solve(engine, 6, 2)
  assert pairs.values.dtype == np.float32
  assert_top_pairs(pairs, kernel, 6, rtol=1e-5, max_angle=1e-2)
  streamed = StreamedKernel(store, 6, "float64", 20, 1e-12, max_block_bytes=20 * 80 * 8,
                            start=start_block(80, 10, 0, np.dtype(np.float64)))
  assert streamed.operator.rows_per_read == 16  # five panels per product
  assert_top_pairs(solve(streamed, 6, 3), kernel.astype(np.float32), 6, rtol=1e-10, max_angle=1e-7)


class _ScriptedEngine:
  """Rounds whose largest residual follows a script: block b is round b's (a number, not vectors)."""

  def __init__(self, residuals):
    self.residuals = residuals

  def advance(self, block):
    return block + 1, 2

  def ritz(self, block):
    return Eigenpairs(np.array([float(block)]), np.full((1, 1), float(block)),
                      np.array([self.residuals[int(block) - 1]]))


def test_a_stalled_solve_ends_with_its_best_round_and_a_resumed_one_too(tmp_path):
  """At round-off the residual wanders: here round 3 is the best, rounds 4 and 5 bring no 10% gain
  (the stall), and the solve returns round 3's pairs, not round 5's, twice as far from exact.
  Saved after round 4 and resumed from disk, it ends the same."""
  residuals = [1e-3, 1e-4, 1e-6, 1.5e-6, 2e-6, 3e-6]
  pairs, state = run_rounds(_ScriptedEngine(residuals), first_state(np.int64(0)), 1e-9, 100)
  assert state["rounds"] == 5 and state["best_round"] == 3 and state["residuals"] == residuals[:5]
  assert pairs.residuals.max() == 1e-6 and pairs.values[0] == 3.0

  directory, saved = str(tmp_path), []

  def save(round_state, *_):
    spectrum_job._save_state(directory, round_state)  # pylint: disable=protected-access
    saved.append(round_state["rounds"])

  _, partial = run_rounds(_ScriptedEngine(residuals), first_state(np.int64(0)), 1e-9, 100, save,
                          stop=lambda: saved[-1] == 4)
  assert partial["rounds"] == 4
  assert sorted(os.listdir(directory)) == ["iterate.json", "iterate_3.npy", "iterate_4.npy"]
  resumed_state = spectrum_job._load_state(directory, None)  # pylint: disable=protected-access
  resumed, end = run_rounds(_ScriptedEngine(residuals), resumed_state, 1e-9, 100)
  assert end["rounds"] == 5 and resumed.values[0] == 3.0 and resumed.residuals.max() == 1e-6


def test_a_solve_resumed_after_its_last_round_runs_no_more_and_keeps_its_seconds():
  """A job killed after saving a round that met tol, before writing its result: resumed, the saved
  block's pairs are measured first and no round is run (another round would move the result
  away from the uninterrupted solve's). And the seconds of rounds run before a resume stay in the
  state, so that a solve resumed twice still counts its first run's rounds."""
  residuals = [1e-3, 1e-10, 1e-11]
  saved = {**first_state(np.int64(2)), "rounds": 2, "iterations": 4, "best": 1e-10,
           "best_round": 2, "best_block": np.int64(2), "residuals": residuals[:2],
           "seconds": 1000.0}
  pairs, state = run_rounds(_ScriptedEngine(residuals), saved, 1e-9, 100)
  assert state["rounds"] == 2 and pairs.values[0] == 2.0 and pairs.residuals.max() == 1e-10
  saved = {**saved, "best": 1e-3, "best_round": 1, "best_block": np.int64(1), "block": np.int64(1),
           "rounds": 1, "iterations": 2, "residuals": residuals[:1]}
  _, state = run_rounds(_ScriptedEngine(residuals), saved, 1e-9, 100)
  assert state["rounds"] == 2 and state["seconds"] >= 1000.0


# ----------------------------------------------------------------------------------------- the job
def spectrum_config(**spectrum):
  c = kernel_config(num_examples=60, logits="trace")
  c.job = "spectrum"
  c.spectrum.num_eigenpairs = 5
  c.spectrum.oversample = 3
  for key, value in spectrum.items():
    setattr(c.spectrum, key, value)
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("spectrum"))
  c = spectrum_config()
  c.job = "train"
  c.phase2.num_epochs = 0
  jobs.run(c, path)
  return path


def kernel_matrix(result):
  return as_matrix(KernelStore.open(os.path.dirname(result["spectrum"])).read()).astype(np.float64)


@pytest.mark.parametrize("method", ["sharded", "streamed", "dense"])
def test_job_writes_the_top_eigenpairs(workdir, method, capsys):
  dtype = "float32" if method == "sharded" else "float64"
  result = jobs.run(spectrum_config(method=method, dtype=dtype, num_eigenpairs=5 if method != "dense"
                                    else 20), workdir)
  out = capsys.readouterr().out
  assert f"spectrum plan: {method}" in out and result["method"] == method and result["converged"]
  pairs, record = load_spectrum(result["spectrum"])
  matrix = kernel_matrix(result)
  k = record["num_eigenpairs"]
  assert pairs.vectors.shape == (60, k)
  assert_top_pairs(type(pairs)(pairs.values[:k], pairs.vectors, pairs.residuals), matrix, k,
                   rtol=1e-5 if dtype == "float32" else 1e-9, max_angle=1e-2 if dtype == "float32" else 1e-6)
  # Eigenvectors are oriented (entries summing to >= 0), so each equals numpy's oriented one, not
  # only up to sign; pairs whose entries sum to about 0 have no stable orientation and are skipped.
  expected = np.linalg.eigh(matrix)[1][:, ::-1][:, :k]
  expected *= np.sign(expected.sum(0))
  clear = np.abs(expected.sum(0)) > 1e-3
  assert clear.sum() >= 3 and (pairs.vectors.sum(0) >= 0).all()
  np.testing.assert_allclose(pairs.vectors[:, clear], expected[:, clear], rtol=0,
                             atol=1e-2 if dtype == "float32" else 1e-6)
  if method == "dense":  # every eigenvalue
    np.testing.assert_allclose(pairs.values, np.linalg.eigvalsh(matrix)[::-1], rtol=1e-9,
                               atol=1e-9 * pairs.values[0])
  assert record["trace"] == pytest.approx(np.trace(matrix), rel=1e-5)
  assert not [name for name in os.listdir(result["spectrum"]) if name.startswith("iterate")]


@pytest.mark.parametrize("method", ["sharded", "streamed"])
def test_preempted_then_killed_solve_resumes_to_the_uninterrupted_result(workdir, method, monkeypatch,
                                                                        capsys):
  # float64 to 1e-13 in rounds of 2 iterations: several rounds, each saved.
  config = spectrum_config(method=method, dtype="float64", tol=1e-13, round_iters=2,
                           num_eigenpairs=6, oversample=2)
  config.kernel.name = f"resume_{method}"
  uninterrupted = jobs.run(config, workdir)
  assert uninterrupted["rounds"] >= 4 and uninterrupted["method"] == method, uninterrupted
  expected, _ = load_spectrum(uninterrupted["spectrum"])
  for name in os.listdir(uninterrupted["spectrum"]):
    os.remove(os.path.join(uninterrupted["spectrum"], name))

  with monkeypatch.context() as patch:  # a preemption notice (SIGTERM) during round 1
    patch.setattr(spectrum_job, "preemption_notices", notices_from(1))
    with pytest.raises(Preempted, match="round 1 of the spectrum is saved") as stopped:
      jobs.run(config, workdir)
  assert stopped.value.step == 1

  saves = []
  real_save = spectrum_job._save_state  # pylint: disable=protected-access

  def save_then_die(directory, state):
    real_save(directory, state)
    saves.append(state["rounds"])
    if len(saves) == 2:
      raise KeyboardInterrupt("killed after round 3")

  monkeypatch.setattr(spectrum_job, "_save_state", save_then_die)
  capsys.readouterr()
  with pytest.raises(KeyboardInterrupt):
    jobs.run(config, workdir)
  assert "resuming the spectrum at round 1" in capsys.readouterr().out
  monkeypatch.setattr(spectrum_job, "_save_state", real_save)
  state_file = os.path.join(uninterrupted["spectrum"], "iterate.json")
  with open(state_file) as f:
    state = json.load(f)
  assert state["seconds"] > 0  # rounds 1-3's time, saved with round 3
  with open(state_file, "w") as f:  # as if they took 1000 s: the record's seconds include them
    json.dump({**state, "seconds": 1000.0}, f)
  started = time.time()
  resumed = jobs.run(config, workdir)
  assert 1000.0 < resumed["seconds"] < 1000.0 + time.time() - started
  assert "resuming the spectrum at round 3" in capsys.readouterr().out
  assert resumed["rounds"] == uninterrupted["rounds"]
  assert resumed["residuals_by_round"] == uninterrupted["residuals_by_round"]
  got, _ = load_spectrum(resumed["spectrum"])
  for name in ("values", "vectors", "residuals"):
    np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))


def test_finished_spectrum_is_read_back_and_new_settings_recompute(workdir, monkeypatch, capsys):
  config = spectrum_config(method="sharded")
  config.kernel.name = "reread"
  first = jobs.run(config, workdir)
  capsys.readouterr()

  def no_solve(*args, **kwargs):
    raise AssertionError("a finished spectrum was solved again")

  monkeypatch.setattr(spectrum_job, "_solve", no_solve)
  loads = []
  for module in (data_module, job_module):  # the spectrum job's and the kernel job's imports
    monkeypatch.setattr(module, "load_dataset",
                        lambda c, load=module.load_dataset: loads.append(c) or load(c))
  stale = os.path.join(first["spectrum"], "iterate_3.npy")  # a kill before the rounds' removal
  open(stale, "wb").close()
  again = jobs.run(config, workdir)
  assert "already computed" in capsys.readouterr().out and not os.path.exists(stale)
  assert len(loads) == 1  # the kernel job takes the spectrum job's dataset
  assert again["top_eigenvalue"] == first["top_eigenvalue"]
  monkeypatch.undo()
  config.spectrum.num_eigenpairs = 7
  result = jobs.run(config, workdir)
  with open(os.path.join(result["spectrum"], "spectrum.json")) as f:
    assert json.load(f)["num_eigenpairs"] == 7
  assert load_spectrum(result["spectrum"])[0].vectors.shape == (60, 7)

  # Fewer pairs at a looser tol: the 7 stored answer them, read back, not replaced; a job that
  # reads the top 4 gets 4.
  capsys.readouterr()
  monkeypatch.setattr(spectrum_job, "_solve", no_solve)
  config.spectrum.num_eigenpairs, config.spectrum.tol = 4, 1e-4
  config.spectrum.method = "auto"
  jobs.run(config, workdir)
  assert "its top 7 sharded eigenpairs hold the 4 asked" in capsys.readouterr().out
  kernel = {"kernel": os.path.dirname(result["spectrum"]), "complete": True}
  pairs, _ = kernel_eigenpairs.top_eigenpairs(config, workdir, kernel)
  assert pairs.vectors.shape == (60, 4) and pairs.values.shape == (4,) == pairs.residuals.shape
  assert load_spectrum(result["spectrum"])[0].vectors.shape == (60, 7)
  # A tighter tol than the stored pairs meet solves again; so does another method, named.
  config.spectrum.tol = 1e-9
  with pytest.raises(AssertionError, match="solved again"):
    jobs.run(config, workdir)
  config.spectrum.tol, config.spectrum.method = 1e-4, "dense"
  jobs.run(config, workdir)  # dense needs no LOBPCG rounds (_solve)
  pairs, record = load_spectrum(result["spectrum"])
  assert record["method"] == "dense" and record["num_eigenpairs"] == 4 and pairs.values.shape == (60,)


@pytest.mark.parametrize("dtype,tol,remedy", [
    ("float32", 1e-9, "float32's round-off floor of the exact decomposition; "
                      "config.spectrum.dtype='float64' would lower it"),
    ("float64", 1e-18, "float64's round-off floor of the exact decomposition; "
                       "raise config.spectrum.tol")])
def test_dense_spectrum_above_tol_is_read_back_and_names_the_dtype_not_max_iters(
    workdir, monkeypatch, capsys, dtype, tol, remedy):
  """A dense result is the exact decomposition: a residual at the dtype's round-off floor above
  tol is final (it was recomputed on every run), and max_iters, which dense has none of, is not
  the remedy."""
  calls, eigh = [], spectrum_job.eigh
  monkeypatch.setattr(spectrum_job, "eigh", lambda *a, **kw: calls.append(1) or eigh(*a, **kw))
  config = spectrum_config(method="dense", dtype=dtype, tol=tol)
  config.kernel.name = "dense_floor"
  first = jobs.run(config, workdir)
  out = capsys.readouterr().out
  assert first["method"] == "dense" and not first["converged"] and first["max_residual"] > tol
  assert calls == [1] and f"(not below tol {tol:g}: {remedy})" in out and "max_iters" not in out
  again = jobs.run(config, workdir)
  out = capsys.readouterr().out
  assert calls == [1], "the dense spectrum was recomputed"
  assert "already computed" in out and remedy in out and "max_iters" not in out
  assert again["max_residual"] == first["max_residual"]


def test_a_plan_over_the_budget_streams_or_is_refused(workdir, capsys):
  tiny = 1e-6  # GiB: not even the block fits
  refused, auto = spectrum_config(method="sharded", memory_budget_gb=tiny), spectrum_config(memory_budget_gb=tiny)
  refused.kernel.name = auto.kernel.name = "budget"
  with pytest.raises(ValueError, match="config.spectrum.memory_budget_gb"):
    jobs.run(refused, workdir)
  result = jobs.run(auto, workdir)
  assert result["method"] == "streamed" and "spectrum plan: streamed" in capsys.readouterr().out


def test_float64_on_tpus_is_solved_on_the_host_or_refused_before_any_compute(workdir, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # TPUs have no float64 arithmetic
  monkeypatch.setattr(spectrum_job, "kernel_job", lambda *a: pytest.fail("the kernel job ran"))
  with pytest.raises(ValueError, match="config.spectrum.dtype='float64' cannot run on TPUs, which "
                                       "have no float64 arithmetic; use method 'streamed'"):
    jobs.run(spectrum_config(method="sharded", dtype="float64"), workdir)
  monkeypatch.undo()
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  kernel64 = spectrum_config()
  kernel64.job, kernel64.kernel.dtype = "kernel", "float64"
  with pytest.raises(ValueError, match="config.kernel.dtype='float64' cannot run on TPUs"):
    jobs.run(kernel64, workdir)
  config = spectrum_config(dtype="float64", tol=1e-8)  # the kernel in float32, its spectrum in float64
  config.kernel.name = "host_solved"  # not the earlier tests' kernel, whose float64 spectra answer it
  assert jobs.run(config, workdir)["method"] == "streamed"  # auto: LOBPCG on the host
  backends, eigh = [], spectrum_job.eigh
  monkeypatch.setattr(spectrum_job, "eigh", lambda matrix, dtype, backend, **named:
                      backends.append(backend) or eigh(matrix, dtype, backend, **named))
  dense = spectrum_config(method="dense", dtype="float64")
  dense.kernel.name = "host_solved"  # whose stored solve is streamed, so dense solves again
  assert jobs.run(dense, workdir)["method"] == "dense" and backends == ["numpy"]


@pytest.mark.parametrize("field,value,message", [
    ("num_eigenpairs", 0, "config.spectrum.num_eigenpairs=0 must be an integer >= 1"),
    ("num_eigenpairs", 61, "config.spectrum.num_eigenpairs=61 is more than the kernel's 60 rows"),
    ("method", "arpack", "config.spectrum.method='arpack'"),
    ("dtype", "bfloat16", "config.spectrum.dtype='bfloat16'"),
    ("tol", -1.0, "config.spectrum.tol=-1.0 must be in"),
    ("precision", "fast", "config.spectrum.precision='fast'"),
    ("tol", 1.0, "config.spectrum.tol=1.0 must be in"),
    ("memory_budget_gb", -0.5, "config.spectrum.memory_budget_gb=-0.5 must be >= 0"),
    ("max_block_mb", -0.5, "config.spectrum.max_block_mb=-0.5 must be >= 0"),
])
def test_bad_settings_are_refused_before_any_compute(tmp_path, monkeypatch, field, value, message):
  monkeypatch.setattr(spectrum_job, "kernel_job", lambda *a: pytest.fail("the kernel job ran"))
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
    jobs.run(spectrum_config(**{field: value}), str(tmp_path))


@pytest.mark.parametrize("classes", [(), (0, 1)])
def test_k_beyond_the_whole_split_or_its_classes_is_refused_before_the_kernel_job(tmp_path, monkeypatch,
                                                                                   classes):
  """config.kernel.num_examples=0 (the whole split, or its config.kernel.classes): k is checked
  against the subset's size before the kernel job runs."""
  from ntk_scale.data import load_dataset
  labels = load_dataset(spectrum_config().data).train.labels
  rows = len(labels) if not classes else int(np.isin(labels, classes).sum())
  monkeypatch.setattr(spectrum_job, "kernel_job", lambda *a: pytest.fail("the kernel job ran"))
  c = spectrum_config(num_eigenpairs=rows + 1)
  c.kernel.num_examples, c.kernel.classes = 0, classes
  with pytest.raises(ValueError, match=f"num_eigenpairs={rows + 1} is more than the kernel's {rows} rows"):
    jobs.run(c, str(tmp_path))


def test_lobpcg_needs_a_narrow_block(workdir):
  with pytest.raises(ValueError, match="under a fifth of the 60 rows"):
    jobs.run(spectrum_config(method="sharded", num_eigenpairs=12), workdir)


def test_a_block_of_exactly_a_fifth_of_the_rows_is_too_wide_for_lobpcg():
  """60 rows: a block of 9 + 3 = 12 vectors is a fifth of them, refused for method sharded and
  planned dense by method auto; 8 + 3 = 11 is narrow enough for LOBPCG."""
  mesh = parallel.make_mesh()
  with pytest.raises(ValueError, match=r"block of num_eigenpairs \+ oversample = 12 vectors under a "
                                       r"fifth of the 60 rows"):
    spectrum_job.check_num_eigenpairs(spectrum_config(method="sharded", num_eigenpairs=9).spectrum, 60)
  spectrum_job.check_num_eigenpairs(spectrum_config(method="sharded", num_eigenpairs=8).spectrum, 60)
  plan = lambda k: spectrum_job.plan_spectrum(spectrum_config(num_eigenpairs=k).spectrum, (60, 60), mesh, 2**30)
  assert (plan(9).method, plan(9).width) == ("dense", 12)
  assert plan(8).method == "sharded"


def test_a_stored_solve_answers_as_many_pairs_or_fewer_in_its_dtype_and_precision(tmp_path):
  """_covers: a stored solve of 6 pairs (residuals below this tol) answers a request for 5, one of
  4 does not, nor one at another precision; _is_final: a solve that has run its max_iters is final
  (a rerun would read it back, not solve again)."""
  s = spectrum_config(num_eigenpairs=5, precision="highest").spectrum
  settings = spectrum_job.solve_settings(s)
  np.save(tmp_path / "residuals.npy", np.zeros(6))
  record = lambda pairs, **stored: {"method": "sharded", "num_eigenpairs": pairs,
                                    "settings": {**settings, "num_eigenpairs": pairs, "seed": 7, **stored}}
  covers = lambda r: spectrum_job._covers(r, str(tmp_path), s, settings)  # pylint: disable=protected-access
  assert covers(record(6)) and covers(record(5))
  assert not covers(record(4))
  assert not covers(record(6, precision="default"))
  assert not covers(record(6, dtype="float64"))
  final = {"max_residual": 1e-3, "method": "sharded", "converged": False, "stalled": False}
  is_final = spectrum_job._is_final  # pylint: disable=protected-access
  assert is_final({**final, "iterations": 400}, 400) and not is_final({**final, "iterations": 399}, 400)


def test_every_setting_of_a_solve_tells_it_from_another():
  """A saved round is resumed, and a result read back as the same solve, only under equal settings:
  rounds of another length (or seed, block, dtype, precision) are another solve."""
  base = spectrum_job.solve_settings(spectrum_config().spectrum)
  for field, value in (("round_iters", 7), ("seed", 3), ("oversample", 4), ("dtype", "float64"),
                       ("precision", "default"), ("num_eigenpairs", 6), ("tol", 1e-3)):
    assert spectrum_job.solve_settings(spectrum_config(**{field: value}).spectrum) != base, field


def test_an_unconverged_solve_goes_on_when_given_more_iterations(workdir, capsys):
  config = spectrum_config(method="sharded", dtype="float64", tol=1e-14, round_iters=1, max_iters=2)
  config.kernel.name = "more"
  short = jobs.run(config, workdir)
  assert not short["converged"] and short["iterations"] == 2
  assert "raise config.spectrum.max_iters" in capsys.readouterr().out
  assert sorted(n for n in os.listdir(short["spectrum"]) if n.startswith("iterate")) == [
      "iterate.json", "iterate_2.npy"]
  assert jobs.run(config, workdir)["iterations"] == 2  # read back: nothing more was asked
  config.spectrum.max_iters = 4
  longer = jobs.run(config, workdir)
  assert "resuming the spectrum at round 2" in capsys.readouterr().out
  assert longer["iterations"] == 4 and longer["residuals_by_round"][:2] == short["residuals_by_round"]


def test_a_kernels_spectrum_is_solved_by_one_job_at_a_time(workdir, held_by_another_process):
  """Two solves of one kernel's spectrum at once (other settings: a spectrum job and an eigen job,
  say) wrote one's eigenvectors beside the other's spectrum.json. The second is refused, naming
  the first, before it writes anything; a finished job releases the lock."""
  config = spectrum_config(method="dense")
  config.kernel.name = "locked"
  kernel_only = spectrum_config(method="dense")
  kernel_only.kernel.name, kernel_only.job = "locked", "kernel"
  kernel = jobs.run(kernel_only, workdir)
  lock = os.path.join(kernel["kernel"], spectrum_job.LOCK_FILE)
  holder = held_by_another_process(lock)
  for run in (lambda: jobs.run(config, workdir),
              lambda: kernel_eigenpairs.top_eigenpairs(config, workdir, kernel)):
    with pytest.raises(writer_lock.WorkdirBusyError,
                       match=rf"the spectrum of .*kernels/locked.* is being written by another job "
                             rf"\(job train, .*process id {holder.pid}.*eigenvectors beside"):
      run()
  assert not os.path.exists(os.path.join(kernel["kernel"], spectrum_job.SPECTRUM_DIR))
  holder.kill()
  holder.wait()
  result = jobs.run(config, workdir)
  assert result["method"] == "dense" and result["converged"]
  taker = subprocess.run([sys.executable, "-c", TAKER, lock], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert taker.returncode == 0, taker.stderr  # released when the job ended


@pytest.mark.parametrize("method", ["dense", "sharded", "streamed"])
def test_a_kernel_with_nan_is_refused_and_nothing_saved(workdir, method):
  """A NaN entry (a damaged tile) gave NaN rounds that "stalled at round-off", a spectrum.json of
  NaNs recorded as final and read back by every rerun. Now: an error naming the kernel, no round
  and no result saved."""
  import tensorstore as ts
  config = spectrum_config(method=method, dtype="float64" if method == "dense" else "float32")
  config.kernel.name = f"nan_{method}"
  kernel_only = spectrum_config()
  kernel_only.kernel.name, kernel_only.job = config.kernel.name, "kernel"
  kernel = jobs.run(kernel_only, workdir)
  array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(
      kernel["kernel"], "kernel.zarr")}}, open=True).result()
  array[7, 41].write(np.float32(np.nan)).result()
  with pytest.raises(FloatingPointError, match=r"kernel .*nan_.* holds NaN or infinite entries, so "
                                               r"its eigenpairs are not finite; nothing is saved"):
    jobs.run(config, workdir)
  spectrum = os.path.join(kernel["kernel"], spectrum_job.SPECTRUM_DIR)
  assert not os.path.exists(spectrum) or os.listdir(spectrum) == []
