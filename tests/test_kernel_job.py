"""The `kernel` job: a checkpoint's empirical NTK on a class-balanced subset, streamed to the
workdir's kernel store, equal to the library call, resumable after a kill, refused with a clear
message when the config or the plan is wrong."""

import glob
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ntk_scale import jobs
from ntk_scale.checkpoint import CheckpointNotFoundError
from ntk_scale.data import load_digits
from ntk_scale.ntk import KernelPlanError, empirical_ntk
from ntk_scale.ntk import job
from ntk_scale.ntk import store as store_module
from ntk_scale.models import build_model
from ntk_scale.ntk.job import inference_apply
from ntk_scale.ntk.spectrum import StoredKernelOperator
from ntk_scale.ntk.store import TILES_DIR, KernelStore, KernelStoreMismatchError
from ntk_scale.preemption import Preempted
from ntk_scale.profile import StepProfile
from ntk_scale.restore import restore_for_inference

from conftest import Killed, notices_from, write_tile_killed_after
from random_variables import random_variables
from test_kernel_regression import all_highest
from test_train import load_config


def _profile_traces(directory: str) -> list[str]:
  return glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.xplane.pb"))


def kernel_config(**kernel):
  c = load_config("digits", "smoke")
  c.num_epochs = 0.5
  c.model.width = 4
  c.phase2.num_epochs = 0.5
  c.phase2.from_epoch = 0.5
  c.eval_attacks = ml_collections.ConfigDict()  # not needed here: spare the time
  c.job = "kernel"
  c.kernel.num_examples = 20
  c.kernel.tile_size = 6
  for k, v in kernel.items():
    setattr(c.kernel, k, v)
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Half an epoch of phase 1, then half an epoch of phase 2 (centered) from it."""
  path = str(tmp_path_factory.mktemp("kernel"))
  c = kernel_config()
  c.job = "train"
  jobs.run(c, path)
  return path


def library_kernel(config, workdir, phase, logits, images):
  """The library call, its BatchNorm averages closed over (the job passes them as an argument), its
  column rows rotating over the devices (the job's settings do not rotate): rotate=True also spares
  fit_plan's timing of the ring, a compilation more."""
  restored = restore_for_inference(config, workdir, phase=phase, epoch=None)
  stats = restored.variables.get("batch_stats", {})
  apply_fn = lambda p, x: restored.model.apply({"params": p, "batch_stats": stats}, x, train=False)
  return empirical_ntk(apply_fn, restored.variables["params"], images, logits=logits, rotate=True)


@pytest.fixture(scope="module")
def phase1_full_kernel(workdir):
  """The library's phase-1 "full" kernel [N, N, C, C] of the cases' 20 examples, computed once:
  its diagonal blocks summed are the trace kernel, its block (3, 3) the class-3 kernel (one
  compilation of the library's programs instead of one per kernel)."""
  store = {}
  def kernel(indices):
    if "kernel" not in store:
      store["indices"] = indices
      store["kernel"] = library_kernel(kernel_config(), workdir, 1, "full",
                                       load_digits().train.images[indices])
    np.testing.assert_array_equal(indices, store["indices"])  # the cases' subset is one
    return store["kernel"]
  return kernel


def expected_kernel(config, workdir, phase, logits, indices, phase1_full_kernel):
  """The library's kernel of `logits` at `phase`; phase 1's is read off its full kernel."""
  if phase == 2:
    return library_kernel(config, workdir, phase, logits, load_digits().train.images[indices])
  full = phase1_full_kernel(indices)
  return np.einsum("abcc->ab", full) if logits == "trace" else full[:, :, int(logits), int(logits)]


def test_a_kernel_of_one_step_is_traced_and_a_loop_too_short_to_trace_says_so(workdir, caplog):
  """The kernel job's programs are compiled before its loop (the plan's memory check), so its
  trace starts at its first step: a kernel of one tile is traced (it was not: the first 2 steps,
  a training run's compilation and warm-up, were skipped, silently). A loop that ends before the
  first step it traces warns."""
  config = kernel_config(tile_size=20, name="one_tile")
  config.profile_steps = 1
  result = jobs.run(config, workdir)
  assert result["tiles"] == 1
  assert len(_profile_traces(result["kernel"])) == 1
  with caplog.at_level(logging.WARNING), StepProfile(workdir, 0, None, 1) as profile:
    for step in range(2):  # a training loop of 2 steps: both compile and warm up
      profile.before(step)
      profile.after(step, None)
  assert "config.profile_steps: the loop ended before step 3" in caplog.text


@pytest.mark.parametrize("end, num_steps", [(None, 2), (4, 5)])
def test_a_profile_is_written_when_its_last_step_is_done(tmp_path, end, num_steps):
  """Steps 2 and 3 (0-based, after the 2 skipped) are traced, whether asked for 2 steps or for 5 in a
  loop that ends at step 4: the trace is stopped and copied when step 3's outputs are ready, inside
  the loop, not a step later (a trace of steps never asked for) nor only when the loop is left."""
  step = jax.jit(lambda x: x @ x / len(x))
  x = jnp.eye(8)
  with StepProfile(str(tmp_path), 0, end, num_steps) as profile:
    for i in range(4 if end else 6):
      profile.before(i)
      x = step(x)
      profile.after(i, x)
      assert len(_profile_traces(str(tmp_path))) == (1 if i >= 3 else 0), i


def test_a_loop_left_mid_trace_ends_the_trace_and_writes_it(tmp_path):
  """10 steps asked, the loop stops after step 3 (preempted, or shorter than asked): leaving the
  context stops jax.profiler and copies what was traced, and the profiler is free for another
  trace (a second start_trace would raise while one runs)."""
  step = jax.jit(lambda x: x @ x / len(x))
  x = jnp.eye(8)
  with StepProfile(str(tmp_path / "a"), 0, None, 10) as profile:
    for i in range(4):
      profile.before(i)
      x = step(x)
      profile.after(i, x)
  assert len(_profile_traces(str(tmp_path / "a"))) == 1
  jax.profiler.start_trace(str(tmp_path / "b"))
  jax.profiler.stop_trace()


def test_a_loop_that_fails_before_its_traced_steps_does_not_say_it_was_too_short(tmp_path, caplog):
  """The warning that the loop ended before the first traced step is for a loop that finished; one
  that raised is reported by its error, not blamed on config.profile_steps."""
  with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="stopped"):
    with StepProfile(str(tmp_path), 0, None, 1) as profile:
      profile.before(0)
      raise RuntimeError("stopped")
  assert "config.profile_steps" not in caplog.text


