"""One training phase: resume from its checkpoints, train with periodic saves, NaN guard, metrics,
and the evaluation that ends it.

Phase 1 (the network) and phase 2 (its linearization) differ only in what they train and where
they write, so both run through `train_phase`: a phase lives in a directory holding its
`checkpoints/` and `metrics.jsonl` (the workdir for phase 1, `<workdir>/phase2/<name>` for phase 2).
"""

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from ntk_scale.checkpoint import CHECKPOINTS_DIR, Checkpoints, same_epoch
from ntk_scale.data import Dataset
from ntk_scale.evaluate import evaluate_and_save, write_evaluation
from ntk_scale.linearize import LinearizedModel
from ntk_scale.preemption import Preempted, preemption_notices
from ntk_scale.profile import StepProfile
from ntk_scale.train.state import TrainState
from ntk_scale.train.steps import Batch, TrainStep

if TYPE_CHECKING:  # clu's writers import TensorFlow (seconds): imported when a phase opens
  from clu import metric_writers

# Steps the host may dispatch ahead of the devices. JAX's dispatch is asynchronous: unbounded, the
# host would queue every step up to the next log or save step, so a preemption notice, read by the
# host, would be acted on only after the devices had run all of them (log_every_steps may be 100s
# of steps, past an eviction's grace period). Two keep the devices fed: the next step is queued
# while one runs.
STEPS_IN_FLIGHT = 2


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss or state; the last good checkpoint is kept."""


class Monitor(Protocol):
  """Measures the state at the steps it is `due` (phase 1's catastrophic-overfitting monitor,
  train/co_monitor.py); it may write metrics and save checkpoints."""

  def due(self, step: int) -> bool: ...

  def __call__(self, step: int, state: TrainState, checkpoints: Checkpoints,
               writer: "metric_writers.MetricWriter") -> None: ...

  def kept_epochs(self) -> list[float]: ...  # of the checkpoints it saved or chose to keep


@dataclasses.dataclass
class Phase:
  """What a phase trains and when it logs and saves; steps count batches."""
  directory: str  # holds checkpoints/ and metrics.jsonl
  batches: Callable[[int], Batch]
  benign_step: TrainStep
  adversarial_step: TrainStep | None
  flip_step: int | None  # first adversarial batch step; None for benign training
  steps_per_epoch: int
  total_steps: int
  saves: dict[int, float]  # step -> epoch of every checkpoint
  learning_rate: optax.Schedule
  log_every_steps: int
  learning_rate_field: str = "config.optimizer.learning_rate"  # named by the NaN guard
  # Called as monitor(step, state, checkpoints, writer) at the steps it is due, once the step's
  # loss and state are known to be finite, before that step's scheduled save.
  monitor: Monitor | None = None
  profile_steps: int = 0  # steps traced for TensorBoard's profile plugin (ntk_scale/profile.py)


@jax.jit
def _is_finite(state: TrainState) -> jax.Array:
  """Whether every float of the parameters, BatchNorm statistics and optimizer state is finite."""
  leaves = [x for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _check_finite(pending: list[tuple[int, dict]], step: int, state: TrainState,
                  checkpoints: Checkpoints, learning_rate_field: str) -> list[tuple[int, dict]]:
  """Fetches the metrics of the steps since the last check; raises at the first non-finite loss,
  or if the state after `step` is not finite (a step's loss is that of the state before its
  update, so a finite loss does not make the state it leaves safe to save)."""
  fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
  problem = next((f"training loss became {m['loss']} at step {s}" for s, m in fetched
                  if not np.isfinite(m["loss"])), None)
  if problem is None and not bool(_is_finite(state)):
    problem = f"the train state (parameters or optimizer state) became non-finite at step {step}"
  if problem is not None:
    checkpoints.wait_until_finished()
    last_good = checkpoints.latest_step()
    where = (f"step {last_good} in {checkpoints.directory}" if last_good is not None
             else "none (no checkpoint was saved before the failure)")
    raise NonFiniteLossError(f"{problem}; stopping without saving. Last good checkpoint: {where}. "
                             f"Lower {learning_rate_field} or check the data.")
  return fetched


def _means(fetched: list[tuple[int, dict]]) -> dict:
  return {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1]}


def open_phase(phase: Phase, state: TrainState, hparams: dict[str, Any]
               ) -> tuple[TrainState, int, Checkpoints, "metric_writers.MetricWriter"]:
  """Resumes `state` from the phase's newest checkpoint (phase 1's initialisation, step 0, included)
  and opens its writers, forgetting the metrics logged after that checkpoint. Returns (state, start
  step, checkpoints, writer)."""
  checkpoints = Checkpoints(os.path.join(phase.directory, CHECKPOINTS_DIR))
  latest = checkpoints.latest_step()
  start_step = latest or 0
  if latest is not None:
    state = checkpoints.restore(latest, state)
    logging.info("Resumed %s from step %d (epoch %.3f).", phase.directory, latest,
                 latest / phase.steps_per_epoch)
  from ntk_scale.train.writers import (  # pylint: disable=import-outside-toplevel
      JsonlWriter, create_writers, kept_on_resume, truncate_event_files)

  keep = kept_on_resume(latest)
  if jax.process_index() == 0:  # the one writer of TensorBoard's files, before it opens a new one
    truncate_event_files(phase.directory, keep)
  writer, jsonl = create_writers(phase.directory)
  if isinstance(jsonl, JsonlWriter):
    jsonl.truncate(lambda r: all(keep(r["step"], name) for name in r if name != "step"))
  if latest is None:
    writer.write_hparams(hparams)
  return state, start_step, checkpoints, writer


def train_phase(phase: Phase, state: TrainState, start_step: int, checkpoints: Checkpoints,
                writer: "metric_writers.MetricWriter") -> TrainState:
  """Trains from `start_step` to the phase's end, saving on its schedule (step 0, the state before
  any update, first when the schedule has it and it is not saved yet); returns the final state.

  On a preemption notice (ntk_scale/preemption.py) it trains on to the next step the monitor
  measures (at once without one), saves there with the metrics not yet logged, and raises
  Preempted; a run resumed from that checkpoint trains, logs and monitors as an uninterrupted one."""
  from clu import periodic_actions  # pylint: disable=import-outside-toplevel

  progress = periodic_actions.ReportProgress(num_train_steps=phase.total_steps, writer=writer,
                                             every_steps=phase.log_every_steps, every_secs=None)
  if start_step == 0 and 0 in phase.saves and checkpoints.latest_step() is None:
    checkpoints.save(0, state, phase.saves[0])
  # Resumed from a preemption's checkpoint: the metrics it saved are still to be logged.
  pending = checkpoints.pending_metrics(start_step) if start_step else []
  profile = StepProfile(phase.directory, start_step, phase.total_steps, phase.profile_steps)
  with preemption_notices() as noticed, profile:
    for step in range(start_step, phase.total_steps):
      adversarial = phase.flip_step is not None and step >= phase.flip_step
      profile.before(step)
      state, metrics = (phase.adversarial_step if adversarial else phase.benign_step)(
          state, phase.batches(step))
      profile.after(step, state)
      done = step + 1
      pending.append((done, metrics))  # the steps since the last log, which waited on them all
      if len(pending) > STEPS_IN_FLIGHT:  # the newest STEPS_IN_FLIGHT may still be running
        jax.block_until_ready(pending[-1 - STEPS_IN_FLIGHT][1])
      progress(done)
      # Every step that may save a checkpoint (the monitor's too) is checked and logged first, so
      # no non-finite state is saved and a run resumed from any checkpoint logs as an unbroken one.
      monitored = phase.monitor is not None and phase.monitor.due(done)
      if done % phase.log_every_steps == 0 or done in phase.saves or monitored:
        means = _means(_check_finite(pending, done, state, checkpoints, phase.learning_rate_field))
        pending = []
        means.update(epoch=done / phase.steps_per_epoch,
                     learning_rate=float(phase.learning_rate(done - 1)), adversarial=float(adversarial))
        writer.write_scalars(done, {f"train/{k}": v for k, v in means.items()})
      if monitored:
        phase.monitor(done, state, checkpoints, writer)
      if done in phase.saves:
        checkpoints.save(done, state, phase.saves[done])
      # Stopped only where the monitor has measured: its state "before" a collapse is then saved.
      if noticed() and done < phase.total_steps and (phase.monitor is None or monitored):
        # The monitor may have saved this step (around a collapse); its metrics are all logged.
        if done not in phase.saves and checkpoints.latest_step() != done:
          unlogged = _check_finite(pending, done, state, checkpoints, phase.learning_rate_field)
          checkpoints.save(done, state, done / phase.steps_per_epoch, pending_metrics=unlogged)
        checkpoints.wait_until_finished()
        writer.flush()
        raise Preempted(f"the train state at step {done} is saved in {checkpoints.directory}", done)
  checkpoints.wait_until_finished()
  _drop_preemption_checkpoints(phase, checkpoints)
  return state


def _drop_preemption_checkpoints(phase: Phase, checkpoints: Checkpoints) -> None:
  """A finished phase keeps the checkpoints an uninterrupted run keeps: one saved at a preemption
  was a point to resume from, and would add an epoch to the evolution job's and the kernel job's
  list, unless the catastrophic-overfitting monitor kept it as the state before a collapse. The
  live monitor is asked (Checkpoints.scheduled_epochs reads its record later): every process holds
  it, while the record is process 0's write, which the others cannot wait for here."""
  kept = phase.monitor.kept_epochs() if phase.monitor is not None else []
  for step in checkpoints.preempted_steps():
    epoch = step / phase.steps_per_epoch  # as train_phase saved it
    if not any(same_epoch(epoch, e) for e in kept):
      checkpoints.delete(step)


