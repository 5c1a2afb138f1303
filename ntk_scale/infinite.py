"""Analytic infinite-width kernels (NTK and NNGP) of fully connected, convolutional and Myrtle networks.

neural-tangents' stax gives, for one architecture, the finite network in NTK parameterisation
(`init_fn`, `apply_fn`) and its infinite-width kernels (`kernel_fn`); both come from one layer list
here, so tests can check the analytic kernel against the Monte-Carlo average of empirical kernels of
the finite networks. This module is the project's only user of neural-tangents (loaded through
`nt_compat`); every other module takes a plain kernel function `(x1, x2) -> [N1, N2]`.

Architectures (`config.infinite.architecture`):
  fc      Flatten, depth x (Dense, ReLU), Dense
  conv    depth x (3x3 SAME Conv, ReLU), Flatten, Dense (CNN-VEC: only the spatial diagonal of
          the covariance is propagated, so it costs about as much as fc times the pixels)
  myrtle  Myrtle-5/7/10 (Shankar et al. 2020): conv stages separated by 2x2 average pools, then a
          global average pool (for 32x32 inputs the same as the paper's three final pools); the
          full spatial covariance is propagated, (H W)^2 per pair of images
"""

import functools
from types import ModuleType
from typing import Callable

import jax
import ml_collections
import numpy as np

from ntk_scale.nt_compat import load_neural_tangents

ARCHITECTURES = ("fc", "conv", "myrtle")
KERNELS = ("ntk", "nngp")
DTYPES = ("float32", "float64")
# Convolution layers per stage of Myrtle-5, -7 and -10 (neural-tangents' Myrtle example).
MYRTLE_STAGES = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}
FEATURE = "the analytic infinite-width kernels of ntk_scale/infinite.py (config.job='infinite')"

KernelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x1 [N1, ...], x2 [N2, ...]) -> [N1, N2]
StaxNetwork = tuple[Callable, Callable, Callable]  # (init_fn, apply_fn, kernel_fn)


def _neural_tangents() -> ModuleType:
  return load_neural_tangents(FEATURE)


def _positive_number(value, field: str, allow_zero: bool = False) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    raise ValueError(f"{field}={value!r} must be a {'non-negative' if allow_zero else 'positive'} "
                     f"number.")


def check_architecture_config(section: ml_collections.ConfigDict,
                              prefix: str = "config.infinite") -> None:
  """Every field that defines the kernel, checked before anything is computed; errors name the field."""
  if section.architecture not in ARCHITECTURES:
    raise ValueError(f"{prefix}.architecture={section.architecture!r} is not a known architecture; "
                     f"expected one of {', '.join(ARCHITECTURES)}.")
  depth = section.depth
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
    raise ValueError(f"{prefix}.depth={depth!r} must be an integer >= 1.")
  if section.architecture == "myrtle" and depth not in MYRTLE_STAGES:
    raise ValueError(f"{prefix}.depth={depth} is not a Myrtle depth; expected one of "
                     f"{', '.join(map(str, MYRTLE_STAGES))}.")
  _positive_number(section.w_std, f"{prefix}.w_std")
  _positive_number(section.b_std, f"{prefix}.b_std", allow_zero=True)
  if section.kernel not in KERNELS:
    raise ValueError(f"{prefix}.kernel={section.kernel!r}; expected one of {', '.join(KERNELS)}.")
  if section.dtype not in DTYPES:
    raise ValueError(f"{prefix}.dtype={section.dtype!r}; expected one of {', '.join(DTYPES)}.")
  batch = section.batch_size
  if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
    raise ValueError(f"{prefix}.batch_size={batch!r} must be an integer >= 1 (images per kernel "
                     f"block).")


