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
