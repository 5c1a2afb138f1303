"""Where a job keeps its compiled programs (config.compilation_cache); that a resumed job loads
them: tests/test_train.py's kill-and-resume test."""

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ntk_scale import compilation_cache
from ntk_scale.base_config import base_config


def test_a_job_keeps_its_programs_in_its_workdir_local_or_in_a_bucket():
  config = base_config()
  assert config.compilation_cache is True
  for workdir in ("/runs/r18", "gs://bucket/runs/r18"):
    assert compilation_cache.cache_directory(config, workdir, environ={}) == f"{workdir}/compilation_cache"


def test_the_environments_cache_or_the_field_turned_off_leaves_jax_as_it_is():
  config = base_config()
  environ = {compilation_cache.ENVIRONMENT: "/shared/jax_cache"}
  assert compilation_cache.cache_directory(config, "/runs/r18", environ=environ) is None
  config.compilation_cache = False
  assert compilation_cache.cache_directory(config, "/runs/r18", environ={}) is None
  # A config not built on base_config (without the field) keeps its programs.
  old = ml_collections.ConfigDict({"job": "train"})
  assert compilation_cache.cache_directory(old, "/runs/r18", environ={}) == "/runs/r18/compilation_cache"


def test_the_job_points_jax_at_the_workdir_and_xla_caches_only_on_a_local_disk(jax_cache_settings):
  """On GPUs JAX puts XLA's autotuning cache in the directory too, written by XLA's C++ file
  access, which has no gs://: in a bucket JAX's cache alone."""
  default_xla_caches = jax.config.jax_persistent_cache_enable_xla_caches
  assert default_xla_caches != "none"
  assert compilation_cache.use_workdir_cache(base_config(), "/runs/r18", environ={}) == \
      "/runs/r18/compilation_cache"
  assert jax.config.jax_compilation_cache_dir == "/runs/r18/compilation_cache"
  assert jax.config.jax_persistent_cache_enable_xla_caches == default_xla_caches
  assert compilation_cache.use_workdir_cache(base_config(), "gs://b/r18", environ={}) == \
      "gs://b/r18/compilation_cache"
  assert jax.config.jax_compilation_cache_dir == "gs://b/r18/compilation_cache"
  assert jax.config.jax_persistent_cache_enable_xla_caches == "none"


def test_a_bucket_named_by_the_environment_keeps_xla_caches_out_unless_they_are_asked_for(
    jax_cache_settings):
  """JAX_COMPILATION_CACHE_DIR=gs://... (which JAX read at import) is left as the cache, the
  autotuning cache turned off; JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES, when set, is the user's."""
  default_xla_caches = jax.config.jax_persistent_cache_enable_xla_caches
  environ = {compilation_cache.ENVIRONMENT: "gs://shared/jax_cache"}
  jax.config.update("jax_compilation_cache_dir", "gs://shared/jax_cache")
  asked = {**environ, compilation_cache.XLA_CACHES_ENVIRONMENT: default_xla_caches}
  assert compilation_cache.use_workdir_cache(base_config(), "gs://b/r18", environ=asked) is None
  assert jax.config.jax_persistent_cache_enable_xla_caches == default_xla_caches
  config = base_config()
  config.compilation_cache = False  # JAX's cache is the environment's all the same
  assert compilation_cache.use_workdir_cache(config, "/runs/r18", environ=environ) is None
  assert jax.config.jax_compilation_cache_dir == "gs://shared/jax_cache"
  assert jax.config.jax_persistent_cache_enable_xla_caches == "none"


def test_a_dry_run_keeps_xla_caches_out_of_a_bucket_too(jax_cache_settings, monkeypatch):
  """The plan compiles the job's programs (here it stops at the seed's check, after the guard)."""
  from ntk_scale import jobs  # pylint: disable=import-outside-toplevel

  monkeypatch.delenv(compilation_cache.XLA_CACHES_ENVIRONMENT, raising=False)
  jax.config.update("jax_compilation_cache_dir", "gs://shared/jax_cache")
  config = base_config()
  config.seed = -1
  with pytest.raises(ValueError, match=r"config\.seed=-1"):
    jobs.dry_run(config)
  assert jax.config.jax_persistent_cache_enable_xla_caches == "none"


def test_a_torn_entry_is_removed_at_the_next_start_and_its_program_kept_again(
    jax_cache_settings, tmp_path, monkeypatch, capsys):
  """A job killed while JAX wrote an entry left it torn, and JAX never replaces an entry that
  exists: it warned and compiled that program again on every start. The next job removes it, JAX
  writes it anew and the job after loads it. Entries checked before are not read again."""
  workdir = str(tmp_path)
  directory = compilation_cache.use_workdir_cache(base_config(), workdir, environ={})
  program = jax.jit(lambda x: jnp.sin(x) * 0.25 - 0.5)
  expected = program(jnp.arange(4.0))
  (entry,) = [n for n in os.listdir(directory)
              if n.startswith("jit__lambda") and n.endswith(compilation_cache.ENTRY_SUFFIX)]
  path = os.path.join(directory, entry)
  whole = open(path, "rb").read()
  with open(path, "wb") as f:  # as a job killed mid-write leaves it
    f.write(whole[:len(whole) // 2])

  def start_again() -> list[str]:  # a new job's process: nothing compiled in its memory
    jax.clear_caches()
    events = []
    record = lambda event, **kwargs: events.append(event)
    jax.monitoring.register_event_listener(record)
    try:
      compilation_cache.use_workdir_cache(base_config(), workdir, environ={})
      np.testing.assert_array_equal(program(jnp.arange(4.0)), expected)
    finally:
      jax.monitoring.unregister_event_listener(record)
    return events

  events = start_again()
  assert f"compilation cache: removed {path}, left torn" in capsys.readouterr().out
  assert "/jax/compilation_cache/cache_misses" in events  # compiled again (arange's is a hit)
  assert compilation_cache._decompresses(path)  # written anew, whole
  read = []
  monkeypatch.setattr(compilation_cache, "_decompresses", lambda p: read.append(p) or True)
  os.utime(path, (time.time() - 60, time.time() - 60))  # written before this check
  assert "/jax/compilation_cache/cache_misses" not in start_again()  # loaded, not compiled
  assert read == [] and "removed" not in capsys.readouterr().out
