"""What an unfinished evaluation has done, so a killed or preempted one resumes there.

The attacks of config.eval_attacks are an evaluation's costly part (AutoAttack on CIFAR-10's
10,000 test images takes minutes on a GPU and hours on a CPU). Each finished attack's result is
kept in `<phase dir>/evaluations/step_<step>.partial/<name>.json` with the settings that made it;
a worst_of attack (AutoAttack) run member by member also keeps, after each member, every example's
state (`<name>.members.json`, naming `<name>.member_<k>.npz`, written first). A rerun reuses what
its own settings made, so it ends with the results and adversarial sets an uninterrupted run
writes; `discard` drops the directory once the evaluation's record is written. After each attack
and each member, a preemption notice (ntk_scale/preemption.py) stops the evaluation there.
"""

import hashlib
import io
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from ntk_scale import files, parallel
from ntk_scale.preemption import Preempted


def partial_directory(phase_dir: str, step: int) -> str:
  """Where the finished parts of the evaluation of checkpoint `step` are kept."""
  return os.path.join(phase_dir, "evaluations", f"step_{step}.partial")


def discard(phase_dir: str, step: int) -> None:
  """Once the evaluation's record is written: its kept parts are not needed any more."""
  directory = partial_directory(phase_dir, step)
  if jax.process_index() == 0 and files.exists(directory):
    files.remove_tree(directory)


class MemberProgress:
  """A worst_of attack's examples after each of its members, for `evaluate`'s member-by-member run."""

  def __init__(self, directory: str, name: str, settings: dict[str, Any], noticed: Callable[[], bool]):
    self._directory, self._name, self._settings, self._noticed = directory, name, settings, noticed
    self._record = os.path.join(directory, f"{name}.members.json")

  def _arrays_path(self, members_done: int) -> str:
    return os.path.join(self._directory, f"{self._name}.member_{members_done}.npz")

  def restore(self) -> tuple[int, dict[str, np.ndarray], dict[str, float]] | None:
    """(members done, every example's arrays after them, accuracy after each) of an earlier run
    with these settings, or None."""
    found = None
    if jax.process_index() == 0:
      found = files.read_result(self._record, self._settings)
    if not parallel.agree(found is not None):
      return None
    found = found or files.read_json(self._record)
    done = int(found["members_done"])
    if jax.process_index() == 0:
      print(f"attack {self._name}: resuming after {done} of its members ({self._directory})", flush=True)
    with np.load(io.BytesIO(files.read_bytes(self._arrays_path(done))), allow_pickle=False) as saved:
      arrays = {k: saved[k] for k in saved.files}
    return done, arrays, dict(found["accuracy_after"])

  def member_done(self, members_done: int, arrays: dict[str, np.ndarray],
                  accuracy_after: dict[str, float], members: int) -> None:
    """Keeps the examples after `members_done` of `members` members; on a preemption notice with
    members left, stops (Preempted)."""
    if jax.process_index() == 0:
      files.make_dirs(self._directory)
      path = self._arrays_path(members_done)
      files.write_atomic(path, lambda f: np.savez(f, **arrays))
      files.write_json(self._record, {"settings": self._settings, "members_done": members_done,
                                      "accuracy_after": accuracy_after})
      previous = self._arrays_path(members_done - 1)
      if files.exists(previous):
        files.remove(previous)
    if self._noticed() and members_done < members:
      raise Preempted(f"{members_done} of {members} members of attack {self._name} are saved in "
                      f"{self._directory}", members_done)


class EvaluationProgress:
  """The finished attacks of one evaluation (a phase directory's checkpoint step) and the members
  of the one under way. Every process makes the same calls in the same order (process 0 reads and
  writes; the others follow its answers)."""

  def __init__(self, phase_dir: str, step: int, settings: dict[str, Any],
               noticed: Callable[[], bool]):
    """`settings`: what the evaluation's results depend on besides each attack's own config."""
    self.directory = partial_directory(phase_dir, step)
    self._settings, self._noticed = {**settings, "step": int(step)}, noticed

  def _attack_settings(self, name: str, index: int, attack: ml_collections.ConfigDict) -> dict[str, Any]:
    return {**self._settings, "name": name, "index": index, "attack": attack.to_dict()}

  def result(self, name: str, index: int, attack: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The result an earlier run kept for the `index`-th attack (`name`, config `attack`), or None."""
    path = os.path.join(self.directory, f"{name}.json")
    found = None
    if jax.process_index() == 0:
      found = files.read_result(path, self._attack_settings(name, index, attack))
    if not parallel.agree(found is not None):
      return None
    if jax.process_index() == 0:
      print(f"attack {name}: its result is kept from an earlier run ({self.directory})", flush=True)
    return (found or files.read_json(path))["result"]

  def members(self, name: str, index: int, attack: ml_collections.ConfigDict) -> MemberProgress:
    return MemberProgress(self.directory, name, self._attack_settings(name, index, attack),
                          self._noticed)

  def attack_done(self, name: str, index: int, attack: ml_collections.ConfigDict,
                  result: dict[str, Any], attacks: int) -> None:
    """Keeps the result of the `index`-th of `attacks` attacks; on a preemption notice with
    attacks left, stops (Preempted)."""
    if jax.process_index() == 0:
      files.make_dirs(self.directory)
      files.write_json(os.path.join(self.directory, f"{name}.json"),
                       {"settings": self._attack_settings(name, index, attack), "result": result})
    if self._noticed() and index + 1 < attacks:
      raise Preempted(f"{index + 1} of {attacks} attacks of the evaluation are saved in "
                      f"{self.directory}", index + 1)


class KeptResults:
  """Evaluations of one job run kept by what they are (a JSON-able `identity`: model, attack),
  with their examples, under `directory` until the job's own results are written (`discard`):
  the infinite job's scores of kernel regression, whose attacks are its costly part. `settings`:
  what every kept result depends on (the job's config). After each one kept, a preemption notice
  stops the job (Preempted)."""

  def __init__(self, directory: str, settings: dict[str, Any], noticed: Callable[[], bool]):
    self.directory, self._settings, self._noticed, self._kept = directory, settings, noticed, 0

  def _path(self, identity: dict[str, Any], suffix: str) -> str:
    digest = hashlib.sha256(json.dumps({**self._settings, **identity}, sort_keys=True).encode())
    return os.path.join(self.directory, f"{digest.hexdigest()[:16]}{suffix}")

  def get(self, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The result kept for `identity` (with its "examples" when it had them), or None."""
    path = self._path(identity, ".json")
    found = None
    if jax.process_index() == 0:
      found = files.read_result(path, {**self._settings, **identity})
    if not parallel.agree(found is not None):
      return None
    result = (found or files.read_json(path))["result"]
    if result.pop("has_examples"):
      with np.load(io.BytesIO(files.read_bytes(self._path(identity, ".npz"))),
                   allow_pickle=False) as saved:
        result["examples"] = {k: saved[k] for k in saved.files}
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
      raise Preempted(f"{self._kept} evaluations are kept in {self.directory}", self._kept)

  def discard(self) -> None:
    if jax.process_index() == 0 and files.exists(self.directory):
      files.remove_tree(self.directory)
