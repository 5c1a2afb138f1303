"""Every in-process test sees 4 emulated CPU devices, so data parallelism is always exercised."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
