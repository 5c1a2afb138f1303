"""Metric writers: clu's TensorBoard and logging writers, plus `<workdir>/metrics.jsonl` (read back
by train/metrics_jsonl.py, which needs no TensorFlow), and what a resumed run keeps of both."""

import io
import json
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from clu import metric_writers

from ntk_scale import files, writer_lock
from ntk_scale.train.metrics_jsonl import METRICS_FILE, read_jsonl

EVENT_FILE_PREFIX = "events.out.tfevents."

_RECORD_FRAMING = 16  # a TFRecord's length (8 bytes) and two checksums (4 each) around its data
Kept = Callable[[int, str], bool]  # (step, metric name) -> whether a resumed run keeps the point


def kept_on_resume(start_step: int | None) -> Kept:
  """What a run resumed from its checkpoint at `start_step` keeps of what was logged: every point
  before it, and at it all but test/* (the resumed run evaluates the final checkpoint again). The
  points after it are logged again as the run trains on. None (no checkpoint saved yet): nothing,
  since the run starts over and logs all again, its hparams at step 0 too (else shown twice)."""
  if start_step is None:
    return lambda step, name: False
  return lambda step, name: step < start_step or (step == start_step and not name.startswith("test/"))


def truncate_event_files(directory: str, keep: Kept) -> None:
  """Rewrites each TensorBoard event file in `directory`, atomically, without the points `keep`
  refuses (and without a torn last record of a killed run); files that keep everything are left
  as they are. Else a resumed run's points would appear twice, since TensorBoard shows every
  file's points (it drops older ones only after a SessionLog restart event, which TF2 writers
  never write)."""
  from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer.record_writer import RecordWriter

  # A rewrite's temporary that a kill left behind: TensorBoard reads every name holding "tfevents",
  # and would show its points twice. Only process 0 writes these files, and it is here.
  if not files.is_cloud(directory):  # (a bucket's writes have no temporaries)
    for stray in files.glob(directory, f"{EVENT_FILE_PREFIX}*.tmp*"):
      files.remove(stray)
  for name in files.list_dir(directory):
    if not name.startswith(EVENT_FILE_PREFIX):
      continue
    path = os.path.join(directory, name)
    records, changed, size = [], False, 0
    for record in RawEventFileLoader(path).Load():  # stops before a torn last record
      size += len(record) + _RECORD_FRAMING
      event = event_pb2.Event.FromString(record)
      values = [v for v in event.summary.value if keep(event.step, v.tag)]
      if len(values) == len(event.summary.value):
        records.append(record)
        continue
      changed = True
      if values:
        del event.summary.value[:]
        event.summary.value.extend(values)
        records.append(event.SerializeToString())
    if not changed and size == files.size(path):
      continue  # nothing to cut: no rewrite (and no checksums, 0.5 s a MB in pure Python)
    buffer = io.BytesIO()
    writer = RecordWriter(buffer)
    for record in records:
      writer.write(record)
    files.write_atomic(path, lambda f, data=buffer.getvalue(): f.write(data))


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
    if not writer_lock.claims_kept():  # in a bucket, another copy of this job took over (it logs these)
      return
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
