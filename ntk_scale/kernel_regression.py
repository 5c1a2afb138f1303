"""Kernel regression as a classifier: f(x) = K(x, X) (K(X, X) + lambda I)^{-1} Y.

This is the infinite-width network trained to convergence with MSE (the NTK) or its Bayesian
posterior mean (the NNGP), and a kernel machine for empirical kernels (e.g. from a KernelStore).
Targets Y are one-hot labels minus 1/C (zero mean over classes). The ridge `regularizer` is relative:
lambda = regularizer * mean(diag K), so one value suits kernels of any scale; 0 is ridgeless.

For a kernel too large to factor (tens of thousands of examples, on disk), `ridge_coefficients_cg`
solves for one column of coefficients by preconditioned conjugate gradients on the kernel as an
operator (one product with the kernel per iteration).

Two uses: `KernelRegression.fit` takes precomputed kernels (any source) and predicts from
K(test, train); `logits_fn` / `predictor` evaluate a kernel function against a fixed training set
inside jax, so the attacks of ntk_scale.attacks differentiate the predictor with respect to the
test images (training-free adversarial examples) or, with `predictor`, the training images too
(robust dataset optimisation).

Everything here that runs in jax runs its matmuls and convolutions (the kernel function's too) at
HIGHEST precision, as the kernel engine does: TF32 on GPUs and bfloat16 passes on TPUs, the
defaults for float32, perturb each kernel entry by ~1e-3 relative, which a ridgeless solve and
its coefficients (large, of both signs) turn into wrong predictions.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import ml_collections
import numpy as np
import scipy.sparse.linalg

from ntk_scale.config_numbers import is_finite_number

SOLVERS = ("cholesky", "eigh", "lstsq")
KernelFn = Callable[[jax.Array, jax.Array], jax.Array]
LogitsFn = Callable[[jax.Array], jax.Array]


def check_regression_config(section: ml_collections.ConfigDict, prefix: str) -> None:
  """`regularizer` (>= 0) and `solver` of a kernel-regression config section; errors name the field."""
  reg = section.regularizer
  if not (is_finite_number(reg) and reg >= 0):
    raise ValueError(f"{prefix}.regularizer={reg!r} must be a finite number >= 0 (relative to the mean "
                     f"kernel diagonal; 0 is ridgeless).")
  if section.solver not in SOLVERS:
    raise ValueError(f"{prefix}.solver={section.solver!r}; expected one of {', '.join(SOLVERS)}.")


def regression_targets(labels: jax.Array, num_classes: int, dtype=jnp.float32) -> jax.Array:
  """One-hot labels minus 1/C: the regression targets [N, C]. Labels must be class indices in
  [0, C): one_hot makes any other a row of zeros, a constant target -1/C that would fit silently
  (a KernelStore of some classes keeps their dataset ids: number them 0 .. C-1 first)."""
  if not isinstance(labels, jax.core.Tracer):  # concrete: checked here, before the solve
    values = np.asarray(labels)
    outside = values[(values < 0) | (values >= num_classes)]
    if outside.size:
      raise ValueError(f"labels must be class indices in [0, {num_classes}) for num_classes="
                       f"{num_classes}; got {sorted(set(outside.tolist()))[:5]} (number a subset's "
                       f"classes 0 .. {num_classes - 1}).")
  return jax.nn.one_hot(labels, num_classes, dtype=dtype) - 1.0 / num_classes


def ridge_coefficients(k_train: jax.Array, targets: jax.Array, regularizer: float = 0.0,
                       solver: str = "cholesky") -> jax.Array:
  """(K + lambda I)^{-1} Y with lambda = regularizer * mean(diag K); differentiable in K.

  cholesky needs K + lambda I positive definite; eigh (ridgeless: the pseudo-inverse, eigenvalues
  below N * machine-eps * largest dropped) and lstsq also take singular kernels.
  """
  if solver not in SOLVERS:
    raise ValueError(f"solver={solver!r}; expected one of {', '.join(SOLVERS)}.")
  with jax.default_matmul_precision("highest"):
    return _ridge_coefficients(k_train, targets, regularizer, solver)


def _ridge_coefficients(k_train: jax.Array, targets: jax.Array, regularizer: float,
                        solver: str) -> jax.Array:
  n = k_train.shape[0]
  shift = regularizer * jnp.mean(jnp.diagonal(k_train))
  regularized = k_train + shift * jnp.eye(n, dtype=k_train.dtype)
  if solver == "cholesky":
    factor = jax.scipy.linalg.cho_factor(regularized, lower=True)
    return jax.scipy.linalg.cho_solve(factor, targets)
  if solver == "eigh":
    values, vectors = jnp.linalg.eigh(regularized)
    cutoff = n * jnp.finfo(values.dtype).eps * jnp.max(jnp.abs(values))
    inverse = jnp.where(values > cutoff, 1.0 / jnp.where(values > cutoff, values, 1.0), 0.0)
    return vectors @ (inverse[:, None] * (vectors.T @ targets))
  return jnp.linalg.lstsq(regularized, targets)[0]


def spectral_preconditioner(values: np.ndarray, vectors: np.ndarray, shift: float
                            ) -> scipy.sparse.linalg.LinearOperator:
  """An approximate inverse of K + shift I from K's top eigenpairs (`values` descending, `vectors`
  orthonormal columns): V diag(1 / (lambda_i + shift)) V^T + (I - V V^T) / (lambda_k + shift), with
  lambda_k the smallest of them. Exact on the span of V and a scaled identity on the rest, it leaves
  CG the condition number (lambda_{k+1} + shift) / shift instead of (lambda_1 + shift) / shift."""
  vectors = np.asarray(vectors, np.float64)
  inverse = 1.0 / (np.asarray(values, np.float64) + shift)
  rest = 1.0 / (float(values[-1]) + shift)

  def apply(block: np.ndarray) -> np.ndarray:
    block = np.asarray(block, np.float64).reshape(len(vectors), -1)
    coordinates = vectors.T @ block
    return vectors @ ((inverse - rest)[:, None] * coordinates) + rest * block

  size = vectors.shape[0]
  return scipy.sparse.linalg.LinearOperator((size, size), matvec=apply, matmat=apply,
                                            dtype=np.float64)


def ridge_coefficients_cg(kernel: scipy.sparse.linalg.LinearOperator | np.ndarray, target: np.ndarray,
                          shift: float, eigenpairs: tuple[np.ndarray, np.ndarray] | None = None,
                          rtol: float = 1e-6, max_iters: int = 500) -> tuple[np.ndarray, dict]:
  """(K + shift I)^{-1} y for one target column y [N] by conjugate gradients, in float64.

  Why: `ridge_coefficients` factors K whole, which a kernel of tens of thousands of examples on
  disk does not allow (10 GB and hours at 50,000). CG needs only products K p, each one pass over
  a `StoredKernelOperator`; `eigenpairs` (top values, vectors of K, as the spectrum job gives) make
  the `spectral_preconditioner`, so the iterations follow the spectrum below them rather than the
  top eigenvalue. `shift` is the ridge itself (ridge_coefficients' regularizer * mean(diag K)).

  Stops when ||y - (K + shift I) x|| <= rtol ||y|| (CG's own running residual) or after
  `max_iters`. Returns x and {"method": "cg", "iterations", "relative_residual" (recomputed from
  x, one more product with K), "converged" (the tolerance met)}.
  """
  target = np.asarray(target, np.float64)
  kernel = scipy.sparse.linalg.aslinearoperator(kernel)
  size = target.shape[0]
  shifted = scipy.sparse.linalg.LinearOperator(
      (size, size), matvec=lambda x: kernel.matvec(x) + shift * np.ravel(x), dtype=np.float64)
  preconditioner = None
  if eigenpairs is not None and float(eigenpairs[0][-1]) + shift > 0:
    preconditioner = spectral_preconditioner(*eigenpairs, shift)
  iterations = 0

  def count(_):
    nonlocal iterations
    iterations += 1

  solution, info = scipy.sparse.linalg.cg(shifted, target, rtol=rtol, atol=0.0, maxiter=max_iters,
                                          M=preconditioner, callback=count)
  norm = float(np.linalg.norm(target))
  residual = float(np.linalg.norm(target - shifted.matvec(solution))) / norm if norm else 0.0
  return solution, {"method": "cg", "iterations": iterations, "relative_residual": residual,
                    # scipy's cg says info 0 also when max_iters=0 ran no iteration (x = 0).
                    "converged": bool(residual <= rtol or (info == 0 and iterations > 0))}


@dataclasses.dataclass(frozen=True)
class KernelRegression:
  """A fitted kernel-regression classifier: its coefficients (K + lambda I)^{-1} Y, [N_train, C]."""
  coefficients: np.ndarray

  @classmethod
  def fit(cls, k_train: np.ndarray, labels: np.ndarray, num_classes: int, *,
          regularizer: float = 0.0, solver: str = "cholesky") -> "KernelRegression":
    """Fits on the training kernel [N, N], in the kernel's dtype (float64 kernels stay float64)."""
    k_train = np.asarray(k_train)
    with jax.enable_x64(k_train.dtype == np.float64):
      targets = regression_targets(jnp.asarray(labels), num_classes, k_train.dtype)
      coefficients = ridge_coefficients(jnp.asarray(k_train), targets, regularizer, solver)
      coefficients = np.asarray(coefficients)
    if not np.all(np.isfinite(coefficients)):
      raise FloatingPointError(f"kernel regression with solver {solver!r} and regularizer "
                               f"{regularizer} gave non-finite coefficients: the kernel is singular "
                               f"or not positive definite; raise the regularizer or use eigh/lstsq.")
    return cls(coefficients)

  @property
  def num_classes(self) -> int:
    return self.coefficients.shape[1]

  def predict(self, k_test_train: np.ndarray) -> np.ndarray:
    """Scores [N_test, C] from the kernel between test and training examples [N_test, N_train]."""
    return np.asarray(k_test_train) @ self.coefficients

  def accuracy(self, k_test_train: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(self.predict(k_test_train), -1) == np.asarray(labels)))

  def logits_fn(self, kernel_fn: KernelFn, train_images: np.ndarray,
                block_size: int | None = None) -> LogitsFn:
    """`images -> scores [N, C]` computing K(images, train_images) in jax: a model for the attacks.
    `block_size`: that many training images at a time (`kernel_scores`)."""
    coefficients = jnp.asarray(self.coefficients)
    train_images = jnp.asarray(train_images, coefficients.dtype)
    return lambda images: kernel_scores(kernel_fn, images, train_images, coefficients, block_size)


def kernel_scores(kernel_fn: KernelFn, images: jax.Array, train_images: jax.Array,
                  coefficients: jax.Array, block_size: int | None = None) -> jax.Array:
  """K(images, train_images) @ coefficients. With `block_size` below the training set's size, a
  block of training images at a time (lax.scan; each block recomputed in the backward pass), so an
  attack holds kernels of [N, block_size] instead of [N, N_train]: for a Myrtle kernel, whose every
  pair carries a (H W)^2 covariance, the whole row of a CIFAR-10 batch against 5,000 training
  images would take terabytes."""
  with jax.default_matmul_precision("highest"):
    return _kernel_scores(kernel_fn, images, train_images, coefficients, block_size)


def _kernel_scores(kernel_fn: KernelFn, images: jax.Array, train_images: jax.Array,
                   coefficients: jax.Array, block_size: int | None) -> jax.Array:
  num_train = train_images.shape[0]
  if block_size is None or block_size >= num_train:
    return kernel_fn(images, train_images) @ coefficients
  pad = -num_train % block_size
  train_images = jnp.concatenate([train_images, jnp.repeat(train_images[:1], pad, 0)])
  coefficients = jnp.concatenate([coefficients, jnp.zeros((pad, coefficients.shape[1]),
                                                          coefficients.dtype)])  # padding adds 0
  blocks = (train_images.reshape(-1, block_size, *train_images.shape[1:]),
            coefficients.reshape(-1, block_size, coefficients.shape[1]))

  @jax.checkpoint
  def add_block(total, block):
    block_images, block_coefficients = block
    return total + kernel_fn(images, block_images) @ block_coefficients, None

  zeros = jnp.zeros((images.shape[0], coefficients.shape[1]),
                    jnp.result_type(images.dtype, coefficients.dtype))
  return jax.lax.scan(add_block, zeros, blocks)[0]


def predictor(kernel_fn: KernelFn, train_images: jax.Array, labels: jax.Array, num_classes: int, *,
              regularizer: float = 0.0, solver: str = "cholesky") -> LogitsFn:
  """Kernel regression fitted inside jax: `images -> scores`, differentiable in the training images
  too (the solve is traced), as dataset optimisation needs."""
  targets = regression_targets(labels, num_classes, train_images.dtype)
  with jax.default_matmul_precision("highest"):
    gram = kernel_fn(train_images, train_images)
  coefficients = ridge_coefficients(gram, targets, regularizer, solver)
  return lambda images: kernel_scores(kernel_fn, images, train_images, coefficients)
