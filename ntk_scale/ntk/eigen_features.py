"""Eigen-features of a kernel (Tsilivis & Kempe 2022): how useful and how robust is each eigen-direction?

For a kernel K = V diag(lambda) V^T on training points X with regression targets Y (one-hot minus
1/C), feature i is f_i(x) = lambda_i^{-1} K(x, X) v_i v_i^T Y; the features of all eigenvalues
above the numerical floor sum to ridgeless kernel regression K(x, X) K^+ Y. Features are taken one
by one for the top `num_single` eigenvalues and in log-spaced groups (indices [k, 2k), [2k, 4k), ...)
after them, a group's predictor being the sum of its features.

For an empirical NTK, K(x, X) = sum_c J_c(x) J_c(X)^T over the kernel's logits c (one class, or
every logit for "trace": the sum of the per-logit kernels, not the kernel of the summed logit), so
a group's predictor is sum_c J_c(x) W_gc with the parameter directions
W_gc = J_c(X)^T V_g diag(1/lambda_g) V_g^T Y (J(X) formed a chunk of examples at a time): the
per-example Jacobian rows J_c(x) times W_gc give it at any x, differentiably, so attacks run against
each feature directly. A trace kernel's directions are C times a class kernel's (G * C * C * P
numbers). The same `group_coefficients` serve any kernel function K(x, X).
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec as P

from ntk_scale import parallel
from ntk_scale.ntk.conv_weight_gradients import evaluate_program
from ntk_scale.ntk.plan import device_budget_bytes
from ntk_scale.ntk.tile_math import LogitSpec


@dataclasses.dataclass(frozen=True)
class FeatureGroup:
  name: str  # "3" for a single eigen-index, "10-19" for a group
  indices: np.ndarray  # eigen-indices, largest eigenvalue first (0-based)


def feature_groups(eigenvalues: np.ndarray, num_single: int, floor: float = 0.0) -> list[FeatureGroup]:
  """Single features for the top `num_single` indices, then doubling groups up to the numerical rank:
  the eigenvalues above `floor` (spectrum.rounding_floor of the kernel's dtype and trace; below it
  an eigenvalue is rounding, which 1/lambda would amplify into a "feature")."""
  rank = int(np.sum(eigenvalues > floor))
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


def _jacobian_rows(apply_fn: Callable, spec: LogitSpec, unravel: Callable) -> Callable:
  """(theta, x [B, ...]) -> the Jacobian rows of the kernel's logits for each example, [B, C', P]:
  one row for a class kernel, one per logit for a trace kernel."""
  if spec.kind == "full":
    raise ValueError("eigen-features need a kernel of one logit or the trace; got logits 'full' "
                     "(config.kernel.logits).")

  def logits(theta, x):
    out = apply_fn(unravel(theta), x[None])[0]
    return out[spec.index][None] if spec.kind == "class" else out

  def rows(theta, x):
    # Convolutions' weight gradients as patch matmuls (conv_weight_gradients.py), as the kernel
    # engine forms them. JAX's own rule makes them one convolution with a feature group per
    # example, which XLA's SPMD partitioner got wrong with the batch sharded over devices (jax
    # 0.10.2, CPU: every example off the first device; the group predictors of a CNN scored 0.333
    # on 4 devices where 1 device gave 0.9).
    program = jax.make_jaxpr(logits)(theta, x[0])
    per_example = lambda t, e: evaluate_program(program.jaxpr, program.consts, [t, e])[0]
    return jax.vmap(jax.jacrev(per_example), in_axes=(None, 0))(theta, x)

  return rows


MAX_CHUNK = 128


def most_rows(rank: int, num_single: int) -> int:
  """Rows of the job's coefficients (every group, then their sum) for a kernel of numerical rank
  at most `rank`: what the parameter directions hold at most, before the kernel exists."""
  return len(feature_groups(np.ones(rank), num_single)) + 1


def examples_per_device(budget_bytes: float, num_rows: int, logits: int, num_classes: int,
                        num_params: int, num_examples: int, num_devices: int, itemsize: int = 4,
                        budget_field: str = "config.kernel.memory_budget_gb") -> int:
  """Training examples per device and step of `parameter_directions`: their Jacobian rows (twice,
  for the reverse pass's cotangents) beside the device's sum of the directions, [num_rows, logits,
  num_classes, num_params], counted twice (the devices' sums are added into a second copy at the
  end); at most MAX_CHUNK and a device's share of the examples. Refuses a budget too small for
  one, naming the fields that change it and `budget_field`, where the budget came from."""
  row_bytes = logits * num_params * itemsize
  accumulator_bytes = num_rows * num_classes * row_bytes
  chunk = int((budget_bytes - 2 * accumulator_bytes) // (2 * row_bytes))
  if chunk < 1:
    gib = lambda b: f"{b / 2**30:.3g} GiB"
    raise ValueError(
        f"the eigen-features' parameter directions ({num_rows} groups x {logits} kernel logit(s) x "
        f"{num_classes} classes x {num_params} parameters) take {gib(accumulator_bytes)} per device, "
        f"twice while summed, and each training example's Jacobian rows {gib(2 * row_bytes)}, but "
        f"the budget is {gib(budget_bytes)} ({budget_field}): use a class kernel rather than the "
        f"trace (config.kernel.logits), fewer single features (config.eigen_features.num_single), "
        f"or raise the budget.")
  return min(chunk, MAX_CHUNK, -(-num_examples // num_devices))


def directions_program(apply_fn: Callable, spec: LogitSpec, unravel: Callable, mesh: Mesh) -> Callable:
  """(theta, images [D * chunk, ...], coefficients [D * chunk, G, K], total [D, G, C', K, P]) ->
  total plus every device's own examples' J_c(x)^T A terms, in its own slice (total donated)."""
  rows = _jacobian_rows(apply_fn, spec, unravel)
  data = P(parallel.DATA_AXIS)

  def accumulate(theta, x, a, total):  # one device: x [chunk, ...], a [chunk, G, K], total [1, ...]
    return total + jnp.einsum("ncp,ngk->gckp", rows(theta, x), a,
                              precision=jax.lax.Precision.HIGHEST)[None]

  return jax.jit(jax.shard_map(accumulate, mesh=mesh, in_specs=(P(), data, data, data),
                               out_specs=data, check_vma=False), donate_argnums=3)


def parameter_directions(apply_fn: Callable, params, train_images: np.ndarray, coefficients: np.ndarray,
                         spec: LogitSpec, *, chunk: int | None = None, mesh: Mesh | None = None,
                         memory_budget_bytes: float | None = None) -> np.ndarray:
  """W_c = J_c(X)^T A for every group, kernel logit c and target column: [G, C', K, P] from
  A [G, N, K] (C' = 1 for a class kernel, C for a trace kernel), as numpy on every process.

  J(X) is formed `chunk` training examples per device at a time on every device of every host
  (`mesh`, default all; one reverse pass per example and logit) and contracted at once: G * K
  VJPs over all N examples would cost G * K times more reverse passes. Each device sums its own
  examples' terms; the devices' sums are added once, at the end. `chunk` None: as many as
  `memory_budget_bytes` per device leaves room for (default: plan.device_budget_bytes).
  """
  mesh = mesh or parallel.make_mesh()
  theta, unravel = ravel_pytree(params)
  num_rows, n, k = coefficients.shape
  logits = spec.rows_per_example
  if chunk is None:
    chunk = examples_per_device(memory_budget_bytes or device_budget_bytes(jax.local_devices()[0]),
                                num_rows, logits, k, theta.size, n, mesh.size, theta.dtype.itemsize)
  per_step = chunk * mesh.size
  padded = -(-n // per_step) * per_step  # padding examples get zero coefficients
  arrays = {"images": np.zeros((padded, *train_images.shape[1:]), train_images.dtype),
            "weights": np.zeros((padded, num_rows, k), coefficients.dtype)}
  arrays["images"][:n], arrays["weights"][:n] = train_images, np.moveaxis(coefficients, 1, 0)
  program = directions_program(apply_fn, spec, unravel, mesh)
  total = jax.jit(lambda: jnp.zeros((mesh.size, num_rows, logits, k, theta.size), theta.dtype),
                  out_shardings=parallel.batch_sharding(mesh))()
  theta = parallel.replicate(theta, mesh)
  for start in range(0, padded, per_step):
    batch = parallel.global_batch(mesh, arrays, np.arange(start, start + per_step))
    total = program(theta, batch["images"], batch["weights"], total)
  summed = jax.jit(lambda t: t.sum(0), out_shardings=parallel.replicated_sharding(mesh))(total)
  return parallel.local_copy(summed)


def feature_logits_fn(apply_fn: Callable, params, directions: jax.Array, spec: LogitSpec) -> Callable:
  """x -> [G, B, K]: every group's predictor sum_c J_c(x) W_gc, from the per-example Jacobian rows
  J(x) [B, C', P] (a reverse pass per example and logit, shared by all G * K directions: K JVPs
  per group cost K times more)."""
  theta, unravel = ravel_pytree(params)
  rows = _jacobian_rows(apply_fn, spec, unravel)

  def logits(x: jax.Array) -> jax.Array:
    return jnp.einsum("bcp,gckp->gbk", rows(theta, x), directions,
                      precision=jax.lax.Precision.HIGHEST)

  return logits
