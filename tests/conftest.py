"""Every in-process test sees 4 emulated CPU devices, so data parallelism is always exercised."""

import os
import subprocess
import sys

import pytest


# Flags the tests set themselves; any other flag in the environment (a dump directory, say) is kept
# for the tests' processes and every process they start.
_OWN_FLAGS = ("--xla_force_host_platform_device_count=", "--xla_backend_optimization_level=")
_USER_FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_OWN_FLAGS)]


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a test process with `devices` emulated CPU devices, for the tests' processes and
  every process they start (results compared across processes come from the same compiler).

  The tests' programs are small and much of their time is compilation: LLVM optimises the
  generated CPU code at -O1, not -O2 (measured on the digits smoke run, three epochs and its
  evaluation: compile 16.9 -> 8.2 s, the whole run 25.4 -> 15.8 s, same accuracy). At -O0 the
  code ran 2-3x slower and the longer runs lost more than compiling saved. Rounding may differ
  from -O2 in the last bits (fusion and vectorisation order); benchmarks and jobs compile as usual."""
  return " ".join([*_USER_FLAGS, f"--xla_force_host_platform_device_count={devices}",
                   "--xla_backend_optimization_level=1"])


# Must happen before jax is imported anywhere. Set, not defaulted: a test process with other
# settings than the processes it starts would compare results of two compilers.
os.environ["XLA_FLAGS"] = xla_flags(4)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# JAX's persistent compilation cache, one directory for the whole session: both xdist workers and
# every process a test starts (main.py, the multi-host pairs) read and write it through the
# environment, so a program (the digits CNN's train/eval/attack steps, kernel tiles) compiled by
# one file is loaded, not compiled again, by the next. A cached executable is the compiled program
# itself: results are bitwise those of a fresh compile. The directory is made by the process that
# starts the session (xdist's controller, or a plain pytest) and removed when it ends
# (pytest_unconfigure); a worker finds it in the environment.
_SESSION_CACHE = "NTK_SCALE_TEST_COMPILATION_CACHE"
_OWN_CACHE = None
if _SESSION_CACHE not in os.environ:
  import tempfile
  _OWN_CACHE = os.environ[_SESSION_CACHE] = tempfile.mkdtemp(prefix="ntk_scale_tests_jax_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_SESSION_CACHE]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # every program, however quick
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"  # and however small

# `make test` runs `pytest -n 2 --dist loadfile`: each file runs whole on one worker, and the two
# workers take the files in collection order. The longest files go first, so that the short ones
# fill in around them; last, the run waited minutes on one long file after the other worker had
# finished. A file missing here only runs later. Measured order (summed test times of a full run
# with the compilation cache, 2026-12-01): multihost 13% of the suite, train 10%, attacks and
# adversarial_training 7% each, the next ones 6% to 2%.
LONGEST_FIRST = ("test_multihost.py", "test_train.py", "test_attacks.py", "test_adversarial_training.py",
                 "test_ntk_engine.py", "test_kernel_job.py", "test_dry_run.py", "test_resume.py",
                 "test_phase2.py", "test_eigen_features.py", "test_linearize.py", "test_spectrum_job.py",
                 "test_eigen_images.py", "test_robust_dataset.py", "test_infinite.py",
                 "test_initial_checkpoint.py", "test_kernel_regression.py", "test_factored_layers.py")


def pytest_configure(config):
  # pytest-xdist would otherwise order the files by their number of tests, which put the longest
  # files (few tests each) at the end.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False
  if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
    _write_compilation_cache_entries_atomically()  # in each process that runs tests


def _write_compilation_cache_entries_atomically():
  """jax's file cache (jax/_src/lru_cache.py, without a size limit) writes an entry in place, so the
  other worker could read a program still being written: jax then warns, compiles it again (same
  result) and keeps the torn entry for the rest of the session. Here an entry is written to a
  temporary file and renamed into place. Processes that tests start keep jax's own write."""
  try:  # jax internals: where they moved, jax's own in-place writes stand (a torn read recompiles)
    from jax._src import lru_cache
    from ntk_scale.files import is_cloud
    put = lru_cache.LRUCache.put
    suffix = lru_cache._CACHE_SUFFIX
  except (ImportError, AttributeError):
    return

  def atomic_put(self, key: str, value: bytes) -> None:
    if getattr(self, "eviction_enabled", True) or not key or is_cloud(str(self.path)):
      return put(self, key, value)  # (a bucket's object appears whole: jax's own write)
    path = os.path.join(str(self.path), f"{key}{suffix}")
    if os.path.exists(path):
      return
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as f:
      f.write(value)
    os.replace(temporary, path)

  lru_cache.LRUCache.put = atomic_put


