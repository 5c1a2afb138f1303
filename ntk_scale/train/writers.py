"""Metric writers: clu's TensorBoard and logging writers, plus `<workdir>/metrics.jsonl`."""

import json
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from ntk_scale import files


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per `write_scalars` call: {"step": s, name: value, ...}."""

  def __init__(self, path: str):
    self._path = path

  def truncate(self, keep: Callable[[dict], bool]) -> None:
    """Rewrites the file atomically with only the records `keep` accepts (used when resuming); a
    torn last line (read_jsonl) goes too."""
    if not files.exists(self._path):
      return
    records = read_jsonl(self._path)
    files.write_text(self._path, "".join(json.dumps(r) + "\n" for r in records if keep(r)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    files.append_text(self._path, json.dumps(record) + "\n")

  # Only scalars go to JSON; everything else is TensorBoard's business.
  def write_summaries(self, step, values, metadata=None): del step, values, metadata
  def write_images(self, step, images): del step, images
  def write_videos(self, step, videos): del step, videos
  def write_audios(self, step, audios, *, sample_rate): del step, audios, sample_rate
  def write_texts(self, step, texts): del step, texts
  def write_histograms(self, step, arrays, num_buckets=None): del step, arrays, num_buckets
  def write_hparams(self, hparams): del hparams
  def flush(self): pass
  def close(self): pass


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
  return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def create_writers(workdir: str) -> tuple[metric_writers.MetricWriter, JsonlWriter | None]:
  """TensorBoard + log + JSON lines on process 0; only logging elsewhere."""
  chief = jax.process_index() == 0
  default = metric_writers.create_default_writer(workdir, just_logging=not chief, asynchronous=False)
  if not chief:
    return default, None
  jsonl = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
  return metric_writers.MultiWriter([default, jsonl]), jsonl
