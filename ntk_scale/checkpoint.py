"""Orbax checkpoints under `<workdir>/checkpoints/`, one per save step, each addressable by epoch.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a job
killed at any moment leaves only whole checkpoints behind; the next run resumes from the newest.
Deletions are atomic too (`Checkpoints.delete`). Restores take the shardings of the target state,
so a checkpoint written on one topology restores on another. With several processes, process 0
lists the saved steps and tells the others, so all of them resume from the same step even where
file-system caches disagree.
"""

import contextlib
import math
import os
from typing import Any, Iterable, Iterator

import jax
import orbax.checkpoint as ocp

from ntk_scale import files, parallel, preemption, writer_lock
from ntk_scale.train.collapse import CO_FILE


CHECKPOINTS_DIR = "checkpoints"  # a phase's checkpoints, in its directory (the workdir for phase 1)
INITIAL_EPOCH = 0.0  # the epoch of phase 1's checkpoint of its initialisation (step 0)
# Where Orbax renames a checkpoint it deletes (on a local or mounted file system), before it is removed.
DELETED_SUBDIR = "deleting"
COMMIT_FILE = "commit_success.txt"  # in a bucket, what marks a step's checkpoint as whole to Orbax


class CheckpointNotFoundError(FileNotFoundError):
  """The requested checkpoint does not exist in the workdir."""


class UnreadableCheckpointError(RuntimeError):
  """A listed checkpoint that Orbax cannot read: a file of it removed or cut short after it was
  saved (Orbax's own errors, a pytree structure error or a tensorstore read error, name neither
  the step nor what to do)."""


@contextlib.contextmanager
def _reading(directory: str, step: int, what: str) -> Iterator[None]:
  """Orbax's errors while reading the checkpoint of `step` as UnreadableCheckpointError, naming
  the step's directory and the way out."""
  try:
    yield
  except CheckpointNotFoundError:
    raise
  except Exception as error:  # pylint: disable=broad-exception-caught
    path = os.path.join(directory, str(step))
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    raise UnreadableCheckpointError(
        f"the {what} of the checkpoint of step {step} cannot be read ({path}: "
        f"{type(error).__name__}: {detail[:300]}); a file of it may have been removed or cut short "
        f"after it was saved. Move {path} out of checkpoints/ and rerun: training resumes from "
        f"the checkpoint before it, and jobs that read checkpoints no longer see it.") from error


def save_schedule(steps_per_epoch: int, num_epochs: float, every_epochs: float,
                  fractional_epochs: Iterable[float], initial: bool = False) -> dict[int, float]:
  """Step -> epoch of every checkpoint: each `every_epochs`, each of `fractional_epochs`, and the end;
  with `initial`, also step 0 as epoch 0, the state before any update (phase 1's initialisation).

  An epoch's step is round(epoch * steps_per_epoch); epochs beyond the run are dropped, and a
  fraction that rounds to step 0 is dropped too (step 0 is only ever the initialisation). Where
  several epochs land on one step, the checkpoint is recorded under the `every_epochs` multiple or
  the end if one lands there (jobs ask for those by epoch), else under the fraction nearest to the
  step (a tie: the smaller), so a checkpoint's epoch is always the best name for its step.
  """
  total_steps = int(round(num_epochs * steps_per_epoch))
  regular = [every_epochs * k for k in range(1, int(math.floor(num_epochs / every_epochs + 1e-9)) + 1)]
  regular.append(num_epochs)
  candidates = [(e, True) for e in regular] + [(float(e), False) for e in fractional_epochs]
  step_of = lambda epoch: int(round(epoch * steps_per_epoch))
  preference = lambda c: (not c[1], abs(c[0] * steps_per_epoch - step_of(c[0])), c[0])
  schedule = {}
  for epoch, is_regular in sorted(candidates, key=preference):
    step = step_of(epoch)
    if 0 < step <= total_steps and step not in schedule:
      # A multiple is stored as a person writes it (0.3, not 0.1 * 3 = 0.30000000000000004), but
      # its step comes from the product as computed before, so runs keep the steps they saved.
      schedule[step] = float(f"{epoch:.12g}") if is_regular else float(epoch)
  if initial:
    schedule[0] = INITIAL_EPOCH
  return dict(sorted(schedule.items()))


