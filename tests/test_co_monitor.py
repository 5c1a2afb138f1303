"""The catastrophic-overfitting detector on synthetic traces, and the monitor inside a tiny run."""

import json
import os

import ml_collections
import numpy as np
import pytest

from ntk_scale import jobs
from ntk_scale.base_config import base_config, pgd_linf
from ntk_scale.checkpoint import Checkpoints
from ntk_scale.train.collapse import CO_FILE, CollapseDetector, check_co_monitor_config
from ntk_scale.train.experiment import check_train_config
from ntk_scale.train.writers import read_metrics

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
  assert summary["checkpoint_epochs"]["before"] == collapse["before"]["epoch"]
  assert summary["checkpoint_epochs"]["after"] == collapse["epoch"]
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


@pytest.mark.parametrize("arg, message", [("method=sgd", "method='sgd'"), ("beta=x", "beta='x'"),
                                          ("gamma=1", "unknown key 'gamma'"),
                                          ("data=mnist", "data='mnist'")])
def test_sweep_config_rejects_unknown_items(arg, message):
  with pytest.raises(ValueError, match=message):
    load_config("catastrophic_overfitting", arg)
