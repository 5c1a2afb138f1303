"""The arithmetic of one kernel tile: Jacobian rows, their contraction, and NTK-vector products.

Theta(x, x') = J(x) J(x')^T with J = d f(x; theta) / d theta, for the logits chosen by a
`LogitSpec`: "trace" (sum over logits of the per-logit kernels), one class index, or "full"
(every logit pair). Two ways to form a tile K[rows, cols]:

  jacobian  Jacobian rows of both blocks (one reverse pass per example and logit), then one
            matmul per parameter group. Fast, but holds T * C' * P numbers per block. Factored
            layers (factored_layers.py) keep their inputs and output cotangents instead of their
            weight gradients and add their share from the Grams of those.
  ntvp      for each column example, its Jacobian rows (C' * P numbers), pushed through the row
            block by forward-mode JVPs: K[:, j] = J(rows) J(x_j)^T. No block Jacobian is stored;
            costs about 3 forward passes of the row block per column example and logit.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from ntk_scale.ntk.factored_layers import (FactoredLayer, FactoredProgram, choose, factored_gram,
                                           find_layers, trace)

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]  # (params, x[N, ...]) -> logits[N, C]


@dataclasses.dataclass(frozen=True)
class LogitSpec:
  """Which logits the kernel covers: kind "trace" | "class" | "full"; `index` for "class"."""
  kind: str
  num_classes: int
  index: int | None = None

  @property
  def rows_per_example(self) -> int:
    """Jacobian rows per example (C'): one per logit, or one for a single class."""
    return 1 if self.kind == "class" else self.num_classes

  @property
  def tile_suffix(self) -> tuple[int, ...]:
    """Trailing dimensions of a kernel entry: (C, C) for "full", none otherwise."""
    return (self.num_classes, self.num_classes) if self.kind == "full" else ()

  def matrix_rows(self, num_examples: int) -> int:
    """Rows of the kernel as a matrix (spectrum.as_matrix): N, or N * C for "full"."""
    return num_examples * (self.num_classes if self.kind == "full" else 1)

  def describe(self) -> str:
    return f"class {self.index}" if self.kind == "class" else self.kind


def parse_logits(logits: str | int, num_classes: int, field: str = "logits") -> LogitSpec:
  """"trace", "full", or a class index (int, or a string of digits as a config gives it)."""
  if isinstance(logits, str) and logits in ("trace", "full"):
    return LogitSpec(logits, num_classes)
  try:
    index = int(logits)
  except (TypeError, ValueError):
    index = None
  if index is None or isinstance(logits, (bool, float)) or not 0 <= index < num_classes:
    raise ValueError(f"{field}={logits!r} is not a logits mode; expected 'trace', 'full' or a class "
                     f"index in [0, {num_classes}).")
  return LogitSpec("class", num_classes, index)


MAX_PARAMETER_GROUPS = 8


def parameter_groups(params: PyTree, max_groups: int = MAX_PARAMETER_GROUPS) -> tuple[int, ...]:
  """Where the raveled parameter vector is cut into about `max_groups` runs of whole arrays of
  about equal size: the offsets of the cuts, 0 and P included.

  Jacobian rows are kept per group, not as one [T, C', P] matrix: forming one matrix from
  per-array gradients holds both (2x the block), and a tile's contraction could not start before
  the whole block existed, where per group XLA contracts and frees each group's rows as they
  come (neural-tangents' per-array contraction fits a ResNet-18 trace kernel of 256 images on
  an H100 that way). A few groups, not one per array: XLA:GPU autotunes every distinct matmul,
  a minute per program with one per array.
  """
  sizes = [int(np.prod(np.shape(a))) for a in jax.tree.leaves(params)]
  target = sum(sizes) / max_groups
  cuts, total, since = [0], 0, 0
  for size in sizes:
    if since and since + size > target:
      cuts.append(total)
      since = 0
    total += size
    since += size
  return tuple(cuts) + (total,)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("groups", "inputs", "cotangents"), meta_fields=("layers",))
@dataclasses.dataclass(frozen=True)
class JacobianRows:
  """A block's Jacobian rows: of the parameters not in factored layers, cut into groups (see
  `parameter_groups`), [T, C', P_g] each; of each factored layer (factored_layers.py) its input
  [T, C_in, *positions] and output cotangents [T, C', C_out, *positions]."""
  groups: tuple[jax.Array, ...]
  inputs: tuple[jax.Array, ...] = ()
  cotangents: tuple[jax.Array, ...] = ()
  layers: tuple[FactoredLayer, ...] = ()

  @property
  def num_examples(self) -> int:
    return self.groups[0].shape[0]


