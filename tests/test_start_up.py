"""What a job's process imports before it starts: TensorFlow (through clu's TensorBoard writers)
and scikit-learn (the digits) take seconds, on every host of a job, so they are imported only by
the jobs that use them (a phase opening its writers, the digits being loaded)."""

import subprocess
import sys

HEAVY = ("tensorflow", "sklearn", "clu.metric_writers", "clu.periodic_actions")


def test_the_jobs_import_neither_tensorflow_nor_sklearn_until_they_use_them():
  program = ("import sys; import ntk_scale.jobs, ntk_scale.dry_run; "
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_library_info_logs_are_dropped_and_every_warning_kept():
  """A job prints its own INFO lines, and the libraries' warnings, but not the INFO chatter of
  Orbax, JAX's internals, TFDS and etils (console.quiet_library_logs, on absl's handler, once)."""
  import logging  # pylint: disable=import-outside-toplevel

  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  from ntk_scale import console  # pylint: disable=import-outside-toplevel

  record = lambda level, path: logging.LogRecord("absl", level, path, 1, "a line", None, None)
  passes = console._DropLibraryInfo().filter
  for library in ("/venv/site-packages/orbax/checkpoint/checkpoint_manager.py",
                  "/venv/site-packages/jax/_src/xla_bridge.py",
                  "/venv/site-packages/tensorflow_datasets/core/dataset_builder.py",
                  "/venv/site-packages/etils/epath/resource_utils.py"):
    assert not passes(record(logging.INFO, library)), library
    assert passes(record(logging.WARNING, library)) and passes(record(logging.ERROR, library)), library
  assert passes(record(logging.INFO, "/repo/ntk_scale/train/loop.py"))
  assert passes(record(logging.INFO, "/venv/site-packages/jax/experimental/multihost_utils.py"))
  handler = absl_logging.get_absl_handler()
  installed = lambda: [f for f in handler.filters if isinstance(f, console._DropLibraryInfo)]
  earlier = installed()  # by a job run earlier in this process
  console.quiet_library_logs()
  console.quiet_library_logs()
  try:
    assert len(installed()) == 1
  finally:
    if not earlier:
      handler.removeFilter(installed()[0])