@pytest.mark.parametrize("phase,logits", [(1, "trace"), (1, "3"), (2, "full")])
def test_kernel_job_equals_the_library_kernel(workdir, phase, logits, phase1_full_kernel, capsys):
  """The trace kernel in bands of 2 row tiles formed 5 logits at a time (config.kernel); the class-3
  kernel with its first lockstep step traced by jax.profiler (config.profile_steps) into
  <kernel>/plugins/profile/<run>/. Phase 1's references come from one library full kernel."""
  chunked = dict(band=2, logit_chunk=5) if logits == "trace" else {}
  config = kernel_config(phase=phase, logits=logits, **chunked)
  config.profile_steps = 1 if logits == "3" else 0
  result = jobs.run(config, workdir)
  traces = _profile_traces(result["kernel"])
  assert len(traces) == config.profile_steps
  for trace in traces:
    with open(trace, "rb") as f:
      assert b"jit_" in f.read()  # the tile programs ran inside the trace
  out = capsys.readouterr().out
  assert "kernel plan: kernel 20 x 20" in out
  assert not chunked or "bands of 2 row tiles, 5 logits at a time" in out
  store = KernelStore.open(result["kernel"])
  assert result["complete"] and store.meta["complete"]
  labels = load_digits().train.labels
  indices = store.indices()
  np.testing.assert_array_equal(store.labels(), labels[indices])
  assert np.bincount(store.labels(), minlength=10).tolist() == [2] * 10  # class-balanced
  expected = expected_kernel(config, workdir, phase, logits, indices, phase1_full_kernel)
  kernel = store.read()
  assert kernel.shape == expected.shape
  np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  with open(os.path.join(result["kernel"], "kernel.json")) as f:
    meta = json.load(f)
  assert meta["source"]["phase"] == phase and meta["tile"] == 6 and meta["dtype"] == "float32"
  # A dense head's rows as factors cost C_in + C' C_out + 1 multiply-adds per pair against
  # C' C_in C_out: factored; the phase-2 (linearized) model's "full" kernel never is.
  assert meta["factored"] == (["['head']['kernel']"] if phase == 1 else [])


