"""lobpcg.lobpcg_top against numpy's dense float64 solver: the top pairs of decaying, repeated and
rank-deficient spectra (zero rows, as the spectrum job's padding makes), one product of the block
per iteration, and its stopping rule measured with exact products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ntk_scale.ntk.lobpcg import lobpcg_top

from test_kernel_regression import all_highest
from test_spectrum import random_psd


def with_spectrum(values, seed=0):
  """Q diag(values) Q^T for a random orthogonal Q."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(values), len(values))))
  return (q * values) @ q.T


def top_pairs(matrix, width, k, max_iters, tol, seed=1):
  block = np.random.default_rng(seed).standard_normal((matrix.shape[0], width))
  run = jax.jit(lambda m, b: lobpcg_top(lambda v: m @ v, b, max_iters, tol, converge=k))
  values, vectors, iterations = run(jnp.asarray(matrix), jnp.asarray(block))
  return np.asarray(values), np.asarray(vectors), int(iterations)


def assert_matches_eigh(matrix, values, vectors, k, rtol, max_angle):
  expected_values, expected_vectors = np.linalg.eigh(matrix)
  expected_values, expected_vectors = expected_values[::-1][:k], expected_vectors[:, ::-1][:, :k]
  np.testing.assert_allclose(values[:k], expected_values, rtol=rtol, atol=rtol * expected_values[0])
  assert np.max(scipy.linalg.subspace_angles(vectors[:, :k], expected_vectors)) < max_angle
  np.testing.assert_allclose(vectors.T @ vectors, np.eye(vectors.shape[1]), atol=1e-12)


def test_decaying_spectrum_in_float64_to_tol():
  matrix = random_psd(120)  # eigenvalues from 1e3 down over 8 decades
  with jax.enable_x64(True):
    values, vectors, iterations = top_pairs(matrix, 12, 8, 200, 1e-12)
  assert iterations < 200  # stopped on its tolerance
  residuals = np.linalg.norm(matrix @ vectors[:, :8] - vectors[:, :8] * values[:8], axis=0)
  assert residuals.max() <= 1e-12 * values[0]  # the rule it stopped on holds for exact products
  assert_matches_eigh(matrix, values, vectors, 8, rtol=1e-11, max_angle=1e-8)
  assert np.all(np.diff(values) <= 0)


def test_repeated_eigenvalues_give_their_eigenspace():
  spectrum = np.concatenate([[5.0] * 3, [4.0] * 2, np.linspace(2, 0.1, 75)])
  matrix = with_spectrum(spectrum)
  with jax.enable_x64(True):
    values, vectors, _ = top_pairs(matrix, 8, 5, 200, 1e-12)
  np.testing.assert_allclose(values[:5], [5, 5, 5, 4, 4], rtol=1e-12)
  assert_matches_eigh(matrix, values, vectors, 5, rtol=1e-12, max_angle=1e-8)


@pytest.mark.parametrize("rank", [3, 6])
def test_rank_below_the_block_and_zero_rows(rank):
  """A kernel of rank 3 or 6 with a block of 8 vectors, in 40 rows of which the last 4 are zero (the
  spectrum job's padding): residual directions vanish to rounding, and the zero eigenvalues fill the
  block without NaNs."""
  factor = np.random.default_rng(2).standard_normal((36, rank)) * np.arange(rank, 0, -1)
  matrix = np.zeros((40, 40))
  matrix[:36, :36] = factor @ factor.T
  with jax.enable_x64(True):
    values, vectors, _ = top_pairs(matrix, 8, min(rank, 5), 100, 1e-12)
  assert np.all(np.isfinite(values)) and np.all(np.isfinite(vectors))
  assert_matches_eigh(matrix, values, vectors, min(rank, 5), rtol=1e-11, max_angle=1e-7)
  np.testing.assert_allclose(vectors[36:, :rank], 0, atol=1e-12)


def test_float32_to_its_default_tol():
  matrix = random_psd(200, decay=False).astype(np.float32)
  values, vectors, _ = top_pairs(matrix, 14, 10, 300, 1e-5)
  assert values.dtype == np.float32
  exact = matrix.astype(np.float64)
  residuals = np.linalg.norm(exact @ vectors[:, :10] - vectors[:, :10] * values[:10], axis=0)
  assert residuals.max() <= 2e-5 * values[0]  # the tol, and the carried products' drift
  np.testing.assert_allclose(values[:10], np.linalg.eigvalsh(exact)[::-1][:10], rtol=1e-5)


def test_one_block_product_per_iteration():
  """jax's lobpcg_standard multiplies 4 blocks per iteration: here the start's block and then one
  block per iteration, each of the block's width."""
  matrix = random_psd(60)
  widths = []

  def product(v):
    widths.append(v.shape[1])
    return matrix @ v

  with jax.enable_x64(True), jax.disable_jit():  # the while loop runs in Python, once per iteration
    _, _, iterations = lobpcg_top(product, np.random.default_rng(0).standard_normal((60, 6)), 7, 0.0)
  assert int(iterations) == 7 and widths == [6] * 8


