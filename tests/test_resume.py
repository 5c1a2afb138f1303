"""Resumed equals uninterrupted, bit for bit, where the state has the most to lose: phase 1 in mode F
resumed from its initialisation (killed right after the step-0 save), at and just after the switch
to adversarial batches (PGD with a random start,
Loo et al.'s two updates per adversarial batch, a cosine schedule over optimizer updates), and an
adversarial phase 2 of a linearized model whose BatchNorm statistics move ("loose").
(Mode C killed by SIGKILL: tests/test_train.py; a benign centered phase 2: tests/test_phase2.py.)
A preemption saves at a step between scheduled saves, with the metrics not yet logged, and the run
resumed from it is the uninterrupted one too (main.py stopped by Ctrl-C, its exit code:
tests/test_train.py; by SIGTERM: the pairs of tests/test_multihost.py)."""

import contextlib
import json
import os
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ntk_scale import jobs, preemption, restore
from ntk_scale.base_config import pgd_linf
from ntk_scale.checkpoint import Checkpoints
from ntk_scale.preemption import Preempted
from ntk_scale.train import loop, phase, writers
from ntk_scale.train.collapse import CollapseDetector
from ntk_scale.train.metrics_jsonl import read_metrics
from ntk_scale.workdir import (WorkdirConfigMismatchError, config_differences, is_runtime_field,
                               prepare_workdir)

from conftest import notices_from
from test_train import load_config

EPS = 0.1
PHASE2 = "linear_loose_A_from1"


def phase1_config() -> ml_collections.ConfigDict:
  """Digits smoke with 5 steps per epoch (batch 256 of 1437) in mode F, adversarial from epoch 1 =
  step 5, saved at steps 0 (the initialisation), 5, 6 and 10."""
  c = load_config("digits", "smoke")
  c.batch_size, c.num_epochs, c.log_every_steps = 256, 2.0, 1
  c.eval_attacks = ml_collections.ConfigDict()
  c.checkpoint.fractional_epochs = (1.2,)
  c.train.mode, c.train.flip_epoch, c.train.benign_step_first = "F", 1.0, True
  c.train.attack = pgd_linf(EPS, num_steps=2)
  return c


def phase2_config() -> ml_collections.ConfigDict:
  """The phase2 job on phase 1's epoch 1: adversarial, loose BatchNorm, saved at steps 2, 4, 5."""
  c = phase1_config()
  c.job = "phase2"
  c.phase2.num_epochs, c.phase2.from_epoch, c.phase2.checkpoint_every_epochs = 1.0, 1.0, 0.4
  c.phase2.linearization, c.phase2.batch_norm, c.phase2.mode = "linear", "loose", "A"
  c.phase2.attack = pgd_linf(EPS, num_steps=2)
  return c


def saved_state(directory, step) -> dict:
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta"))
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def state_leaves(directory, step) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(saved_state(directory, step))]


def records(directory) -> list[dict]:
  """The train and test records of metrics.jsonl (not the timing ones)."""
  return [r for r in read_metrics(directory) if any(k.startswith(("train/", "test/")) for k in r)]


def tensorboard_points(directory) -> list[tuple[str, int, float]]:
  """Every scalar point of the directory's TensorBoard event files, as TensorBoard would show them
  all (timing metrics left out: they differ from run to run)."""
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  from tensorboard.util import tensor_util

  points = []
  for name in sorted(os.listdir(directory)):
    if name.startswith("events.out.tfevents."):
      for event in EventFileLoader(os.path.join(directory, name)).Load():
        points += [(v.tag, event.step, float(tensor_util.make_ndarray(v.tensor)))
                   for v in event.summary.value if v.tag.startswith(("train/", "test/"))]
  return sorted(points)


