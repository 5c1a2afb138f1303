"""neural-tangents 0.6.5 loaded through ntk_scale.nt_compat on current JAX, checked against jax.jacrev.

Its empirical kernels are the oracle for our kernel engine, so they are checked here against an explicit
float64 Jacobian contraction; a failed load must name the feature that needed it.
"""

import functools
import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_scale import nt_compat
from ntk_scale.models.cnn import SmallCNN
from ntk_scale.models.mlp import MLP

from conftest import neural_tangents_or_skip

FEATURE = "the neural-tangents oracle of tests/test_nt_compat.py"
SHAPE = (4, 4, 1)
NUM_CLASSES = 3
MODELS = {"mlp": lambda: MLP(num_classes=NUM_CLASSES, width=8, depth=2),
          "cnn": lambda: SmallCNN(num_classes=NUM_CLASSES, width=2)}
# STRUCTURED_DERIVATIVES (and AUTO, which tries it) call private JAX internals that changed: unsupported.
SUPPORTED_IMPLEMENTATIONS = ("JACOBIAN_CONTRACTION", "NTK_VECTOR_PRODUCTS")


@pytest.fixture(scope="module")
def nt():
  """The neural_tangents module; skips only when the optional `nt` extra is not installed."""
  return neural_tangents_or_skip(FEATURE)


@pytest.fixture
def float64():
  with jax.enable_x64(True):
    yield


def _random_params(model, seed: int) -> dict:
  """float64 parameters shaped as `model.init`'s, drawn with numpy (init compiles slowly on CPU)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)), train=False))
  flat = flax.traverse_util.flatten_dict(abstract["params"])
  return flax.traverse_util.unflatten_dict(
      {path: jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])))
       for path, leaf in flat.items()})


def _jacrev_ntk(apply_fn, params, x1, x2) -> jax.Array:
  """Full [N1, N2, C, C] kernel sum_p J1[i, c, p] J2[j, d, p] from explicit Jacobians."""
  def flat_jacobian(x):
    leaves = jax.tree.leaves(jax.jacrev(apply_fn)(params, x))
    return jnp.concatenate([leaf.reshape(*leaf.shape[:2], -1) for leaf in leaves], axis=-1)
  return jnp.einsum("icp,jdp->ijcd", flat_jacobian(x1), flat_jacobian(x2))


def _relative_error(actual, expected) -> float:
  return float(jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected)))


@functools.cache
def _case(name: str):
  """A model's apply function, float64 parameters and inputs, and the jacrev kernel (built once per model)."""
  model = MODELS[name]()
  params = _random_params(model, seed=0)
  apply_fn = lambda params, x: model.apply({"params": params}, x, train=False)
  rng = np.random.default_rng(1)
  x1, x2 = (jnp.asarray(rng.normal(size=(n, *SHAPE))) for n in (3, 2))
  expected = jax.jit(lambda *args: _jacrev_ntk(apply_fn, *args))(params, x1, x2)
  return apply_fn, params, x1, x2, expected


# nt's _std_basis (NTK_VECTOR_PRODUCTS) calls jnp.size on a ShapeDtypeStruct: deprecated in jax 0.10,
# to become an error; this test then fails and the compat layer needs one more adapter.
@pytest.mark.filterwarnings("ignore:size requires ndarray or scalar arguments:DeprecationWarning")
@pytest.mark.parametrize("implementation", SUPPORTED_IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_empirical_ntk_matches_float64_jacobian_contraction(nt, float64, name, implementation):
  apply_fn, params, x1, x2, expected = _case(name)
  assert expected.dtype == jnp.float64
  full_and_mean_over_logits = [
      nt.empirical_ntk_fn(apply_fn, trace_axes=trace_axes, vmap_axes=0,
                          implementation=getattr(nt.NtkImplementation, implementation))
      for trace_axes in ((), (-1,))]
  full, traced = jax.jit(lambda *args: [ntk(*args) for ntk in full_and_mean_over_logits])(x1, x2, params)
  assert full.shape == (3, 2, NUM_CLASSES, NUM_CLASSES) and full.dtype == jnp.float64
  assert _relative_error(full, expected) < 1e-10
  # nt's default trace_axes=(-1,) is the mean over logits (trace / C), not the sum.
  assert _relative_error(traced, jnp.einsum("ijcc->ij", expected) / NUM_CLASSES) < 1e-10


def test_analytic_stax_ntk_is_symmetric_positive_semidefinite(nt, float64):
  _, _, kernel_fn = nt.stax.serial(nt.stax.Dense(512), nt.stax.Relu(), nt.stax.Dense(1))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 5)))
  kernel = np.asarray(kernel_fn(x, None, "ntk"))
  assert kernel.shape == (6, 6) and np.all(np.isfinite(kernel))
  np.testing.assert_allclose(kernel, kernel.T, rtol=1e-12)
  assert np.linalg.eigvalsh(kernel).min() > -1e-10 * np.abs(kernel).max()


def test_aliases_only_add_missing_names(monkeypatch):
  import jax.core
  import jax.extend.core

  existing = object()
  monkeypatch.setattr(jax.core, "Jaxpr", existing, raising=False)
  shaped_array = jax.core.ShapedArray
  for _ in range(2):  # idempotent
    nt_compat._install_aliases()
  assert jax.core.Jaxpr is existing and jax.core.ShapedArray is shaped_array
  assert getattr(jax.core, "JaxprEqn") is jax.extend.core.JaxprEqn
  from jax.util import safe_map, safe_zip
  assert safe_zip([1, 2], "ab") == [(1, "a"), (2, "b")]
  assert safe_map(lambda a, b: a + b, [1, 2], [3, 4]) == [4, 6]
  with pytest.raises(ValueError):
    safe_zip([1, 2], [3])


