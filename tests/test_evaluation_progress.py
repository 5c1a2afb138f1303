"""Evaluations kept for a resume: batches in runs written when due or on a preemption notice, and
read back in order; results by identity and settings, examples beside them."""

import types

import numpy as np
import pytest

from ntk_scale import evaluation_progress
from ntk_scale.evaluation_progress import BatchProgress, KeptResults
from ntk_scale.preemption import Preempted


def _batch(b: int) -> dict[str, np.ndarray]:
  return {"sum_correct": np.float32(b), "images": np.full((4, 2), b, np.float32)}


def test_batches_are_kept_when_due_and_read_back_in_order(tmp_path, monkeypatch):
  prefix = str(tmp_path / "kept" / "abc.pgd")
  monkeypatch.setattr(evaluation_progress, "KEEP_EVERY_S", 0.0)  # every batch is due
  writer = BatchProgress(prefix, "pgd", lambda: False)
  for b in range(3):
    writer.put(b, _batch(b), batches=5)
  assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [
      f"abc.pgd.from_{b}.npz" for b in range(3)]
  reader = BatchProgress(prefix, "pgd", lambda: False)
  for b in range(3):
    got = reader.get(b)
    assert got["sum_correct"] == b and np.all(got["images"] == b)
  assert reader.get(3) is None


def test_a_notice_writes_the_run_of_batches_not_yet_due_and_stops(tmp_path, monkeypatch):
  prefix = str(tmp_path / "kept" / "abc.pgd")
  monkeypatch.setattr(evaluation_progress, "KEEP_EVERY_S", 3600.0)
  notices = iter([False, False, True])
  writer = BatchProgress(prefix, "pgd", lambda: next(notices))
  writer.put(0, _batch(0), batches=5)
  writer.put(1, _batch(1), batches=5)
  assert not (tmp_path / "kept").exists()  # not due yet
  with pytest.raises(Preempted, match="3 of 5 batches of attack pgd are kept") as stopped:
    writer.put(2, _batch(2), batches=5)
  assert stopped.value.step == 3
  assert [p.name for p in (tmp_path / "kept").iterdir()] == ["abc.pgd.from_0.npz"]  # one run of 3
  reader = BatchProgress(prefix, "pgd", lambda: False)
  assert [float(reader.get(b)["sum_correct"]) for b in range(3)] == [0.0, 1.0, 2.0]
  assert reader.get(3) is None
  reader.put(3, _batch(3), batches=5)  # the next run starts where the kept one ended
  reader.put(4, _batch(4), batches=5)


def test_a_notice_at_the_last_batch_lets_the_attack_finish(tmp_path, monkeypatch):
  """With no batch left there is nothing to resume: a notice that comes with the last batch does
  not stop the evaluation (Preempted there stopped a job whose attack had finished, and its
  rerun only read the batches back)."""
  prefix = str(tmp_path / "kept" / "abc.pgd")
  monkeypatch.setattr(evaluation_progress, "KEEP_EVERY_S", 3600.0)
  notices = iter([False, False, True])
  writer = BatchProgress(prefix, "pgd", lambda: next(notices))
  for b in range(3):
    writer.put(b, _batch(b), batches=3)  # no Preempted at batch 2 of 3
  with pytest.raises(Preempted, match="1 of 2 batches"):  # while one with batches left stops
    BatchProgress(prefix, "pgd", lambda: True).put(0, _batch(0), batches=2)


def test_results_are_kept_with_their_examples_for_their_own_settings_only(tmp_path):
  directory = str(tmp_path / "kept")
  result = {"accuracy": 0.25, "per_class_accuracy": [0.5, 0.0],
            "examples": {"images": np.arange(6, dtype=np.float32).reshape(3, 2)}}
  KeptResults(directory, {"config": "a"}, lambda: False).put({"model": "m"}, result)
  again = KeptResults(directory, {"config": "a"}, lambda: False).get({"model": "m"}, "m")
  assert {k: v for k, v in again.items() if k != "examples"} == {
      "accuracy": 0.25, "per_class_accuracy": [0.5, 0.0]}
  np.testing.assert_array_equal(again["examples"]["images"], result["examples"]["images"])
  assert KeptResults(directory, {"config": "b"}, lambda: False).get({"model": "m"}, "m") is None
  assert KeptResults(directory, {"config": "a"}, lambda: False).get({"model": "n"}, "n") is None
  KeptResults(directory, {}, lambda: False).discard()
  assert not (tmp_path / "kept").exists()


