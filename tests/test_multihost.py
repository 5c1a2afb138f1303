"""Two processes on 127.0.0.1 (two CPU devices each, collectives over the loopback) run `main.py`
as one process with four devices does: the same training and the same kernel. Checkpoints cross
topologies both ways (two processes -> one resumes training, one -> two computes a kernel); when
one of two processes is killed the other stops with an error in bounded time, and when one is
preempted (SIGTERM) both keep their work at one agreed step and stop (training and kernel tiles).

Each `main.py` process pays ~15 s of imports and start-up on this 2-core machine, and process 1
compiles every program itself (JAX writes the persistent cache from process 0 only, and keys it by
the process's own devices), so the file runs few pairs: a training pair killed half-way, one
preempted, kernel pairs (one preempted), and a pair proves two things where it can (the
eigen_features pair's kernel is the ring)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from typing import Callable

import jax
import numpy as np
import pytest

from ntk_scale import evaluation_records, files, jobs, parallel
from ntk_scale.checkpoint import Checkpoints
from ntk_scale.ntk.store import KernelStore
from ntk_scale.preemption import PREEMPTED_EXIT_CODE

import multihost_config
from conftest import neural_tangents_or_skip, xla_flags
from test_train import REPO

CONFIG = "tests/multihost_config.py"
HEARTBEAT_S = 5
STOP_BOUND_S = 30  # a survivor must stop this soon after its peer is killed
PAIR_TIMEOUT_S = 240  # a hang fails the test instead of holding CI
KILL_AFTER_CHECKPOINTS = 5  # steps 0 (the initialisation), 3, 6, 8, 11 of 22: the kill lands mid-run
# 5 blocks of 8: 15 tiles in square tiles, the spectrum job's: its top 4 eigenpairs then come from
# LOBPCG with the kernel's rows split over the devices of both processes. (The ring, column rows
# rotating over the devices of both processes, is the eigen_features pair's kernel.)
SPECTRUM = {"job": "spectrum", "spectrum.num_eigenpairs": 4, "spectrum.oversample": 3,
            "spectrum.method": "sharded", "spectrum.dtype": "float64"}
KERNELS = {"tiles": ({**SPECTRUM, "kernel.num_examples": 40, "kernel.tile_size": 8}, 15),
           # LOBPCG on the host, each process reading its share of 5 panels of 8 rows per product.
           "streamed": ({**SPECTRUM, "spectrum.method": "streamed", "spectrum.max_block_mb": 0.0025,
                         "kernel.num_examples": 40, "kernel.tile_size": 8}, 15)}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _log_path(workdir: str, pid: int) -> str:
  return f"{workdir}_process{pid}.log"


def _log(workdir: str, pid: int) -> str:
  with open(_log_path(workdir, pid)) as f:
    return f.read()


def tiles_by_process(logs: list[str]) -> list[int]:
  """How many kernel tiles each process says it computed."""
  return [int(re.search(r"this process computed (\d+) tiles", log).group(1)) for log in logs]


def start_pair(workdir: str, config_file: str = CONFIG, **fields) -> list[subprocess.Popen]:
  """`main.py` as processes 0 and 1 of one job, two emulated CPU devices each."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
  overrides = [f"--config.{k}={v}" for k, v in fields.items()]
  procs = []
  for pid in range(2):
    with open(_log_path(workdir, pid), "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "main.py", "--config", config_file, "--workdir", workdir,
           "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
           "--process_id", str(pid), f"--heartbeat_timeout_s={HEARTBEAT_S}", *overrides],
          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def stop_all(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    p.kill()
  for p in procs:
    p.wait(timeout=30)


def run_pair(workdir: str, config_file: str = CONFIG, **fields) -> list[str]:
  """`start_pair` run to completion (each process must exit 0); the two processes' logs."""
  procs = start_pair(workdir, config_file, **fields)
  try:
    for pid, p in enumerate(procs):
      assert p.wait(timeout=PAIR_TIMEOUT_S) == 0, _log(workdir, pid)[-3000:]
  finally:
    stop_all(procs)
  return [_log(workdir, pid) for pid in range(2)]


def config(**fields):
  c = multihost_config.get_config()
  for key, value in fields.items():
    section, _, name = key.rpartition(".")
    setattr(c[section] if section else c, name, value)
  return c


def _finished_checkpoints(workdir: str) -> list[int]:
  """Steps of the checkpoints Orbax has committed (unfinished ones carry a temporary suffix)."""
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _accuracies(workdir: str) -> dict[str, float]:
  """The newest evaluation's accuracies."""
  return {k: v["accuracy"] for k, v in evaluation_records.read_records(workdir)[-1]["results"].items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """`one`: trained by this process (four devices). `two`: trained by two processes, process 1
  killed after KILL_AFTER_CHECKPOINTS checkpoints, then resumed by this process."""
  root = tmp_path_factory.mktemp("multihost")
  one, two = str(root / "one"), str(root / "two")
  jobs.run(config(), one)
  procs = start_pair(two)
  try:
    deadline = time.time() + PAIR_TIMEOUT_S
    while len(_finished_checkpoints(two)) < KILL_AFTER_CHECKPOINTS:
      assert time.time() < deadline and procs[0].poll() is None, _log(two, 0)[-3000:]
      time.sleep(0.02)
    procs[1].kill()
    killed_at = time.time()
    try:
      survivor_rc = procs[0].wait(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
      survivor_rc = None
    stopped_after = time.time() - killed_at
  finally:
    stop_all(procs)
  last_checkpoint = _finished_checkpoints(two)[-1]
  finished_before_restart = os.path.exists(os.path.join(two, "evaluations"))
  resumed = jobs.run(config(), two)  # 2 processes' checkpoint -> 1 process with 4 devices
  return types.SimpleNamespace(one=one, two=two, survivor_rc=survivor_rc, stopped_after=stopped_after,
                               last_checkpoint=last_checkpoint, resumed=resumed,
                               finished_before_restart=finished_before_restart)


def test_a_killed_process_stops_the_other_with_an_error_in_bounded_time(runs):
  log = _log(runs.two, 0)
  assert runs.survivor_rc is not None, f"process 0 still ran {STOP_BOUND_S} s after process 1 died"
  assert runs.survivor_rc != 0 and not runs.finished_before_restart, log[-3000:]
  assert runs.stopped_after < STOP_BOUND_S
  # Either the next collective fails (main.py names the likely cause) or the coordination service
  # misses the dead process's heartbeats and terminates this one (JAX names it).
  assert "another process died first" in log or "another task died" in log, log[-3000:]


def preempt_pair(workdir: str, started: Callable[[], bool], **fields) -> tuple[list[int], list[str]]:
  """`start_pair`, SIGTERM to process 1 once `started()`; the two exit codes and logs."""
  procs = start_pair(workdir, **fields)
  try:
    deadline = time.time() + PAIR_TIMEOUT_S
    while not started():
      assert time.time() < deadline and procs[0].poll() is None, _log(workdir, 0)[-3000:]
      time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=PAIR_TIMEOUT_S) for p in procs]
  finally:
    stop_all(procs)
  return codes, [_log(workdir, pid) for pid in range(2)]


@pytest.fixture(scope="module")
def preempted(runs, tmp_path_factory):
  """Two processes training as `runs.two` does, process 1 sent SIGTERM once the initialisation is
  saved; then resumed by this process. (workdir, the pair's exit codes, their logs, the step.)"""
  workdir = str(tmp_path_factory.mktemp("preempted") / "two")
  codes, logs = preempt_pair(workdir, lambda: bool(_finished_checkpoints(workdir)))
  step = _finished_checkpoints(workdir)[-1]
  jobs.run(config(), workdir)
  return types.SimpleNamespace(workdir=workdir, codes=codes, logs=logs, step=step)


def test_a_preempted_process_and_its_peer_save_at_one_step_and_resume(runs, preempted):
  assert preempted.codes == [PREEMPTED_EXIT_CODE] * 2, preempted.logs[0][-3000:]
  for pid, log in enumerate(preempted.logs):
    assert f"process {pid}: preempted: the train state at step {preempted.step} is saved" in log
  assert 0 < preempted.step < 22
  # Resumed on one process, the metrics the pair had not logged included: the one-process curve.
  two, one = _losses(preempted.workdir), _losses(runs.one)
  assert sorted(two) == sorted(one)
  np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=1e-5)
  epochs = lambda workdir: Checkpoints(os.path.join(workdir, "checkpoints")).epochs()
  assert epochs(preempted.workdir) == epochs(runs.one)  # no checkpoint of the preemption's kept