class _BrokenNeuralTangents:
  """A meta-path finder under which `import neural_tangents` fails as it does on jax >= 0.6 unaided."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname == "neural_tangents":
      raise ImportError("cannot import name 'Jaxpr' from 'jax.core'")
    return None


def test_missing_install_names_the_feature_and_the_fix(monkeypatch):
  monkeypatch.setitem(sys.modules, "neural_tangents", None)  # what an absent package looks like
  with pytest.raises(nt_compat.NeuralTangentsUnavailableError) as raised:
    nt_compat.load_neural_tangents(FEATURE)
  message = str(raised.value)
  assert isinstance(raised.value, ImportError)
  assert FEATURE in message and "not installed" in message and nt_compat.INSTALL_HINT in message


def test_failed_import_names_the_feature_the_error_and_the_fix(monkeypatch):
  monkeypatch.delitem(sys.modules, "neural_tangents", raising=False)
  monkeypatch.setattr(sys, "meta_path", [_BrokenNeuralTangents(), *sys.meta_path])
  with pytest.raises(nt_compat.NeuralTangentsUnavailableError) as raised:
    nt_compat.load_neural_tangents(FEATURE)
  message = str(raised.value)
  assert FEATURE in message and "failed to import" in message and nt_compat.INSTALL_HINT in message
  assert "cannot import name 'Jaxpr' from 'jax.core'" in message
  assert isinstance(raised.value.__cause__, ImportError)


def test_safe_map_refuses_arguments_of_unequal_length():
  """jax.util.safe_map, as neural-tangents relies on it: a shorter argument is an error, not a
  silently shorter result."""
  nt_compat._install_aliases()
  from jax.util import safe_map
  assert safe_map(lambda a, b: a * b, [1, 2], [3, 4]) == [3, 8]
  with pytest.raises(ValueError):
    safe_map(lambda a, b: a + b, [1, 2], [3])


class _FailingImport:
  """A meta-path finder under which `import neural_tangents` fails with `error`."""

  def __init__(self, error):
    self.error = error

  def find_spec(self, fullname, path=None, target=None):
    if fullname == "neural_tangents":
      raise self.error
    return None


@pytest.mark.parametrize("error, reason", [
    # One of nt's own distributions missing: not installed.
    (ModuleNotFoundError("No module named 'frozendict'", name="frozendict"), "not installed"),
    # A name missing from an installed nt, or any other error: a broken import, named.
    (ImportError("cannot import name 'stax' from 'neural_tangents'", name="neural_tangents"),
     "failed to import"),
    (AttributeError("module 'jax' has no attribute 'tree_map'"), "failed to import"),
    # A JAX module nt imports that newer JAX removed: nt is installed, its import is broken.
    (ModuleNotFoundError("No module named 'jax.experimental.host_callback'",
                         name="jax.experimental.host_callback"), "failed to import"),
])
def test_an_import_failure_is_told_apart_as_missing_or_broken(monkeypatch, error, reason):
  """Whatever breaks the import becomes NeuralTangentsUnavailableError naming the feature and the
  fix; "not installed" only where one of nt's own distributions is missing (frozendict
  included), so that a broken install is not mistaken for an absent one."""
  monkeypatch.delitem(sys.modules, "neural_tangents", raising=False)
  monkeypatch.setattr(sys, "meta_path", [_FailingImport(error), *sys.meta_path])
  with pytest.raises(nt_compat.NeuralTangentsUnavailableError) as raised:
    nt_compat.load_neural_tangents(FEATURE)
  message = str(raised.value)
  assert reason in message and FEATURE in message and nt_compat.INSTALL_HINT in message
  assert str(error) in message and raised.value.__cause__ is error


@pytest.mark.parametrize("tensorflow", ["absent", "installed"])
def test_loads_without_tensorflow_and_only_its_tensorflow_kernels_refuse(nt, tensorflow):
  """Where TensorFlow is absent (the GPU images) nt still computes kernels, and where it is installed
  nt does not import it (~5 s: its kernels of TensorFlow models, which nothing here uses); those
  kernels say why not."""
  del nt  # only for the skip when neural-tangents is not installed
  absent = 'sys.modules["tensorflow"] = sys.modules["tf2jax"] = None' if tensorflow == "absent" else ""
  program = textwrap.dedent(f"""
      import sys
      {absent}
      import jax.numpy as jnp
      from ntk_scale import nt_compat
      nt = nt_compat.load_neural_tangents("test")
      assert sys.modules.get("tensorflow") is None and sys.modules.get("tf2jax") is None
      fn = nt.empirical_ntk_fn(lambda p, x: x @ p, trace_axes=(), vmap_axes=0)
      k = fn(jnp.ones((2, 3)), None, jnp.eye(3)[:, :2])
      assert k.shape == (2, 2, 2, 2), k.shape  # f(x) = x @ p: K[i, j, c, d] = <x_i, x_j> delta_cd = 3 delta_cd
      assert float(abs(k - 3 * jnp.eye(2)[None, None]).max()) == 0.0, k
      try:
        nt.experimental.empirical_ntk_fn_tf(None)
      except nt_compat.NeuralTangentsUnavailableError as error:
        assert "tensorflow" in str(error)
      else:
        raise AssertionError("empirical_ntk_fn_tf ran without TensorFlow")
      print("ok")
      """)
  result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
