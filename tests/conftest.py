"""Every in-process test sees 4 emulated CPU devices, so data parallelism is always exercised."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# `make test` runs `pytest -n 2 --dist loadfile`: each file runs whole on one worker, and the two
# workers take the files in collection order. The longest files (about 1-4 minutes each on 2 CPU
# cores) go first, so that the short ones fill in around them; last, the run waited minutes on
# one long file after the other worker had finished. A file missing here only runs later.
LONGEST_FIRST = ("test_ntk_engine.py", "test_train.py", "test_phase2.py", "test_adversarial_training.py",
                 "test_resume.py", "test_kernel_job.py", "test_multihost.py", "test_infinite_references.py")


def pytest_configure(config):
  # pytest-xdist would otherwise order the files by their number of tests, which put the longest
  # files (few tests each) at the end.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


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