def test_two_processes_train_as_one_and_the_restart_resumes_on_one(runs):
  """Losses up to the kill come from two processes, the rest from the resumed single process;
  the whole curve equals the uninterrupted single-process run's."""
  two, one = _losses(runs.two), _losses(runs.one)
  assert sorted(two) == sorted(one)
  assert len([s for s in two if s <= runs.last_checkpoint]) >= 3
  np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=1e-5)
  for name, accuracy in _accuracies(runs.one).items():
    assert runs.resumed["results"][name]["accuracy"] == pytest.approx(accuracy, abs=1.5 / 360), name


LEAVE = """
import sys, time
import jax
from ntk_scale import parallel
pid, case = int(sys.argv[1]), sys.argv[3]
parallel.initialize_distributed(sys.argv[2], 2, pid, heartbeat_timeout_s=5)
parallel.barrier("working")
if case == "one failed":
  if pid == 0:
    parallel.exit_together(1, 2)
  parallel.barrier("never passed")  # process 1 still works, blocked in a collective
if pid == 1:
  time.sleep(1.5)  # still saving when the coordinator is done
parallel.exit_together(143, None) if case == "preempted" else parallel.exit_together(1, 10)
"""


@pytest.mark.parametrize("case, codes", [("preempted", [PREEMPTED_EXIT_CODE] * 2),
                                         ("both failed", [1, 1]), ("one failed", None)])
