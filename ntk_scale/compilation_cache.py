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
an entry can leave it torn: JAX then warns and compiles that program again on every start (same
results); removing the directory clears it.
"""

import os
from collections.abc import Mapping

import jax
import ml_collections

from ntk_scale import files

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
  keep_xla_caches_out_of_buckets(environ)
  return directory


def keep_xla_caches_out_of_buckets(environ: Mapping[str, str] = os.environ) -> None:
  """Turns XLA's autotuning cache off when JAX's cache is in a bucket, unless the environment
  chose (JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES); before the first compilation, as above."""
  in_use = jax.config.jax_compilation_cache_dir
  if in_use and files.is_cloud(in_use) and XLA_CACHES_ENVIRONMENT not in environ:
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