def _factored_program(apply_fn: ApplyFn, params: PyTree, example: Any, spec: LogitSpec,
                      factoring: str) -> tuple[FactoredProgram, list[Any]]:
  """(The model as a program of its parameter leaves and a batch, with the layers `factoring`
  chooses factored; its leaves)."""
  leaves, treedef = jax.tree.flatten(params)
  closed = trace(lambda leaves, x: apply_fn(jax.tree.unflatten(treedef, leaves), x), leaves,
                 example)
  layers = choose(find_layers(closed, len(leaves)), spec.rows_per_example, spec.kind, factoring)
  return FactoredProgram(closed, layers), leaves


def factored_layers_of(apply_fn: ApplyFn, params: PyTree, example: Any, spec: LogitSpec,
                       factoring: str) -> tuple[FactoredLayer, ...]:
  """The layers whose rows `jacobian_rows` keeps as factors for `factoring` ("auto" | "all" |
  "none", factored_layers.choose); `example` one batch of one example, array or shape."""
  return _factored_program(apply_fn, params, example, spec, factoring)[0].layers


def jacobian_rows(apply_fn: ApplyFn, params: PyTree, x: jax.Array, spec: LogitSpec,
                  first_logit: jax.Array | int = 0, num_logits: int | None = None,
                  factoring: str = "none") -> JacobianRows:
  """Per-example Jacobians of the chosen logits with respect to all parameters (see JacobianRows;
  `factoring` says which layers keep factors instead, see `factored_layers_of`). With `num_logits`
  ("trace" only), of logits first_logit .. first_logit + num_logits - 1 only (`first_logit` may be
  traced): a trace kernel is a sum over logits and can be formed a chunk of logits at a time.

  One vmapped reverse pass per example (and logit): examples never mix, which holds for any model
  in inference mode (BatchNorm on running averages). Convolutions' weight gradients are batched
  matmuls of patches (see conv_weight_gradients.py).
  """
  program, leaves = _factored_program(apply_fn, params, x[:1], spec, factoring)
  layers = program.layers
  fixed = {layer.leaf: leaves[layer.leaf] for layer in layers}
  rest = [a for i, a in enumerate(leaves) if i not in fixed]
  theta, unravel = ravel_pytree(rest)
  cuts = parameter_groups(rest)
  groups = tuple(theta[a:b] for a, b in zip(cuts[:-1], cuts[1:]))
  first = jnp.asarray(first_logit, jnp.int32)

  def logits_of(group_vectors, perturbations, example, first):
    free = iter(unravel(jnp.concatenate(group_vectors)))
    all_leaves = [fixed[i] if i in fixed else next(free) for i in range(len(leaves))]
    out, inputs = program(all_leaves, example[None], perturbations)
    out = out[0]
    if spec.kind == "class":
      out = out[spec.index][None]
    elif num_logits is not None:
      out = lax.dynamic_slice_in_dim(out, first, num_logits)
    return out, inputs

  per_example = jax.jacrev(logits_of, argnums=(0, 1), has_aux=True)
  perturbations = program.zero_perturbations(theta.dtype if rest else leaves[0].dtype)
  (rows, cotangents), inputs = jax.vmap(per_example, in_axes=(None, None, 0, None))(
      groups, perturbations, x, first)
  return JacobianRows(rows, inputs, cotangents, layers)


def symmetric_tile_by_logit_chunks(apply_fn: ApplyFn, params: PyTree, x: jax.Array, spec: LogitSpec,
                                   precision: lax.Precision, pieces: int, chunk: int,
                                   factoring: str = "none") -> jax.Array:
  """The trace kernel of x with itself, summed over chunks of `chunk` logits in a sequential loop:
  only one chunk's Jacobian rows (T * chunk * P numbers) exist at a time, at the price of one
  more forward pass per chunk."""
  if spec.kind != "trace" or spec.num_classes % chunk:
    raise ValueError(f"logit chunks of {chunk} need a trace kernel over a multiple of {chunk} logits.")

  def add_chunk(total, first):
    rows = jacobian_rows(apply_fn, params, x, spec, first, chunk, factoring)
    return total + contract_symmetric(rows, spec, precision, pieces), None

  firsts = jnp.arange(0, spec.num_classes, chunk, dtype=jnp.int32)
  zero = jnp.zeros((x.shape[0],) * 2, jnp.result_type(*jax.tree.leaves(params)))  # x may be tokens
  total, _ = lax.scan(add_chunk, zero, firsts)
  return total