def test_processes_leave_the_job_together_or_in_bounded_time(case, codes):
  """Processes preempted at one step, or failed alike, exit with their codes: process 0 (the
  coordinator) done first does not take its slower peer down with SIGABRT. A process failed alone
  exits after its wait, not at JAX's five-minute shutdown barrier, and its peer, blocked in a
  collective, then stops too."""
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", LEAVE, str(pid), address, case], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in range(2)]
  try:
    outs = [p.communicate(timeout=STOP_BOUND_S * 2)[0] for p in procs]
  finally:
    stop_all(procs)
  returned = [p.returncode for p in procs]
  if codes is not None:
    assert returned == codes, outs[1][-3000:]
  else:
    assert returned[0] == 1 and returned[1] != 0, outs[1][-3000:]


def test_a_preempted_kernel_pair_keeps_its_tiles_and_one_process_finishes_the_kernel(runs):
  """SIGTERM to process 1 once the first tile is stored: both stop at one agreed lockstep step with
  every finished tile stored; this process (four devices) computes the rest. (800 examples: the
  notice took up to a second to be agreed here, hundreds of lockstep steps. The reference, one
  process's kernel, is made of 3 tiles of 400: in 5,050 tiles of 8 it doubled the time on disk.)"""
  workdir, total = runs.one, 100 * 101 // 2  # 800 examples in tiles of 8
  fields = {"job": "kernel", "kernel.num_examples": 800, "kernel.tile_size": 8,
            "kernel.name": "preempted"}
  markers = os.path.join(workdir, "kernels", "preempted", "tiles")
  codes, logs = preempt_pair(workdir, lambda: os.path.isdir(markers) and bool(os.listdir(markers)),
                             **fields)
  assert codes == [PREEMPTED_EXIT_CODE] * 2, logs[0][-3000:]
  stored = len(KernelStore.open(os.path.dirname(markers)).done_tiles())
  assert 0 < stored < total
  for pid, log in enumerate(logs):
    assert f"process {pid}: preempted: {stored} of {total} tiles" in log, log[-3000:]
  resumed = jobs.run(config(**fields), workdir)
  assert resumed["complete"] and resumed["tiles_computed"] == total - stored
  jobs.run(config(**{**fields, "kernel.name": "preempted_single", "kernel.tile_size": 400}), workdir)
  by_one = KernelStore.open(os.path.join(workdir, "kernels", "preempted_single")).read()
  np.testing.assert_allclose(KernelStore.open(os.path.dirname(markers)).read(), by_one, rtol=1e-5,
                             atol=1e-5 * np.abs(by_one).max())