def test_killed_kernel_job_resumes_without_recomputing(workdir, monkeypatch):
  """The class-3 kernel, whose programs the library test's job compiled (only the diagonal one the
  resumed run needs is new)."""
  config = kernel_config(name="resumed", logits="3")
  with monkeypatch.context() as patch:
    patch.setattr(KernelStore, "write_tile", write_tile_killed_after(4)[0])
    patch.setattr(store_module, "SECONDS_KEPT_EVERY_S", 0.0)  # kernel.json's seconds kept after every step
    with pytest.raises(Killed):
      jobs.run(config, workdir)
  # The killed kernel says it is unfinished (its kernel.json had no "complete" until the end), so
  # its spectrum is refused rather than taken from tiles of zeros. The seconds it ran are counted,
  # as they were kept while it ran (a job killed outright never reaches its end).
  killed = KernelStore.open(os.path.join(workdir, "kernels", "resumed"))
  assert killed.meta["complete"] is False
  killed_seconds = killed.meta["seconds"]
  assert killed_seconds > 0
  with pytest.raises(ValueError, match="resumed is an unfinished kernel"):
    StoredKernelOperator(killed)
  # It resumes the way it started: another method would make a kernel no uninterrupted run makes.
  other = {"jacobian": "ntvp", "ntvp": "jacobian"}[killed.meta["method"]]
  with pytest.raises(ValueError, match=rf"config.kernel.method='{other}' but .*resumed was started "
                                       rf"with method '{killed.meta['method']}'"):
    jobs.run(kernel_config(name="resumed", logits="3", method=other), workdir)
  resumed = jobs.run(config, workdir)
  assert resumed["tiles"] == 10 and resumed["tiles_computed"] == 10 - 4 and resumed["complete"]
  assert resumed["method"] == killed.meta["method"]
  assert KernelStore.open(resumed["kernel"]).meta["seconds"] == pytest.approx(
      killed_seconds + resumed["seconds"])
  uninterrupted = jobs.run(kernel_config(name="uninterrupted", logits="3"), workdir)
  np.testing.assert_array_equal(KernelStore.open(resumed["kernel"]).read(),
                                KernelStore.open(uninterrupted["kernel"]).read())
  again = jobs.run(config, workdir)  # a finished kernel is not recomputed
  assert again["tiles_computed"] == 0


def test_a_preempted_kernel_job_stores_its_finished_tiles_and_resumes(workdir, monkeypatch):
  config = kernel_config(name="preempted", logits="3")
  with monkeypatch.context() as patch:  # as if SIGTERM came during the second lockstep step
    patch.setattr(job, "preemption_notices", notices_from(2))
    with pytest.raises(Preempted) as stopped:
      jobs.run(config, workdir)
  assert stopped.value.step == 1
  stored = len(KernelStore.open(os.path.join(workdir, "kernels", "preempted")).done_tiles())
  assert 0 < stored < 10 and f"{stored} of 10 tiles" in str(stopped.value)
  resumed = jobs.run(config, workdir)
  assert resumed["tiles_computed"] == 10 - stored and resumed["complete"]
  uninterrupted = jobs.run(kernel_config(name="uninterrupted", logits="3"), workdir)
  np.testing.assert_array_equal(KernelStore.open(resumed["kernel"]).read(),
                                KernelStore.open(uninterrupted["kernel"]).read())


def test_a_rerun_resumes_with_the_tile_its_kernel_started_with(workdir, monkeypatch):
  """A tile_size over the 20 examples is clipped to 20: the same command again is a no-op, which
  neither plans nor compiles, under any plan settings (a kernel made on a large device is read on a
  small one; it was planned again, and refused); settings that cannot resume that tile (one block
  of 5 per device, rotating) say which kernel holds it; a kernel of other logits under that name
  is refused before any planning (which compiles)."""
  config = kernel_config(name="clipped", logits="trace", tile_size=64)
  first = jobs.run(config, workdir)
  assert first["tile"] == 20 and first["complete"]
  meta = KernelStore.open(first["kernel"]).meta
  with monkeypatch.context() as patch:
    patch.setattr(job, "fit_plan", lambda *a, **k: pytest.fail("planned a complete kernel"))
    again = jobs.run(kernel_config(name="clipped", logits="trace", tile_size=0, rotate=True), workdir)
  assert again["tiles_computed"] == 0 and again["complete"] and again["tiles"] == first["tiles"]
  assert KernelStore.open(first["kernel"]).meta == meta  # kernel.json untouched
  os.remove(os.path.join(first["kernel"], TILES_DIR, "0-0"))  # as if killed before its last tile
  KernelStore.open(first["kernel"]).update_meta(complete=False)
  with pytest.raises(KernelPlanError, match=r"clipped was started with tile 20, which these settings "
                     r"cannot resume: config.kernel.rotate=True needs .* another config.kernel.name"):
    jobs.run(kernel_config(name="clipped", logits="trace", tile_size=0, rotate=True), workdir)
  assert jobs.run(config, workdir)["tiles_computed"] == 1
  monkeypatch.setattr(job, "fit_plan", lambda *a, **k: pytest.fail("planned a mismatched kernel"))
  with pytest.raises(KernelStoreMismatchError, match="holds a different kernel:\n  logits: 'trace' "
                     "-> 'class 3'\nChoose another config.kernel.name"):
    jobs.run(kernel_config(name="clipped", logits="3"), workdir)


