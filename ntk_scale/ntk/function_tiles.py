"""A kernel given as a function of two blocks of examples, `k(x1 [t, ...], x2 [t, ...]) -> [t, t]`
(the analytic infinite-width kernels of infinite.py), tile by tile on every device of every host.

Its tiles are independent (no Jacobian rows to reuse, unlike the empirical engine's), so they are
dealt out D at a time to the D devices, one `shard_map` step per D tiles, only those on and above
the diagonal when x2 is None. With a `KernelStore` the finished tiles stream to disk while the
next step runs, and a rerun computes only the tiles not yet there: a Myrtle kernel of CIFAR-10
(hours of device time) survives a killed job. Every process gets the whole kernel.

`function_kernel_vjp` is the same loop backwards: the gradient with respect to x of <C, K(x, x)>
for a cotangent C, the tiles' vector-Jacobian products summed per block. Dataset optimisation
through kernel regression needs it each outer step; the Gram matrix and its gradient in one call
would hold terabytes for a Myrtle kernel of a few thousand images.
"""

import contextlib
import functools
import logging
import math
import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from ntk_scale import parallel
from ntk_scale.ntk.engine import StepProgress, blocks_on_devices, padded_blocks
from ntk_scale.ntk.schedule import Step, Tile, tile_schedule
from ntk_scale.ntk.store import KernelStore, SecondsKept, TileWriter, agreed_done_tiles
from ntk_scale.ntk.tile_math import mirror_tile

BlockKernelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x1 [t, ...], x2 [t, ...]) -> [t, t]


def kernel_tiles(num_rows: int, num_cols: int, tile: int, symmetric: bool) -> list[Tile]:
  """The tiles (i, j) a kernel of num_rows x num_cols is made of: i <= j only when `symmetric`."""
  row_blocks, col_blocks = math.ceil(num_rows / tile), math.ceil(num_cols / tile)
  return [(i, j) for i in range(row_blocks) for j in range(i if symmetric else 0, col_blocks)]


@functools.lru_cache(maxsize=16)
def tile_program(kernel_fn: BlockKernelFn, mesh: Mesh) -> Callable:
  """Every device computes kernel_fn of its own row and column blocks: one compilation per kernel
  function, tile size and mesh."""
  data = P(parallel.DATA_AXIS)
  return jax.jit(jax.shard_map(kernel_fn, mesh=mesh, in_specs=(data, data), out_specs=data,
                               check_vma=False))


@functools.lru_cache(maxsize=16)
def tile_vjp_program(kernel_fn: BlockKernelFn, mesh: Mesh) -> Callable:
  """Every device pulls its own tile's cotangent back to its row and column blocks."""
  data = P(parallel.DATA_AXIS)

  def pull_back(rows, cols, cotangent):
    return jax.vjp(kernel_fn, rows, cols)[1](cotangent)
  return jax.jit(jax.shard_map(pull_back, mesh=mesh, in_specs=(data, data, data),
                               out_specs=(data, data), check_vma=False))