def contract(rows: JacobianRows, cols: JacobianRows, spec: LogitSpec,
             precision: lax.Precision) -> jax.Array:
  """K[i, j] (or K[i, j, c, d] for "full") from two blocks' Jacobian rows.

  trace/class: one matmul per group over the flattened (logit, parameter) axis, which sums the
  per-logit kernels; full: one matmul per group over the parameter axis with logits kept apart.
  Factored layers add their share from the Grams of their factors (factored_layers.py).
  """
  t1, t2, k = rows.num_examples, cols.num_examples, rows.groups[0].shape[1]
  keep = k if spec.kind == "full" else 1  # logits kept apart as matrix rows
  total = sum(lax.dot_general(r.reshape(t1 * keep, -1), c.reshape(t2 * keep, -1),
                              (((1,), (1,)), ((), ())), precision=precision)
              for r, c in zip(rows.groups, cols.groups))
  for layer, a1, d1, a2, d2 in zip(rows.layers, rows.inputs, rows.cotangents, cols.inputs,
                                   cols.cotangents):
    total = total + factored_gram(a1, d1, a2, d2, layer, precision)
  if spec.kind == "full":
    return total.reshape(t1, k, t2, k).transpose(0, 2, 1, 3)
  return total


def mirror_tile(tile: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
  """The tile at (j, i) of a symmetric kernel from the one at (i, j): K[j, i, d, c] = K[i, j, c, d]
  ("full" tiles [T1, T2, C, C]), K[j, i] = K[i, j] otherwise. numpy or jax arrays."""
  return tile.transpose((1, 0, 3, 2) if tile.ndim == 4 else (1, 0))


def contract_symmetric(rows: JacobianRows, spec: LogitSpec, precision: lax.Precision,
                       pieces: int) -> jax.Array:
  """`contract(rows, rows)` from the products on and above the diagonal of a `pieces` x `pieces`
  split, mirrored: (pieces + 1) / (2 * pieces) of the multiply-adds."""
  t = rows.num_examples
  if pieces <= 1 or t % pieces:
    return contract(rows, rows, spec, precision)
  size = t // pieces
  part = lambda a: jax.tree.map(lambda r: r[a * size:(a + 1) * size], rows)
  blocks = {}
  for a in range(pieces):
    for b in range(a, pieces):
      blocks[a, b] = contract(part(a), part(b), spec, precision)
      blocks[b, a] = mirror_tile(blocks[a, b])
  return jnp.concatenate([jnp.concatenate([blocks[a, b] for b in range(pieces)], axis=1)
                          for a in range(pieces)], axis=0)


def ntvp_tile(apply_fn: ApplyFn, params: PyTree, x_rows: jax.Array, x_cols: jax.Array,
              spec: LogitSpec) -> jax.Array:
  """The same tile as `contract(jacobian_rows(rows), jacobian_rows(cols))`, by JVPs.

  Holds one column example's Jacobian rows at a time (C' * P numbers) and the activations of a
  forward-mode pass over the row block.
  """
  theta, unravel = ravel_pytree(params)
  rows_fn = lambda flat: apply_fn(unravel(flat), x_rows)  # [T1, C]

  def column(example):  # -> [C', T1, C]: J(rows) v for each Jacobian row v of the example
    jac = jnp.concatenate([g[0] for g in jacobian_rows(apply_fn, params, example[None], spec).groups],
                          axis=-1)  # [C', P]
    return jax.vmap(lambda v: jax.jvp(rows_fn, (theta,), (v,))[1])(jac)

  products = lax.map(column, x_cols)  # [T2, C', T1, C]
  if spec.kind == "class":
    return products[:, 0, :, spec.index].T
  if spec.kind == "trace":
    return jnp.einsum("jcic->ij", products)
  return products.transpose(2, 0, 3, 1)  # [T1, T2, C, C]: K[i, j, c, d] = J_c(x_i) . J_d(x_j)
