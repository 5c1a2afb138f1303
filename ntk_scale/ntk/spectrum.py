"""Eigenpairs of an empirical kernel: all of them for a kernel that fits in memory, the top k of one
that does not (read from its on-disk KernelStore a row panel at a time).

A per-logit or traced kernel [N, N] is its own matrix. A "full" kernel [N, N, C, C] is the
(N*C) x (N*C) matrix whose row i*C + a is example i, logit a (`as_matrix`), so eigenvectors come
back with that row order too.

The top-k solver is scipy's LOBPCG (Knyazev 2001): each iteration multiplies the kernel by one
block of vectors, so a kernel on disk costs one sequential read per iteration and never more host
memory than one row panel plus the block (`StoredKernelOperator`).
"""

import dataclasses
import warnings
from types import ModuleType
from typing import Callable

import jax
import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from ntk_scale import parallel
from ntk_scale.ntk.store import KernelStore

ArrayLike = np.ndarray | jax.Array  # numpy on the host, jax.numpy inside a jitted program

DTYPES = ("float32", "float64")
BACKENDS = ("numpy", "jax")
DEFAULT_BLOCK_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class Eigenpairs:
  """Eigenvalues in descending order and their unit eigenvectors as columns of `vectors`."""
  values: np.ndarray  # [k]
  vectors: np.ndarray  # [M, k], M = N (or N*C for a full kernel)
  residuals: np.ndarray | None = None  # ||K v - lambda v|| / lambda_max per pair (iterative solvers)

  def oriented(self) -> "Eigenpairs":
    """The same pairs, each eigenvector with the sign that makes its entries sum to >= 0: a solver
    may return -v for v, and which one it returns differs between solvers, LOBPCG's start blocks
    and device counts, so results that show eigenvectors would differ by their signs."""
    flips = np.where(np.sum(self.vectors, axis=0) < 0, -1.0, 1.0).astype(self.vectors.dtype)
    return dataclasses.replace(self, vectors=self.vectors * flips)


def _check_dtype(dtype: str) -> np.dtype:
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)}.")
  return np.dtype(dtype)


def as_matrix(kernel: np.ndarray) -> np.ndarray:
  """The kernel as a square matrix: [N, N] unchanged, [N, N, C, C] as (N*C, N*C), row i*C + a."""
  kernel = np.asarray(kernel)
  if kernel.ndim == 2 and kernel.shape[0] == kernel.shape[1]:
    return kernel
  if kernel.ndim == 4 and kernel.shape[0] == kernel.shape[1] and kernel.shape[2] == kernel.shape[3]:
    n, _, c, _ = kernel.shape
    return kernel.transpose(0, 2, 1, 3).reshape(n * c, n * c)
  raise ValueError(f"a kernel is [N, N] or [N, N, C, C]; got shape {kernel.shape}.")


class NonFiniteKernelError(FloatingPointError):
  """A kernel with NaN or infinite entries: its eigenpairs are NaN (nothing derived is saved)."""

  @classmethod
  def of(cls, name: str) -> "NonFiniteKernelError":
    return cls(f"{name} holds NaN or infinite entries, so its eigenpairs are not finite; nothing is "
               f"saved. Its checkpoint gives non-finite outputs on these examples, or a stored tile "
               f"was damaged: delete the kernel's directory to compute it again.")