def test_a_kernel_of_some_classes_is_named_apart_from_one_of_every_class(workdir):
  """The default name says which classes a subset is of: 20 images of classes 1 and 2 live beside
  20 of every class (they took its name, and the second was refused: "holds a different kernel")."""
  every = jobs.run(kernel_config(logits="0"), workdir)
  some = jobs.run(kernel_config(logits="0", classes=(2, 1)), workdir)
  assert os.path.basename(every["kernel"]) == "phase1_epoch0.5_train20_class0"
  assert os.path.basename(some["kernel"]) == "phase1_epoch0.5_train20of1-2_class0"
  assert set(KernelStore.open(some["kernel"]).labels()) == {1, 2}


def test_bad_kernel_settings_fail_before_compute(workdir):
  with pytest.raises(ValueError, match="config.kernel.logits='sum'"):
    jobs.run(kernel_config(logits="sum"), workdir)
  with pytest.raises(ValueError, match="config.kernel.split='validation'"):
    jobs.run(kernel_config(split="validation"), workdir)
  with pytest.raises(ValueError, match="config.kernel.num_examples=25"):  # not a multiple of 10
    jobs.run(kernel_config(num_examples=25), workdir)
  with pytest.raises(KernelPlanError, match="config.kernel.logit_chunk=3 needs a trace kernel"):
    jobs.run(kernel_config(logits="trace", logit_chunk=3), workdir)
  with pytest.raises(ValueError, match="config.kernel.band=-1 must be an integer >= 0"):
    jobs.run(kernel_config(band=-1), workdir)
  # Each passed: NaN budgets failed after planning as "does not fit", class 2.5 was read as class 2
  # by the check and as 2.5 by the subset, phase True was phase 1.
  with pytest.raises(ValueError, match="config.kernel.memory_budget_gb=nan must be a number >= 0"):
    jobs.run(kernel_config(memory_budget_gb=float("nan")), workdir)
  with pytest.raises(ValueError, match=r"config.kernel.classes=\(2.5,\) must be class indices"):
    jobs.run(kernel_config(classes=(2.5,), num_examples=0), workdir)
  with pytest.raises(ValueError, match="config.kernel.phase=True; expected 1"):
    jobs.run(kernel_config(phase=True), workdir)
  with pytest.raises(ValueError, match="config.kernel.factored_layers='some'; expected one of auto"):
    jobs.run(kernel_config(factored_layers="some"), workdir)
  with pytest.raises(KernelPlanError, match="config.kernel.memory_budget_gb"):
    jobs.run(kernel_config(name="tiny", memory_budget_gb=1e-7, tile_size=0), workdir)
  with pytest.raises(CheckpointNotFoundError, match="config.kernel.epoch=7.*available epochs"):
    jobs.run(kernel_config(epoch=7.0), workdir)
  assert not os.path.exists(os.path.join(workdir, "kernels", "tiny"))


def test_kernels_of_two_checkpoints_share_one_compilation(workdir):
  """BatchNorm averages are an argument of the engine's programs, not constants baked into them:
  the kernel of a second checkpoint of the same model compiles nothing (the evolution job). The
  class-3 kernel: the library test's job compiled its programs already."""
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None)
  first = jobs.run(kernel_config(epoch=0.25, logits="3"), workdir)
  count = len(compiles)
  second = jobs.run(kernel_config(epoch=0.375, logits="3"), workdir)
  assert first["tiles_computed"] == second["tiles_computed"] == 10
  assert len(compiles) == count, compiles[count:]
  a, b = KernelStore.open(first["kernel"]).read(), KernelStore.open(second["kernel"]).read()
  assert not np.allclose(a, b)  # two different checkpoints, two kernels