def missing_initial_note(phase: int, from_epoch: float | None = None) -> str:
  """Why a phase's checkpoints have no epoch 0, for an error that asked for it: phase 1 saves its
  initialisation, so a phase-1 run without one predates that; phase 2 never saves its initial state,
  which is theta0 (phase 1's checkpoint at config.phase2.from_epoch, `from_epoch`)."""
  if phase == 1:
    return ("this run predates initial checkpoints: phase 1 now saves its initialisation as epoch 0 "
            "(step 0) before the first update, runs trained before that have none; train phase 1 "
            "again in a new workdir to have one")
  at = "config.phase2.from_epoch" + ("" if from_epoch is None else f"={from_epoch:g}")
  return (f"phase 2 saves no initial checkpoint: it starts from theta0, phase 1's checkpoint at {at}, "
          f"whose kernel is the linearized model's at phase-2 epoch 0 (ask for phase 1 at that epoch)")


def same_epoch(a: float, b: float) -> bool:
  """Whether two epochs name one checkpoint, to the 1e-9 that epochs are matched to."""
  return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def is_initial(epoch: float) -> bool:
  """Whether `epoch` names the initialisation, epoch 0 (to the 1e-9 that epochs are matched to)."""
  return math.isclose(epoch, INITIAL_EPOCH, abs_tol=1e-9)


