"""The catastrophic-overfitting monitor of phase 1 (config.train.co_monitor; detector in collapse.py).

Every `every_steps` batch steps, and at every checkpoint after the first update (not at step 0,
the initialisation phase 1 saves before training), it measures accuracy under its attack
(config.train.co_monitor.attack, PGD by default) on a fixed held-out batch of test images and
clean accuracy on a fixed batch of training images, writes them to metrics.jsonl as co/*, and
feeds them to the detector. At the first collapse it
writes <workdir>/catastrophic_overfitting.json and, with `keep_checkpoints`, saves the states of
the monitored steps just before and just after it as ordinary checkpoints, so the kernel job
(config.kernel.epoch) can compute kernels on both sides of the collapse.

Monitoring at every checkpoint keeps checkpoints in step order: no scheduled save falls between
two monitored steps (step 0 comes before them all), so the state before a collapse is either
already saved or newer than every saved one. A resumed run replays the co/* records of
metrics.jsonl into the detector. Keeping checkpoints costs one extra copy of the train state in
device memory until the collapse.
"""

import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ntk_scale import files
from ntk_scale.attacks import build_attack
from ntk_scale.checkpoint import Checkpoints
from ntk_scale.data import Dataset, Split
from ntk_scale.evaluate import evaluate
from ntk_scale.matmul_precision import default_precision
from ntk_scale.train.collapse import CO_FILE, check_co_monitor_config, detector_from_config
from ntk_scale.train.experiment import eval_matmul_precision
from ntk_scale.train.state import TrainState
from ntk_scale.train.metrics_jsonl import METRICS_FILE, read_jsonl

if TYPE_CHECKING:  # clu's writers import TensorFlow (seconds); the train job passes one in
  from clu import metric_writers

ROBUST, CLEAN, TRAIN_CLEAN = "co/robust_accuracy", "co/clean_accuracy", "co/train_clean_accuracy"


def _fixed_subset(split: Split, size: int, seed: int) -> Split:
  rows = np.sort(np.random.default_rng(seed).permutation(len(split))[:size])
  return Split(split.images[rows], split.labels[rows])


def _same_collapse(a: dict | None, b: dict | None) -> bool:
  """Whether two recorded collapses (or none) are at the same step, after the same measurement."""
  step = lambda c: None if c is None else (c["step"], (c.get("before") or {}).get("step"))
  return step(a) == step(b)