def forget_after(phase_dir, step: int) -> None:
  """The phase directory as a run killed right after its checkpoint at `step` would leave it."""
  checkpoints = os.path.join(phase_dir, "checkpoints")
  for name in os.listdir(checkpoints):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(checkpoints, name))
  shutil.rmtree(os.path.join(phase_dir, "evaluations"), ignore_errors=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Phase 1, then phase 2 by its own job (so that resuming one does not re-evaluate the other)."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  jobs.run(phase1_config(), workdir)
  jobs.run(phase2_config(), workdir)
  return workdir


def test_the_run_is_what_the_resume_tests_assume(uninterrupted):
  workdir = uninterrupted
  assert sorted(Checkpoints(os.path.join(workdir, "checkpoints")).epochs().values()) == [0, 5, 6, 10]
  adversarial = {r["step"]: r["train/adversarial"] for r in records(workdir) if "train/adversarial" in r}
  assert adversarial == {s: float(s > 5) for s in range(1, 11)}  # batch steps 5..9 (1-based 6..10)
  # 5 benign batches of one update, then 5 adversarial ones of two (benign_step_first).
  assert int(saved_state(os.path.join(workdir, "checkpoints"), 10)["step"]) == 15
  p2dir = os.path.join(workdir, "phase2", PHASE2)  # phase 2 saves no step 0: its start is theta0
  assert sorted(Checkpoints(os.path.join(p2dir, "checkpoints")).epochs().values()) == [2, 4, 5]


@pytest.mark.parametrize("resume_step", [0, 5, 6])
def test_phase1_resumed_around_the_switch_equals_uninterrupted(uninterrupted, tmp_path, resume_step):
  """Step 0: killed right after the initialisation was saved, the rerun restores it and trains."""
  workdir = uninterrupted
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  forget_after(copy, resume_step)
  jobs.run(phase1_config(), copy)
  straight = state_leaves(os.path.join(workdir, "checkpoints"), 10)
  resumed = state_leaves(os.path.join(copy, "checkpoints"), 10)
  assert len(straight) == len(resumed)
  for a, b in zip(straight, resumed):
    np.testing.assert_array_equal(a, b)
  assert records(copy) == records(workdir)
  # TensorBoard shows the uninterrupted run's points once each: the killed run's points after its
  # checkpoint were cut from its event file, as from metrics.jsonl.
  points = tensorboard_points(copy)
  assert points == tensorboard_points(workdir) and len(points) == len(set(points)) > 0


def test_adversarial_loose_phase2_resumed_equals_uninterrupted(uninterrupted, tmp_path):
  workdir = uninterrupted
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  p2dir, p2copy = (os.path.join(d, "phase2", PHASE2) for d in (workdir, copy))
  forget_after(p2copy, 2)
  jobs.run(phase2_config(), copy)
  straight = state_leaves(os.path.join(p2dir, "checkpoints"), 5)
  resumed = state_leaves(os.path.join(p2copy, "checkpoints"), 5)
  for a, b in zip(straight, resumed, strict=True):
    np.testing.assert_array_equal(a, b)
  assert records(p2copy) == records(p2dir)


def test_a_phase_resumes_from_its_step_0_checkpoint_and_writes_its_hparams_once(tmp_path, monkeypatch):
  """open_phase on a phase without checkpoints keeps the state given and writes the hparams; with
  only the initialisation saved (step 0, which is falsy) it restores that and writes no hparams
  again (TensorBoard would show them twice)."""

  hparams_written = []

  class Writer:
    def write_hparams(self, hparams):
      hparams_written.append(hparams)

  monkeypatch.setattr(writers, "create_writers", lambda directory: (Writer(), None))
  run = phase.Phase(directory=str(tmp_path), batches=None, benign_step=None, adversarial_step=None,
                    flip_step=None, steps_per_epoch=5, total_steps=10, saves={0: 0.0, 10: 2.0},
                    learning_rate=None, log_every_steps=1)
  given = {"w": jnp.arange(3.0)}
  state, start, checkpoints, _ = phase.open_phase(run, given, {"seed": 0})
  assert start == 0 and state is given and hparams_written == [{"seed": 0}]
  checkpoints.save(0, {"w": jnp.array([7.0, 8.0, 9.0])}, 0.0)
  checkpoints.close()
  state, start, checkpoints, _ = phase.open_phase(run, given, {"seed": 0})
  checkpoints.close()
  assert start == 0 and hparams_written == [{"seed": 0}]
  np.testing.assert_array_equal(np.asarray(state["w"]), [7.0, 8.0, 9.0])


def test_a_rerun_may_change_where_the_data_comes_from_but_not_which_data(tmp_path):
  """data.download and data.data_dir say how the data is fetched (a resumed job on a machine that
  has it already), not which: they may change; data.name may not."""
  config = phase1_config()
  prepare_workdir(config, str(tmp_path))
  recorded = (tmp_path / "config.json").read_text()
  config.data.download, config.data.data_dir = False, str(tmp_path / "tfds")
  prepare_workdir(config, str(tmp_path))
  assert (tmp_path / "config.json").read_text() == recorded
  config.data.name = "mnist"
  with pytest.raises(WorkdirConfigMismatchError, match=r"data.name: 'digits' -> 'mnist'"):
    prepare_workdir(config, str(tmp_path))


def test_a_field_named_like_a_runtime_field_is_not_one():
  """Only a name ending in "." covers the fields under it: a field that merely starts with a
  runtime field's name (none does yet; say data.download_checksum) is part of the experiment."""
  assert is_runtime_field("data.download") and is_runtime_field("kernel.tile_size")
  assert not is_runtime_field("data.download_checksum") and not is_runtime_field("jobs")
  saved = {"job": "train", "data": {"download": True, "download_checksum": "a"}}
  current = {"job": "kernel", "data": {"download": False, "download_checksum": "b"}}
  assert config_differences(saved, current) == ["data.download_checksum: 'a' -> 'b'"]


def test_a_recorded_field_the_config_no_longer_has_is_a_difference(tmp_path):
  """A field the workdir's record has and the config lacks (one renamed or removed since) is
  reported, saved value against <absent>, as a field the config has and the record lacks is."""
  config = phase1_config()
  recorded = json.loads(config.to_json())
  recorded["train"]["removed_option"] = 0.5
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  with pytest.raises(WorkdirConfigMismatchError, match=r"train.removed_option: 0.5 -> '<absent>'"):
    prepare_workdir(config, str(tmp_path))


def preemption_config() -> ml_collections.ConfigDict:
  """Phase 1 of phase1_config in mode C, logged at steps 4 and 8 and at the saves 5, 6 and 10."""
  c = phase1_config()
  c.train.mode, c.train.flip_epoch, c.train.benign_step_first, c.log_every_steps = "C", 0.0, False, 4
  return c


def test_a_preemption_saves_its_unlogged_metrics_and_resumes_as_uninterrupted(tmp_path, monkeypatch):
  straight, preempted = str(tmp_path / "straight"), str(tmp_path / "preempted")
  jobs.run(preemption_config(), straight)
  with monkeypatch.context() as patch:
    patch.setattr(phase, "preemption_notices", notices_from(7))
    with pytest.raises(Preempted) as stopped:
      jobs.run(preemption_config(), preempted)
  assert stopped.value.step == 7  # neither logged (4, 8) nor scheduled (5, 6, 10)
  checkpoints = Checkpoints(os.path.join(preempted, "checkpoints"))
  assert [s for s, _ in checkpoints.pending_metrics(7)] == [7]
  assert not os.path.exists(os.path.join(preempted, "evaluations"))
  # Jobs that read "the newest" or "every saved epoch" take the schedule's, not step 7, which the
  # resumed run deletes (a kernel of it would name a checkpoint that is gone).
  assert checkpoints.scheduled_epochs() == {0.0: 0, 1.0: 5, 1.2: 6} and 7 in checkpoints.epochs().values()
  assert restore._find_step(checkpoints, None, "config.kernel.epoch", "train", "") == (6, 1.2)
  assert restore.saved_epochs(preemption_config(), preempted, 1) == [0.0, 1.0, 1.2]
  jobs.run(preemption_config(), preempted)
  for a, b in zip(state_leaves(os.path.join(straight, "checkpoints"), 10),
                  state_leaves(os.path.join(preempted, "checkpoints"), 10), strict=True):
    np.testing.assert_array_equal(a, b)
  assert records(preempted) == records(straight)  # step 8's mean is over steps 5..8 in both
  # The preemption's checkpoint (step 7) was to resume from: the finished run has the straight one's.
  assert (Checkpoints(os.path.join(preempted, "checkpoints")).epochs()
          == Checkpoints(os.path.join(straight, "checkpoints")).epochs() == {0.0: 0, 1.0: 5, 1.2: 6,
                                                                            2.0: 10})


def test_a_preemption_stops_within_steps_in_flight_of_the_devices(tmp_path, monkeypatch):
  """The host dispatches steps asynchronously. Unbounded, it ran about 10 steps ahead of the
  devices here (and up to the next log or save step in general), so a notice read by the host was
  acted on only once the devices had run those too. Each step is made slow on the devices (matmuls
  it depends on); the notice comes once the devices have finished 8 steps, and the run must stop
  within phase.STEPS_IN_FLIGHT steps of them (before the fix: at steps 11 and 13 of 20)."""
  c = preemption_config()
  c.num_epochs, c.log_every_steps = 4.0, 1000  # 20 steps, saved at 0 and 20 only, never logged
  c.checkpoint.every_epochs, c.checkpoint.fractional_epochs = 4.0, ()
  dispatched = []  # every step's metrics, ready once the devices have run the step

  def slowed(train_step):
    @jax.jit
    def run(state, batch):
      x = jnp.full((768, 768), 1e-3, jnp.float32) + state.step.astype(jnp.float32)
      for _ in range(8):
        x = jnp.tanh(x @ x)
      state, metrics = train_step(state, batch)
      return state.replace(step=state.step + (x[0, 0] * 0).astype(state.step.dtype)), metrics

    def dispatch(state, batch):
      state, metrics = run(state, batch)
      dispatched.append(metrics)
      return state, metrics
    return dispatch

  def slowed_steps(*args, build=loop.build_train_steps, **kwargs):
    return tuple(slowed(s) for s in build(*args, **kwargs))

  def notices():
    ran = lambda: sum(jax.tree.leaves(m)[0].is_ready() for m in dispatched)
    return contextlib.nullcontext(lambda: ran() >= 8)

  monkeypatch.setattr(loop, "build_train_steps", slowed_steps)
  monkeypatch.setattr(phase, "preemption_notices", notices)
  with pytest.raises(Preempted) as stopped:
    jobs.run(c, str(tmp_path))
  assert 8 <= stopped.value.step <= 8 + phase.STEPS_IN_FLIGHT, stopped.value.step


def test_one_process_keeps_a_sigterm_for_its_later_loops_and_restores_the_handler(monkeypatch):
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signals reach the main thread only")
  monkeypatch.setattr(preemption, "_NOTICED", threading.Event())
  before = signal.getsignal(signal.SIGTERM)
  with preemption.preemption_notices() as noticed:
    assert not noticed()
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 10
    while not noticed() and time.time() < deadline:
      time.sleep(0.01)
    assert noticed()
  assert signal.getsignal(signal.SIGTERM) is before
  with preemption.preemption_notices() as noticed:  # say, phase 2 after the last step of phase 1
    assert noticed()


@pytest.fixture
def python_sigint(monkeypatch):
  """SIGINT handled by Python's own handler, as in main.py, and no notice taken yet; restored after."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signals reach the main thread only")
  monkeypatch.setattr(preemption, "_NOTICED", threading.Event())
  monkeypatch.setattr(preemption, "_INTERRUPTED", threading.Event())
  before = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, before)


def test_one_process_takes_a_first_ctrl_c_as_a_notice_and_a_second_as_keyboard_interrupt(python_sigint):
  assert preemption.exit_code() == preemption.PREEMPTED_EXIT_CODE
  with preemption.preemption_notices() as noticed:
    os.kill(os.getpid(), signal.SIGINT)  # handled between two bytecodes of this thread
    time.sleep(0.1)
    assert noticed()
    assert "interrupted (Ctrl-C): " in str(preemption.Preempted("the work", 3))
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  assert preemption.exit_code() == preemption.INTERRUPTED_EXIT_CODE


def test_ctrl_c_is_a_notice_only_inside_a_loop_and_only_the_first_time(python_sigint):
  """Outside a loop Ctrl-C keeps Python's effect (KeyboardInterrupt at once); after a first Ctrl-C
  (phase 1's), a later loop (phase 2's) must not take the second for a notice again: it stops the
  job at once, as the first one's message promised."""
  with preemption.preemption_notices() as noticed:
    assert not noticed()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after a loop
  with preemption.preemption_notices() as noticed:
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a notice
    time.sleep(0.1)
    assert noticed()
  with preemption.preemption_notices() as noticed:  # the next loop
    assert noticed() and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)


