"""Evaluation records: one object per result, so that jobs evaluating one checkpoint at once keep
each other's results in a bucket too, and records of the older one-file layout are still read."""

import json
import os

import pytest

from ntk_scale import evaluation_records, files, report
from ntk_scale.evaluate import write_evaluation

from fake_gcs import fake_bucket


@pytest.fixture(params=["local", "bucket"])
def workdir(request, tmp_path):
  if request.param == "local":
    yield str(tmp_path)
    return
  with fake_bucket() as bucket:
    yield f"{bucket}/run"


def result(accuracy: float) -> dict:
  return {"accuracy": accuracy, "settings": {"step": 3}}


def test_two_evaluations_writing_one_checkpoint_at_once_keep_each_others_results(workdir, monkeypatch):
  """The train job's last evaluation and an evaluate job (or two evaluate jobs) of one checkpoint
  record at once. With one file per checkpoint, read, merged and written back under a lock that a
  bucket cannot hold, the later writer dropped the results the other wrote in between (here: the
  other job's whole write falls inside this one's)."""
  write_json, interleaved = files.write_json, []

  def other_job_writes_meanwhile(path, value, **options):
    if not interleaved:
      interleaved.append(path)
      write_evaluation(workdir, 3, 1.0, {"fab": result(0.25), "clean": result(0.9)})
    write_json(path, value, **options)

  monkeypatch.setattr(files, "write_json", other_job_writes_meanwhile)
  record = write_evaluation(workdir, 3, 1.0, {"clean": result(0.9), "pgd": result(0.5)})
  assert interleaved and record == {"step": 3, "epoch": 1.0,
                                    "results": {"clean": result(0.9), "pgd": result(0.5)}}
  assert evaluation_records.read_record(workdir, 3) == {
      "step": 3, "epoch": 1.0,
      "results": {"clean": result(0.9), "pgd": result(0.5), "fab": result(0.25)}}


def test_a_record_of_the_one_file_layout_is_read_under_newer_results(tmp_path):
  """Workdirs written before 2026-12-04 hold a checkpoint's record as evaluations/step_<step>.json:
  its results stand until a result of the same name is recorded again. Each result's file is named
  by its result, transfer keys ("/", ":") included; kept progress (step_<step>.partial/) and
  temporaries are no records."""
  workdir = str(tmp_path)
  os.makedirs(os.path.join(workdir, "evaluations", "step_7.partial"))
  with open(os.path.join(workdir, "evaluations", "step_12.json"), "w") as f:
    json.dump({"step": 12, "epoch": 2.0, "results": {"clean": result(0.8), "pgd": result(0.4)}}, f)
  write_evaluation(workdir, 12, 2.0, {"pgd": result(0.45), "transfer:a/adversarial/pgd": result(0.6)})
  write_evaluation(workdir, 3, 0.5, {"clean": result(0.5)})
  assert sorted(os.listdir(evaluation_records.record_directory(workdir, 12))) == [
      "pgd.json", "transfer%3Aa%2Fadversarial%2Fpgd.json"]
  assert evaluation_records.recorded_steps(workdir) == [3, 12]
  assert evaluation_records.read_record(workdir, 7) is None
  assert evaluation_records.read_records(workdir) == [
      {"step": 3, "epoch": 0.5, "results": {"clean": result(0.5)}},
      {"step": 12, "epoch": 2.0, "results": {"clean": result(0.8), "pgd": result(0.45),
                                             "transfer:a/adversarial/pgd": result(0.6)}}]
  page = files.read_text(report.write_report(workdir))
  assert ("<tr><td>2</td><td>12</td><td>0.8</td><td>0.45</td><td>0.6</td></tr>" in page
          and "<tr><td>0.5</td><td>3</td><td>0.5</td><td></td><td></td></tr>" in page)