def stax_network(architecture: str, depth: int, num_classes: int, *, w_std: float, b_std: float,
                 width: int = 1) -> StaxNetwork:
  """`(init_fn, apply_fn, kernel_fn)` of one architecture; `width` matters only to the finite network."""
  stax = _neural_tangents().stax
  dense = functools.partial(stax.Dense, W_std=w_std, b_std=b_std)
  conv = functools.partial(stax.Conv, width, (3, 3), padding="SAME", W_std=w_std, b_std=b_std)
  if architecture == "fc":
    layers = [stax.Flatten()] + [dense(width), stax.Relu()] * depth
    layers += [dense(num_classes)]
  elif architecture == "conv":
    layers = [conv(), stax.Relu()] * depth + [stax.Flatten(), dense(num_classes)]
  elif architecture == "myrtle":
    first, second, third = MYRTLE_STAGES[depth]
    pool = stax.AvgPool((2, 2), strides=(2, 2))
    layers = [conv(), stax.Relu()] * first + [pool] + [conv(), stax.Relu()] * second + [pool]
    layers += [conv(), stax.Relu()] * third + [stax.GlobalAvgPool(), dense(num_classes)]
  else:
    raise ValueError(f"architecture={architecture!r}; expected one of {', '.join(ARCHITECTURES)}.")
  return stax.serial(*layers)


def network_of(section: ml_collections.ConfigDict, num_classes: int, width: int = 1) -> StaxNetwork:
  """The stax network of `config.infinite` (checked first)."""
  check_architecture_config(section)
  return stax_network(section.architecture, section.depth, num_classes, w_std=section.w_std,
                      b_std=section.b_std, width=width)


def kernel_function(section: ml_collections.ConfigDict, num_classes: int) -> KernelFn:
  """`k(x1, x2) -> [N1, N2]`, the config's analytic kernel (NTK or NNGP) of one output logit.

  A plain jax function: jittable and differentiable in both arguments, so attacks differentiate
  kernel regression through it.
  """
  _, _, kernel_fn = network_of(section, num_classes)
  get = section.kernel
  return lambda x1, x2: kernel_fn(x1, x2, get)


def _padded(x: np.ndarray, multiple: int) -> np.ndarray:
  pad = -len(x) % multiple
  return x if not pad else np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])


def kernel_matrix(section: ml_collections.ConfigDict, num_classes: int, x1: np.ndarray,
                  x2: np.ndarray | None = None) -> np.ndarray:
  """The analytic kernel between two image sets (x2 None: x1 with itself) as a numpy array in
  `config.infinite.dtype`, computed in `batch_size` x `batch_size` blocks by nt.batch, serially on
  one device (memory stays bounded whatever the number of images)."""
  nt = _neural_tangents()
  _, _, kernel_fn = network_of(section, num_classes)
  size = section.batch_size
  with jax.enable_x64(section.dtype == "float64"):
    compiled = jax.jit(kernel_fn, static_argnames="get")
    batched = nt.batch(compiled, batch_size=size, device_count=0, store_on_device=False)
    a = _padded(np.asarray(x1, section.dtype), size)
    b = a if x2 is None else _padded(np.asarray(x2, section.dtype), size)
    kernel = np.asarray(batched(a, b, section.kernel))
  return kernel[:len(x1), :len(x1) if x2 is None else len(x2)]


def empirical_kernel_average(section: ml_collections.ConfigDict, num_classes: int, width: int,
                             x1: np.ndarray, x2: np.ndarray, num_networks: int,
                             seed: int = 0) -> np.ndarray:
  """Monte-Carlo estimate of the NTK: the logit-averaged empirical NTK of `num_networks` random
  finite networks of `width` (same layers, NTK parameterisation), computed by our engine."""
  from ntk_scale.ntk import empirical_ntk  # the project's engine, not neural-tangents'

  init_fn, apply_fn, _ = network_of(section, num_classes, width)
  total = 0.0
  for i in range(num_networks):
    with jax.enable_x64(True):
      _, params = init_fn(jax.random.key(seed + i), x1.shape)
      params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    total = total + empirical_ntk(apply_fn, params, x1, x2, logits="trace", dtype="float64")
  return total / (num_networks * num_classes)