def test_an_ignored_sigint_stays_ignored(monkeypatch):
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signals reach the main thread only")
  monkeypatch.setattr(preemption, "_NOTICED", threading.Event())
  before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job of a shell script
  try:
    with preemption.preemption_notices() as noticed:
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
      assert not noticed()
  finally:
    signal.signal(signal.SIGINT, before)


class FakeSyncService:
  """JAX's preemption sync service as it answers one process: once told of a notice (`notify`), the
  agreed step is the largest step given so far plus one, and only that step is answered True."""

  def __init__(self):
    self.steps, self.agreed = [], None

  def notify(self) -> None:
    self.agreed = max(self.steps, default=0) + 1

  def reached(self, step: int) -> bool:
    self.steps.append(step)
    return step == self.agreed


def test_several_processes_count_steps_across_loops_so_a_late_notice_stops_the_next_loop(monkeypatch):
  service = FakeSyncService()
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption, "_reached_sync_point", service.reached)
  monkeypatch.setattr(preemption._SyncPoints, "steps", 0)
  monkeypatch.setattr(preemption._SyncPoints, "reached", False)
  with preemption.preemption_notices() as noticed:  # a loop of 3 steps; the notice after its last
    assert [noticed() for _ in range(3)] == [False] * 3
  service.notify()  # agreed: step 4, which that loop never reaches
  with preemption.preemption_notices() as noticed:  # the next loop stops at its first step
    assert noticed()
  with preemption.preemption_notices() as noticed:  # and every later one
    assert noticed()
  assert service.steps == [1, 2, 3, 4]  # one count over the loops: a per-loop step never reaches 4