@pytest.mark.parametrize("layout", list(KERNELS))
def test_kernel_over_two_processes_from_a_one_process_checkpoint_equals_one_process(runs, layout):
  workdir = runs.one  # written by one process with four devices, restored by two with two each
  fields, num_tiles = KERNELS[layout]
  logs = run_pair(workdir, **fields, **{"kernel.name": layout})
  assert "column rows rotating over the devices" not in logs[0], logs[0][-3000:]
  # Each process computed and wrote the tiles of its own devices; only process 0 reports.
  per_process = tiles_by_process(logs)
  assert min(per_process) > 0 and sum(per_process) == num_tiles, per_process
  assert not re.search(r"tiles computed|spectrum in", logs[1])
  by_two = KernelStore.open(os.path.join(workdir, "kernels", layout))
  assert by_two.meta["complete"] and len(by_two.done_tiles()) == num_tiles

  single = config(**fields, **{"kernel.name": f"{layout}_single"})
  jobs.run(single, workdir)
  by_one = KernelStore.open(os.path.join(workdir, "kernels", f"{layout}_single")).read()
  np.testing.assert_allclose(by_two.read(), by_one, rtol=1e-5, atol=1e-5 * np.abs(by_one).max())
  if layout == "streamed":
    assert "spectrum plan: streamed LOBPCG" in logs[0] and "panels of 8 examples" in logs[0]
  else:
    assert "spectrum plan: sharded LOBPCG" in logs[0] and "rows split over 4 devices" in logs[0]
  assert f"spectrum in {os.path.join(workdir, 'kernels', layout, 'spectrum')}" in logs[0]
  two_values, one_values = (np.load(os.path.join(workdir, "kernels", name, "spectrum", "values.npy"))
                            for name in (layout, f"{layout}_single"))
  np.testing.assert_allclose(two_values, one_values, rtol=1e-5)


# The kernel is the ring: 4 blocks of 10, one per device, 10 tiles, the column rows rotating over
# the devices of both processes (restored from runs.one, the one-process checkpoint).
EIGEN_FEATURES = {"job": "eigen_features", "kernel.num_examples": 40, "kernel.rotate": True,
                  "eigen_features.num_single": 3, "eigen_features.num_test": 40,
                  "eigen_features.batch_size": 16}


