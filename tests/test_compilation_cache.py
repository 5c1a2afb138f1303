"""Where a job keeps its compiled programs (config.compilation_cache); that a resumed job loads
them: tests/test_train.py's kill-and-resume test."""

import ml_collections

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
  # A config saved before the field existed keeps its programs.
  old = ml_collections.ConfigDict({"job": "train"})
  assert compilation_cache.cache_directory(old, "/runs/r18", environ={}) == "/runs/r18/compilation_cache"