def test_checkpoint_saves_leave_the_sync_service_to_the_loops(tmp_path, monkeypatch):
  """Orbax would ask JAX's sync service about each checkpoint step, moving the loops' count."""
  asked = []
  monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point",
                      lambda step: asked.append(step) or False)
  checkpoints = Checkpoints(str(tmp_path / "checkpoints"))
  checkpoints.save(3, {"w": np.ones(2)}, 1.0)
  checkpoints.wait_until_finished()
  assert checkpoints.latest_step() == 3 and not asked
  monkeypatch.setattr(preemption, "CheckpointManager", ocp.CheckpointManager)  # orbax's own asks
  orbax_checkpoints = Checkpoints(str(tmp_path / "orbax"))
  orbax_checkpoints.save(3, {"w": np.ones(2)}, 1.0)
  orbax_checkpoints.wait_until_finished()
  assert 3 in asked


def test_a_preemption_waits_for_the_next_step_the_monitor_measures(tmp_path, monkeypatch):
  """The catastrophic-overfitting monitor's state "before" a collapse must be a measured step."""
  config = preemption_config()
  config.train.co_monitor.every_steps, config.train.co_monitor.num_examples = 4, 32
  config.train.co_monitor.attack = pgd_linf(EPS, num_steps=1)
  monkeypatch.setattr(phase, "preemption_notices", notices_from(7))
  with pytest.raises(Preempted) as stopped:
    jobs.run(config, str(tmp_path))
  assert stopped.value.step == 8
  assert 8 in Checkpoints(os.path.join(tmp_path, "checkpoints")).epochs().values()
  assert [r["step"] for r in read_metrics(str(tmp_path)) if "co/robust_accuracy" in r] == [4, 5, 6, 8]