def test_eigen_features_over_two_processes_equal_one_process(runs):
  """The eigen_features job as processes 0 and 1 (2 devices each) on the one-process checkpoint:
  the kernel job's ring over the devices of both (each process writing its own tiles) equals one
  process's kernel; every group's predictor evaluated on global batches spread over all 4
  devices; the same groups and accuracies as one process with 4 devices."""
  workdir = runs.one
  logs = run_pair(workdir, **EIGEN_FEATURES, **{"kernel.name": "features"})
  assert "column rows rotating over the devices" in logs[0], logs[0][-3000:]
  per_process = tiles_by_process(logs)
  assert min(per_process) > 0 and sum(per_process) == 10, per_process
  kernel = KernelStore.open(os.path.join(workdir, "kernels", "features"))
  assert kernel.meta["complete"] and len(kernel.done_tiles()) == 10
  assert "eigen-feature group all" in logs[0] and "eigen-feature group" not in logs[1]
  with open(os.path.join(workdir, "eigen_features", "features", "features.json")) as f:
    by_two = json.load(f)
  single = config(**EIGEN_FEATURES, **{"kernel.name": "features_single"})
  by_one = jobs.run(single, workdir)
  one_kernel = KernelStore.open(os.path.join(workdir, "kernels", "features_single")).read()
  np.testing.assert_allclose(kernel.read(), one_kernel, rtol=1e-5,
                             atol=1e-5 * np.abs(one_kernel).max())
  assert [r["group"] for r in by_two["groups"]] == [r["group"] for r in by_one["groups"]]
  for mine, theirs in zip(by_two["groups"], by_one["groups"]):
    for key in ("clean_accuracy", "robust_accuracy"):
      assert mine[key] == pytest.approx(theirs[key], abs=1e-12), (mine["group"], key)
    assert mine["eigenvalue"] == pytest.approx(theirs["eigenvalue"], rel=1e-6)


ANALYTIC_FEATURES = {"job": "eigen_features", "eigen_features.source": "infinite",
                     "kernel.num_examples": 40, "infinite.batch_size": 8,
                     "eigen_features.num_single": 3, "eigen_features.num_test": 40,
                     "eigen_features.batch_size": 16}


def test_analytic_kernel_over_two_processes_equals_one_process(tmp_path):
  """The eigen_features job on an analytic kernel (configs/infinite_width.py:smoke) as processes 0
  and 1: the kernel's 15 tiles of 8 dealt out to the devices of both, each process writing its
  own into the store; the kernel equals one process's in memory, and the groups' accuracies too."""
  from ntk_scale import infinite
  from ntk_scale.data import load_dataset
  from ntk_scale.ntk.job import select_examples
  from test_train import load_config

  neural_tangents_or_skip(infinite.FEATURE)
  workdir = str(tmp_path)
  logs = run_pair(workdir, "configs/infinite_width.py:smoke", **ANALYTIC_FEATURES)
  per_process = tiles_by_process(logs)
  assert min(per_process) > 0 and sum(per_process) == 15, per_process
  (directory,) = (tmp_path / "kernels").iterdir()
  by_two = KernelStore.open(str(directory))
  assert by_two.meta["complete"] and len(by_two.done_tiles()) == 15
  c = load_config("infinite_width", "smoke")
  for key, value in ANALYTIC_FEATURES.items():
    section, _, name = key.rpartition(".")
    setattr(c[section] if section else c, name, value)
  train = load_dataset(c.data).train
  images = train.images[select_examples(c, train.labels)]
  np.testing.assert_allclose(by_two.read(), infinite.kernel_matrix(c.infinite, 10, images), rtol=1e-12)
  features = next((tmp_path / "eigen_features").iterdir()) / "features.json"
  by_one = jobs.run(c, str(tmp_path / "single"))
  groups = json.loads(features.read_text())["groups"]
  assert [g["group"] for g in groups] == [g["group"] for g in by_one["groups"]]
  for mine, theirs in zip(groups, by_one["groups"]):
    assert mine["clean_accuracy"] == theirs["clean_accuracy"], mine["group"]
    assert mine["robust_accuracy"] == pytest.approx(theirs["robust_accuracy"], abs=1e-12), mine["group"]


