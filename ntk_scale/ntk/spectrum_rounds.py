"""The top eigenpairs of a stored kernel in rounds of LOBPCG iterations, each round restarted from
the previous round's block of vectors, so the block after any round is a complete state to save
and resume from (a resumed solve is the uninterrupted one, round for round).

Two engines with one interface (`advance` a block by a round, `ritz` pairs of its top k):
- `ShardedKernel`: the kernel's matrix on the devices, its rows split over every device of every
  host (each process reads only its devices' rows from the store), multiplied inside our LOBPCG
  (lobpcg.py: one product per iteration, where jax's lobpcg_standard makes four). One product of a
  50,000-row kernel with 1,000 vectors is 5e12 FLOP: a tenth of a second on a GPU, minutes in numpy.
- `StreamedKernel`: scipy's LOBPCG on the host, the kernel read from disk by row panels at each
  product (spectrum.StoredKernelOperator): for a kernel larger than the devices' memory.

Rows of the matrix are `spectrum.as_matrix`'s (example i, logit a at row i*C + a). On the devices
the examples are padded with zero rows and columns to a multiple of the device count; the padding
only adds zero eigenvalues and the blocks are kept zero there, so no pair changes.
"""

import time
import warnings
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ntk_scale import parallel
from ntk_scale.cost_analysis import memory_per_device
from ntk_scale.matmul_precision import default_precision, lax_precision
from ntk_scale.ntk.lobpcg import lobpcg_top
from ntk_scale.ntk.spectrum import (Eigenpairs, NonFiniteKernelError, StoredKernelOperator, as_matrix_rows,
                                    rayleigh_ritz)
from ntk_scale.ntk.store import KernelStore

STALL_GAIN, STALL_ROUNDS = 0.9, 2  # a round must bring the best residual below 0.9x; 2 in a row may not


def matrix_layout(shape: tuple[int, ...]) -> tuple[int, int]:
  """(examples N, logits per example C) of a kernel [N, N] (C = 1) or [N, N, C, C]."""
  return shape[0], (shape[2] if len(shape) == 4 else 1)


def start_block(size: int, width: int, seed: int, dtype: np.dtype) -> np.ndarray:
  """The first round's block: Gaussian vectors, the same on every host for a seed."""
  return np.random.default_rng(seed).standard_normal((size, width)).astype(dtype)


