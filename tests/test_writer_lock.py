"""One job at a time writes an experiment: a second train (or phase 2) job on a workdir being written
is refused before it records or writes anything, naming the holder; readers are not; a killed
holder's lock never blocks the rerun. (Two train jobs at once deleted each other's half-written
checkpoints, leaving a step without its metadata, and both appended to metrics.jsonl.) In a
bucket, where nothing locks, the later copy takes over and the earlier one stops."""

import fcntl
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ntk_scale import files, jobs, writer_lock
from ntk_scale.checkpoint import CheckpointNotFoundError, Checkpoints
from ntk_scale.train.metrics_jsonl import read_metrics
from ntk_scale.train.writers import JsonlWriter
from ntk_scale.workdir import WorkdirConfigMismatchError, phase2_name, prepare_workdir

from conftest import TAKER
from fake_gcs import fake_bucket
from test_train import load_config

def test_a_second_train_job_is_refused_until_the_first_ends(tmp_path, held_by_another_process):
  workdir = str(tmp_path / "run")
  holder = held_by_another_process(writer_lock.lock_path(workdir))
  config = load_config("digits", "smoke")
  config.phase2.num_epochs = 0
  with pytest.raises(writer_lock.WorkdirBusyError,
                     match=rf"run is being written by another job \(job train, host .*, process id "
                           rf"{holder.pid}, since .*; .*run/\.writer\.lock\)"):
    jobs.run(config, workdir)
  assert os.listdir(workdir) == [writer_lock.LOCK_FILE]  # no config record, no checkpoint
  holder.kill()  # as a SIGKILL'd job: the system releases its lock
  holder.wait()
  prepare_workdir(config, workdir)  # the rerun takes it and records its experiment
  assert os.path.exists(os.path.join(workdir, "config.json"))
  writer_lock.release_all()


def test_phase2_of_one_name_is_locked_readers_are_not(tmp_path, held_by_another_process):
  workdir = str(tmp_path)
  config = load_config("digits", "smoke")
  config.phase2.num_epochs = 1.0
  prepare_workdir(config, workdir)  # phase 1 recorded (and its locks taken: released below)
  writer_lock.release_all()
  held_by_another_process(writer_lock.lock_path(workdir, phase2_name(config)))
  phase2 = load_config("digits", "smoke")
  phase2.phase2.num_epochs, phase2.job = 1.0, "phase2"
  for job in ("phase2", "train"):  # the train job would go on to that phase 2
    phase2.job = job
    with pytest.raises(writer_lock.WorkdirBusyError, match=r"phase2/centered_C_from1 is being written"):
      jobs.run(phase2, workdir)
  reader = load_config("digits", "smoke")
  reader.phase2.num_epochs, reader.job = 1.0, "evaluate"
  with pytest.raises(CheckpointNotFoundError):  # past the locks: it trained nothing to read
    jobs.run(reader, workdir)
  other_name = load_config("digits", "smoke")
  other_name.phase2.num_epochs, other_name.phase2.name = 1.0, "another"
  other_name.job = "phase2"
  prepare_workdir(other_name, workdir)  # another phase-2 experiment of this workdir is free
  writer_lock.release_all()


def test_a_job_releases_its_locks_when_it_ends_or_fails(tmp_path, monkeypatch):
  """A lock held past the job's end would refuse every later job of another process."""
  workdir = str(tmp_path)
  config = load_config("digits", "smoke")
  config.phase2.num_epochs = 1.0
  take = lambda path: subprocess.run([sys.executable, "-c", TAKER, path], capture_output=True, text=True,
                                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  monkeypatch.setitem(jobs.JOBS, "train", lambda config, workdir: "trained")
  assert jobs.run(config, workdir) == "trained"
  for path in (writer_lock.lock_path(workdir), writer_lock.lock_path(workdir, phase2_name(config))):
    assert take(path).returncode == 0, take(path).stderr
  config.optimizer.learning_rate *= 2  # another experiment: refused once the locks are taken
  with pytest.raises(WorkdirConfigMismatchError):
    jobs.run(config, workdir)
  assert take(writer_lock.lock_path(workdir)).returncode == 0


def test_a_workdir_this_user_cannot_write_is_named_as_such(tmp_path, monkeypatch):
  """The lock's read-only fallback (a lock file of another user) hid the cause: a read-only workdir
  ended in FileNotFoundError for .writer.lock. (Simulated: the tests may run as root.)"""
  real_open = os.open

  def read_only(path, flags, *args):
    if flags & os.O_CREAT:
      raise PermissionError(13, "Permission denied", path)
    return real_open(path, flags, *args)

  monkeypatch.setattr(os, "open", read_only)
  workdir = str(tmp_path)
  with pytest.raises(PermissionError, match=rf"{workdir} is not writable by this user, so no job can "
                                            rf"write there .*use a --workdir it can write"):
    writer_lock.hold(writer_lock.lock_path(workdir), "train", workdir)


def _held_elsewhere(path: str) -> bool:
  """Whether a lock on `path` is held through another open file (flock locks belong to an open file,
  so this process's own lock counts too)."""
  descriptor = os.open(path, os.O_RDONLY)
  try:
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(descriptor)


def test_the_lock_names_its_holder_alone_and_a_refused_job_leaves_no_file_open(
    tmp_path, held_by_another_process):
  """The holder's line replaces whatever an earlier holder wrote (a longer line's tail named a job
  long gone); a refused job closes the lock file (a job retrying would otherwise run out of
  descriptors)."""
  path = writer_lock.lock_path(str(tmp_path))
  with open(path, "w") as f:
    f.write("job phase2, host an-earlier-host-with-a-long-name, process id 1, since 2020-01-01\n" * 3)
  holder = held_by_another_process(path)
  with open(path) as f:
    line = f.read()
  assert re.fullmatch(rf"job train, host .*, process id {holder.pid}, since [^\n]*", line), line
  open_files = lambda: sum(os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path)
                          for fd in os.listdir("/proc/self/fd"))  # this process's, of the lock
  before = open_files()
  for _ in range(3):
    with pytest.raises(writer_lock.WorkdirBusyError, match=rf"\(job train, .*process id {holder.pid}, since "
                                                           rf"[^;\n]*; {re.escape(path)}\)"):
      writer_lock.hold(path, "train", "the experiment")
  assert open_files() == before


