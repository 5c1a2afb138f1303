"""The train job end to end: data parallelism, kill-and-resume, rerun of a finished run, ResNet-18,
NaN guard (the digits smoke run's checkpoints by epoch: tests/test_adversarial_training.py)."""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ntk_scale import compilation_cache, jobs
from ntk_scale.checkpoint import Checkpoints
from ntk_scale.train.loop import NonFiniteLossError
from ntk_scale.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE
from ntk_scale.train.metrics_jsonl import read_metrics

from conftest import xla_flags
from main_py_flags import REPO, main_py_in_process


def load_config(name: str, arg: str = ""):
  """get_config(arg) of configs/<name>.py, loaded the way main.py loads it."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def main_py(workdir, *overrides: str, devices: int = 1, config: str = "configs/digits.py:smoke",
            wait: bool = True, python_args: tuple[str, ...] = (), environ: dict | None = None):
  """Runs main.py in a fresh process with `devices` emulated CPU devices. It inherits the session's
  compilation cache from the environment (conftest.py): programs compiled by one process, of this
  file or another, are loaded, not compiled again, by the next. `environ`: variables to set, or with
  None to remove."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), TF_CPP_MIN_LOG_LEVEL="2")
  for name, value in (environ or {}).items():
    if value is None:
      env.pop(name, None)
    else:
      env[name] = value
  cmd = [sys.executable, *python_args, "main.py", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  return out


def final_state_leaves(workdir) -> list[np.ndarray]:
  """Every array of the newest checkpoint, read back on the host."""
  import orbax.checkpoint as ocp
  checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
  step = checkpoints.latest_step()
  manager = ocp.CheckpointManager(checkpoints.directory, item_names=("state", "meta"))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return [np.asarray(x) for x in jax.tree.leaves(restored)]


def train_records(workdir) -> list[dict]:
  keep = lambda r: {k: v for k, v in r.items() if k.startswith(("step", "train/", "test/"))}
  return [keep(r) for r in read_metrics(workdir) if any(k.startswith(("train/", "test/")) for k in r)]


# The runs' evaluations attack with 2 steps instead of 20: what these tests read of them (the printed
# results, the record) does not depend on the attacks' strength, and PGD-20 and APGD-20 took about
# 9 s of CPU time per run.
SHORT_ATTACKS = ("--config.eval_attacks.pgd.num_steps=2", "--config.eval_attacks.apgd.num_steps=2")
ONE_EPOCH = ("--config.num_epochs=1", "--config.log_every_steps=1", *SHORT_ATTACKS)


@pytest.fixture(scope="module")
def one_device_epoch(tmp_path_factory):
  """One epoch of configs/digits.py:smoke by main.py on one device, logged every step:
  (workdir, what main.py printed)."""
  workdir = tmp_path_factory.mktemp("one_device")
  return workdir, main_py(workdir, *ONE_EPOCH, "--config.profile_steps=3", devices=1)


def test_each_logged_step_records_its_own_epoch(one_device_epoch):
  """train/epoch is the step logged over the steps of an epoch (22 here), every step."""
  workdir, _ = one_device_epoch
  records = [r for r in read_metrics(workdir) if "train/epoch" in r]
  assert [r["step"] for r in records] == list(range(1, 23))
  for r in records:
    assert r["train/epoch"] == pytest.approx(r["step"] / 22, rel=1e-6)


def test_profile_steps_leave_a_trace_of_the_train_step_for_tensorboard(one_device_epoch):
  """--config.profile_steps=3 (a runtime field): steps 3-5 traced into the workdir's
  plugins/profile/<run>/, where TensorBoard's profile plugin reads it, with the train step in it."""
  workdir, printed = one_device_epoch
  (trace,) = glob.glob(str(workdir / "plugins" / "profile" / "*" / "*.xplane.pb"))
  with open(trace, "rb") as f:
    assert b"jit_step" in f.read()  # the jitted train step (train/steps.py) ran inside the trace
  assert "profile of steps 3-5 written under" in printed
  # And the TensorBoard scalars (clu's writers, imported only when a phase opens) are there too.
  (events,) = glob.glob(str(workdir / "events.out.tfevents.*"))
  with open(events, "rb") as f:
    assert b"train/loss" in f.read()


def test_the_learning_rate_logged_at_a_step_is_that_of_the_update_it_took(one_device_epoch):
  """Digits smoke, one epoch of 22 steps, logged every step: cosine decay from 0.1 with no
  warm-up, the update that ends step s taken at 0.1 (1 + cos(pi (s - 1) / 22)) / 2: 0.1 at step 1
  (logged one update ahead, step 1 read 0.0995 and step 22 read 0)."""
  records = [r for r in train_records(one_device_epoch[0]) if "train/learning_rate" in r]
  assert [r["step"] for r in records] == list(range(1, 23))
  expected = [0.1 * (1 + np.cos(np.pi * (s - 1) / 22)) / 2 for s in range(1, 23)]
  np.testing.assert_allclose([r["train/learning_rate"] for r in records], expected, rtol=1e-5,
                             atol=1e-9)


def test_four_devices_give_the_losses_of_one(one_device_epoch, tmp_path):
  one = one_device_epoch[0]
  assert jax.device_count() == 4  # this process (conftest.py); main.py ran `one` on one device
  config = load_config("digits", "smoke")
  config.num_epochs, config.log_every_steps = 1.0, 1  # ONE_EPOCH
  config.eval_attacks = ml_collections.ConfigDict()  # the losses are compared, not the attacks
  jobs.run(config, str(tmp_path))
  one_records, four_records = train_records(one), train_records(tmp_path)
  assert [r["step"] for r in one_records] == [r["step"] for r in four_records]
  losses = lambda rs: np.array([r["train/loss"] for r in rs if "train/loss" in r])
  assert len(losses(one_records)) == 22
  np.testing.assert_allclose(losses(four_records), losses(one_records), rtol=2e-4)
  # Parameters after 22 steps: float32 rounding differences (~1e-7 at step 1) grow with training.
  flat = lambda leaves: np.concatenate([x.ravel().astype(np.float64) for x in leaves])
  a, b = flat(final_state_leaves(one)), flat(final_state_leaves(tmp_path))
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-3


def _signal_when_written(proc, pattern: str, signum: int = signal.SIGKILL,
                         timeout_s: float = 300) -> str:
  """Sends `signum` once a path matching `pattern` (a glob) exists; what the process printed until
  it stopped."""
  deadline = time.time() + timeout_s
  while not glob.glob(pattern):
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, f"nothing matched {pattern}"
    time.sleep(0.005)
  proc.send_signal(signum)
  return proc.communicate(timeout=300)[0]


# main.py with SIGINT restored to Python's handler: a background job of a non-interactive shell (CI)
# inherits it ignored, which main.py leaves as it is (no preexec_fn: a fork of this multithreaded
# process could deadlock before its exec).
INTERRUPTIBLE = ("-c", "import runpy, signal, sys; signal.signal(signal.SIGINT, "
                 "signal.default_int_handler); sys.argv = sys.argv[1:]; "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_interrupt_kill_and_rerun_equal_uninterrupted_bitwise(tmp_path):
  """Three epochs: stopped by Ctrl-C in epoch 1 with metrics not yet logged, resumed across epoch
  1's end and killed after epoch 2's save, the last run resumed at an epoch boundary. (An epoch
  trains in ~1 s: a run's cost is its start.)

  A first Ctrl-C is a preemption notice, as SIGTERM is (the notice and its exit status in one
  process: tests/test_resume.py; SIGTERM to main.py: the pairs of tests/test_multihost.py): the run
  saves at the step it is in, with the metrics of the steps it has not logged, and exits 130
  without a traceback (no KeyboardInterrupt landed in Orbax's threads or XLA's compiler).

  The interrupted runs keep their compiled programs in the workdir (config.compilation_cache), not
  in the session's cache: the last run loads the train step the first compiled."""
  # Saves at steps 0, 11 (epoch 0.5), 22, 44, 55 (epoch 2.5), 66; metrics logged every 11 steps.
  overrides = ("--config.num_epochs=3", "--config.log_every_steps=11",
               "--config.checkpoint.fractional_epochs=(0.5,2.5)", *SHORT_ATTACKS)
  main_py(tmp_path / "straight", *overrides)
  assert not (tmp_path / "straight" / compilation_cache.CACHE_DIR).exists()  # the session's cache
  killed = tmp_path / "killed"
  own_cache = {compilation_cache.ENVIRONMENT: None}
  # Ctrl-C between steps 3 and 10, sent when the trace of step 3 (profile_steps=1, a runtime field)
  # is copied into the workdir, after step 3 and before the run looks for a notice after it; the
  # next save and log are 8 steps later. (Sent when a checkpoint appeared, it landed on a save
  # step, where every metric has been logged.)
  proc = main_py(killed, *overrides, "--config.profile_steps=1", wait=False,
                 python_args=INTERRUPTIBLE, environ=own_cache)
  out = _signal_when_written(proc, str(killed / "plugins" / "profile" / "*" / "*"), signal.SIGINT)
  assert proc.returncode == INTERRUPTED_EXIT_CODE, out[-3000:]
  assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
  assert "Ctrl-C again stops at once" in out
  stopped_at = int(re.search(r"interrupted \(Ctrl-C\): the train state at step (\d+) is saved", out)[1])
  assert 3 <= stopped_at < 11, "the Ctrl-C came too late: every metric was logged"
  assert (killed / "checkpoints" / str(stopped_at)).is_dir()
  # Resumed from there, then SIGKILL just after epoch 2 appeared.
  proc = main_py(killed, *overrides, wait=False, environ=own_cache)
  out = _signal_when_written(proc, str(killed / "checkpoints" / "44"))
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  assert f"from step {stopped_at} " in out
  out = main_py(killed, *overrides, environ={**own_cache, "JAX_LOG_COMPILES": "1"})
  assert "Persistent compilation cache hit for 'jit_step'" in out
  assert glob.glob(str(killed / compilation_cache.CACHE_DIR / "jit_step-*"))

  straight, resumed = final_state_leaves(tmp_path / "straight"), final_state_leaves(killed)
  assert len(straight) == len(resumed)
  for a, b in zip(straight, resumed):
    np.testing.assert_array_equal(a, b)
  # The metrics file tells the story of one run: no duplicated or missing steps.
  assert train_records(killed) == train_records(tmp_path / "straight")


def test_rerun_of_a_finished_run_takes_its_attacks_from_the_record(one_device_epoch, tmp_path, capsys):
  """main.py rerun on a finished workdir (in this process: it trains and attacks nothing, so its
  four devices read back what one device recorded) prints what the first run printed."""
  finished, first = one_device_epoch
  shutil.copytree(finished, tmp_path / "rerun")
  with main_py_in_process("--config=configs/digits.py:smoke", f"--workdir={tmp_path / 'rerun'}",
                          *ONE_EPOCH) as (main, argv):
    main.main(main.parse_flags(argv))
  captured = capsys.readouterr()
  second = captured.out + captured.err
  printed = lambda out: [line for line in out.splitlines()  # main.py's lines, not the timed logs
                         if "test accuracy" in line and not re.match(r"[IWEF]\d{4} ", line)]
  assert len(printed(first)) == 3 and printed(first) == printed(second)  # clean, pgd, apgd
  for name in ("pgd", "apgd"):  # trained no further, attacked no further
    assert f"attack {name}: recorded with these settings" in second
  assert sum("test/accuracy" in r for r in read_metrics(tmp_path / "rerun")) == 1


def test_resnet18_trains_adversarially_on_mock_cifar10_in_bfloat16(tmp_path):
  """The CIFAR config end to end, its train steps computing in bfloat16 as on TPUs and GPUs
  (config.train.compute_dtype): float32 checkpoints, finite losses, evaluations in float32."""
  config = load_config("cifar10_resnet18", "adversarial,smoke")
  config.num_epochs = 1.0
  config.train.compute_dtype = "bfloat16"
  del config.eval_attacks.apgd  # one attack shows the evaluation; APGD's compile costs ~6 s more
  with tfds.testing.mock_data(num_examples=16):
    result = jobs.run(config, str(tmp_path))
  assert result["steps"] == 2
  losses = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
  assert losses and np.all(np.isfinite(losses))
  checkpoints = Checkpoints(os.path.join(tmp_path, "checkpoints"))
  assert checkpoints.latest_step() == 2
  assert {leaf.dtype for leaf in jax.tree.leaves(checkpoints.restore(2, result["state"]).params)} == {
      np.dtype(np.float32)}
  assert result["results"]["pgd"]["accuracy"] <= result["results"]["clean"]["accuracy"]


@pytest.mark.parametrize("value", [0, -5])
def test_bad_log_every_steps_fails_before_training(tmp_path, value):
  """A zero interval divided by zero after the first step was compiled and trained."""
  config = load_config("digits", "smoke")
  config.log_every_steps = value
  with pytest.raises(ValueError, match=f"config.log_every_steps={value}"):
    jobs.run(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def _diverging_config():
  """Digits smoke at learning rate 1e12: the loss of step 2 (from the state after one update) is
  still finite (~6e10), but the state after the second update already holds infinities."""
  config = load_config("digits", "smoke")
  config.model.batch_norm = False
  config.optimizer.schedule = "constant"
  config.optimizer.learning_rate = 1e12
  return config


def _saved_states_are_finite(workdir) -> dict[int, bool]:
  import orbax.checkpoint as ocp
  directory = os.path.join(workdir, "checkpoints")
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta"))
  out = {}
  for step in manager.all_steps():
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    out[step] = all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
  return out


def test_nan_guard_stops_keeps_the_last_good_checkpoint_and_never_saves_a_non_finite_state(tmp_path):
  """A save is due after the second step, whose state holds infinities: the guard stops there, names
  step 1 as the last good checkpoint, and leaves it the newest."""
  config = _diverging_config()
  config.checkpoint.fractional_epochs = (1 / 22, 2 / 22)  # saves after the first and second steps
  with pytest.raises(NonFiniteLossError, match=r"(?s)at step 2.*Last good checkpoint: step 1 "):
    jobs.run(config, str(tmp_path))
  assert _saved_states_are_finite(tmp_path) == {0: True, 1: True}  # the initialisation and step 1
  assert Checkpoints(os.path.join(tmp_path, "checkpoints")).latest_step() == 1
  assert all(np.all(np.isfinite(x)) for x in final_state_leaves(tmp_path))


def test_nan_guard_stops_before_the_co_monitor_keeps_a_diverged_state(tmp_path):
  config = _diverging_config()
  config.checkpoint.fractional_epochs = (1 / 22,)
  m = config.train.co_monitor  # measured after every step, a hair-trigger collapse keeps checkpoints
  m.every_steps, m.num_examples, m.attack.num_steps = 1, 64, 1
  m.collapse_fraction, m.min_peak, m.max_train_drop = 1.0, 0.0, 1.0
  with pytest.raises(NonFiniteLossError, match="Last good checkpoint: step 1 "):
    jobs.run(config, str(tmp_path))
  assert _saved_states_are_finite(tmp_path) == {0: True, 1: True}


def test_a_stopped_job_exits_with_the_status_a_shell_gives_its_signal():
  """Schedulers and shells read 143 as "stopped by SIGTERM" (a preemption, to be retried) and 130
  as "stopped by Ctrl-C"; the constants are compared with the exit status a job's process gives."""
  assert PREEMPTED_EXIT_CODE == 128 + signal.SIGTERM == 143
  assert INTERRUPTED_EXIT_CODE == 128 + signal.SIGINT == 130
