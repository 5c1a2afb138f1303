"""jax's matmul precision levels by the names configs give them (config.kernel.precision,
config.spectrum.precision, config.train.matmul_precision, ...): "default" is the backend's (TF32 on
GPUs, one bfloat16 pass on TPUs), "high" TF32 or three bfloat16 passes, "highest" float32."""

import contextlib

import jax
from jax import lax

PRECISIONS = {"highest": lax.Precision.HIGHEST, "high": lax.Precision.HIGH,
              "default": lax.Precision.DEFAULT}


def check_precision(precision: str, field: str = "precision") -> None:
  if precision not in PRECISIONS:
    raise ValueError(f"{field}={precision!r} is not a matmul precision; expected one of "
                     f"{', '.join(PRECISIONS)}.")


def lax_precision(precision: str) -> lax.Precision | None:
  """The `precision=` argument of a matmul at `precision`: None for "default", which leaves it to
  the surrounding context or the global jax_default_matmul_precision, as `default_precision`."""
  return None if precision == "default" else PRECISIONS[precision]


def default_precision(precision: str) -> contextlib.AbstractContextManager:
  """A context in which float32 matmuls and convolutions traced without a precision of their own
  run at `precision`; "default" enters none, leaving them to the surrounding context or the global
  jax_default_matmul_precision (a None context would override those with the backend's)."""
  if precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(precision)