def test_a_block_holding_a_lock_its_process_held_already_leaves_it_held(tmp_path):
  """`holding` inside a job that holds the lock already (an eigen job solving the spectrum of the
  kernel it locked) must not release the enclosing job's lock as its block ends."""
  path = str(tmp_path / ".writer.spectrum.lock")
  try:
    writer_lock.hold(path, "spectrum", "the spectrum")
    with writer_lock.holding(path, "eigen_features", "the spectrum", "mixing", "elsewhere"):
      assert _held_elsewhere(path)
    assert _held_elsewhere(path)  # still the enclosing job's
  finally:
    writer_lock.release_all()
  assert not _held_elsewhere(path)
  with writer_lock.holding(path, "spectrum", "the spectrum", "mixing", "elsewhere"):
    assert _held_elsewhere(path)
  assert not _held_elsewhere(path)  # a block's own lock goes with it


def _another_jobs_claim(path: str) -> None:
  """What a second copy of the job, started on another host, writes over this job's claim."""
  files.write_json(path, {"token": "another", "holder": "job train, host other-host, process id 7"})


@pytest.fixture
def bucket_workdir():
  """A workdir in a bucket; whatever claims the test leaves held are released after it."""
  with fake_bucket() as bucket:
    try:
      yield f"{bucket}/claimed"  # not another test's run/: Orbax may list its steps from a cache
    finally:
      writer_lock.release_all()


def test_in_a_bucket_a_later_copy_takes_the_claim_over_and_the_earlier_stops_before_it_saves(
    bucket_workdir, capsys):
  """A bucket has no locks: the lock file is a claim that a later job replaces (naming the one it
  replaces), and the job whose claim was replaced appends no more metrics and stops before it
  writes a checkpoint, so that of two copies of a job one goes on. Its own claim goes with it;
  another's stays."""
  workdir = bucket_workdir
  path = writer_lock.lock_path(workdir)
  writer_lock.hold(path, "train", workdir)
  assert files.read_json(path)["holder"].startswith("job train, host ")
  writer_lock.hold(path, "train", workdir)  # a job inside the job: the same claim
  writer_lock.check_claims("saving step 1")  # still this job's
  checkpoints = Checkpoints(f"{workdir}/checkpoints")
  checkpoints.save(0, {"w": np.zeros(3, np.float32)}, 0.0)
  checkpoints.wait_until_finished()
  metrics = JsonlWriter(f"{workdir}/metrics.jsonl")
  metrics.write_scalars(1, {"train/loss": 2.0})
  _another_jobs_claim(path)
  metrics.write_scalars(2, {"train/loss": 1.0})  # left to the job that took over
  assert read_metrics(workdir) == [{"step": 1, "train/loss": 2.0}]
  with pytest.raises(writer_lock.WorkdirTakenError,
                     match=rf"^{re.escape(workdir)}: this job's claim {re.escape(path)} was replaced "
                           rf"by another job's \(job train, host other-host, process id 7\) while "
                           rf"this job ran; it stops before saving step 5, so that two jobs"):
    checkpoints.save(5, {"w": np.ones(3, np.float32)}, 1.0)
  assert checkpoints.latest_step() == 0  # nothing of step 5 written
  checkpoints.close()
  writer_lock.release_all()
  assert files.read_json(path)["token"] == "another"  # the other job's claim stays

  capsys.readouterr()
  writer_lock.hold(path, "train", workdir)  # the rerun, after a job that never released its claim
  assert re.search(rf"note: {re.escape(path)}: {re.escape(workdir)} was claimed by another job "
                   rf"\(job train, host other-host, process id 7\), which did not release it",
                   capsys.readouterr().out)
  files.remove(path)  # someone removed the claim
  with pytest.raises(writer_lock.WorkdirTakenError, match=r"claim .* was removed while this job ran; "
                                                          r"it stops before saving round 2"):
    writer_lock.check_claims("saving round 2")
  writer_lock.release_all()
  writer_lock.hold(path, "train", workdir)
  writer_lock.release_all()
  assert not files.exists(path)  # a job's own claim goes when it ends
  writer_lock.check_claims("saving step 3")  # no claims held: nothing to check
