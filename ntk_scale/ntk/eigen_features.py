"""Eigen-features of a kernel (Tsilivis & Kempe 2022): how useful and how robust is each eigen-direction?

For a kernel K = V diag(lambda) V^T on training points X with regression targets Y (one-hot minus
1/C), feature i is f_i(x) = lambda_i^{-1} K(x, X) v_i v_i^T Y; the features of all eigenvalues
above the numerical floor sum to ridgeless kernel regression K(x, X) K^+ Y. Features are taken one
by one for the top `num_single` eigenvalues and in log-spaced groups (indices [k, 2k), [2k, 4k), ...)
after them, a group's predictor being the sum of its features.

For an empirical NTK, K(x, X) = J(x) J(X)^T with J the Jacobian of the kernel's logit (a class, or
the sum of logits for "trace"), so a group's predictor is J(x) W_g with the parameter directions
W_g = J(X)^T V_g diag(1/lambda_g) V_g^T Y (J(X) formed a chunk of examples at a time): the
per-example gradient J(x) times W_g gives it at any x, differentiably, so attacks run against each
feature directly. The same `group_coefficients` serve any kernel function K(x, X).
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ntk_scale.ntk.tile_math import LogitSpec


@dataclasses.dataclass(frozen=True)
class FeatureGroup:
  name: str  # "3" for a single eigen-index, "10-19" for a group
  indices: np.ndarray  # eigen-indices, largest eigenvalue first (0-based)


def feature_groups(eigenvalues: np.ndarray, num_single: int, rtol: float = 1e-10) -> list[FeatureGroup]:
  """Single features for the top `num_single` indices, then doubling groups up to the numerical rank
  (eigenvalues above rtol * largest; below, 1/lambda amplifies rounding only)."""
  rank = int(np.sum(eigenvalues > rtol * eigenvalues[0]))
  groups = [FeatureGroup(str(i), np.array([i])) for i in range(min(num_single, rank))]
  start = min(num_single, rank)
  width = max(start, 1)
  while start < rank:
    stop = min(start + width, rank)
    groups.append(FeatureGroup(f"{start}-{stop - 1}", np.arange(start, stop)))
    start, width = stop, width * 2
  return groups


def group_coefficients(eigenvalues: np.ndarray, eigenvectors: np.ndarray, targets: np.ndarray,
                       groups: list[FeatureGroup]) -> np.ndarray:
  """A_g = V_g diag(1/lambda_g) V_g^T Y for each group: [G, N, C]; predictor g(x) = K(x, X) A_g."""
  out = []
  for group in groups:
    v = eigenvectors[:, group.indices]
    out.append(v @ ((v.T @ targets) / eigenvalues[group.indices, None]))
  return np.stack(out)


def _scalar_logit(apply_fn: Callable, spec: LogitSpec) -> Callable:
  """theta, x -> the kernel's logit per example [B]: one class, or the sum over classes."""
  if spec.kind == "full":
    raise ValueError("eigen-features need a kernel of one logit or the trace; got logits 'full' "
                     "(config.kernel.logits).")

  def logit(params, x):
    out = apply_fn(params, x)
    return out[:, spec.index] if spec.kind == "class" else out.sum(-1)

  return logit


def _per_example_gradients(apply_fn: Callable, spec: LogitSpec, unravel: Callable) -> Callable:
  """(theta, x [B, ...]) -> the gradient of the kernel's logit for each example, [B, P]."""
  logit = _scalar_logit(apply_fn, spec)
  return jax.vmap(jax.grad(lambda t, x: logit(unravel(t), x[None])[0]), in_axes=(None, 0))


def parameter_directions(apply_fn: Callable, params, train_images: jax.Array, coefficients: jax.Array,
                         spec: LogitSpec, chunk: int = 128) -> jax.Array:
  """W = J(X)^T A for every group and class column: [G, C, P] from A [G, N, C].

  J(X) is formed `chunk` training examples at a time (one reverse pass each) and contracted at
  once: G * C VJPs over all N examples would cost G * C times more reverse passes.
  """
  theta, unravel = ravel_pytree(params)
  per_example = _per_example_gradients(apply_fn, spec, unravel)
  contract = jax.jit(lambda t, x, a: jnp.einsum("np,gnc->gcp", per_example(t, x), a,
                                                precision=jax.lax.Precision.HIGHEST))
  total = None
  for start in range(0, train_images.shape[0], chunk):
    part = contract(theta, train_images[start:start + chunk], coefficients[:, start:start + chunk])
    total = part if total is None else total + part
  return total


def feature_logits_fn(apply_fn: Callable, params, directions: jax.Array, spec: LogitSpec) -> Callable:
  """x -> [G, B, C]: every group's predictor J(x) W_g, from the per-example gradients J(x) [B, P]
  (one reverse pass per example, shared by all G * C directions: C JVPs per group cost C times more)."""
  theta, unravel = ravel_pytree(params)
  per_example = _per_example_gradients(apply_fn, spec, unravel)

  def logits(x: jax.Array) -> jax.Array:
    grads = per_example(theta, x)  # [B, P]
    return jnp.einsum("bp,gcp->gbc", grads, directions, precision=jax.lax.Precision.HIGHEST)

  return logits
