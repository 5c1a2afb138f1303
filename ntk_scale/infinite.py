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
import hashlib
import json
import os
from types import ModuleType
from typing import Callable

import jax
import ml_collections
import numpy as np

from ntk_scale import parallel
from ntk_scale.config_numbers import is_finite_number, is_whole_number
from ntk_scale.nt_compat import load_neural_tangents
from ntk_scale.ntk.function_tiles import function_kernel
from ntk_scale.ntk.store import KernelStore, open_on_every_process

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
  if not (is_finite_number(value) and (value >= 0 if allow_zero else value > 0)):
    raise ValueError(f"{field}={value!r} must be a {'non-negative' if allow_zero else 'positive'} "
                     f"finite number.")


def check_architecture_config(section: ml_collections.ConfigDict,
                              prefix: str = "config.infinite") -> None:
  """Every field that defines the kernel, checked before anything is computed; errors name the field."""
  if section.architecture not in ARCHITECTURES:
    raise ValueError(f"{prefix}.architecture={section.architecture!r} is not a known architecture; "
                     f"expected one of {', '.join(ARCHITECTURES)}.")
  depth = section.depth
  if not is_whole_number(depth, 1):
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
  parallel.check_float64_devices(section.dtype, f"{prefix}.dtype", "use 'float32'")
  batch = section.batch_size
  if not is_whole_number(batch, 1):
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
  kernel regression through it. One function object per kernel (its compilations are reused).
  """
  check_architecture_config(section)
  return _kernel_function(section.architecture, section.depth, num_classes, float(section.w_std),
                          float(section.b_std), section.kernel)


@functools.lru_cache(maxsize=16)
def _kernel_function(architecture: str, depth: int, num_classes: int, w_std: float, b_std: float,
                     get: str) -> KernelFn:
  _, _, kernel_fn = stax_network(architecture, depth, num_classes, w_std=w_std, b_std=b_std)
  return lambda x1, x2: kernel_fn(x1, x2, get)


def kernel_identity(section: ml_collections.ConfigDict, images: np.ndarray) -> dict:
  """What makes two analytic kernels of an image set with itself the same: the kernel's fields
  and the images (a digest)."""
  digest = hashlib.sha256(np.ascontiguousarray(images, section.dtype).tobytes()).hexdigest()
  fields = {k: section[k] for k in ("architecture", "depth", "w_std", "b_std", "kernel")}
  return {"source": {"infinite": fields}, "dtype": section.dtype, "images": digest,
          "shape": [len(images), len(images)]}


def kernel_store_name(section: ml_collections.ConfigDict, x1: np.ndarray) -> str:
  """The directory name of `kernel_store`'s kernel of x1, known without creating it: a job can
  key its own results on the kernel (the digest changes with the images, so with the subset)."""
  identity = kernel_identity(section, x1)
  digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
  return f"infinite_{section.architecture}{section.depth}_{section.kernel}_{len(x1)}_{digest}"


def kernel_store(section: ml_collections.ConfigDict, kernels_dir: str, x1: np.ndarray,
                 labels: np.ndarray) -> KernelStore:
  """The store of the analytic kernel of x1 with itself in tiles of `config.infinite.batch_size`,
  created or resumed on every process: pass it to `kernel_matrix(..., store=)`. `labels`: x1's.
  It lives at `<kernels_dir>/infinite_<architecture><depth>_<kernel>_<N>_<digest>/`, the digest
  one of the kernel's fields and images, so jobs that need the same kernel share it."""
  identity = kernel_identity(section, x1)
  # The kernel of one logit, which every logit shares (the analytic kernel is K x identity).
  meta = {**identity, "tile": section.batch_size, "logits": "each", "method": "analytic"}
  # Its name is a digest of its identity: a store there holding another kernel is damaged or stale.
  return open_on_every_process(os.path.join(kernels_dir, kernel_store_name(section, x1)), meta,
                               tuple(identity), np.arange(len(x1)), np.asarray(labels),
                               remedy="Delete the directory to recompute it (its name is a digest of "
                                      "the kernel's fields and images).")


def kernel_matrix(section: ml_collections.ConfigDict, num_classes: int, x1: np.ndarray,
                  x2: np.ndarray | None = None, *, store: KernelStore | None = None) -> np.ndarray:
  """The analytic kernel between two image sets (x2 None: x1 with itself) as a numpy array in
  `config.infinite.dtype`, in `batch_size` x `batch_size` tiles spread over every device of every
  host (ntk/function_tiles.py); with `store` (`kernel_store`), streamed to disk and resumable, in
  the store's own tiles (a kernel stored under another batch_size is resumed, not refused)."""
  kernel_fn = kernel_function(section, num_classes)
  with jax.enable_x64(section.dtype == "float64"):
    return function_kernel(kernel_fn, np.asarray(x1, section.dtype),
                           None if x2 is None else np.asarray(x2, section.dtype),
                           tile=section.batch_size if store is None else store.tile, store=store)


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