@pytest.fixture
def jax_cache_settings():
  """JAX's cache settings put back, and its cache reopened, after the test (and closed before it):
  this process opened the session's cache at its first compilation, and a job points JAX at its
  workdir before any (ntk_scale/compilation_cache.py)."""
  from jax.experimental.compilation_cache import compilation_cache as jax_cache
  import jax

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_enable_xla_caches")
  saved = {name: getattr(jax.config, name) for name in names}
  jax_cache.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  jax_cache.reset_cache()


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:
    import shutil
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep their order


def neural_tangents_or_skip(feature: str):
  """The neural_tangents module loaded for `feature`; skips only when the optional `nt` extra is not
  installed (a failure to load an installed one is an error, not a skip)."""
  import importlib.util

  import pytest

  from ntk_scale import nt_compat

  missing = [m for m in ("neural_tangents", "frozendict") if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f"neural-tangents {nt_compat.NT_VERSION} is not installed (missing {', '.join(missing)}); "
                f"it is the optional extra: {nt_compat.INSTALL_HINT}")
  return nt_compat.load_neural_tangents(feature)


class Killed(Exception):
  """Raised where a test's job is "killed"."""


def write_tile_killed_after(count: int):
  """A replacement for KernelStore.write_tile that writes the first `count` tiles it is given and
  raises Killed for every later one, as a job killed after `count` tiles would leave its store.
  Tiles are written on several threads at once (store.TileWriter), so the count is kept under a
  lock. Returns (the replacement, the list of tiles written)."""
  import threading

  from ntk_scale.ntk.store import KernelStore

  write, written, lock = KernelStore.write_tile, [], threading.Lock()

  def killed_after(self, i, j, tile, mirror):
    with lock:
      if len(written) == count:
        raise Killed()
      written.append((i, j))
    write(self, i, j, tile, mirror)

  return killed_after, written


def notices_from(step: int):
  """A replacement for preemption.preemption_notices whose `noticed()` is True from its `step`-th
  call on (1: the loop's first step), as if SIGTERM arrived during that step of the loop."""
  import contextlib
  import itertools

  def preemption_notices():
    calls = itertools.count(1)
    return contextlib.nullcontext(lambda: next(calls) >= step)

  return preemption_notices


# A process holding a writer lock (ntk_scale/writer_lock.py), as another job would.
HOLDER = ("import sys, time\n"
          "from ntk_scale import writer_lock\n"
          "writer_lock.hold(sys.argv[1], 'train', 'the experiment')\n"
          "print('held', flush=True)\n"
          "time.sleep(120)\n")


@pytest.fixture
def held_by_another_process():
  """Starts a process holding a writer lock; yields a function taking the lock's path, returning
  the process (killed at the end)."""
  started = []

  def hold(path):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    started.append(process)
    assert process.stdout.readline().strip() == "held"
    return process

  yield hold
  for process in started:
    process.kill()
    process.wait()


TAKER = ("import sys\n"
         "from ntk_scale import writer_lock\n"
         "writer_lock.hold(sys.argv[1], 'train', 'the experiment')\n")