def write_test_scalars(writer: "metric_writers.MetricWriter", step: int,
                       results: dict[str, dict[str, Any]]) -> None:
  writer.write_scalars(step, {
      f"test/{name}/{k}" if name != "clean" else f"test/{k}": r[k]
      for name, r in results.items() for k in ("accuracy", "loss")})
  writer.flush()


def finish_phase(config: ml_collections.ConfigDict, phase: Phase, state: TrainState, epoch: float,
                 dataset: Dataset, mesh: Mesh, checkpoints: Checkpoints,
                 writer: "metric_writers.MetricWriter", *, label: str,
                 linearized: LinearizedModel | None = None) -> dict[str, Any]:
  """Evaluates the phase's final state on the test split (clean and config.eval_attacks) and records
  it in the phase directory (evaluations/, adversarial/, test/* metrics); closes the checkpoints.

  Both phases end here, so their results have one format. Returns {"state", "test" (the clean
  result), "results", "steps"}; `label` ("Phase 1", "Phase 2") starts the log lines.
  """
  step = phase.total_steps
  results = evaluate_and_save(config, state, dataset, mesh, phase.directory, step, linearized=linearized)
  write_evaluation(phase.directory, step, epoch, results)
  write_test_scalars(writer, step, results)
  checkpoints.close()
  for name, r in results.items():
    logging.info("%s test accuracy (%s) %.4f, loss %.4f after %g epochs.", label, name, r["accuracy"],
                 r["loss"], epoch)
  return {"state": state, "test": results["clean"], "results": results, "steps": step}