def test_a_preemption_at_the_step_the_monitor_saved_after_a_collapse(tmp_path, monkeypatch):
  """The monitor saves the state "after" a collapse (step 8, off the schedule) just before the
  notice is acted on there: that checkpoint is the one to resume from (its metrics are logged);
  a second save of step 8 is not asked of Orbax, which refuses it."""
  config = preemption_config()
  config.train.co_monitor.every_steps, config.train.co_monitor.num_examples = 4, 32
  config.train.co_monitor.attack = pgd_linf(EPS, num_steps=1)
  original_update = CollapseDetector.update

  def collapse_at_8(self, step, epoch, robust_accuracy, train_accuracy):
    original_update(self, step, epoch, robust_accuracy, train_accuracy)
    if step == 8:
      self.collapse = dict(self.previous, peak=self.peak, before={"step": 6})
      return self.collapse
    return None

  monkeypatch.setattr(CollapseDetector, "update", collapse_at_8)
  monkeypatch.setattr(phase, "preemption_notices", notices_from(7))
  with pytest.raises(Preempted) as stopped:
    jobs.run(config, str(tmp_path))
  assert stopped.value.step == 8
  checkpoints = Checkpoints(os.path.join(tmp_path, "checkpoints"))
  assert checkpoints.latest_step() == 8 and checkpoints.preempted_steps() == []
  assert checkpoints.pending_metrics(8) == []