def test_inference_apply_traces_at_the_precision_it_is_given_and_else_leaves_it_to_the_caller():
  model = build_model(ml_collections.ConfigDict({"name": "mlp", "width": 8, "depth": 1}), 10)
  variables = random_variables(model, (8, 8, 1))  # model.init compiled its initialisers: seconds
  x = jnp.zeros((2, 8, 8, 1))
  at = lambda apply: (lambda p: jnp.sum(apply(p, x, {})))
  assert all_highest(at(inference_apply(model, "highest")), variables["params"])
  assert all_highest(jax.grad(at(inference_apply(model, "highest"))), variables["params"])
  assert not all_highest(at(inference_apply(model)), variables["params"])
  with jax.default_matmul_precision("highest"):  # the tile loop's context is not overridden
    assert all_highest(at(inference_apply(model)), variables["params"])


def test_a_complete_kernel_with_a_lost_chunk_computes_that_tile_again(workdir, capsys):
  """A chunk deleted from a finished kernel read as zeros: the spectrum of a wrong kernel, with a
  "complete: read back" line. The job finds the tile and computes it again (only that one)."""
  config = kernel_config(name="lost", logits="3")
  first = jobs.run(config, workdir)
  expected = KernelStore.open(first["kernel"]).read()
  assert first["tiles"] > 1
  os.remove(os.path.join(first["kernel"], "kernel.zarr", "c", "1", "0"))  # the mirror of tile 0-1
  capsys.readouterr()
  again = jobs.run(config, workdir)
  assert "complete: read back" not in capsys.readouterr().out
  assert again["tiles_computed"] == 1 and again["complete"]
  np.testing.assert_array_equal(KernelStore.open(again["kernel"]).read(), expected)


def test_plan_settings_read_the_budget_in_gib_and_zeros_as_unset():
  settings = job.plan_settings(kernel_config(memory_budget_gb=2, tile_size=0, band=3).kernel)
  assert settings["memory_budget_bytes"] == 2 * 2**30
  assert (settings["tile_size"], settings["band"], settings["logit_chunk"]) == (None, 3, None)
  assert job.plan_settings(kernel_config(memory_budget_gb=0).kernel)["memory_budget_bytes"] is None


def test_a_resumed_kernel_keeps_what_it_is_of_and_how_it_was_started(workdir):
  """An unfinished class-3 kernel (its programs compiled by the tests above): another matmul
  precision is another kernel, refused before any compute; so is factoring other layers than it
  started with; its own method named explicitly resumes it, and kernel.json adds up the seconds
  of both runs."""
  first = jobs.run(kernel_config(name="kept", logits="3"), workdir)
  seconds = KernelStore.open(first["kernel"]).meta["seconds"]
  assert seconds == pytest.approx(first["seconds"])
  os.remove(os.path.join(first["kernel"], TILES_DIR, "0-0"))  # as if killed before its last tile
  KernelStore.open(first["kernel"]).update_meta(complete=False)
  with pytest.raises(KernelStoreMismatchError, match="precision: 'highest' -> 'high'"):
    jobs.run(kernel_config(name="kept", logits="3", precision="high"), workdir)
  with pytest.raises(ValueError, match=r"config.kernel.factored_layers='none' factors \[\], but .*kept "
                                       r"was started factoring \[\"\['head'\]\['kernel'\]\"\]"):
    jobs.run(kernel_config(name="kept", logits="3", factored_layers="none"), workdir)
  resumed = jobs.run(kernel_config(name="kept", logits="3", method=first["method"]), workdir)
  assert resumed["tiles_computed"] == 1 and resumed["complete"]
  assert KernelStore.open(first["kernel"]).meta["seconds"] == pytest.approx(seconds + resumed["seconds"])


def test_a_float64_kernel_job_is_stored_in_float64(workdir):
  """config.kernel.dtype='float64': kernel.json and the stored array say float64, and its entries
  carry more than float32's digits."""
  result = jobs.run(kernel_config(name="float64", logits="3", dtype="float64", num_examples=10,
                                  tile_size=10), workdir)  # one tile: one program to compile
  store = KernelStore.open(result["kernel"])
  kernel = store.read()
  assert store.meta["dtype"] == "float64" and kernel.dtype == np.float64
  assert not np.array_equal(kernel, kernel.astype(np.float32))
