"""Metric writers: clu's TensorBoard and logging writers, plus `<workdir>/metrics.jsonl` (read back
by train/metrics_jsonl.py, which needs no TensorFlow)."""

import json
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from clu import metric_writers

from ntk_scale import files
from ntk_scale.train.metrics_jsonl import METRICS_FILE, read_jsonl


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


def create_writers(workdir: str) -> tuple[metric_writers.MetricWriter, JsonlWriter | None]:
  """TensorBoard + log + JSON lines on process 0; only logging elsewhere."""
  chief = jax.process_index() == 0
  default = metric_writers.create_default_writer(workdir, just_logging=not chief, asynchronous=False)
  if not chief:
    return default, None
  jsonl = JsonlWriter(os.path.join(workdir, METRICS_FILE))
  return metric_writers.MultiWriter([default, jsonl]), jsonl
