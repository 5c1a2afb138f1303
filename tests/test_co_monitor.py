"""The catastrophic-overfitting detector on synthetic traces, and the monitor inside a tiny run."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ntk_scale import jobs, parallel
from ntk_scale.base_config import base_config, pgd_linf
from ntk_scale.checkpoint import Checkpoints
from ntk_scale.data import Split, load_digits
from ntk_scale.train import co_monitor
from ntk_scale.train.co_monitor import CLEAN, ROBUST, TRAIN_CLEAN, CoMonitor
from ntk_scale.train.collapse import CO_FILE, CollapseDetector, check_co_monitor_config
from ntk_scale.train.experiment import check_train_config
from ntk_scale.train.metrics_jsonl import read_metrics
from ntk_scale.train.writers import JsonlWriter

from test_train import load_config


def _feed(detector, robust, train):
  events = [detector.update(100 * (i + 1), 0.5 * (i + 1), r, t) for i, (r, t) in enumerate(zip(robust, train))]
  return [e for e in events if e is not None]


def test_detector_fires_once_on_a_collapse_with_rising_train_accuracy():
  # FGSM-like: robustness builds to 0.45, then drops to ~0 within two checks as training accuracy rises.
  robust = [0.10, 0.25, 0.38, 0.45, 0.44, 0.30, 0.05, 0.02, 0.01]
  train = [0.30, 0.55, 0.70, 0.78, 0.82, 0.88, 0.93, 0.97, 0.99]
  events = _feed(CollapseDetector(collapse_fraction=0.5), robust, train)
  assert len(events) == 1
  e = events[0]
  assert e["step"] == 700 and e["robust_accuracy"] == 0.05
  assert e["peak"]["step"] == 400 and e["peak"]["robust_accuracy"] == 0.45
  assert e["before"]["step"] == 600 and e["before"]["epoch"] == 3.0


def test_detector_is_silent_without_a_collapse():
  detector = CollapseDetector(collapse_fraction=0.5)
  # PGD-like: robust accuracy rises and plateaus with noise.
  assert _feed(detector, [0.1, 0.3, 0.42, 0.45, 0.41, 0.46, 0.44, 0.47], np.linspace(0.3, 0.9, 8)) == []
  # Robustness that never became meaningful (below min_peak) cannot collapse.
  assert _feed(CollapseDetector(min_peak=0.2), [0.15, 0.05, 0.0, 0.0], [0.5, 0.7, 0.8, 0.9]) == []
  # Everything falling together is divergence, not catastrophic overfitting.
  assert _feed(CollapseDetector(), [0.3, 0.4, 0.1, 0.05], [0.8, 0.85, 0.3, 0.1]) == []


def test_detector_tells_a_sustained_collapse_from_a_transient_one():
  train = np.linspace(0.5, 0.99, 12)
  # Digits-like: a drop at the 5th measurement, back above half the peak at the 6th, then a lasting one.
  robust = [0.10, 0.20, 0.30, 0.40, 0.10, 0.35, 0.42, 0.15, 0.10, 0.05, 0.04, 0.03]
  detector = CollapseDetector(collapse_fraction=0.5, sustain_evals=3)
  events = _feed(detector, robust, train)
  assert [e["step"] for e in events] == [500]  # the first collapse, reported once
  assert detector.recoveries[0]["step"] == 600 and detector.recoveries[0]["collapsed_at"] == 500
  s = detector.sustained
  assert s["step"] == 800 and s["confirmed"]["step"] == 1000 and s["evaluations"] == 3
  assert s["peak"]["robust_accuracy"] == 0.42  # the peak reached between the two collapses
  # A transient drop alone is never sustained.
  transient = CollapseDetector(sustain_evals=2)
  _feed(transient, [0.3, 0.4, 0.1, 0.4, 0.1, 0.45], np.linspace(0.5, 0.9, 6))
  assert transient.collapse is not None and transient.sustained is None and len(transient.recoveries) == 2


def test_a_dip_in_training_accuracy_inside_a_collapse_is_no_recovery():
  """Robust accuracy stays collapsed while training accuracy dips by more than max_train_drop: the
  point is not catastrophic overfitting (divergence), but robustness did not come back either. The
  run neither ends (no recovery) nor grows; it is sustained once enough collapsed points follow."""
  detector = CollapseDetector(collapse_fraction=0.5, max_train_drop=0.05, sustain_evals=3)
  _feed(detector, [0.30, 0.40, 0.05, 0.04, 0.05, 0.04], [0.90, 0.95, 0.96, 0.88, 0.97, 0.98])
  assert detector.collapse["step"] == 300 and detector.recoveries == []
  s = detector.sustained
  assert s["step"] == 300 and s["confirmed"]["step"] == 600 and s["evaluations"] == 3


def test_bad_monitor_fields_are_named():
  monitor = base_config().train.co_monitor
  monitor.every_steps = 10
  monitor.collapse_fraction = 1.5
  with pytest.raises(ValueError, match=r"config\.train\.co_monitor\.collapse_fraction=1\.5"):
    check_co_monitor_config(monitor)
  monitor.collapse_fraction = 0.5
  monitor.sustain_evals = 0
  with pytest.raises(ValueError, match=r"config\.train\.co_monitor\.sustain_evals=0 must be an integer >= 1"):
    check_co_monitor_config(monitor)
  monitor.sustain_evals = 3
  with pytest.raises(ValueError, match=r"config\.train\.co_monitor\.num_examples=256 exceeds the 100"):
    check_co_monitor_config(monitor, num_test_examples=100)
  monitor.attack.eps = -1.0
  with pytest.raises(ValueError, match=r"config\.train\.co_monitor\.attack\.eps=-1\.0"):
    check_co_monitor_config(monitor)
  # The train job's own check (before its workdir records the config) knows the dataset's test
  # size and classes: more examples than digits' 360 test images, or more targets than its 9 others.
  c = load_config("digits", "smoke")
  c.train.co_monitor.every_steps, c.train.co_monitor.num_examples = 10, 400
  with pytest.raises(ValueError, match=r"config\.train\.co_monitor\.num_examples=400 exceeds the 360"):
    check_train_config(c, 1)
  c.train.co_monitor.num_examples = 100
  c.train.co_monitor.attack = ml_collections.ConfigDict(dict(name="apgd_t", eps=0.1, num_steps=2,
                                                             num_targets=12))
  with pytest.raises(ValueError, match=r"co_monitor\.attack\.num_targets=12 must be at most 9"):
    check_train_config(c, 1)


def test_monitor_records_metrics_collapse_and_checkpoints_around_it(tmp_path):
  c = base_config()
  c.model.name, c.model.width, c.model.depth = "mlp", 16, 1
  c.batch_size, c.eval_batch_size = 64, 128
  c.num_epochs = 1.0  # 22 steps; scheduled saves at 3, 6, 8, 11, 16, 22 (fractional epochs) and the end
  c.log_every_steps = 11
  c.train.mode = "A"
  c.train.attack = ml_collections.ConfigDict(dict(name="fgsm", eps=0.1))
  c.data.transform.name, c.data.transform.beta = "inject", 0.05
  c.checkpoint.fractional_epochs = (0.5,)
  c.save_adversarial = False
  m = c.train.co_monitor
  m.every_steps, m.num_examples, m.attack = 4, 128, pgd_linf(0.1, num_steps=3)
  # A hair-trigger criterion, so that this short run is sure to record a "collapse".
  m.collapse_fraction, m.min_peak, m.max_train_drop = 1.0, 0.0, 1.0
  workdir = str(tmp_path)
  jobs.run(c, workdir)

  records = [r for r in read_metrics(workdir) if "co/robust_accuracy" in r]
  assert [r["step"] for r in records] == [4, 8, 11, 12, 16, 20, 22]  # every 4 steps and every save
  with open(os.path.join(workdir, CO_FILE)) as f:
    summary = json.load(f)
  assert summary["collapsed"]
  collapse = summary["collapse"]
  robust = {r["step"]: r["co/robust_accuracy"] for r in records}
  assert collapse["robust_accuracy"] == robust[collapse["step"]]
  assert collapse["robust_accuracy"] < max(robust[s] for s in robust if s < collapse["step"])
  epochs = Checkpoints(os.path.join(workdir, "checkpoints")).epochs()
  for side in ("before", "after"):
    assert any(abs(e - summary["checkpoint_epochs"][side]) < 1e-9 for e in epochs)
  # The checkpoints kept under those epochs are those of the steps around the collapse (a scheduled
  # save at a fractional epoch has the config's epoch, not step / 22).
  assert epochs[summary["checkpoint_epochs"]["before"]] == collapse["before"]["step"]
  assert epochs[summary["checkpoint_epochs"]["after"]] == collapse["step"]
  # The summary is rewritten after the collapse: whether it lasted follows the same records.
  replay = CollapseDetector(1.0, 0.0, 1.0, 3)
  for r in records:
    replay.update(r["step"], r["step"] / 22, r["co/robust_accuracy"], r["co/train_clean_accuracy"])
  assert summary["sustained"] == (replay.sustained is not None)
  assert [p["step"] for p in summary["recoveries"]] == [p["step"] for p in replay.recoveries]
  assert summary["last"]["step"] == 22 and summary["criterion"]["sustain_evals"] == 3


@pytest.mark.parametrize("arg", ["", "method=rs_fgsm,beta=0.1,eps=0.15", "method=n_fgsm,perp,smoke",
                                 "method=grad_align,beta=0.05,lambda=2", "method=pgd",
                                 "data=cifar10,method=n_fgsm,beta=0.0314"])
def test_sweep_config_variants_pass_the_train_checks(arg):
  config = load_config("catastrophic_overfitting", arg)
  check_train_config(config, 4)
  assert config.train.co_monitor.every_steps > 0 and config.train.mode == "A"


def test_sweep_config_single_step_defaults_can_be_overridden():
  """The N-FGSM and RS-FGSM fields build_attack reads exist (None: the paper's), so
  --config.train.attack.noise=... sets them instead of failing on a locked config."""
  config = load_config("catastrophic_overfitting", "method=n_fgsm")
  assert (config.train.attack.step_size, config.train.attack.noise) == (None, None)
  config.lock()
  config.train.attack.noise, config.train.attack.step_size = 0.5, 0.2  # as config_flags sets them
  assert (config.train.attack.noise, config.train.attack.step_size) == (0.5, 0.2)
  check_train_config(config, 4)
  config.train.attack.noise = -0.5
  with pytest.raises(ValueError, match=r"config\.train\.attack\.noise=-0\.5"):
    check_train_config(config, 4)
  config = load_config("catastrophic_overfitting", "method=rs_fgsm").lock()
  config.train.attack.step_size = 0.3
  check_train_config(config, 4)


@pytest.mark.parametrize("arg", ["lambda=5", "method=n_fgsm,lambda=1.0", "method=pgd,lambda=2"])
def test_sweep_config_refuses_lambda_without_grad_align(arg):
  with pytest.raises(ValueError, match=r"lambda=.* is GradAlign's weight; it needs method=grad_align"):
    load_config("catastrophic_overfitting", arg)
  assert load_config("catastrophic_overfitting", "method=grad_align,lambda=5").train.grad_align == 5.0


@pytest.mark.parametrize("arg, message", [("method=sgd", "method='sgd'"), ("beta=x", "beta='x'"),
                                          ("gamma=1", "unknown key 'gamma'"),
                                          ("data=mnist", "data='mnist'"),
                                          # Both ran the plain digits (transform "none"):
                                          ("beta=-0.1", "beta=-0.1 must be >= 0"),
                                          ("beta=nan", "beta='nan' must be a finite number"),
                                          ("eps=inf", "eps='inf' must be a finite number"),
                                          ("method=grad_align,lambda=inf",
                                           "lambda='inf' must be a finite number")])
def test_sweep_config_rejects_unknown_items(arg, message):
  with pytest.raises(ValueError, match=message):
    load_config("catastrophic_overfitting", arg)


# --------------------------------------------------------------------------- the monitor on a scripted trace

class _RecordingCheckpoints:
  """Stands in for Checkpoints: remembers step -> epoch of every save."""

  def __init__(self):
    self.saved = {}

  def save(self, step, state, epoch):
    del state
    if self.saved and step <= max(self.saved):  # as Orbax, which saves only after its newest step
      raise RuntimeError(f"step {step} is not after the newest saved, {max(self.saved)}")
    self.saved[step] = epoch

  def latest_step(self):
    return max(self.saved) if self.saved else None


# The default fractional epochs (0.125, 0.25, 0.375, 0.5, 0.75) and epoch 1 at 22 steps per epoch
# (digits, batch 64): steps round(22 e).
_SAVES = {3: 0.125, 6: 0.25, 8: 0.375, 11: 0.5, 16: 0.75, 22: 1.0}
# Robust accuracy at the monitored steps (every 4 steps and every save): collapse at step 6 (0.1 <
# half of 0.4, the peak at step 4), recoveries at 8 and 12 (a new peak), collapsed 16, 20, 22 (sustained).
_ROBUST = {3: 0.3, 4: 0.4, 6: 0.1, 8: 0.35, 11: 0.1, 12: 0.5, 16: 0.1, 20: 0.05, 22: 0.04}


def _scripted_monitor(directory, robust=_ROBUST, **criterion):
  directory.mkdir(exist_ok=True)
  c = base_config()
  c.train.co_monitor.every_steps, c.train.co_monitor.num_examples = 4, 8
  c.train.co_monitor.update(criterion)
  monitor = CoMonitor(c, load_digits(), parallel.make_mesh(), 22, _SAVES, str(directory))
  # The measurements, scripted by the state's step (the state is a stand-in: {"step": ...}).
  monitor._measure = lambda state: {ROBUST: robust[int(state["step"])], CLEAN: 0.5,
                                    TRAIN_CLEAN: 0.5 + int(state["step"]) / 100}
  return monitor


def _run_scripted(monitor, directory, checkpoints, start, stop):
  """Steps start+1..stop as train_phase calls them: the monitor, then the step's scheduled save."""
  writer = JsonlWriter(os.path.join(str(directory), "metrics.jsonl"))
  for step in range(start + 1, stop + 1):
    monitor(step, {"step": jnp.array(step)}, checkpoints, writer)
    if step in _SAVES:
      checkpoints.save(step, None, _SAVES[step])
  return monitor.finish()


@pytest.mark.parametrize("robust, steps, epochs", [
    (_ROBUST, (4, 6), (4 / 22, 0.25)),  # before: step 4, saved by the monitor; after: a scheduled save
    ({**_ROBUST, 6: 0.45, 8: 0.1}, (6, 8), (0.25, 0.375)),  # both scheduled saves
])
def test_kept_checkpoint_epochs_are_the_epochs_the_checkpoints_are_saved_under(tmp_path, robust, steps,
                                                                               epochs):
  # `--config.kernel.epoch=<before or after>` looks a checkpoint up by its saved epoch (to 1e-9).
  # The scheduled saves at fractional epochs are saved under the epoch the config names (6 steps
  # is epoch 0.25, not 6 / 22 = 0.2727); a step no schedule saves, under step / 22.
  checkpoints = _RecordingCheckpoints()
  summary = _run_scripted(_scripted_monitor(tmp_path, robust), tmp_path, checkpoints, 0, 22)
  assert (summary["collapse"]["before"]["step"], summary["collapse"]["step"]) == steps
  assert checkpoints.saved == {**_SAVES, steps[0]: epochs[0]}
  assert (summary["checkpoint_epochs"]["before"], summary["checkpoint_epochs"]["after"]) == epochs


def test_a_resumed_monitor_records_what_an_uninterrupted_one_does(tmp_path):
  checkpoints = _RecordingCheckpoints()
  full = _run_scripted(_scripted_monitor(tmp_path / "full"), tmp_path / "full", checkpoints, 0, 22)
  assert full["sustained"] and [p["step"] for p in full["recoveries"]] == [8, 12]
  for cut in (3, 6, 8, 11, 16):  # killed right after the save at `cut`, rerun on the same workdir
    directory = tmp_path / f"cut{cut}"
    resumed_checkpoints = _RecordingCheckpoints()
    _run_scripted(_scripted_monitor(directory), directory, resumed_checkpoints, 0, cut)
    monitor = _scripted_monitor(directory)
    start = resumed_checkpoints.latest_step()
    monitor.resume(str(directory), start)
    assert _run_scripted(monitor, directory, resumed_checkpoints, start, 22) == full, cut
    assert resumed_checkpoints.saved == checkpoints.saved, cut


@pytest.mark.parametrize("robust, cut, criterion, collapse, epochs", [
    # min_peak 0.45 ignores the peak 0.4 of step 4: the collapse is at 16 (a scheduled save, the
    # resumed step), after 12, which only an uninterrupted run kept.
    (_ROBUST, 16, dict(min_peak=0.45), (12, 16), {"after": 0.75}),
    # collapse_fraction 0.2 ignores step 6 (0.1 of the peak 0.4): the collapse is at 8 after 6, both
    # scheduled saves.
    ({**_ROBUST, 8: 0.05}, 11, dict(collapse_fraction=0.2), (6, 8), {"before": 0.25, "after": 0.375}),
])
def test_a_rerun_with_another_criterion_records_the_epochs_around_its_own_collapse(
    tmp_path, robust, cut, criterion, collapse, epochs):
  """train.co_monitor.* are runtime fields: a rerun replays co/* through its criterion and must not
  keep the epochs of checkpoints around the first run's collapse (step 6, after 4)."""
  checkpoints = _RecordingCheckpoints()
  first = _run_scripted(_scripted_monitor(tmp_path, robust), tmp_path, checkpoints, 0, cut)
  assert (first["collapse"]["before"]["step"], first["collapse"]["step"]) == (4, 6)
  monitor = _scripted_monitor(tmp_path, robust, **criterion)
  monitor.resume(str(tmp_path), cut)
  summary = _run_scripted(monitor, tmp_path, checkpoints, cut, 22)
  assert (summary["collapse"]["before"]["step"], summary["collapse"]["step"]) == collapse
  assert summary["checkpoint_epochs"] == epochs
  assert set(epochs.values()) <= set(checkpoints.saved.values())  # the kernel job finds them
  with open(tmp_path / CO_FILE) as f:
    assert json.load(f)["checkpoint_epochs"] == epochs


def test_measurements_run_at_config_eval_matmul_precision(tmp_path, monkeypatch):
  """The monitor's accuracies are evaluations: they follow config.eval_matmul_precision."""
  c = base_config()
  c.train.co_monitor.every_steps, c.train.co_monitor.num_examples = 4, 8
  c.eval_matmul_precision = "high"
  monitor = CoMonitor(c, load_digits(), parallel.make_mesh(), 22, _SAVES, str(tmp_path))
  in_effect = []
  monkeypatch.setattr(co_monitor, "evaluate", lambda *args, **kwargs: in_effect.append(
      jax.config.jax_default_matmul_precision) or {"accuracy": 0.5})
  assert monitor._measure(None) == {ROBUST: 0.5, CLEAN: 0.5, TRAIN_CLEAN: 0.5}
  assert in_effect == ["high"] * 3


def test_train_clean_accuracy_is_measured_on_training_images(tmp_path):
  """co/train_clean_accuracy, the detector's guard against divergence, is clean accuracy on the
  training subset: with every training label 0 and every test label 1, a model that always says
  0 scores 1 there and 0 on the held-out batch (measured on held-out images it read 0)."""
  c = base_config()
  c.train.co_monitor.every_steps, c.train.co_monitor.num_examples = 4, 8
  c.eval_batch_size = 8
  digits = load_digits()
  dataset = dataclasses.replace(
      digits, train=Split(digits.train.images, np.zeros(len(digits.train), np.int32)),
      test=Split(digits.test.images, np.ones(len(digits.test), np.int32)))
  monitor = CoMonitor(c, dataset, parallel.make_mesh(), 22, _SAVES, str(tmp_path))
  always_zero = lambda x: jnp.zeros((len(x), 10)).at[:, 0].set(1.0) + 0 * x.reshape(len(x), -1)[:, :1]
  assert monitor._measure(always_zero) == {ROBUST: 0.0, CLEAN: 0.0, TRAIN_CLEAN: 1.0}


def test_a_collapse_is_strictly_below_the_fraction_of_a_peak_at_least_min_peak():
  """The criterion's boundaries: robust accuracy exactly collapse_fraction of the peak is no
  collapse; a peak exactly min_peak can collapse."""
  at_fraction = CollapseDetector(collapse_fraction=0.5, min_peak=0.2)
  assert _feed(at_fraction, [0.4, 0.2], [0.8, 0.9]) == []
  assert len(_feed(CollapseDetector(collapse_fraction=0.5, min_peak=0.2), [0.4, 0.19], [0.8, 0.9])) == 1
  assert len(_feed(CollapseDetector(collapse_fraction=0.5, min_peak=0.2), [0.2, 0.05], [0.8, 0.9])) == 1


def test_a_train_accuracy_exactly_max_train_drop_below_the_peaks_is_still_a_collapse():
  """The divergence guard's boundary, in binary fractions so the arithmetic is exact: training
  accuracy 0.5 against a peak's 0.75 with max_train_drop 0.25 fell by exactly the allowed drop, so
  the robustness lost is catastrophic overfitting; a drop of 0.25 + 1/16 is divergence."""
  detector = lambda: CollapseDetector(collapse_fraction=0.5, min_peak=0.2, max_train_drop=0.25)
  assert [e["step"] for e in _feed(detector(), [0.5, 0.125], [0.75, 0.5])] == [200]
  assert _feed(detector(), [0.5, 0.125], [0.75, 0.4375]) == []


def test_a_recovery_names_the_first_point_of_the_run_it_ends():
  """Two collapsed measurements (steps 300 and 400), then robustness back above half the peak at
  step 500: the recovery records that the run began at step 300 and lasted 2 evaluations, what the
  summary reports as how long robustness stayed lost."""
  detector = CollapseDetector(collapse_fraction=0.5, sustain_evals=3)
  _feed(detector, [0.3, 0.4, 0.1, 0.05, 0.35], [0.5, 0.6, 0.7, 0.8, 0.9])
  assert detector.sustained is None
  [recovery] = detector.recoveries
  assert (recovery["step"], recovery["collapsed_at"], recovery["evaluations"]) == (500, 300, 2)


def test_the_peak_is_the_first_point_to_reach_the_best_robust_accuracy():
  """A later measurement that only equals the best keeps the earlier peak, whose training accuracy
  the divergence guard measures against: here 0.84 is within 0.05 of the first peak's 0.80, so the
  drop to 0.1 is a collapse (against the tie's 0.90 it would not be)."""
  detector = CollapseDetector(collapse_fraction=0.5, min_peak=0.2, max_train_drop=0.05)
  [event] = _feed(detector, [0.4, 0.4, 0.1], [0.80, 0.90, 0.84])
  assert event["step"] == 300 and event["peak"]["step"] == 100
  assert event["peak"]["train_clean_accuracy"] == 0.80


def test_the_monitor_may_measure_every_test_example():
  """num_examples equal to the test split is allowed (the whole split); one more is refused."""
  monitor = base_config().train.co_monitor
  monitor.every_steps, monitor.num_examples = 10, 100
  check_co_monitor_config(monitor, num_test_examples=100)
  monitor.num_examples = 101
  with pytest.raises(ValueError, match=r"config\.train\.co_monitor\.num_examples=101 exceeds the 100 test"):
    check_co_monitor_config(monitor, num_test_examples=100)


def test_keep_checkpoints_that_is_not_a_bool_is_refused():
  """--config.train.co_monitor.keep_checkpoints=None (ConfigDict accepts None for a bool field) is
  refused by name: unchecked, it would silently keep no checkpoints around the collapse."""
  monitor = base_config().train.co_monitor
  monitor.every_steps = 10
  monitor.keep_checkpoints = None
  with pytest.raises(ValueError,
                     match=r"config\.train\.co_monitor\.keep_checkpoints=None must be True or False"):
    check_co_monitor_config(monitor)


def test_a_collapse_right_after_the_resumed_step_keeps_that_step_as_before(tmp_path):
  """Killed after the save at step 6, the rerun's first measurement (step 8) finds the collapse:
  the state before it is the resumed checkpoint's, as in an uninterrupted run."""
  robust = {**_ROBUST, 6: 0.45, 8: 0.1}
  full = _run_scripted(_scripted_monitor(tmp_path / "full", robust), tmp_path / "full",
                       _RecordingCheckpoints(), 0, 22)
  assert full["checkpoint_epochs"] == {"before": 0.25, "after": 0.375}
  directory, checkpoints = tmp_path / "cut", _RecordingCheckpoints()
  _run_scripted(_scripted_monitor(directory, robust), directory, checkpoints, 0, 6)
  monitor = _scripted_monitor(directory, robust)
  monitor.resume(str(directory), 6)
  assert _run_scripted(monitor, directory, checkpoints, 6, 22) == full


def test_the_collapse_is_recorded_when_it_is_found(tmp_path):
  """A run killed after the collapse (before its end writes the summary) leaves its record, with
  the epochs of the checkpoints kept around it."""
  monitor = _scripted_monitor(tmp_path)
  checkpoints = _RecordingCheckpoints()
  writer = JsonlWriter(str(tmp_path / "metrics.jsonl"))
  for step in range(1, 7):
    monitor(step, {"step": jnp.array(step)}, checkpoints, writer)
    if step in _SAVES:
      checkpoints.save(step, None, _SAVES[step])
  with open(tmp_path / CO_FILE) as f:
    summary = json.load(f)
  assert summary["collapsed"] and (summary["collapse"]["before"]["step"], summary["collapse"]["step"]) == (4, 6)
  assert summary["checkpoint_epochs"] == {"before": 4 / 22, "after": 0.25}
