"""Reads `metrics.jsonl`, the JSON-lines metrics file that train/writers.py's JsonlWriter appends to.

Apart from the writers, so that its readers (the report, the catastrophic-overfitting monitor
resuming) do not import clu's writers and, through them, TensorFlow: about 6 s of start-up for
each process of a kernel, spectrum or dry-run job.
"""

import json
import os

from absl import logging

from ntk_scale import files

METRICS_FILE = "metrics.jsonl"  # in a phase's directory


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file, in order.

  A last line that is not a whole record is an append cut short by a power loss (part of a record,
  or the zeros a file system leaves for data it never wrote): it is dropped with a warning, and a
  resume rewrites the file without it (JsonlWriter.truncate), so the next record starts on a clean
  line. A bad line before the last is corruption: an error naming the file and the line.
  """
  text = files.read_bytes(path).decode("utf-8", errors="replace")  # torn bytes must not stop a read
  lines = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
  records = []
  for i, (number, line) in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i < len(lines) - 1:
        raise ValueError(f"{path}, line {number}: not a JSON record ({e}); only a torn last line is "
                         f"dropped, so the file is corrupt: mend or delete that line.") from e
      logging.warning("%s: dropped its last line %d, not a whole JSON record (a write cut short, "
                      "e.g. by a power loss): %r", path, number, line[:80])
  return records


def read_metrics(workdir: str) -> list[dict]:
  """All records of `<workdir>/metrics.jsonl`, in order."""
  return read_jsonl(os.path.join(workdir, METRICS_FILE))
