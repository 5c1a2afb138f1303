"""`metrics.jsonl` after a power loss: a torn last line (part of a record, or the zeros a file
system leaves where unwritten data was) is dropped with a warning and cut off on resume, so the
next record starts on a clean line; a bad line before the last is corruption and an error naming
the file and line."""

import json
import logging
import os

import ml_collections
import pytest

from ntk_scale import jobs
from ntk_scale.train.metrics_jsonl import read_jsonl, read_metrics
from ntk_scale.train.writers import JsonlWriter

from test_train import load_config

RECORDS = [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}]


def write_records(path, tail: str | bytes = "") -> None:
  with open(path, "wb") as f:
    f.write("".join(json.dumps(r) + "\n" for r in RECORDS).encode())
    f.write(tail if isinstance(tail, bytes) else tail.encode())


@pytest.mark.parametrize("tail", ['{"step": 3, "train/lo', "\x00" * 40, '{"step": 3, "train/loss": 1.2\n',
                                  b'{"step": 3, "train/loss": \xff\xfe'], ids=["part", "zeros", "newline", "bytes"])
def test_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog, tail):
  path = tmp_path / "metrics.jsonl"
  write_records(path, tail)
  with caplog.at_level(logging.WARNING):
    assert read_jsonl(str(path)) == RECORDS
  assert f"{path}: dropped its last line 3" in caplog.text


def test_corrupt_line_before_the_last_names_file_and_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  write_records(path, '{"step": 3, "tra\n{"step": 4, "train/loss": 1.0}\n')
  with pytest.raises(ValueError, match=rf"{path}, line 3: not a JSON record"):
    read_jsonl(str(path))


def test_blank_lines_between_records_are_skipped_not_corruption(tmp_path, caplog):
  """Lines holding only whitespace (blank lines an editor or a CRLF copy left: spaces, a lone
  carriage return) carry no record and are skipped wherever they are, with no warning; they are
  neither records nor a corrupt line that would stop the report and the resume."""
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps(RECORDS[0]) + "\n   \n\r\n" + json.dumps(RECORDS[1]) + "\n \n")
  with caplog.at_level(logging.WARNING):
    assert read_jsonl(str(path)) == RECORDS
  assert "dropped" not in caplog.text


def test_truncate_on_resume_cuts_the_torn_line_and_appends_on_a_clean_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  write_records(path, '{"step": 3, "train/lo')
  writer = JsonlWriter(str(path))
  writer.truncate(lambda r: r["step"] < 3)  # as open_phase does when resuming from step 3
  writer.write_scalars(3, {"train/loss": 1.25})
  assert path.read_text().splitlines() == [json.dumps(r) for r in [*RECORDS, {"step": 3, "train/loss": 1.25}]]


def test_run_resumes_after_a_power_loss_tore_its_last_metrics_line(tmp_path, caplog):
  config = load_config("digits", "smoke")
  config.num_epochs = 1.0
  config.eval_attacks = ml_collections.ConfigDict()
  jobs.run(config, str(tmp_path))
  path = os.path.join(tmp_path, "metrics.jsonl")
  before = read_metrics(str(tmp_path))
  with open(path, "a") as f:
    f.write('{"step": 23, "train/loss": 0.')
  with caplog.at_level(logging.WARNING):
    jobs.run(config, str(tmp_path))  # the finished run only evaluates (its clean accuracy)
  assert "dropped its last line" in caplog.text
  with open(path) as f:
    lines = f.read().splitlines()
  records = [json.loads(line) for line in lines]  # every line whole
  assert records == before  # the test metrics rewritten once, nothing torn left


def test_event_files_are_cut_back_like_metrics_jsonl_and_otherwise_left_alone(tmp_path):
  """TensorBoard's event files on resume: a file with nothing to cut is not rewritten, a torn last
  record (a power loss) goes, and the points the resumed run logs again go (train/* after the
  checkpoint's step, test/* from it on), each event keeping what it still holds."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

  from ntk_scale.train.writers import kept_on_resume, truncate_event_files

  writer = tf.summary.create_file_writer(str(tmp_path))
  with writer.as_default():
    for step in range(10):
      tf.summary.scalar("train/loss", float(step), step=step)
      tf.summary.scalar("test/accuracy", float(step), step=step)
  writer.close()
  [path] = [str(p) for p in tmp_path.iterdir()]
  whole, modified = open(path, "rb").read(), os.stat(path).st_mtime_ns
  truncate_event_files(str(tmp_path), kept_on_resume(10))
  assert open(path, "rb").read() == whole and os.stat(path).st_mtime_ns == modified
  with open(path, "ab") as f:
    f.write(b"\x2a\x00\x00")  # a record cut short
  truncate_event_files(str(tmp_path), kept_on_resume(10))
  assert open(path, "rb").read() == whole
  stray = path + ".tmphost-123"  # a rewrite's temporary, its process killed: TensorBoard reads it
  with open(stray, "wb") as f:
    f.write(whole)
  truncate_event_files(str(tmp_path), kept_on_resume(5))
  assert not os.path.exists(stray)
  points = sorted((v.tag, e.step) for e in EventFileLoader(path).Load() for v in e.summary.value)
  assert points == sorted([("train/loss", s) for s in range(6)] + [("test/accuracy", s) for s in range(5)])
  # A rerun with no checkpoint yet starts over and logs everything again (hparams at step 0 too).
  truncate_event_files(str(tmp_path), kept_on_resume(None))
  assert [v for e in EventFileLoader(path).Load() for v in e.summary.value] == []