def _finite_matrix(kernel: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
  """`kernel` as a matrix in `dtype`; NonFiniteKernelError naming it as `name` where an entry is
  NaN or infinite (scipy's own check names neither the kernel nor the cause)."""
  matrix = as_matrix(kernel).astype(dtype, copy=False)
  if not np.isfinite(matrix).all():
    raise NonFiniteKernelError.of(name)
  return matrix


def eigh(kernel: np.ndarray, dtype: str = "float64", backend: str = "numpy",
         name: str = "the kernel") -> Eigenpairs:
  """Every eigenpair of a symmetric kernel that fits in memory, largest first; NonFiniteKernelError,
  naming it as `name`, for one with NaN or infinite entries.

  float64 by default: kernel spectra span many decades and float32 loses the tail. backend "jax"
  runs jnp.linalg.eigh on the default device (a GPU's is much faster for large N); float64 there
  needs jax_enable_x64, which is switched on for the call.
  """
  np_dtype = _check_dtype(dtype)
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; expected one of {', '.join(BACKENDS)}.")
  matrix = _finite_matrix(kernel, np_dtype, name)
  if backend == "numpy":
    values, vectors = scipy.linalg.eigh(matrix, check_finite=True)
  else:
    import jax  # pylint: disable=import-outside-toplevel

    with jax.enable_x64(np_dtype == np.float64):
      values, vectors = jax.numpy.linalg.eigh(jax.numpy.asarray(matrix), symmetrize_input=True)
      values, vectors = np.asarray(values), np.asarray(vectors)
  return Eigenpairs(values[::-1].copy(), vectors[:, ::-1].copy()).oriented()


def rounding_floor(dtype: str, trace: float) -> float:
  """How far the rounding of a kernel stored in `dtype` can move any of its eigenvalues: about
  eps * trace (each entry K_ij is formed and stored to within about eps * sqrt(K_ii K_jj)). An
  eigenvalue at or below it is zero to that precision. numpy's matrix_rank tolerance, eps * size *
  lambda_1, is up to size times larger: in float32 at 500 examples it is 6e-5 * lambda_1, and took
  real eigenvalues of a full-rank kernel for zeros."""
  return float(np.finfo(dtype).eps * abs(trace))


def eigenvalues(kernel: np.ndarray, dtype: str = "float64", name: str = "the kernel") -> np.ndarray:
  """Every eigenvalue of a symmetric kernel that fits in memory, largest first: for spectra alone,
  about 10x faster than `eigh`, which also forms the eigenvectors. NonFiniteKernelError as `eigh`."""
  matrix = _finite_matrix(kernel, _check_dtype(dtype), name)
  return scipy.linalg.eigvalsh(matrix, check_finite=True)[::-1].copy()


class StoredKernelOperator(scipy.sparse.linalg.LinearOperator):
  """K @ V for a kernel in a KernelStore, reading it by row panels of at most `max_block_bytes`
  (aligned to the store's tiles when a panel spans several), so the kernel never has to fit.

  With several processes (every one calls each product, as the solvers on the host do), each
  reads and multiplies its own contiguous share of the panels and the rows are gathered: per
  product a process reads 1/P of the kernel (20 GB at 50,000 examples), not all of it.
  `process` = (index, count) is this process's place (default: JAX's).

  `passes` counts products (sweeps over this process's share) and `panels_read` this process's
  reads, for tests and logs.
  """

  def __init__(self, store: KernelStore, dtype: str = "float64",
               max_block_bytes: int = DEFAULT_BLOCK_BYTES, process: tuple[int, int] | None = None):
    if store.meta.get("complete") is not True:  # a killed job's kernel.json says False (or, before
      # 2026-12-01, nothing)
      raise ValueError(f"{store.directory} is an unfinished kernel; rerun its kernel job to complete "
                       f"it before computing its spectrum.")
    shape = store.shape
    if len(shape) not in (2, 4) or shape[0] != shape[1]:
      raise ValueError(f"{store.directory} holds a [{shape}] kernel; the spectrum needs a symmetric "
                       f"one ([N, N] or [N, N, C, C]).")
    self.store = store
    self.num_examples = shape[0]
    self.logits_per_example = shape[2] if len(shape) == 4 else 1
    size = self.num_examples * self.logits_per_example
    super().__init__(dtype=_check_dtype(dtype), shape=(size, size))
    row_bytes = size * self.logits_per_example * max(self.dtype.itemsize, 4)
    rows = max(1, int(max_block_bytes) // row_bytes)
    if rows >= store.tile:
      rows -= rows % store.tile  # whole chunks per read
    self.rows_per_read = min(rows, self.num_examples)
    self.passes = 0
    self.panels_read = 0
    self.process, count = process or (jax.process_index(), jax.process_count())
    starts = list(range(0, self.num_examples, self.rows_per_read)) + [self.num_examples]
    cuts = [starts[(len(starts) - 1) * p // count] for p in range(count)] + [self.num_examples]
    self.shares = list(zip(cuts[:-1], cuts[1:]))  # examples [first, stop) of each process

  def panels(self):
    """(first matrix row, panel [rows * C, N * C]) for every row panel of this process's share,
    in order."""
    c = self.logits_per_example
    first, stop = self.shares[self.process]
    for start in range(first, stop, self.rows_per_read):
      panel = self.store.read(rows=slice(start, min(start + self.rows_per_read, stop)))
      self.panels_read += 1
      yield start * c, as_matrix_rows(panel.astype(self.dtype, copy=False))

  def share_product(self, vectors: np.ndarray) -> np.ndarray:
    """This process's rows of K @ vectors (matrix rows first * C to stop * C of its share)."""
    vectors = np.asarray(vectors, self.dtype)
    c, (first, stop) = self.logits_per_example, self.shares[self.process]
    out = np.empty(((stop - first) * c, vectors.shape[1]), self.dtype)
    for row, panel in self.panels():
      out[row - first * c:row - first * c + panel.shape[0]] = panel @ vectors
    self.passes += 1
    return out

  def _matmat(self, vectors: np.ndarray) -> np.ndarray:
    mine = self.share_product(vectors)
    if len(self.shares) == 1:
      return mine
    c = self.logits_per_example
    longest = max(stop - first for first, stop in self.shares) * c
    padded = np.zeros((longest, mine.shape[1]), self.dtype)
    padded[:len(mine)] = mine
    every = parallel.gather_from_processes(padded)  # float64 rows stay float64
    return np.concatenate([every[p, :(stop - first) * c]
                           for p, (first, stop) in enumerate(self.shares)])

  def _matvec(self, vector: np.ndarray) -> np.ndarray:
    return self._matmat(np.reshape(vector, (-1, 1)))[:, 0]

  def _adjoint(self) -> "StoredKernelOperator":
    return self  # symmetric

  def trace(self) -> float:
    """Tr K, the sum of every eigenvalue (for spectral mass without the whole spectrum)."""
    total = 0.0
    for first, panel in self.panels():
      rows = np.arange(panel.shape[0])
      total += float(panel[rows, first + rows].sum())
    return float(parallel.sum_over_processes(np.float64(total)))


def as_matrix_rows(panel: np.ndarray) -> np.ndarray:
  """Rows of `as_matrix`'s layout from a row panel [r, N] or [r, N, C, C] of the kernel."""
  if panel.ndim == 2:
    return panel
  r, n, c, _ = panel.shape
  return panel.transpose(0, 2, 1, 3).reshape(r * c, n * c)


def top_eigenpairs(kernel: np.ndarray | scipy.sparse.linalg.LinearOperator, k: int, *,
                   oversample: int = 10, tol: float = 1e-7, max_iters: int = 200, seed: int = 0,
                   dtype: str = "float64") -> Eigenpairs:
  """The k largest eigenpairs of a symmetric PSD kernel by LOBPCG: an array (any shape
  `as_matrix` takes) or a LinearOperator such as StoredKernelOperator, which is only multiplied
  by blocks of k + `oversample` vectors (extra vectors speed convergence of the k-th pair).

  `tol` bounds each residual ||K v - lambda v|| relative to lambda_max; pairs that miss it after
  `max_iters` iterations are returned with a warning, their residuals in `Eigenpairs.residuals`.
  """
  np_dtype = _check_dtype(dtype)
  if isinstance(kernel, scipy.sparse.linalg.LinearOperator):
    operator = kernel
  else:
    operator = scipy.sparse.linalg.aslinearoperator(as_matrix(kernel).astype(np_dtype, copy=False))
  size = operator.shape[0]
  if not 1 <= k <= size:
    raise ValueError(f"k={k} eigenpairs asked of a {size} x {size} kernel; expected 1 <= k <= {size}.")
  block = min(k + max(oversample, 0), size)
  start = np.random.default_rng(seed).standard_normal((size, block)).astype(np_dtype)
  if 5 * block >= size:
    # Too small for LOBPCG (scipy would build the dense matrix itself): multiply by the identity.
    full = eigh(operator.matmat(np.eye(size, dtype=np_dtype)), dtype=dtype)
    return Eigenpairs(full.values[:k], full.vectors[:, :k], np.zeros(k))
  # LOBPCG's tolerance is absolute: scale it by a lower bound on lambda_max (one product).
  start, _ = np.linalg.qr(start)
  scale = float(np.linalg.norm(operator.matmat(start), axis=0).max())
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # scipy's "not reaching the requested tolerance"
    values, vectors = scipy.sparse.linalg.lobpcg(operator, start, tol=tol * scale / 10,
                                                 maxiter=max_iters, largest=True)
  pairs = rayleigh_ritz(operator.matmat, vectors[:, np.argsort(values)[::-1][:k]])
  values, vectors, residuals = pairs.values, pairs.vectors, pairs.residuals
  if np.any(residuals > tol):
    warnings.warn(f"top_eigenpairs: {int(np.sum(residuals > tol))} of {k} eigenpairs did not reach "
                  f"tol={tol:g} in {max_iters} iterations (largest residual {residuals.max():.2e}); "
                  f"raise max_iters or oversample.")
  return Eigenpairs(values, vectors, residuals).oriented()


def relative_residuals(products: ArrayLike, vectors: ArrayLike, values: ArrayLike,
                       xp: ModuleType = np) -> ArrayLike:
  """||K v - lambda v|| / |lambda_max| per pair, from the products K v (columns): how far each pair
  is from exact. `xp` is numpy, or jax.numpy inside a jitted program."""
  scale = xp.maximum(xp.abs(values[0]), xp.finfo(values.dtype).tiny)
  return xp.linalg.norm(products - vectors * values, axis=0) / scale


def rayleigh_ritz(matmat: Callable[[ArrayLike], ArrayLike], vectors: ArrayLike,
                  xp: ModuleType = np) -> Eigenpairs:
  """Ritz pairs of a symmetric operator (`matmat(V)` = K V) on the span of `vectors` [M, k],
  largest first, orthonormal to round-off, with their relative residuals: what an iterative solve
  returns. `xp` is numpy, or jax.numpy inside a jitted program (set its matmul precision there)."""
  vectors, _ = xp.linalg.qr(vectors)
  products = matmat(vectors)
  projected = vectors.T @ products
  ritz_values, ritz_vectors = xp.linalg.eigh((projected + projected.T) / 2)
  values, vectors = ritz_values[::-1], vectors @ ritz_vectors[:, ::-1]
  products = products @ ritz_vectors[:, ::-1]
  return Eigenpairs(values, vectors, relative_residuals(products, vectors, values, xp))


def store_top_eigenpairs(store: KernelStore, k: int, *, max_block_bytes: int = DEFAULT_BLOCK_BYTES,
                         **kwargs) -> Eigenpairs:
  """top_eigenpairs of the kernel in `store`, streamed by row panels of at most `max_block_bytes`."""
  operator = StoredKernelOperator(store, kwargs.get("dtype", "float64"), max_block_bytes)
  return top_eigenpairs(operator, k, **kwargs)