def function_kernel(kernel_fn: BlockKernelFn, x1: np.ndarray, x2: np.ndarray | None = None, *,
                    tile: int, store: KernelStore | None = None,
                    mesh: Mesh | None = None) -> np.ndarray:
  """K[a, b] = kernel_fn(x1[a], x2[b]) (x2 None: x1 with itself, from the tiles i <= j) as a numpy
  array in x1's dtype, computed in tile x tile blocks on every device of `mesh` (default: all).

  `kernel_fn` must be jittable and one function object per kernel (it keys the compilation
  cache). With `store` (created for this kernel's shape and `tile`), tiles already on disk are
  read, not computed, and the kernel returned is read back from the store.
  """
  mesh = mesh or parallel.make_mesh()
  x1 = np.asarray(x1)
  symmetric = x2 is None
  x2 = x1 if symmetric else np.asarray(x2)
  if store is not None and (store.tile != tile or store.shape[:2] != (len(x1), len(x2))):
    raise ValueError(f"{store.directory} holds a kernel of shape {store.shape} in tiles of "
                     f"{store.tile}, not {len(x1)} x {len(x2)} in tiles of {tile}.")
  tiles = kernel_tiles(len(x1), len(x2), tile, symmetric)
  done = set() if store is None else agreed_done_tiles(store, tiles, mirror=symmetric)
  todo = [t for t in tiles if t not in done]
  rows = padded_blocks(x1, math.ceil(len(x1) / tile), tile)
  cols = rows if symmetric else padded_blocks(x2, math.ceil(len(x2) / tile), tile)
  program = tile_program(kernel_fn, mesh)

  kernel = None if store is not None else np.zeros((len(x1), len(x2)), x1.dtype)

  def in_memory(i: int, j: int, part: np.ndarray) -> None:
    kernel[i * tile:i * tile + part.shape[0], j * tile:j * tile + part.shape[1]] = part
    if symmetric and i != j:
      kernel[j * tile:j * tile + part.shape[1], i * tile:i * tile + part.shape[0]] = mirror_tile(part)

  handed = 0

  def hand_over(step: Step, out: jax.Array, on_tile: Callable) -> None:
    nonlocal handed
    for shard in out.addressable_shards:
      for (i, j), _, _ in step.tiles[(shard.index[0].start or 0) // tile]:
        part = np.asarray(shard.data)[:min(tile, len(x1) - i * tile), :min(tile, len(x2) - j * tile)]
        on_tile(i, j, part)
        handed += 1

  steps = tile_schedule(todo, mesh.size)
  progress = StepProgress(len(steps), len(todo), mesh.size)
  started = progress.started
  clock = SecondsKept(store) if store is not None else None
  writer = TileWriter(store, mirror=symmetric) if store is not None else contextlib.nullcontext(in_memory)
  # HIGHEST: a kernel solved for regression coefficients wants float32 products, not TF32 ones.
  with writer as on_tile, jax.default_matmul_precision("highest"):
    pending = None
    for number, step in enumerate(steps):
      out = program(blocks_on_devices(rows, [i for i, _ in step.blocks], tile, mesh),
                    blocks_on_devices(cols, [j for _, j in step.blocks], tile, mesh))
      if pending is not None:
        hand_over(*pending, on_tile)  # the last step's tiles leave the devices while this one runs
      pending = (step, out)
      progress.step_done(number)
      if clock is not None:
        clock.tick()
    if pending is not None:
      hand_over(*pending, on_tile)
  # Streamed kernels run for hours; in-memory ones are often one step of a loop (the robust set's).
  logging.log(logging.INFO if store is not None else logging.DEBUG,
              "kernel of %d x %d: this process computed %d tiles in %.1f s", len(x1), len(x2),
              handed, time.time() - started)
  if store is not None:
    parallel.barrier(f"kernel tiles written {store.directory}")
    if jax.process_index() == 0 and not store.meta.get("complete"):
      store.update_meta(complete=True, seconds=clock.total(time.time() - clock.started))
    parallel.barrier(f"kernel metadata written {store.directory}")  # readers need complete: true
    return store.read()
  return parallel.sum_over_processes(kernel)  # each tile was written by exactly one process



def function_kernel_vjp(kernel_fn: BlockKernelFn, x: np.ndarray, cotangent: np.ndarray, *,
                        tile: int, mesh: Mesh | None = None) -> np.ndarray:
  """d/dx sum(cotangent * K) for K[a, b] = kernel_fn(x[a], x[b]) (K = function_kernel(kernel_fn,
  x)), a numpy array shaped like x, on every process; `cotangent` [N, N] need not be symmetric.

  Only the tiles i <= j are pulled back, each once, with the cotangent of both places it fills,
  C_ij + C_ji^T (a diagonal tile: C_ii, through both of its arguments); a block's gradient is the
  sum over the tiles it enters. The kernel must be symmetric, kernel_fn(a, b) = kernel_fn(b, a)^T.
  """
  mesh = mesh or parallel.make_mesh()
  x = np.asarray(x)
  n = len(x)
  if np.shape(cotangent) != (n, n):
    raise ValueError(f"the cotangent of a kernel of {n} examples must be {n} x {n}, "
                     f"not {np.shape(cotangent)}.")
  num_blocks = math.ceil(n / tile)
  rows = padded_blocks(x, num_blocks, tile)
  padded = np.zeros((num_blocks * tile,) * 2, x.dtype)  # padding rows and columns pull back 0
  padded[:n, :n] = cotangent
  block = lambda i, j: padded[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
  tile_cotangent = lambda i, j: block(i, i) if i == j else block(i, j) + block(j, i).T
  program = tile_vjp_program(kernel_fn, mesh)
  gradient = np.zeros_like(rows)

  def hand_over(step: Step, out: tuple[jax.Array, jax.Array]) -> None:
    for row_shard, col_shard in zip(*(o.addressable_shards for o in out)):
      for (i, j), _, _ in step.tiles[(row_shard.index[0].start or 0) // tile]:
        gradient[i * tile:(i + 1) * tile] += np.asarray(row_shard.data)
        gradient[j * tile:(j + 1) * tile] += np.asarray(col_shard.data)

  steps = tile_schedule(kernel_tiles(n, n, tile, symmetric=True), mesh.size)
  with jax.default_matmul_precision("highest"):
    pending = None
    for step in steps:
      cotangents = np.concatenate([tile_cotangent(i, j) for i, j in step.blocks])
      out = program(blocks_on_devices(rows, [i for i, _ in step.blocks], tile, mesh),
                    blocks_on_devices(rows, [j for _, j in step.blocks], tile, mesh),
                    blocks_on_devices(cotangents, range(mesh.size), tile, mesh))
      if pending is not None:
        hand_over(*pending)  # the last step's gradients leave the devices while this one runs
      pending = (step, out)
    if pending is not None:
      hand_over(*pending)
  return parallel.sum_over_processes(gradient)[:n]  # each tile pulled back by one process