class CoMonitor:
  """Call it after each training step with (step, state, checkpoints, writer), before that step's
  scheduled save; `finish` writes the summary."""

  def __init__(self, config: ml_collections.ConfigDict, dataset: Dataset, mesh: Mesh,
               steps_per_epoch: int, saves: dict[int, float], directory: str):
    monitor = config.train.co_monitor
    check_co_monitor_config(monitor, len(dataset.test), num_classes=dataset.num_classes)
    self._config, self._every = monitor, monitor.every_steps
    self._attack = build_attack(monitor.attack, prefix="config.train.co_monitor.attack",
                                num_classes=dataset.num_classes)
    self._held_out = _fixed_subset(dataset.test, monitor.num_examples, config.seed + 3)
    self._train = _fixed_subset(dataset.train, min(monitor.num_examples, len(dataset.train)),
                                config.seed + 4)
    self._key = jax.random.key(config.seed + 5)  # the same attack draws at every measurement
    self._batch_size, self._num_classes = config.eval_batch_size, dataset.num_classes
    self._precision = eval_matmul_precision(config)  # an evaluation's
    self._mesh, self._steps_per_epoch, self._saves = mesh, steps_per_epoch, saves
    self._path = os.path.join(directory, CO_FILE)
    self._detector = detector_from_config(monitor)
    self._kept: tuple[int, TrainState | None] | None = None  # last monitored step, its state if unsaved
    self._checkpoint_epochs: dict[str, float] = {}

  def due(self, step: int) -> bool:
    return step % self._every == 0 or step in self._saves

  def resume(self, directory: str, start_step: int) -> None:
    """Replays the co/* records up to `start_step` (which is a saved, hence monitored, step).

    The stored checkpoint_epochs are kept only around the collapse the replay finds: the rerun may
    judge by another criterion. Otherwise the epochs of its before and after steps that are saved
    (scheduled, the resumed step, or kept for the old collapse) replace them.
    """
    path = os.path.join(directory, METRICS_FILE)
    if not start_step or not files.exists(path):
      return
    records = read_jsonl(path)
    for r in records:
      if ROBUST in r and r["step"] <= start_step:
        self._detector.update(r["step"], r["step"] / self._steps_per_epoch, r[ROBUST], r[TRAIN_CLEAN])
    stored = files.read_json(self._path) if files.exists(self._path) else {}
    epochs = stored.get("checkpoint_epochs", {})
    if _same_collapse(stored.get("collapse"), self._detector.collapse):
      self._checkpoint_epochs = epochs
    elif self._detector.collapse is not None and self._config.keep_checkpoints:
      # The criterion (runtime fields) changed: the stored epochs are around another collapse.
      saved = lambda step: (step in self._saves or step == start_step
                            or self._saved_epoch(step) in epochs.values())
      collapse = self._detector.collapse
      before = (collapse["before"] or {}).get("step")
      self._checkpoint_epochs = {name: self._saved_epoch(step)
                                 for name, step in (("before", before), ("after", collapse["step"]))
                                 if step is not None and saved(step)}
    self._kept = (start_step, None)

  def kept_epochs(self) -> list[float]:
    """The epochs of the checkpoints kept around a collapse (config.train.co_monitor.keep_checkpoints)."""
    return list(self._checkpoint_epochs.values())

  def _measure(self, state: TrainState) -> dict[str, float]:
    run = lambda split, attack=None: evaluate(state, split, self._batch_size, self._mesh,
                                              self._num_classes, attack=attack, key=self._key)["accuracy"]
    with default_precision(self._precision):
      return {ROBUST: run(self._held_out, self._attack), CLEAN: run(self._held_out),
              TRAIN_CLEAN: run(self._train)}

  def __call__(self, step: int, state: TrainState, checkpoints: Checkpoints,
               writer: "metric_writers.MetricWriter") -> None:
    if not self.due(step):
      return
    values = self._measure(state)
    writer.write_scalars(step, values)
    epoch = step / self._steps_per_epoch
    collapse = self._detector.update(step, epoch, values[ROBUST], values[TRAIN_CLEAN])
    if collapse is not None and self._config.keep_checkpoints:
      self._save_around(collapse, step, state, checkpoints)
    if self._detector.collapse is not None:  # whether it lasts is known only later
      self.finish()
    if self._config.keep_checkpoints and self._detector.collapse is None:
      # The train step donates its input state, so the state "before" is kept as a device copy.
      self._kept = (step, None if step in self._saves else jax.tree.map(jnp.copy, state))

  def _saved_epoch(self, step: int) -> float:
    """The epoch the checkpoint of `step` is saved under, which the kernel job looks it up by: a
    scheduled save's own (fractional epoch 0.125 is 3 steps of 22, not 3 / 22), else step / steps."""
    return self._saves.get(step, step / self._steps_per_epoch)

  def _save_around(self, collapse: dict, step: int, state: TrainState, checkpoints: Checkpoints) -> None:
    before_step, before_state = self._kept if self._kept else (0, None)
    if before_step == collapse["before"]["step"]:
      if before_state is None:  # a scheduled save (or the step this run resumed from)
        self._checkpoint_epochs["before"] = self._saved_epoch(before_step)
      elif before_step > (checkpoints.latest_step() or 0):
        self._checkpoint_epochs["before"] = self._saved_epoch(before_step)
        checkpoints.save(before_step, before_state, self._checkpoint_epochs["before"])
    self._checkpoint_epochs["after"] = self._saved_epoch(step)
    if step not in self._saves:  # a scheduled step is saved by the loop right after this call
      checkpoints.save(step, state, self._checkpoint_epochs["after"])

  def finish(self) -> dict:
    """Writes and returns the summary: whether and where robust accuracy collapsed."""
    d = self._detector
    summary = {"collapsed": d.collapse is not None, "collapse": d.collapse,
               "sustained": d.sustained is not None, "sustained_collapse": d.sustained,
               "recoveries": d.recoveries, "peak": d.peak,
               "last": d.previous, "checkpoint_epochs": self._checkpoint_epochs,
               "criterion": {k: self._config.get(k, 3 if k == "sustain_evals" else None)
                             for k in ("collapse_fraction", "min_peak", "max_train_drop",
                                       "sustain_evals", "every_steps")}}
    if jax.process_index() == 0:
      files.write_json(self._path, summary, indent=2)
    return summary