def test_robust_set_over_two_processes_equals_one_process(tmp_path):
  """The infinite job (tests/multihost_config.py:infinite) as processes 0 and 1: the robust set's
  outer steps split their Gram tiles, attack batches and pullback tiles over the devices of both,
  save their state with Orbax from both (removed once the set is written), and end with the images
  that one process's 4 devices optimise from the same training subset and settings
  (robust_dataset.optimise_dataset, as the job calls it)."""
  from ntk_scale import infinite
  from ntk_scale.data import class_balanced_subset, load_dataset
  from ntk_scale.infinite_job import ROBUST_DATASET_FILE, ROBUST_DATASET_STEPS_DIR
  from ntk_scale.robust_dataset import optimise_dataset

  neural_tangents_or_skip(infinite.FEATURE)
  workdir = str(tmp_path / "pair")
  logs = run_pair(workdir, f"{CONFIG}:infinite")
  # Saved after steps 2 and 3; the state is removed once the set is written.
  assert "robust set: step 2 of 3" in logs[0] and "robust set: step 3 of 3" in logs[1]
  assert not (tmp_path / "pair" / ROBUST_DATASET_STEPS_DIR).exists()
  # network_width 0 and no transfer widths: kernel regression alone, no network trained.
  assert not (tmp_path / "pair" / "transfer").exists()
  results = json.loads((tmp_path / "pair" / "results.json").read_text())
  assert list(results["robust_dataset"]) == ["optimisation", "kernel_regression"]
  c = multihost_config.get_config("infinite")
  s = c.infinite
  train = load_dataset(c.data).train
  rows = class_balanced_subset(train.labels, s.num_train, c.seed)
  with jax.enable_x64(True):
    one, one_record = optimise_dataset(s.robust_data, infinite.kernel_function(s, 10),
                                       train.images[rows].astype(np.float64), train.labels[rows], 10,
                                       s.regression, c.seed, tile=s.batch_size,
                                       batch_size=c.eval_batch_size)
  two = np.load(tmp_path / "pair" / ROBUST_DATASET_FILE, allow_pickle=False)
  # The gradients agree to float64 rounding (summed in another order); Adam divides each pixel's
  # by its own running scale, so pixels whose gradient is ~0 move by rounding noise: 1e-8 here.
  np.testing.assert_allclose(two["images"], one, rtol=0, atol=1e-6)
  np.testing.assert_allclose(json.loads(str(two["record"]))["objective"], one_record["objective"],
                             rtol=1e-6)


def test_every_job_ends_with_the_processes_meeting(tmp_path, monkeypatch):
  """Process 0 alone writes an evolution's metrics and plots (or the report) while the others have
  returned: they waited at JAX's exit barrier, which after 5 minutes aborted both, process 0
  mid-write (two processes, process 0's metrics delayed past a 5 s exit timeout: both exit 134, no
  metrics). jobs.run now ends every job in a collective barrier, which waits for its peers."""
  events = []
  monkeypatch.setitem(jobs.JOBS, "report", lambda config, workdir: events.append("job") or {"report": ""})
  monkeypatch.setattr(parallel, "barrier", events.append)
  config = multihost_config.get_config()
  jobs.prepare_workdir(config, str(tmp_path))  # the report job needs a recorded experiment
  config.job = "report"
  jobs.run(config, str(tmp_path))
  assert events == ["job", "ntk_scale job report finished"]


def test_a_sum_over_processes_adds_the_part_of_every_process(monkeypatch):
  """Each process holds its own tiles of a kernel, zeros elsewhere: the sum is the whole kernel, in
  float64 (here this process and a second one, whose part the fake all-gather brings)."""
  mine = np.array([[1.0, 0.0], [0.0, 0.0]]) / 3
  theirs = np.array([[0.0, 2.0], [2.0, 5.0]]) / 7

  def allgather(words):  # float64 travels as pairs of 32-bit words (parallel.gather_from_processes)
    np.testing.assert_array_equal(words.view(np.float64).reshape(mine.shape), mine)
    return np.stack([words, theirs.reshape(-1).view(np.uint32)])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(parallel.multihost_utils, "process_allgather", allgather)
  total = parallel.sum_over_processes(mine)
  assert total.dtype == np.float64
  np.testing.assert_array_equal(total, mine + theirs)