@pytest.mark.parametrize("iterations", [3, 60])
def test_float32_with_fast_decaying_residuals_stays_orthonormal(iterations):
  """A spectrum decaying as i^-2 to rank 300 of 1024 rows (the benchmark's kernels): in float32 the
  first residuals are so nearly dependent that some are lost to rounding. The zero columns they
  left made P lose orthonormality and the solve fall apart from its second iteration (eigenvalues
  off by 2 lambda_1 at the third); over many iterations the products carried along must not drift
  either."""
  rng = np.random.default_rng(0)
  factor = rng.standard_normal((1024, 300)) / np.arange(1, 301)
  matrix = (factor @ factor.T).astype(np.float32)
  values, vectors, _ = top_pairs(matrix, 30, 20, iterations, 0.0)
  exact = matrix.astype(np.float64)
  expected = np.linalg.eigvalsh(exact)[::-1][:20]
  residuals = np.linalg.norm(exact @ vectors[:, :20] - vectors[:, :20] * values[:20], axis=0)
  assert residuals.max() < 3e-5 * expected[0]
  np.testing.assert_allclose(values[:20], expected, rtol=0, atol=1e-5 * expected[0])
  np.testing.assert_allclose(vectors.T.astype(np.float64) @ vectors, np.eye(30), atol=1e-4)


def test_iterating_past_convergence_keeps_the_block_orthonormal_and_its_pairs():
  """tol 0 on the kernel of rank 3 above (40 rows, 4 of them zero, a block of 8): from the first
  iteration on, every residual direction is lost to rounding, at every iteration. Replaced by
  random directions, the block stays orthonormal and its top 3 pairs numpy's; left as zero
  columns, 20 iterations later the eigenvalues were off by half of lambda_1 and the block by 1
  from orthonormal."""
  factor = np.random.default_rng(2).standard_normal((36, 3)) * np.arange(3, 0, -1)
  matrix = np.zeros((40, 40))
  matrix[:36, :36] = factor @ factor.T
  with jax.enable_x64(True):
    values, vectors, iterations = top_pairs(matrix, 8, 3, 20, 0.0)
  assert iterations == 20
  assert_matches_eigh(matrix, values, vectors, 3, rtol=1e-11, max_angle=1e-7)


def test_a_block_wider_than_a_third_of_the_rows():
  """A block of 5 of 12 rows: the basis [X, P, R] of 15 columns cannot be independent, so some
  of its directions are lost even after random ones replace them. Their zero columns must rank
  below every real Ritz value: ranked above, they became the "top" pairs (values of 90 for a
  largest eigenvalue of 12, zero vectors)."""
  matrix = with_spectrum(np.arange(12, 0, -1.0))
  with jax.enable_x64(True):
    values, vectors, _ = top_pairs(matrix, 5, 5, 50, 1e-10)
  assert_matches_eigh(matrix, values, vectors, 5, rtol=1e-10, max_angle=1e-7)


def test_it_stops_once_the_top_converge_pairs_meet_tol():
  """Two well separated eigenvalues (100, 50) above a cluster (1.0 to 0.9): the top 2 converge
  in a few iterations, the cluster's pairs in the rest of the block in tens. Asked for the top 2
  (`converge`, as the spectrum job asks for its k of a wider block), it stops once they meet tol,
  with exact products, while the others are still far from it (waiting for all 6 took 41
  iterations)."""
  matrix = with_spectrum(np.concatenate([[100.0, 50.0], np.linspace(1.0, 0.9, 58)]))
  with jax.enable_x64(True):
    values, vectors, iterations = top_pairs(matrix, 6, 2, 300, 1e-10)
  residuals = np.linalg.norm(matrix @ vectors - vectors * values, axis=0)
  assert residuals[:2].max() <= 1e-10 * values[0] < 1e-5 * values[0] < residuals[2:].max()
  np.testing.assert_allclose(values[:2], [100, 50], rtol=1e-12)
  assert iterations < 10


def test_every_product_of_the_solver_is_at_highest_precision():
  """The basis' Gram matrices, projections and Ritz combinations: on GPUs (TF32) and TPUs
  (bfloat16 passes) float32 matmuls at the default precision lose the orthogonality the solver
  rests on. Read from the traced program, with a kernel product at HIGHEST (on this CPU the
  precision changes nothing)."""
  matrix = jnp.asarray(random_psd(40).astype(np.float32))
  block = jnp.asarray(np.random.default_rng(1).standard_normal((40, 6)).astype(np.float32))
  product = lambda m: (lambda v: jnp.matmul(m, v, precision=jax.lax.Precision.HIGHEST))
  assert all_highest(lambda m, b: lobpcg_top(product(m), b, 5, 1e-6, converge=3), matrix, block)