class Checkpoints:
  """Saves and restores train states; a thin layer over `ocp.CheckpointManager`."""

  def __init__(self, directory: str, create: bool = True):
    """`create=False` for readers: a job that only reads checkpoints leaves a workdir without
    them as it found it (no empty checkpoints/), and finds no steps there."""
    # Orbax wants absolute paths; a bucket's URI is one.
    self.directory = directory if files.is_cloud(directory) else os.path.abspath(directory)
    self._manager = preemption.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=create,
                                             enable_async_checkpointing=True,
                                             single_host_load_and_broadcast=True,
                                             todelete_subdir=DELETED_SUBDIR))
    if create:  # a writer: what a deletion cut short left
      self._remove_deleted()

  def save(self, step: int, state: Any, epoch: float,
           pending_metrics: list[tuple[int, dict[str, float]]] | None = None) -> None:
    """Starts an asynchronous save; the state's device buffers may be donated right after.
    `pending_metrics`: a save at a preemption also keeps the metrics of the steps since the last
    logged one (read back by `pending_metrics`), so the resumed run logs them as an uninterrupted
    one would."""
    writer_lock.check_claims(f"saving step {step}")  # in a bucket, another copy of this job took over
    gone = jax.process_index() == 0 and not files.is_cloud(self.directory) and not files.exists(
        self.directory)
    if parallel.agree(gone):  # Orbax would make it again: a workdir missing its config and past
      raise FileNotFoundError(
          f"{self.directory} was deleted while this job ran: stopping rather than saving step "
          f"{step} into a workdir without its record (config.json) and earlier checkpoints. "
          f"Rerun to start again there, or use another --workdir.")
    meta = {"step": int(step), "epoch": float(epoch)}
    if pending_metrics is not None:
      meta.update(preempted=True, pending_metrics=[[int(s), m] for s, m in pending_metrics])
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    if not saved:  # Orbax skips a step at or below its newest without a word: a state lost
      raise RuntimeError(f"the checkpoint of step {step} was not saved in {self.directory}: Orbax "
                         f"saves only after its newest step ({self.latest_step()})")

  def _meta(self, step: int) -> dict[str, Any]:
    with _reading(self.directory, step, "metadata"):
      return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def pending_metrics(self, step: int) -> list[tuple[int, dict[str, float]]]:
    """The unlogged metrics saved with the checkpoint at `step` (one saved at a preemption)."""
    return [(int(s), m) for s, m in self._meta(step).get("pending_metrics", [])]

  def _metas(self) -> dict[int, dict[str, Any]]:
    """Each listed step's metadata. A step deleted since Orbax listed the directory (a reader that
    lists while the resumed train job drops its preemption checkpoint) is left out, not an error."""
    metas = {}
    for step in self._manager.all_steps():
      try:
        metas[step] = self._meta(step)
      except UnreadableCheckpointError:
        if files.exists(os.path.join(self.directory, str(step))):
          raise
    return metas

  def preempted_steps(self) -> list[int]:
    """Steps of the checkpoints saved at a preemption: points to resume from, off the schedule."""
    return [step for step, meta in self._metas().items() if meta.get("preempted")]

  def delete(self, step: int) -> None:
    """Deletes the checkpoint at `step` (every process calls it: Orbax agrees on it), so that a
    kill at any moment leaves it whole or gone: a recursive delete cut short would leave a step
    that Orbax lists and nothing can read (meta/ gone: every later job failed on the workdir).
    On a local or mounted file system Orbax first renames it into checkpoints/deleting/, which
    is removed after (or by the next writer); in a bucket, where a rename is a copy, its commit
    marker goes first, and Orbax lists only committed steps there."""
    parallel.barrier(f"ntk_scale delete checkpoint {step}")  # every process has read the steps
    marker = os.path.join(self.directory, str(step), COMMIT_FILE)
    if files.is_cloud(self.directory) and jax.process_index() == 0 and files.exists(marker):
      files.remove(marker)
    self._manager.delete(step)
    self._remove_deleted()

  def _remove_deleted(self) -> None:
    trash = os.path.join(self.directory, DELETED_SUBDIR)
    if jax.process_index() == 0 and not files.is_cloud(self.directory) and files.exists(trash):
      files.remove_tree(trash)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def epochs(self) -> dict[float, int]:
    """Epoch -> step of every finished checkpoint."""
    return {meta["epoch"]: step for step, meta in self._metas().items()}

  def scheduled_epochs(self) -> dict[float, int]:
    """`epochs` less the preempted checkpoints: those of the schedule, which stay (with one the
    catastrophic-overfitting monitor kept as a state before a collapse). A preempted one is deleted
    once the resumed phase finishes, so a job that picks "the newest", "every saved epoch" or one
    by epoch must not pick it (its results would name a checkpoint that no longer exists)."""
    epochs, preempted = self.epochs(), set(self.preempted_steps())
    kept = self._kept_by_co_monitor() if preempted else []
    return {epoch: step for epoch, step in epochs.items()
            if step not in preempted or any(same_epoch(epoch, e) for e in kept)}

  def _kept_by_co_monitor(self) -> list[float]:
    """The epochs the catastrophic-overfitting monitor's record (next to phase 1's checkpoints/)
    names as kept around its collapse: a preempted checkpoint among them stays (train/phase.py)."""
    path = os.path.join(os.path.dirname(self.directory), CO_FILE)
    if not files.exists(path):
      return []
    return list(files.read_json(path).get("checkpoint_epochs", {}).values())

  def _require_step(self, step: int) -> None:
    """Raises CheckpointNotFoundError, listing the steps there are, unless `step` is saved here."""
    steps = list(self._manager.all_steps())
    if step not in steps:
      raise CheckpointNotFoundError(f"no checkpoint at step {step} in {self.directory}; "
                                    f"available steps: {steps or 'none'}.")

  def restore(self, step: int, target: Any) -> Any:
    """The state saved at `step`, placed with the shardings of `target` (a state or its abstract tree)."""
    self._require_step(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with _reading(self.directory, step, "state"):
      return self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]

  def restore_variables(self, step: int, sharding: jax.sharding.Sharding) -> dict[str, Any]:
    """Only `{"params", "batch_stats"}` of the state saved at `step`, every array placed with
    `sharding`, shapes as saved: inference needs neither the optimizer state nor a model
    initialisation to shape the target. `batch_stats` is {} for models without BatchNorm."""
    self._require_step(step)
    # A reader of its own: Orbax binds an item to one handler per manager, and a partial restore
    # needs the PyTree handler where this manager saves with the Standard one (same format on disk).
    reader = ocp.CheckpointManager(self.directory, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False, single_host_load_and_broadcast=True))
    with _reading(self.directory, step, "parameters"):
      saved = reader.item_metadata(step)["state"].tree
      target = {k: saved[k] for k in ("params", "batch_stats") if jax.tree.leaves(saved.get(k, {}))}
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), target)
      restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))["state"]
    reader.close()
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}

  def step_for_epoch(self, epoch: float, field: str | None = None, initial_note: str = "") -> int:
    """The step of the checkpoint saved at `epoch` (e.g. 0, 0.125 or 20) of `scheduled_epochs` (not
    one saved at a preemption, which the rerun deletes); raises CheckpointNotFoundError naming
    `field` (the config field that asked for it) and listing the epochs there are, with
    `initial_note` (`missing_initial_note`) when epoch 0 is asked of checkpoints that lack it."""
    epochs = self.scheduled_epochs()
    for saved_epoch, step in epochs.items():
      if same_epoch(saved_epoch, epoch):
        return step
    asked = f"{field}={epoch:g}" if field else f"epoch {epoch:g}"
    why = f" ({initial_note})" if initial_note and epochs and is_initial(epoch) else ""
    if any(same_epoch(saved_epoch, epoch) for saved_epoch in self.epochs()):
      why = (" (the checkpoint of that epoch was saved at a preemption, only to resume from: the "
             "rerun deletes it once the phase has trained)")
    raise CheckpointNotFoundError(
        f"no checkpoint for {asked} in {self.directory}{why}; available epochs: "
        f"{sorted(epochs) or 'none (has this workdir been trained?)'}.")

  def restore_epoch(self, epoch: float, target: Any) -> Any:
    """The state saved at `epoch`, placed like `target`."""
    return self.restore(self.step_for_epoch(epoch), target)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