def _as_process(monkeypatch, index: int, sent: list) -> None:
  """This process as process `index` of two: as 0, broadcast_one_to_all records what it sends in
  `sent`; as 1, it replays `sent`, each array process 1 offers checked against process 0's shape
  and dtype (a mismatch would hang a real pair)."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: index)
  received = iter(sent)

  def replayed(value):
    theirs = next(received)
    assert (np.shape(value), np.asarray(value).dtype) == (theirs.shape, theirs.dtype)
    return theirs

  monkeypatch.setattr(parallel.multihost_utils, "broadcast_one_to_all", replayed if index else
                      lambda value: sent.append(np.array(value)) or value)


def test_what_process_0_reads_reaches_every_process_unread_there(monkeypatch):
  """A record another job may change meanwhile is read by process 0 alone and sent: process 1 gets
  process 0's contents, whatever its own read would give."""
  sent = []
  _as_process(monkeypatch, 0, sent)
  record = {"step": 3, "results": {"pgd": {"accuracy": 0.5, "names": ["é", None]}}}
  assert parallel.from_process_0(lambda: record) == record
  _as_process(monkeypatch, 1, sent)
  assert parallel.from_process_0(lambda: pytest.fail("process 1 read the record")) == record


def test_a_read_that_fails_on_process_0_fails_every_process(monkeypatch):
  """Process 0 raises its own error after sending it; process 1 raises one that names it, instead of
  waiting for a value that never comes."""
  sent = []
  _as_process(monkeypatch, 0, sent)

  def unreadable():
    raise files.UnreadableRecordError("evaluations/step_3/pgd.json is not a readable JSON record")

  with pytest.raises(files.UnreadableRecordError, match="step_3/pgd.json"):
    parallel.from_process_0(unreadable)
  _as_process(monkeypatch, 1, sent)
  with pytest.raises(RuntimeError, match=r"process 0 could not read what every process needs: "
                                         r"UnreadableRecordError: evaluations/step_3/pgd.json is not"):
    parallel.from_process_0(lambda: pytest.fail("process 1 read the record"))


def test_start_up_flags_are_checked_before_joining_a_job():
  with pytest.raises(ValueError, match="--coordinator_address, --num_processes and --process_id"):
    parallel.initialize_distributed("127.0.0.1:1234", 2, None)
  with pytest.raises(ValueError, match="--process_id=2 must lie in"):
    parallel.initialize_distributed("127.0.0.1:1234", 2, 2)
  with pytest.raises(ValueError, match="--heartbeat_timeout_s=0"):
    parallel.initialize_distributed("127.0.0.1:1234", 2, 0, heartbeat_timeout_s=0)
  parallel.initialize_distributed()  # a plain single-process run joins nothing
  assert jax.process_count() == 1


def test_distributed_without_a_cluster_says_what_to_give_instead():
  cluster_vars = ("SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "TPU_", "JAX_COORDINATOR", "JAX_PROCESS")
  env = {k: v for k, v in os.environ.items() if not k.startswith(cluster_vars)}
  out = subprocess.run([sys.executable, "-c", "from ntk_scale import parallel; "
                        "parallel.initialize_distributed(auto=True)"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode != 0
  assert "found no TPU pod, SLURM" in out.stderr and "--coordinator_address" in out.stderr, out.stderr


def test_both_processes_are_refused_while_another_job_writes_the_workdir(tmp_path):
  """Process 0 takes the writer lock for the job; with another job holding it, process 0 refuses
  and process 1, told so, refuses too (rather than waiting for a peer that left)."""
  from ntk_scale import writer_lock  # pylint: disable=import-outside-toplevel
  from conftest import HOLDER  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, writer_lock.lock_path(workdir)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  procs = []
  try:
    assert holder.stdout.readline().strip() == "held"
    procs = start_pair(workdir)
    returned = [p.wait(timeout=PAIR_TIMEOUT_S) for p in procs]
    logs = [_log(workdir, pid) for pid in range(2)]
    assert returned[0] != 0 and returned[1] != 0, logs
    assert f"process id {holder.pid}" in logs[0] and "WorkdirBusyError" in logs[1], logs[1][-3000:]
    assert os.listdir(workdir) == [writer_lock.LOCK_FILE]  # nothing recorded
  finally:
    stop_all(procs)
    holder.kill()
    holder.wait()
