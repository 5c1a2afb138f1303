"""Evaluations kept until a job's own results are written, so a killed or preempted job resumes.

Attacks are the costly part of an evaluation (AutoAttack on CIFAR-10's 10,000 test images takes
minutes on a GPU and hours on a CPU; attacks on a kernel machine more). `KeptResults` keeps each
finished one, under a name digested from what it is and the settings that made it, with its
examples when it has them; a rerun takes back what its own settings made, so the job ends with the
results an uninterrupted one writes, and `discard` drops the directory once those are written
(an evaluation's attacks: `discard_named`, which drops the attacks its record now holds, leaving
another job's under way).
Users: an evaluation's attacks (`evaluate.evaluate_and_save`, in
`<phase dir>/evaluations/step_<step>.partial/`), the infinite job's kernel-regression scores, the
eigen_features job's groups. The attack under way keeps its batches' results every KEEP_EVERY_S
seconds (`BatchProgress`), and a worst_of attack (AutoAttack), run member by member, every
example's state after each member (`MemberProgress`) and the batches of the member under way.
After each one kept, a preemption notice (ntk_scale/preemption.py) stops the job there.
"""

import hashlib
import io
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from ntk_scale import files, parallel
from ntk_scale.preemption import Preempted

KEEP_EVERY_S = 60.0  # an attack's batches are written to the workdir at most this often


def discard(directory: str) -> None:
  """Once the job's own results are written, what was kept for them is not needed any more."""
  if jax.process_index() == 0 and files.exists(directory):
    files.remove_tree(directory)


def discard_named(directory: str, names: set[str]) -> None:
  """Drops what was kept in `directory` for the evaluations called `names` (an evaluation's
  attacks, once its record holds them), whatever settings made it, and the directory once empty.
  Another job's evaluations of other names, under way beside this one (say, an evaluate job's
  AutoAttack while the train job evaluates its last checkpoint), keep theirs."""
  if jax.process_index() != 0 or not files.exists(directory):
    return
  entries = files.list_dir(directory)
  finished = {}  # <digest>.json: a finished evaluation's record, naming it; <digest>.npz: its examples
  for entry in entries:
    digest, _, rest = entry.partition(".")
    if rest == "json":
      try:
        finished[digest] = files.read_json(os.path.join(directory, entry))["settings"].get("name")
      except (files.UnreadableRecordError, OSError, KeyError, AttributeError):
        pass  # gone (another job discarded it), or not this module's: kept
  for entry in entries:
    digest, _, rest = entry.partition(".")
    # Under way: <digest>.<name>.from_<batch>.npz, <digest>.<name>.members.json, ...
    name = finished.get(digest) if rest in ("json", "npz") else rest.split(".")[0]
    if name in names:
      try:
        files.remove(os.path.join(directory, entry))
      except FileNotFoundError:  # another evaluation of that name discarded it first
        pass
  files.remove_if_empty(directory)


def _read_agreed(path: str, settings: dict[str, Any]) -> dict[str, Any] | None:
  """The JSON record at `path` if process 0 finds it made with `settings`, on every process."""
  found = files.read_result(path, settings) if jax.process_index() == 0 else None
  if not parallel.agree(found is not None):
    return None
  return found or files.read_json(path)


def _load_arrays(path: str) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False) as saved:
    return {k: saved[k] for k in saved.files}


class KeptResults:
  """Results kept by what they are (a JSON-able `identity`, say model and attack), with their
  examples, under `directory`; `settings`: what every one of them depends on. Every process makes
  the same calls in the same order (process 0 reads and writes, the others follow its answers).
  After each one kept, a preemption notice stops the job (Preempted)."""

  def __init__(self, directory: str, settings: dict[str, Any], noticed: Callable[[], bool]):
    self.directory, self._settings, self._noticed, self._kept = directory, settings, noticed, 0

  def _path(self, identity: dict[str, Any], suffix: str) -> str:
    digest = hashlib.sha256(json.dumps({**self._settings, **identity}, sort_keys=True).encode())
    return os.path.join(self.directory, f"{digest.hexdigest()[:16]}{suffix}")

  def get(self, identity: dict[str, Any], label: str) -> dict[str, Any] | None:
    """The result kept for `identity` (with its "examples" when it had them), or None; `label`
    names it in the line that says it was taken back."""
    found = _read_agreed(self._path(identity, ".json"), {**self._settings, **identity})
    if found is None:
      return None
    if jax.process_index() == 0:
      print(f"{label}: kept from an earlier run ({self.directory})", flush=True)
    result = found["result"]
    if result.pop("has_examples"):
      result["examples"] = _load_arrays(self._path(identity, ".npz"))
    return result

  def put(self, identity: dict[str, Any], result: dict[str, Any]) -> None:
    """Keeps `result` (its "examples" arrays beside it, written first)."""
    self._kept += 1
    if jax.process_index() == 0:
      files.make_dirs(self.directory)
      examples = result.get("examples")
      if examples is not None:
        files.write_atomic(self._path(identity, ".npz"), lambda f: np.savez(f, **examples))
      record = {k: v for k, v in result.items() if k != "examples"}
      files.write_json(self._path(identity, ".json"), {
          "settings": {**self._settings, **identity},
          "result": {**record, "has_examples": examples is not None}})
    if self._noticed():
      kept = "1 evaluation is" if self._kept == 1 else f"{self._kept} evaluations are"
      raise Preempted(f"{kept} kept in {self.directory}", self._kept)

  def batches(self, identity: dict[str, Any], name: str) -> "BatchProgress":
    """Where the attack `identity` (called `name`) keeps each batch's results as it goes."""
    return BatchProgress(self._path(identity, f".{name}"), name, self._noticed)

  def members(self, identity: dict[str, Any], name: str) -> "MemberProgress":
    """Where the worst_of attack `identity` (called `name`) keeps its examples after each member."""
    return MemberProgress(self._path(identity, f".{name}"), name, {**self._settings, **identity},
                          self._noticed)

  def discard(self) -> None:
    discard(self.directory)


