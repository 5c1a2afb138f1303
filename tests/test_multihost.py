"""Two processes on 127.0.0.1 (two CPU devices each, collectives over the loopback) run the same
jobs as one process with four devices: same training, same kernel; checkpoints cross between the
two topologies; when one process dies the other stops with an error in bounded time, and the
rerun resumes from the last checkpoint to the uninterrupted result."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ntk_scale import jobs
from ntk_scale.ntk.store import KernelStore

from test_train import REPO, load_config

HEARTBEAT_S = 5
FIELDS = {"model.name": "mlp", "model.width": 16, "num_epochs": 1.0}


def tiny_config(**fields):
  c = load_config("digits", "smoke")
  for key, value in {**FIELDS, **fields}.items():
    section, _, name = key.rpartition(".")
    setattr(c[section] if section else c, name, value)
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _flags(fields: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in {**FIELDS, **fields}.items()]


def start_pair(workdir: str, **fields) -> list[subprocess.Popen]:
  """main.py as processes 0 and 1 of a two-process job, two emulated devices each."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  procs = []
  for pid in range(2):
    log = open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}_{pid}.log"), "w")
    procs.append(subprocess.Popen(
        [sys.executable, "main.py", "--config", "configs/digits.py:smoke", "--workdir", workdir,
         "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(pid),
         f"--heartbeat_timeout_s={HEARTBEAT_S}"] + _flags(fields),
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _log(workdir: str, pid: int) -> str:
  with open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}_{pid}.log")) as f:
    return f.read()


def run_pair(workdir: str, timeout: float = 240, **fields) -> None:
  procs = start_pair(workdir, **fields)
  try:
    for pid, p in enumerate(procs):
      assert p.wait(timeout=timeout) == 0, _log(workdir, pid)[-3000:]
  finally:
    for p in procs:
      p.kill()


def _losses(workdir: str) -> np.ndarray:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return np.array([r["train/loss"] for r in rows if "train/loss" in r])


def _evaluation(workdir: str) -> dict:
  directory = os.path.join(workdir, "evaluations")
  (name,) = sorted(os.listdir(directory))[-1:]
  with open(os.path.join(directory, name)) as f:
    return json.load(f)


def _accuracies(evaluation: dict) -> dict[str, float]:
  return {k: v["accuracy"] for k, v in evaluation["results"].items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same config trained by two processes and by this process (four devices)."""
  root = tmp_path_factory.mktemp("multihost")
  two, one = str(root / "two"), str(root / "one")
  run_pair(two)
  jobs.run(tiny_config(), one)
  return two, one


def test_two_processes_train_as_one(runs):
  two, one = runs
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-4)
  assert len(_losses(two)) > 3
  for name, accuracy in _accuracies(_evaluation(one)).items():
    assert _accuracies(_evaluation(two))[name] == pytest.approx(accuracy, abs=1.5 / 360), name


def test_kernel_over_two_processes_equals_one_process_from_the_same_checkpoint(runs):
  two, _ = runs
  kernel = {"job": "kernel", "kernel.num_examples": 40, "kernel.tile_size": 8}
  run_pair(two, **kernel)  # tiles spread over both processes' devices
  (name,) = os.listdir(os.path.join(two, "kernels"))
  by_two = KernelStore.open(os.path.join(two, "kernels", name))
  assert by_two.meta["complete"] and len(by_two.done_tiles()) == 15
  k_two = by_two.read()
  # The checkpoint written by two processes, restored by one with four devices.
  c = tiny_config(**kernel)
  c.kernel.name = "single"
  jobs.run(c, two)
  k_one = KernelStore.open(os.path.join(two, "kernels", "single")).read()
  np.testing.assert_allclose(k_two, k_one, rtol=1e-5, atol=1e-5 * np.abs(k_one).max())


def test_two_processes_evaluate_a_checkpoint_written_by_one(runs):
  _, one = runs
  before = _accuracies(_evaluation(one))
  run_pair(one, job="evaluate")
  after = _accuracies(_evaluation(one))
  for name, accuracy in before.items():
    assert after[name] == pytest.approx(accuracy, abs=1.5 / 360), name


def test_a_dead_process_stops_the_other_and_the_rerun_resumes(tmp_path):
  workdir, reference = str(tmp_path / "killed"), str(tmp_path / "uninterrupted")
  long_run = {"num_epochs": 12.0}
  procs = start_pair(workdir, **long_run)
  try:
    checkpoints = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 180
    while not (os.path.isdir(checkpoints) and len(os.listdir(checkpoints)) >= 3):
      assert time.time() < deadline and procs[0].poll() is None, _log(workdir, 0)[-3000:]
      time.sleep(0.05)
    procs[1].kill()
    killed_at = time.time()
    rc = procs[0].wait(timeout=HEARTBEAT_S + 60)
    stopped_after = time.time() - killed_at
  finally:
    for p in procs:
      p.kill()
  assert rc != 0, "the surviving process finished the job on its own"
  assert stopped_after < HEARTBEAT_S + 60
  assert "another task died" in _log(workdir, 0) or "heartbeat" in _log(workdir, 0)
  assert not os.path.exists(os.path.join(workdir, "evaluations"))  # it did not finish

  # The rerun (here one process with four devices) resumes from the last checkpoint of the two.
  resumed = jobs.run(tiny_config(**long_run), workdir)
  jobs.run(tiny_config(**long_run), reference)
  np.testing.assert_allclose(_losses(workdir)[-5:], _losses(reference)[-5:], rtol=1e-3)
  for name, accuracy in _accuracies(_evaluation(reference)).items():
    assert resumed["results"][name]["accuracy"] == pytest.approx(accuracy, abs=2.5 / 360), name