class ShardedKernel:
  """A kernel's matrix split by rows over `mesh`, with compiled LOBPCG rounds and Ritz pairs.

  Construction compiles both programs from shapes alone (nothing is read), so `bytes_per_device`
  can refuse a plan before the kernel is loaded; `load` then reads this process's rows.
  """

  def __init__(self, shape: tuple[int, ...], mesh: Mesh, width: int, k: int, dtype: str,
               round_iters: int, precision: str, tol: float):
    self.num_examples, self.logits = matrix_layout(shape)
    self.size = self.num_examples * self.logits  # rows of the kernel's matrix
    devices = mesh.devices.size
    self.padded_size = -(-self.num_examples // devices) * devices * self.logits
    self.mesh, self.width, self.k, self.round_iters = mesh, width, k, round_iters
    self.dtype = np.dtype(dtype)
    self.rows = NamedSharding(mesh, P(parallel.DATA_AXIS, None))
    replicated = parallel.replicated_sharding(mesh)
    matrix = jax.ShapeDtypeStruct((self.padded_size,) * 2, self.dtype, sharding=self.rows)
    block = jax.ShapeDtypeStruct((self.padded_size, width), self.dtype, sharding=replicated)
    kept = jax.ShapeDtypeStruct((self.padded_size, k), self.dtype, sharding=replicated)

    def advance(matrix, block):
      # A round stops early once the top k residuals, from the products LOBPCG carries along, are
      # under half of tol * lambda_max: `ritz` measures them with fresh products after the round,
      # and the margin absorbs the carried products' drift.
      product = lambda v: jnp.matmul(matrix, v, precision=lax_precision(precision))
      _, vectors, iterations = lobpcg_top(product, block, round_iters, tol / 2, converge=k)
      return vectors, iterations

    def ritz(matrix, vectors):
      with default_precision(precision):  # every matmul of the host's Rayleigh-Ritz
        pairs = rayleigh_ritz(lambda v: matrix @ v, vectors, xp=jnp)
      return pairs.values, pairs.vectors, pairs.residuals

    self._advance = jax.jit(advance, out_shardings=(replicated, replicated)).lower(matrix, block).compile()
    self._ritz = jax.jit(ritz, out_shardings=replicated).lower(matrix, kept).compile()
    self._matrix = None

  def flops_per_round(self) -> float:
    """Multiply-adds x 2 of a round's kernel products at most: the starting block's, one block per
    iteration (lobpcg.py), and the Ritz step's k vectors."""
    product = 2.0 * self.padded_size ** 2
    return product * ((self.round_iters + 1) * self.width + self.k)

  def bytes_per_device(self) -> float | None:
    """Peak bytes one device holds during a round or a Ritz step, by XLA (None: no analysis)."""
    sizes = [memory_per_device(c) for c in (self._advance, self._ritz)]
    return None if None in sizes else max(sizes)

  def load(self, store: KernelStore) -> None:
    """Reads this process's rows of the kernel from `store` onto its devices."""
    n, c, size = self.num_examples, self.logits, self.padded_size

    def rows(index) -> np.ndarray:
      start, stop, _ = index[0].indices(size)
      first, last = start // c, min(stop // c, n)
      if last * c == stop and size == n * c:  # no padding: the rows as read (one host copy)
        return as_matrix_rows(store.read(rows=slice(first, last))).astype(self.dtype, copy=False)
      panel = np.zeros((stop - start, size), self.dtype)
      if last > first:
        panel[:(last - first) * c, :n * c] = as_matrix_rows(store.read(rows=slice(first, last)))
      return panel

    self._matrix = jax.make_array_from_callback((size, size), self.rows, rows)

  def trace(self) -> float:
    """Tr K: the sum of every eigenvalue."""
    return float(jax.jit(jnp.trace)(self._matrix))

  def _padded(self, block: np.ndarray) -> jax.Array:
    padded = np.zeros((self.padded_size, block.shape[1]), self.dtype)
    padded[:self.size] = block
    return parallel.replicate(padded, self.mesh)

  def advance(self, block: np.ndarray) -> tuple[np.ndarray, int]:
    """One round from `block` [M, width]: the next block and the iterations LOBPCG ran."""
    vectors, iterations = self._advance(self._matrix, self._padded(block))
    return parallel.local_copy(vectors)[:self.size], int(parallel.local_copy(iterations))

  def ritz(self, block: np.ndarray) -> Eigenpairs:
    """Ritz pairs on the span of `block`'s first k columns, with their residuals."""
    values, vectors, residuals = self._ritz(self._matrix, self._padded(block[:, :self.k]))
    return Eigenpairs(parallel.local_copy(values), parallel.local_copy(vectors)[:self.size],
                      parallel.local_copy(residuals))


class StreamedKernel:
  """The same rounds on the host, the kernel read from `store` by row panels at every product.

  scipy's LOBPCG tolerance is absolute: it is scaled by a lower bound on lambda_max from `start`,
  the solve's seeded first block (one product, at the first round), never from the block a round
  starts from, so that a resumed solve runs the rounds of an uninterrupted one."""

  def __init__(self, store: KernelStore, k: int, dtype: str, round_iters: int, tol: float,
               max_block_bytes: int, start: np.ndarray):
    self.operator = StoredKernelOperator(store, dtype, max_block_bytes)
    self.size, self.k, self.round_iters, self.tol = self.operator.shape[0], k, round_iters, tol
    self._start, self._scale = start, None

  def trace(self) -> float:
    return self.operator.trace()

  def advance(self, block: np.ndarray) -> tuple[np.ndarray, int]:
    if self._scale is None:
      self._scale = float(np.linalg.norm(self.operator.matmat(np.linalg.qr(self._start)[0]),
                                         axis=0).max())
      if not np.isfinite(self._scale):  # a NaN or infinite entry spoils its row of every product
        raise NonFiniteKernelError.of(f"kernel {self.operator.store.directory}")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # scipy's "not reaching the requested tolerance"
      # scipy overwrites the block it is given: a copy, so that the caller's state stays as saved
      values, vectors = scipy.sparse.linalg.lobpcg(self.operator, block.copy(), tol=self.tol * self._scale / 10,
                                                   maxiter=self.round_iters, largest=True)
    return vectors[:, np.argsort(values)[::-1]], self.round_iters

  def ritz(self, block: np.ndarray) -> Eigenpairs:
    return rayleigh_ritz(self.operator.matmat, block[:, :self.k])


class Engine(Protocol):
  size: int

  def advance(self, block: np.ndarray) -> tuple[np.ndarray, int]: ...

  def ritz(self, block: np.ndarray) -> Eigenpairs: ...


def first_state(block: np.ndarray | None) -> dict:
  """A solve before its first round, from `block`."""
  return {"rounds": 0, "iterations": 0, "best": None, "best_round": None, "stalled": 0,
          "residuals": [], "seconds": 0.0, "block": block, "best_block": None}


def finished(pairs: Eigenpairs, state: dict, tol: float, max_iters: int) -> bool:
  """Whether a solve ends at `state`: every residual of the top k below `tol` (relative to
  lambda_max), `max_iters` iterations run, or STALL_ROUNDS rounds in a row with no STALL_GAIN on
  the best residual (round-off)."""
  return bool(pairs.residuals.max() <= tol or state["iterations"] >= max_iters
              or state["stalled"] >= STALL_ROUNDS)


def run_rounds(engine: Engine, state: dict, tol: float, max_iters: int,
               after_round: Callable[[dict, Eigenpairs, float], None] | None = None,
               stop: Callable[[], bool] | None = None) -> tuple[Eigenpairs, dict]:
  """Rounds from `state` until the solve is `finished`, or `stop()` (asked after every round, when
  `after_round(state, pairs, seconds)` has seen it, to save it) says to stop there.
  Returns the pairs of the finished solve's best round (at round-off, the residual wanders: a
  stalled solve's last round was up to 2x worse than its best) and the state; stopped early, the
  last round's."""
  pairs = engine.ritz(state["block"]) if state["rounds"] else None
  while pairs is None or not finished(pairs, state, tol, max_iters):
    started = time.time()
    block, iterations = engine.advance(state["block"])
    pairs = engine.ritz(block)
    residual = float(pairs.residuals.max())
    improved = state["best"] is None or residual < STALL_GAIN * state["best"]
    best = state["best"] is None or residual < state["best"]
    state = {**state, "block": block, "rounds": state["rounds"] + 1,
             "iterations": state["iterations"] + iterations,
             "best": residual if best else state["best"],
             "best_round": state["rounds"] + 1 if best else state.get("best_round"),
             "best_block": block if best else state.get("best_block"),
             "stalled": 0 if improved else state["stalled"] + 1,
             "residuals": state["residuals"] + [residual]}
    seconds = time.time() - started
    state["seconds"] = state.get("seconds", 0.0) + seconds  # every round's, resumed ones' too
    if after_round is not None:
      after_round(state, pairs, seconds)
    if stop is not None and stop():
      break
  if (finished(pairs, state, tol, max_iters) and state.get("best_block") is not None
      and state["best_round"] != state["rounds"]):
    pairs = engine.ritz(state["best_block"])
  return pairs, state
