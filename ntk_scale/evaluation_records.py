"""The evaluation records of a phase directory: what each evaluated checkpoint scored.

A checkpoint's record is `evaluations/step_<step>/`, one JSON object per result ("clean", an attack
of config.eval_attacks, a "transfer:<set>" key), each `{"step", "epoch", "results": {name: result}}`
and named by its result, percent-encoded (transfer keys hold "/" and ":"). Jobs that evaluate one
checkpoint at once (the train job's last evaluation and an evaluate job, or two evaluate jobs) each
write only their own results' objects, whole (files.write_json): nothing is read, merged and written
back, so no lock is needed and none of their results is lost, in a bucket (where nothing can be
locked) as on a local disk. Of two writes of one result the later stands; each names the settings
that made it. `read_record` merges the objects into the checkpoint's record. Workdirs written
before 2026-12-04 hold a record as one file, `evaluations/step_<step>.json`; it is read under the
objects beside it.
"""

import os
import re
import urllib.parse
from typing import Any

from ntk_scale import files

DIRECTORY = "evaluations"
_STEP = re.compile(r"step_(\d+)(\.json)?")


def record_directory(phase_dir: str, step: int) -> str:
  """Where checkpoint `step`'s results are recorded."""
  return os.path.join(phase_dir, DIRECTORY, f"step_{step}")


def _result_path(phase_dir: str, step: int, name: str) -> str:
  return os.path.join(record_directory(phase_dir, step), urllib.parse.quote(name, safe="") + ".json")


def _single_file(phase_dir: str, step: int) -> str:
  """A whole record of the layout before 2026-12-04."""
  return os.path.join(phase_dir, DIRECTORY, f"step_{step}.json")


def write_results(phase_dir: str, step: int, epoch: float, results: dict[str, Any]) -> None:
  """Records each of `results` in checkpoint `step`'s record, replacing only results of the same
  names."""
  files.make_dirs(record_directory(phase_dir, step))
  for name, result in results.items():
    files.write_json(_result_path(phase_dir, step, name),
                     {"step": int(step), "epoch": float(epoch), "results": {name: result}}, indent=2)


def read_record(phase_dir: str, step: int) -> dict[str, Any] | None:
  """Checkpoint `step`'s record, `{"step", "epoch", "results"}` with every result recorded of it;
  None when it has none."""
  parts = []
  if files.exists(_single_file(phase_dir, step)):
    parts.append(files.read_json(_single_file(phase_dir, step)))
  directory = record_directory(phase_dir, step)
  parts += [files.read_json(os.path.join(directory, name)) for name in files.list_dir(directory)
            if name.endswith(".json")]
  if not parts:
    return None
  results = {}
  for part in parts:
    results.update(part["results"])
  return {"step": int(step), "epoch": parts[-1]["epoch"], "results": results}


def recorded_steps(phase_dir: str) -> list[int]:
  """The steps of the checkpoints with a record, in order."""
  matches = (_STEP.fullmatch(name) for name in files.list_dir(os.path.join(phase_dir, DIRECTORY)))
  return sorted({int(m.group(1)) for m in matches if m})


def read_records(phase_dir: str) -> list[dict[str, Any]]:
  """Every checkpoint's record, by step."""
  records = (read_record(phase_dir, step) for step in recorded_steps(phase_dir))
  return [r for r in records if r is not None]  # (a directory made, no result written yet)
