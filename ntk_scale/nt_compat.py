"""The one way into neural-tangents: makes release 0.6.5 import on current JAX, or says clearly why not.

neural-tangents 0.6.5 (its last release) was written for jax <= 0.4.25. On jax 0.10 its import fails
only on names that moved or were removed, not on anything it computes with:
  jax.core.{Jaxpr, JaxprEqn, Literal, Var, Primitive}  now in jax.extend.core;
  jax.util.{safe_map, safe_zip}                        the module is gone (length-checked map / zip);
  jax.interpreters.ad.zeros_like_p                     gone; nt only keys a rule table on it.
`load_neural_tangents` adds those names where they are missing (never replacing an existing one) and
then imports neural_tangents. Its package __init__ also imports `experimental.empirical_tf`, kernels
of TensorFlow models, which imports TensorFlow and tf2jax (~5 s, and absent from GPU images and slim
installs); nothing here uses those kernels, so that one module is always replaced by one whose
functions raise, and the rest loads without TensorFlow. That is enough for the analytic stax kernels and for empirical kernels
with JACOBIAN_CONTRACTION and NTK_VECTOR_PRODUCTS. STRUCTURED_DERIVATIVES (and AUTO, which tries it)
call private JAX internals whose signatures changed; nothing here may depend on them.

The project computes its own empirical kernels; neural-tangents serves infinite-width kernels and is
an independent oracle in tests and benchmarks. Nothing else imports neural_tangents directly.
"""

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any, Callable, Iterable

import jax
import jax.extend.core
import jax.interpreters.ad

NT_VERSION = "0.6.5"  # the release these aliases were written and tested against
INSTALL_HINT = "pip install -e '.[nt]'"
# Modules of neural-tangents' own distributions: failing to find one means "not installed".
_NT_DISTRIBUTION_MODULES = frozenset({"neural_tangents", "frozendict"})
_NT_TENSORFLOW_MODULE = "neural_tangents.experimental.empirical_tf.empirical"


class NeuralTangentsUnavailableError(ImportError):
  """neural-tangents is needed by a feature but is not installed or does not import."""


def _safe_map(f: Callable[..., Any], *iterables: Iterable[Any]) -> list[Any]:
  """jax.util.safe_map as it was: `map` into a list that refuses arguments of unequal length."""
  return [f(*args) for args in zip(*iterables, strict=True)]


def _safe_zip(*iterables: Iterable[Any]) -> list[tuple[Any, ...]]:
  """jax.util.safe_zip as it was: `zip` into a list that refuses arguments of unequal length."""
  return list(zip(*iterables, strict=True))


def _add_missing(module: ModuleType, names: dict[str, Callable[[], Any]]) -> None:
  """Sets each missing attribute of `module` from its factory; existing attributes are left alone."""
  for name, make in names.items():
    if not hasattr(module, name):
      setattr(module, name, make())


def _install_aliases() -> None:
  """Adds the names neural-tangents 0.6.5 imports from old JAX; idempotent."""
  _add_missing(jax.core, {name: (lambda name=name: getattr(jax.extend.core, name))
                          for name in ("Jaxpr", "JaxprEqn", "Literal", "Var", "Primitive")})
  # nt only keys its STRUCTURED_DERIVATIVES rule tables on it, a path we do not use.
  _add_missing(jax.interpreters.ad, {"zeros_like_p": lambda: jax.extend.core.Primitive("zeros_like")})
  try:
    util = importlib.import_module("jax.util")
  except ModuleNotFoundError:
    util = sys.modules.setdefault("jax.util", ModuleType("jax.util", "Stand-in for neural-tangents."))
  _add_missing(util, {"safe_map": lambda: _safe_map, "safe_zip": lambda: _safe_zip})


def _without_tensorflow() -> None:
  """Stands in for nt's TensorFlow-model kernels, which ntk_scale never uses; idempotent."""
  stand_in = ModuleType(_NT_TENSORFLOW_MODULE, "neural-tangents' TensorFlow kernels, not loaded here.")

  def unavailable(*args: Any, **kwargs: Any) -> Any:
    raise NeuralTangentsUnavailableError(
        "neural-tangents' kernels of TensorFlow models are not loaded by ntk_scale, which never "
        "uses them (loading them imports tensorflow and tf2jax)")

  stand_in.empirical_ntk_fn_tf = unavailable
  stand_in.get_apply_fn_and_params = unavailable
  sys.modules.setdefault(_NT_TENSORFLOW_MODULE, stand_in)


def load_neural_tangents(feature: str) -> ModuleType:
  """Returns the `neural_tangents` module, made importable on current JAX.

  `feature` names what needs it (e.g. "the neural-tangents baseline of benchmarks/ntk_engine.py"), so
  that a missing or broken install fails with a message saying what is lost and how to fix it.
  """
  _install_aliases()
  try:
    _without_tensorflow()
    return importlib.import_module("neural_tangents")
  except Exception as error:  # whatever breaks the import, the feature is unavailable
    if isinstance(error, ModuleNotFoundError) and error.name in _NT_DISTRIBUTION_MODULES:
      reason = f"it is not installed ({error})"
    else:
      reason = (f"it failed to import on jax {jax.__version__} "
                f"(the compatibility aliases target neural-tangents {NT_VERSION}): "
                f"{type(error).__name__}: {error}")
    raise NeuralTangentsUnavailableError(
        f"{feature} needs neural-tangents, but {reason}. Fix: {INSTALL_HINT}.") from error
