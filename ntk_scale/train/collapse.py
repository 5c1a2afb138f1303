"""Detecting catastrophic overfitting from a trace of robust and clean training accuracy.

Single-step adversarial training (FGSM; Wong et al. 2020 "Fast is better than free") gains
robustness and then, within a few hundred iterations, loses nearly all of it while its training
accuracy keeps improving: catastrophic overfitting (CO). Ortiz-Jimenez et al. 2023 induce it with
injected features; de Jorge et al. 2022 (N-FGSM) and GradAlign avoid it. A run records the first
moment its robust accuracy falls below a fraction of its best so far, provided the best was
meaningful and clean training accuracy did not fall with it (which would be divergence, not CO),
and whether (and when first) the collapse lasted: a sustained collapse stays collapsed for
`sustain_evals` consecutive measurements.
"""

import dataclasses

import ml_collections

from ntk_scale.attacks import build_attack
from ntk_scale.config_numbers import is_finite_number, is_whole_number

CO_FILE = "catastrophic_overfitting.json"


@dataclasses.dataclass
class CollapseDetector:
  """Feed it (step, epoch, robust accuracy, clean train accuracy) in step order.

  `update` returns the first collapse, once: the first point that satisfies the criterion. On
  digits such drops can be transient (robustness returns within an epoch), unlike CO on CIFAR-10,
  so the detector also records `sustained`, the first run of `sustain_evals` consecutive collapsed
  points, and every `recoveries` point at which a run of collapsed points ended.
  """
  collapse_fraction: float = 0.5
  min_peak: float = 0.2
  max_train_drop: float = 0.05
  sustain_evals: int = 3
  peak: dict | None = None  # the point of highest robust accuracy so far, outside collapsed runs
  previous: dict | None = None  # the last point fed
  collapse: dict | None = None
  sustained: dict | None = None
  recoveries: list = dataclasses.field(default_factory=list)
  _run: list = dataclasses.field(default_factory=list)  # the current run of collapsed points

  def update(self, step: int, epoch: float, robust_accuracy: float,
             train_accuracy: float) -> dict | None:
    point = dict(step=int(step), epoch=float(epoch), robust_accuracy=float(robust_accuracy),
                 train_clean_accuracy=float(train_accuracy))
    previous, self.previous = self.previous, point
    if self.peak is not None and self._collapsed(point):
      self._run.append(point)
      if self.sustained is None and len(self._run) == self.sustain_evals:
        self.sustained = dict(self._run[0], confirmed=point, peak=self.peak, evaluations=len(self._run))
      if self.collapse is None:
        self.collapse = dict(point, peak=self.peak, before=previous)
        return self.collapse
      return None
    if self._run:
      if point["robust_accuracy"] < self.collapse_fraction * self.peak["robust_accuracy"]:
        # Robustness still collapsed, but training accuracy fell too (divergence, not catastrophic
        # overfitting): no recovery, and the run neither ends nor grows.
        return None
      self.recoveries.append(dict(point, collapsed_at=self._run[0]["step"], evaluations=len(self._run)))
      self._run = []
    if self.peak is None or robust_accuracy > self.peak["robust_accuracy"]:
      self.peak = point
    return None

  def _collapsed(self, point: dict) -> bool:
    peak = self.peak
    return (peak["robust_accuracy"] >= self.min_peak
            and point["robust_accuracy"] < self.collapse_fraction * peak["robust_accuracy"]
            and point["train_clean_accuracy"] >= peak["train_clean_accuracy"] - self.max_train_drop)


def detector_from_config(monitor: ml_collections.ConfigDict) -> CollapseDetector:
  return CollapseDetector(monitor.collapse_fraction, monitor.min_peak, monitor.max_train_drop,
                          monitor.get("sustain_evals", 3))


def check_co_monitor_config(monitor: ml_collections.ConfigDict | None, num_test_examples: int | None = None,
                            prefix: str = "config.train.co_monitor", num_classes: int | None = None
                            ) -> None:
  """Raises ValueError naming the wrong field of config.train.co_monitor (nothing to check when off);
  with `num_classes`, also an attack's targets the dataset's classes cannot supply."""
  if monitor is None:
    return
  every = monitor.get("every_steps", 0)
  if not is_whole_number(every, 0):
    raise ValueError(f"{prefix}.every_steps={every!r} must be an integer >= 0 (0: no monitor).")
  if every == 0:
    return
  n = monitor.get("num_examples")
  if not is_whole_number(n, 1):
    raise ValueError(f"{prefix}.num_examples={n!r} must be an integer >= 1.")
  if num_test_examples is not None and n > num_test_examples:
    raise ValueError(f"{prefix}.num_examples={n} exceeds the {num_test_examples} test examples.")
  for field, low, high in (("collapse_fraction", 0.0, 1.0), ("min_peak", 0.0, 1.0),
                           ("max_train_drop", 0.0, 1.0)):
    value = monitor.get(field)
    if not (is_finite_number(value) and low <= value <= high):
      raise ValueError(f"{prefix}.{field}={value!r} must lie in [{low}, {high}].")
  sustain = monitor.get("sustain_evals", 3)
  if not is_whole_number(sustain, 1):
    raise ValueError(f"{prefix}.sustain_evals={sustain!r} must be an integer >= 1 (consecutive "
                     "collapsed measurements that make a collapse sustained).")
  if not isinstance(monitor.get("keep_checkpoints"), bool):
    raise ValueError(f"{prefix}.keep_checkpoints={monitor.get('keep_checkpoints')!r} must be True or False.")
  build_attack(monitor.attack, prefix=f"{prefix}.attack", num_classes=num_classes)