def test_discarding_named_evaluations_leaves_the_others_kept_beside_them(tmp_path, monkeypatch):
  """Two jobs evaluate one checkpoint: the one that finishes first drops only what was kept for the
  attacks its record holds (under any settings); the other's, under way, stay to resume from."""
  monkeypatch.setattr(evaluation_progress, "KEEP_EVERY_S", 0.0)
  directory = str(tmp_path / "step_22.partial")
  mine = KeptResults(directory, {"step": 22, "eval_batch_size": 128}, lambda: False)
  other = KeptResults(directory, {"step": 22, "eval_batch_size": 64}, lambda: False)
  identity = lambda name: {"name": name, "attack": {"eps": 0.03}}
  mine.put(identity("pgd"), {"accuracy": 0.5, "examples": {"images": np.zeros((2, 3))}})
  other.put(identity("pgd"), {"accuracy": 0.4})  # pgd under other settings (a killed run's)
  other.put(identity("square"), {"accuracy": 0.6, "examples": {"images": np.ones((2, 3))}})
  other.batches(identity("fab"), "fab").put(0, _batch(0), batches=3)
  members = other.members(identity("autoattack"), "autoattack")
  members.batches(1).put(0, _batch(0), batches=3)
  members.member_done(1, {"images": np.ones((2, 3))}, {"apgd-ce": 0.3}, members=3)
  before = set(evaluation_progress.files.list_dir(directory))
  evaluation_progress.discard_named(directory, {"clean", "pgd"})
  after = set(evaluation_progress.files.list_dir(directory))
  assert len(before - after) == 3  # pgd's two results and the examples of one
  assert len(after) == 6  # square's result and examples, fab's batches, autoattack's three
  assert other.get(identity("square"), "square")["accuracy"] == 0.6
  assert other.batches(identity("fab"), "fab").get(0) is not None
  assert members.restore()[0] == 1
  assert mine.get(identity("pgd"), "pgd") is None and other.get(identity("pgd"), "pgd") is None
  evaluation_progress.discard_named(directory, {"square", "fab", "autoattack"})
  assert not (tmp_path / "step_22.partial").exists()


def test_a_run_of_batches_is_written_keep_every_s_after_the_last_write(tmp_path, monkeypatch):
  """A fast attack is not slowed by a write per batch: a run is written once KEEP_EVERY_S seconds
  have passed since the last write (not since the attack began), holding every batch since."""
  now = [0.0]
  monkeypatch.setattr(evaluation_progress, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
  monkeypatch.setattr(evaluation_progress, "KEEP_EVERY_S", 60.0)
  prefix = str(tmp_path / "kept" / "abc.pgd")
  writer = BatchProgress(prefix, "pgd", lambda: False)
  for b, seconds in enumerate([10.0, 60.0, 100.0, 119.0, 120.0, 130.0]):
    now[0] = seconds
    writer.put(b, _batch(b), batches=8)
  # Due at 60 s (batches 0-1) and 60 s after that write (batches 2-4); not at 100, 119 or 130 s.
  assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["abc.pgd.from_0.npz",
                                                                   "abc.pgd.from_2.npz"]
  reader = BatchProgress(prefix, "pgd", lambda: False)
  assert [float(reader.get(b)["sum_correct"]) for b in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
  assert reader.get(5) is None


def test_a_notice_after_a_kept_result_stops_counting_the_results_kept(tmp_path):
  """KeptResults.put writes the result, then a notice stops the job (Preempted), naming how many
  results this run kept; the count is the Preempted step."""
  notices = iter([False, True])
  kept = KeptResults(str(tmp_path / "kept"), {"config": "a"}, lambda: next(notices))
  kept.put({"model": "m"}, {"accuracy": 0.5})
  with pytest.raises(Preempted, match=r": 2 evaluations are kept in .*kept; rerun") as stopped:
    kept.put({"model": "n"}, {"accuracy": 0.25})
  assert stopped.value.step == 2
  assert kept.get({"model": "n"}, "n") == {"accuracy": 0.25}  # written before it stopped
  with pytest.raises(Preempted, match=r": 1 evaluation is kept in") as first:
    KeptResults(str(tmp_path / "other"), {}, lambda: True).put({"model": "m"}, {"accuracy": 0.5})
  assert first.value.step == 1


def test_each_member_done_replaces_the_examples_kept_after_the_one_before(tmp_path):
  """A worst_of attack keeps only the examples after its last finished member (each as large as
  the test set), and its rerun resumes from those."""
  kept = KeptResults(str(tmp_path / "kept"), {"config": "a"}, lambda: False)
  members = kept.members({"name": "autoattack"}, "autoattack")
  for done in (1, 2):
    members.member_done(done, {"images": np.full((2, 3), done, np.float32)},
                        {"apgd-ce": 0.5, "apgd-t": 0.25}, members=3)
  names = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "kept").iterdir())
  assert names == ["autoattack.member_2.npz", "autoattack.members.json"]
  done, arrays, accuracy = members.restore()
  assert done == 2 and accuracy == {"apgd-ce": 0.5, "apgd-t": 0.25}
  np.testing.assert_array_equal(arrays["images"], np.full((2, 3), 2, np.float32))


def test_a_notice_at_the_last_member_lets_the_attack_finish(tmp_path):
  """As with batches: a notice with members left stops the attack after keeping its examples; with
  the last member done there is nothing to resume, and the attack finishes."""
  members = KeptResults(str(tmp_path / "kept"), {}, lambda: True).members({"name": "aa"}, "aa")
  with pytest.raises(Preempted, match="2 of 3 members of attack aa are saved") as stopped:
    members.member_done(2, {"images": np.zeros(2)}, {"apgd-ce": 0.5}, members=3)
  assert stopped.value.step == 2
  members.member_done(3, {"images": np.ones(2)}, {"apgd-ce": 0.5, "fab": 0.25}, members=3)
  assert members.restore()[0] == 3
