"""Compiled programs kept in the workdir, so that a resumed or later job loads them, not compiles.

A preempted job restarts into the compilation it already did: the train, evaluation and attack
steps, or the kernel's tile programs (minutes for ResNet-18 and its attacks on a TPU pod). JAX's
persistent compilation cache stores each compiled executable under a key of the program, the
devices, the compiler and its flags, and a later process with the same key loads the executable
itself, so its results are bitwise those of a fresh compile. JAX writes entries from process 0
only (programs taking at least `jax_persistent_cache_min_compile_time_secs`, 1 s by default, to
compile) and every process reads them, so on TPUs and GPUs the workdir, one directory or bucket
for all hosts of a job, serves every host (JAX keys a GPU program without its device assignment
for that). On CPUs the key holds each process's own topology (jax/_src/cache_key.py), so the
processes other than 0 of a multi-process CPU job compile every program on every start. On GPUs
JAX also points XLA's per-fusion autotuning cache into the directory, and XLA's C++ file access
has no gs://: its first compilation would fail. So in a bucket (the workdir's cache or
JAX_COMPILATION_CACHE_DIR's) that cache is left off, unless
JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES says otherwise; a hit in JAX's cache skips autotuning anyway.
The keys hold the cache's path too, so a moved workdir compiles again. A job killed while it writes
an entry into a local directory can leave it torn (an upload to a bucket appears whole or not at
all), and JAX never replaces an entry that exists: it would warn and compile that program again on
every start. So a job removes the torn entries of its workdir's local cache before it compiles
(`remove_torn_entries`; an entry is written once, so only those written since the last check are
read), and JAX writes the program anew.
"""

import contextlib
import os
import time
from collections.abc import Mapping

import jax
import ml_collections

from ntk_scale import files

try:  # JAX's own decompression of its entries (private: a JAX that moves it gets no check)
  from jax._src.compilation_cache import decompress_executable
except ImportError:
  decompress_executable = None

CACHE_DIR = "compilation_cache"
# JAX reads it at import: a cache the user chose, shared by many workdirs (the test suite's).
ENVIRONMENT = "JAX_COMPILATION_CACHE_DIR"
XLA_CACHES_ENVIRONMENT = "JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES"


def cache_directory(config: ml_collections.ConfigDict, workdir: str,
                    environ: Mapping[str, str] = os.environ) -> str | None:
  """<workdir>/compilation_cache when `config.compilation_cache` is on; None when it is off or
  when JAX_COMPILATION_CACHE_DIR already names the cache."""
  if not config.get("compilation_cache", True) or environ.get(ENVIRONMENT):
    return None
  return os.path.join(workdir, CACHE_DIR)


def use_workdir_cache(config: ml_collections.ConfigDict, workdir: str,
                      environ: Mapping[str, str] = os.environ) -> str | None:
  """Points JAX's persistent cache at cache_directory(config, workdir), if any, and returns it;
  keeps XLA's autotuning cache out of a bucket. Called before the process compiles anything: JAX
  opens the cache at its first compilation."""
  directory = cache_directory(config, workdir, environ)
  if directory is not None:
    jax.config.update("jax_compilation_cache_dir", directory)
    if not files.is_cloud(directory) and jax.process_index() == 0:  # JAX writes from process 0
      for name in remove_torn_entries(directory):
        print(f"compilation cache: removed {os.path.join(directory, name)}, left torn by a job "
              f"killed while writing it; its program is compiled and kept again", flush=True)
  keep_xla_caches_out_of_buckets(environ)
  return directory


ENTRY_SUFFIX, ATIME_SUFFIX = "-cache", "-atime"  # jax/_src/lru_cache.py's names of an entry's files
CHECKED_FILE = ".entries_checked"  # its time: when the entries were last checked


def remove_torn_entries(directory: str) -> list[str]:
  """Removes the entries of JAX's cache in the local `directory` that do not decompress (a job
  killed while writing one) and returns their names. Entries written before the last check were
  read then and are not read again."""
  if decompress_executable is None or not os.path.isdir(directory):
    return []
  marker = os.path.join(directory, CHECKED_FILE)
  checked = os.path.getmtime(marker) if os.path.exists(marker) else float("-inf")
  started = time.time()
  torn = []
  with os.scandir(directory) as entries:
    for entry in entries:
      if (entry.name.endswith(ENTRY_SUFFIX) and entry.is_file() and entry.stat().st_mtime >= checked
          and not _decompresses(entry.path)):
        torn.append(entry.name)
        for path in (entry.path, entry.path[:-len(ENTRY_SUFFIX)] + ATIME_SUFFIX):
          with contextlib.suppress(FileNotFoundError):  # (another job removed it first)
            os.remove(path)
  with open(marker, "w"):
    pass
  os.utime(marker, (started, started))  # an entry written during the check is read next time
  return sorted(torn)


def _decompresses(path: str) -> bool:
  """Whether the entry at `path` decompresses as JAX reads it (zlib or zstd, as installed)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    decompress_executable(data)
  except Exception:  # pylint: disable=broad-except  # zlib.error, zstd's errors: a torn entry
    return False
  return True


def keep_xla_caches_out_of_buckets(environ: Mapping[str, str] = os.environ) -> None:
  """Turns XLA's autotuning cache off when JAX's cache is in a bucket, unless the environment
  chose (JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES); before the first compilation, as above."""
  in_use = jax.config.jax_compilation_cache_dir
  if in_use and files.is_cloud(in_use) and XLA_CACHES_ENVIRONMENT not in environ:
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