class MemberProgress:
  """A worst_of attack's examples after each of its members, for `evaluate`'s member-by-member run
  (`<prefix>.members.json`, naming `<prefix>.member_<k>.npz`, written first; `prefix` names the
  attack and its settings)."""

  def __init__(self, prefix: str, name: str, settings: dict[str, Any], noticed: Callable[[], bool]):
    self._prefix, self._name, self._settings, self._noticed = prefix, name, settings, noticed
    self._directory, self._record = os.path.dirname(prefix), f"{prefix}.members.json"

  def _arrays_path(self, members_done: int) -> str:
    return f"{self._prefix}.member_{members_done}.npz"

  def batches(self, member: int) -> "BatchProgress":
    """Where member `member` (from 0) keeps its batches: valid for these settings and the state
    after the members before it, which is kept (or computed again the same way)."""
    return BatchProgress(f"{self._prefix}.member{member}", f"{self._name} (member {member + 1})",
                         self._noticed)

  def restore(self) -> tuple[int, dict[str, np.ndarray], dict[str, float]] | None:
    """(members done, every example's arrays after them, accuracy after each) of an earlier run
    with these settings, or None."""
    found = _read_agreed(self._record, self._settings)
    if found is None:
      return None
    done = int(found["members_done"])
    if jax.process_index() == 0:
      print(f"attack {self._name}: resuming after {done} of its members ({self._directory})",
            flush=True)
    return done, _load_arrays(self._arrays_path(done)), dict(found["accuracy_after"])

  def member_done(self, members_done: int, arrays: dict[str, np.ndarray],
                  accuracy_after: dict[str, float], members: int) -> None:
    """Keeps the examples after `members_done` of `members` members; on a preemption notice with
    members left, stops (Preempted)."""
    if jax.process_index() == 0:
      files.make_dirs(self._directory)
      files.write_atomic(self._arrays_path(members_done), lambda f: np.savez(f, **arrays))
      files.write_json(self._record, {"settings": self._settings, "members_done": members_done,
                                      "accuracy_after": accuracy_after})
      previous = self._arrays_path(members_done - 1)
      if files.exists(previous):
        files.remove(previous)
    if self._noticed() and members_done < members:
      raise Preempted(f"{members_done} of {members} members of attack {self._name} are saved in "
                      f"{self._directory}", members_done)


class BatchProgress:
  """An attack's results batch by batch, for `evaluate`'s batch loop, kept in runs of batches
  (`<prefix>.from_<first batch>.npz`, each run starting where the one before ended; `prefix`
  names the attack and its settings): a run is written once KEEP_EVERY_S seconds have passed since
  the last (a fast attack on a GPU is not slowed by a write per batch; a slow one keeps every
  batch) or on a preemption notice, which then stops the job."""

  def __init__(self, prefix: str, name: str, noticed: Callable[[], bool]):
    self._prefix, self._name, self._noticed = prefix, name, noticed
    self._pending: list[dict[str, np.ndarray]] = []
    self._first, self._last_kept = 0, time.monotonic()
    self._taken: dict[int, dict[str, np.ndarray]] = {}  # batches of a run read back

  def _path(self, first: int) -> str:
    return f"{self._prefix}.from_{first}.npz"

  def get(self, batch: int) -> dict[str, np.ndarray] | None:
    """The arrays kept for `batch` by an earlier run, or None (batches are asked in order)."""
    if batch not in self._taken:
      found = jax.process_index() == 0 and files.exists(self._path(batch))
      if not parallel.agree(found):
        return None
      stacked = _load_arrays(self._path(batch))
      count = len(next(iter(stacked.values())))
      self._taken = {batch + j: {k: v[j] for k, v in stacked.items()} for j in range(count)}
      self._first = batch + count
    return self._taken.pop(batch)

  def put(self, batch: int, arrays: dict[str, np.ndarray], batches: int) -> None:
    """Adds `batch`'s arrays to the run being kept; writes the run when it is due; on a
    preemption notice with batches left, writes it and stops (Preempted)."""
    if not self._pending:
      self._first = batch
    self._pending.append(arrays)
    preempted = self._noticed() and batch + 1 < batches
    if preempted or time.monotonic() - self._last_kept >= KEEP_EVERY_S:
      if jax.process_index() == 0:
        files.make_dirs(os.path.dirname(self._prefix))
        stacked = {k: np.stack([a[k] for a in self._pending]) for k in arrays}
        files.write_atomic(self._path(self._first), lambda f: np.savez(f, **stacked))
      self._pending, self._last_kept = [], time.monotonic()
    if preempted:
      raise Preempted(f"{batch + 1} of {batches} batches of attack {self._name} are kept in "
                      f"{os.path.dirname(self._prefix)}", batch + 1)
