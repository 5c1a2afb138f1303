"""Eigenpairs of kernels against numpy's dense solver on random PSD matrices: all of them, the top k
by LOBPCG in memory, and the top k streamed from a KernelStore by row panels smaller than it."""

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg

from ntk_scale.ntk import spectrum
from ntk_scale.ntk.store import KernelStore


def random_psd(n, seed=0, decay=True):
  """Q diag(lambda) Q^T with eigenvalues over 8 decades (like a kernel's), or a Wishart matrix."""
  rng = np.random.default_rng(seed)
  if not decay:
    x = rng.standard_normal((n, n // 2))
    return x @ x.T
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return (q * np.geomspace(1e3, 1e-5, n)) @ q.T


def full_kernel(n, c, seed=0):
  """[N, N, C, C] kernel of random Jacobian rows J[N, C, P]: K[i, j, a, b] = J[i, a] . J[j, b]."""
  jac = np.random.default_rng(seed).standard_normal((n, c, 3 * n))
  jac *= np.geomspace(1, 1e-2, 3 * n)  # a decaying spectrum, as real kernels have
  return np.einsum("iap,jbp->ijab", jac, jac), jac.reshape(n * c, -1)


def reference(matrix):
  values, vectors = np.linalg.eigh(matrix)
  return values[::-1], vectors[:, ::-1]


def assert_same_eigenpairs(result, matrix, k, rtol=1e-8, max_angle=1e-6):
  values, vectors = reference(matrix)
  np.testing.assert_allclose(result.values, values[:k], rtol=rtol)
  # Eigenvectors are defined up to sign (and rotation within a cluster): compare subspaces.
  assert np.max(scipy.linalg.subspace_angles(result.vectors, vectors[:, :k])) < max_angle
  np.testing.assert_allclose(result.vectors.T @ result.vectors, np.eye(k), atol=1e-10)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
@pytest.mark.parametrize("decay", [True, False])
def test_dense_eigh_matches_numpy(backend, decay):
  matrix = random_psd(80, decay=decay)
  result = spectrum.eigh(matrix, backend=backend)
  assert result.values.dtype == np.float64 and np.all(np.diff(result.values) <= 0)
  values, _ = reference(matrix)
  np.testing.assert_allclose(result.values, values, rtol=1e-8, atol=1e-12 * values[0])
  # Top 10 eigenvalues are well separated: their eigenvectors match one by one up to sign.
  assert_same_eigenpairs(spectrum.Eigenpairs(result.values[:10], result.vectors[:, :10]), matrix, 10)


def test_float32_kernel_is_decomposed_in_float64_unless_asked():
  matrix = random_psd(40).astype(np.float32)
  assert spectrum.eigh(matrix).values.dtype == np.float64
  assert spectrum.eigh(matrix, dtype="float32").values.dtype == np.float32


def test_full_kernel_is_the_example_logit_matrix():
  kernel, jac_rows = full_kernel(6, 3)
  np.testing.assert_allclose(spectrum.as_matrix(kernel), jac_rows @ jac_rows.T, rtol=1e-12)
  assert_same_eigenpairs(spectrum.eigh(kernel), jac_rows @ jac_rows.T, 18, max_angle=1e-5)


@pytest.mark.parametrize("decay", [True, False])
def test_top_k_matches_numpy(decay):
  matrix = random_psd(200, seed=1, decay=decay)
  result = spectrum.top_eigenpairs(matrix, 8)
  assert result.residuals.max() < 1e-7
  assert_same_eigenpairs(result, matrix, 8)


def write_store(directory, kernel, tile, labels=None, num_classes=1):
  """A complete KernelStore of `kernel`, written tile by tile as the kernel job does."""
  n = kernel.shape[0]
  meta = {"shape": list(kernel.shape), "tile": tile, "dtype": str(kernel.dtype),
          "num_classes": num_classes}
  labels = np.zeros(n, int) if labels is None else labels
  store = KernelStore.create_or_resume(str(directory), meta, ("shape",), np.arange(n), labels)
  blocks = range(-(-n // tile))
  for i in blocks:
    for j in blocks:
      if i <= j:
        store.write_tile(i, j, kernel[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile], mirror=True)
  store.update_meta(complete=True)
  return KernelStore.open(str(directory))


def test_top_k_streamed_from_store_equals_in_memory(tmp_path):
  matrix = random_psd(150, seed=2)
  store = write_store(tmp_path / "trace", matrix, tile=16)
  # Room for 40 rows of float64 per read; rounded down to whole tiles: 32 rows, 5 panels a pass.
  operator = spectrum.StoredKernelOperator(store, max_block_bytes=40 * 150 * 8)
  assert operator.rows_per_read == 32
  streamed = spectrum.top_eigenpairs(operator, 6)
  assert operator.panels_read == 5 * operator.passes and operator.passes > 2
  in_memory = spectrum.top_eigenpairs(matrix, 6)
  np.testing.assert_allclose(streamed.values, in_memory.values, rtol=1e-10)
  assert np.max(scipy.linalg.subspace_angles(streamed.vectors, in_memory.vectors)) < 1e-6
  # As processes 0, 1, 2 of three: contiguous shares of whole panels (1, 2 and 2 of the 5), each
  # read by one process only; their rows of K V stacked are K V.
  vectors = np.random.default_rng(0).normal(size=(150, 3))
  thirds = [spectrum.StoredKernelOperator(store, max_block_bytes=40 * 150 * 8, process=(p, 3))
            for p in range(3)]
  assert [t.shares[t.process] for t in thirds] == [(0, 32), (32, 96), (96, 150)]
  np.testing.assert_allclose(np.concatenate([t.share_product(vectors) for t in thirds]),
                             matrix @ vectors, rtol=1e-12)
  assert [t.panels_read for t in thirds] == [1, 2, 2]
  assert_same_eigenpairs(streamed, matrix, 6)
  assert operator.trace() == pytest.approx(np.trace(matrix), rel=1e-12)


def test_full_kernel_streamed_from_store(tmp_path):
  kernel, jac_rows = full_kernel(30, 3, seed=3)
  store = write_store(tmp_path / "full", kernel, tile=8)
  result = spectrum.store_top_eigenpairs(store, 5, max_block_bytes=7 * 90 * 3 * 8)  # 7-row panels
  assert_same_eigenpairs(result, jac_rows @ jac_rows.T, 5)


def test_bad_requests_are_refused(tmp_path):
  with pytest.raises(ValueError, match="k=0"):
    spectrum.top_eigenpairs(random_psd(20), 0)
  with pytest.raises(ValueError, match="dtype='float16'"):
    spectrum.eigh(random_psd(20), dtype="float16")
  with pytest.raises(ValueError, match=r"\[N, N\] or \[N, N, C, C\]"):
    spectrum.eigh(np.zeros((3, 4)))
  store = write_store(tmp_path / "unfinished", random_psd(20), tile=8)
  store.update_meta(complete=False)
  with pytest.raises(ValueError, match="unfinished kernel"):
    spectrum.StoredKernelOperator(store)


class _ScriptedEngine:
  """A stand-in LOBPCG engine whose k-th round returns residuals[k] (10 iterations a round)."""

  def __init__(self, residuals):
    self.residuals, self.rounds = list(residuals), 0

  def advance(self, block):
    self.rounds += 1
    return block, 10

  def ritz(self, block):
    r = self.residuals[self.rounds - 1]
    return spectrum.Eigenpairs(np.ones(1), np.ones((1, 1)), np.array([r]))


@pytest.mark.parametrize("residuals, rounds, stalled", [
    # Round-off floor: after 1e-3, two rounds in a row without a 10% gain (0.95e-3, 0.94e-3) stop it.
    ([1e-3, 9.5e-4, 9.4e-4, 1e-9], 3, 2),
    # A round with a gain over 10% (8e-4 < 0.9 * 9.5e-4) resets the count: it goes on to tol.
    ([1e-3, 9.5e-4, 8e-4, 7.9e-4, 1e-7], 5, 0),
    # Best-so-far, not the last round: a worse round then one just below the best are no gain.
    ([1e-3, 2e-3, 9.5e-4, 1e-9], 3, 2),
])
def test_rounds_stop_at_the_round_off_floor_and_only_there(residuals, rounds, stalled):
  """The spectrum's rounds end below tol, after max_iters, or when STALL_ROUNDS rounds in a row bring
  the best residual no STALL_GAIN (10%) lower: float32 round-off, where more rounds do nothing."""
  from ntk_scale.ntk.spectrum_rounds import STALL_ROUNDS, first_state, run_rounds

  assert STALL_ROUNDS == 2
  engine = _ScriptedEngine(residuals)
  pairs, state = run_rounds(engine, first_state(np.zeros((1, 1))), tol=1e-6, max_iters=400)
  assert state["rounds"] == rounds == engine.rounds and state["stalled"] == stalled
  assert state["residuals"] == residuals[:rounds] and pairs.residuals[0] == residuals[rounds - 1]


def test_a_streamed_round_leaves_the_block_it_started_from_unchanged(tmp_path):
  """scipy's LOBPCG overwrites the block it is given: passed the caller's, a round changed the
  saved state it started from (and the best round's block a stalled solve returns to)."""
  from ntk_scale.ntk.spectrum_rounds import StreamedKernel, start_block

  matrix = random_psd(60, seed=4)
  store = write_store(tmp_path / "kernel", matrix, tile=16)
  start = start_block(60, 8, 0, np.dtype(np.float64))
  engine = StreamedKernel(store, 4, "float64", 5, 1e-12, max_block_bytes=16 * 60 * 8, start=start)
  block = np.random.default_rng(1).standard_normal((60, 8))
  given = block.copy()
  advanced, iterations = engine.advance(block)
  np.testing.assert_array_equal(block, given)
  assert iterations == 5 and not np.array_equal(advanced, given)
  # The round moved toward the top 4: their Ritz values are numpy's to a few digits.
  np.testing.assert_allclose(engine.ritz(advanced).values, np.linalg.eigvalsh(matrix)[::-1][:4],
                             rtol=1e-3)


def test_eigenvalues_alone_are_numpys_largest_first():
  """`eigenvalues` (the spectrum without eigenvectors) is ordered as `eigh`: largest first."""
  matrix = random_psd(50, seed=5, decay=False)
  values = spectrum.eigenvalues(matrix)
  np.testing.assert_allclose(values, np.linalg.eigvalsh(matrix)[::-1], rtol=1e-9,
                             atol=1e-12 * np.abs(values).max())
  assert values[0] == values.max() and np.all(np.diff(values) <= 0)


def test_top_k_eigenvectors_have_the_sign_that_sums_to_at_least_zero():
  """LOBPCG returns v or -v by its start block: `top_eigenpairs` orients each, as `eigh` does, so
  that results showing eigenvectors do not differ by sign between solvers and device counts."""
  matrix = random_psd(200, seed=1)
  result = spectrum.top_eigenpairs(matrix, 6)  # 16 vectors of 200 rows: by LOBPCG, not dense
  assert np.all(result.vectors.sum(0) >= 0)
  _, vectors = reference(matrix)
  vectors = vectors[:, :6] * np.where(vectors[:, :6].sum(0) < 0, -1.0, 1.0)
  np.testing.assert_allclose(result.vectors, vectors, atol=1e-8)


class _CountedProducts(scipy.sparse.linalg.LinearOperator):
  """A matrix as an operator that counts its block products (one per LOBPCG iteration)."""

  def __init__(self, matrix):
    super().__init__(dtype=np.float64, shape=matrix.shape)
    self.matrix, self.products = matrix, 0

  def _matmat(self, block):
    self.products += 1
    return self.matrix @ block

  def _matvec(self, vector):
    return self._matmat(vector.reshape(-1, 1))[:, 0]


def test_top_k_tolerance_is_relative_to_the_kernels_scale():
  """tol bounds residuals relative to lambda_max whatever the kernel's units: scipy's absolute
  tolerance is scaled by lambda_max. Unscaled, 1e-6 K stopped short of tol (with a warning) and
  1e6 K ran every iteration for nothing; scaled, c K takes K's iterations to K's pairs times c."""
  matrix, tol = random_psd(200, seed=1), 1e-7
  unscaled = _CountedProducts(matrix)
  spectrum.top_eigenpairs(unscaled, 6, tol=tol)
  values, vectors = reference(matrix)
  for c in (1e-6, 1e6):
    operator = _CountedProducts(c * matrix)
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # "did not reach tol" is a failure here
      result = spectrum.top_eigenpairs(operator, 6, tol=tol)
    assert result.residuals.max() <= tol
    np.testing.assert_allclose(result.values, c * values[:6], rtol=1e-10)
    assert np.max(scipy.linalg.subspace_angles(result.vectors, vectors[:, :6])) < 1e-6
    assert abs(operator.products - unscaled.products) <= 3, (c, operator.products,
                                                             unscaled.products)


def test_rounding_floor_is_the_stored_dtypes_epsilon_times_the_trace():
  """eps * |Tr K| of the dtype the kernel was stored in: 2^-52 for float64, 2^-23 for float32. A
  float64 kernel given float32's floor would call eigenvalues 1e-9 of its trace null space."""
  assert spectrum.rounding_floor("float64", -3.0) == 3.0 * 2.0**-52
  assert spectrum.rounding_floor("float32", 3.0) == 3.0 * 2.0**-23


def test_a_kernel_with_infinite_entries_or_an_unknown_backend_is_refused_by_name():
  """An infinite entry is a NonFiniteKernelError naming the kernel, as NaN is (scipy's own check
  raised a bare ValueError naming neither); an unknown backend or an [N, N, C, D] kernel with
  C != D is refused with the accepted values, not run on jax or reshaped by numpy's error."""
  matrix = random_psd(6)
  matrix[2, 3] = matrix[3, 2] = np.inf
  for solve in (spectrum.eigh, spectrum.eigenvalues):
    with pytest.raises(spectrum.NonFiniteKernelError, match="the kernel holds NaN or infinite"):
      solve(matrix)
  with pytest.raises(ValueError, match="backend='torch'; expected one of numpy, jax"):
    spectrum.eigh(random_psd(6), backend="torch")
  with pytest.raises(ValueError, match=r"\[N, N\] or \[N, N, C, C\]; got shape \(2, 2, 3, 4\)"):
    spectrum.as_matrix(np.zeros((2, 2, 3, 4)))


def test_a_negative_oversample_still_gives_k_pairs():
  """The block is k + max(oversample, 0) vectors: oversample=-3 must not shrink it below k (LOBPCG
  would return k - 3 columns), so the top 5 of a 200 x 200 kernel are still numpy's top 5."""
  matrix = random_psd(200, seed=1)
  result = spectrum.top_eigenpairs(matrix, 5, oversample=-3)
  assert result.values.shape == (5,) and result.vectors.shape == (200, 5)
  assert_same_eigenpairs(result, matrix, 5)


def test_a_store_of_an_older_job_or_of_a_non_square_kernel_is_refused(tmp_path):
  """kernel.json without "complete" (written before 2026-12-01, when a killed job left nothing to
  tell) is unfinished, not complete; a [6, 4] kernel has no spectrum."""
  write_store(tmp_path / "old", random_psd(12), tile=4)
  path = tmp_path / "old" / "kernel.json"
  meta = json.loads(path.read_text())
  del meta["complete"]
  path.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="unfinished kernel"):
    spectrum.StoredKernelOperator(KernelStore.open(str(tmp_path / "old")))
  meta = {"shape": [6, 4], "tile": 2, "dtype": "float64", "num_classes": 1}
  store = KernelStore.create_or_resume(str(tmp_path / "wide"), meta, ("shape",), np.arange(6),
                                       np.zeros(6, int))
  store.update_meta(complete=True)
  with pytest.raises(ValueError, match=r"the spectrum needs a symmetric one"):
    spectrum.StoredKernelOperator(KernelStore.open(str(tmp_path / "wide")))


def test_top_k_with_a_block_of_a_fifth_of_the_rows_is_solved_dense():
  """As the spectrum job plans it, a block of k + oversample = 12 vectors is too wide for LOBPCG on
  60 rows (5 * 12 >= 60): one product with the identity and a dense eigh, residuals exactly 0;
  11 vectors (k = 8) go to LOBPCG (more products, residuals of its solve)."""
  matrix = random_psd(60, seed=4)
  dense = _CountedProducts(matrix)
  result = spectrum.top_eigenpairs(dense, 9, oversample=3)
  assert dense.products == 1 and np.all(result.residuals == 0)
  assert_same_eigenpairs(result, matrix, 9)
  iterative = _CountedProducts(matrix)
  spectrum.top_eigenpairs(iterative, 8, oversample=3)
  assert iterative.products > 1


def test_lobpcg_stops_a_decade_below_tol_and_warns_for_each_pair_that_missed_it():
  """scipy's stop is at tol / 10 (times the lambda_max estimate): the Ritz residuals recomputed
  after it land below tol (at scipy's tol itself, 1e-2 here stopped at 1.02e-2 and warned). A solve
  cut short by max_iters warns when any pair misses tol, counting those pairs, not only when all
  do."""
  matrix = random_psd(200, seed=1, decay=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert spectrum.top_eigenpairs(matrix, 6, tol=1e-2).residuals.max() <= 1e-2
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    residuals = spectrum.top_eigenpairs(matrix, 6, tol=1e-12, max_iters=5).residuals
  tol = float(np.median(residuals))  # 5 iterations reach no tol below it: the same 5 run again
  with pytest.warns(UserWarning, match=f"{int(np.sum(residuals > tol))} of 6 eigenpairs did not"):
    spectrum.top_eigenpairs(matrix, 6, tol=tol, max_iters=5)


def test_relative_residuals_divide_by_the_largest_eigenvalues_magnitude():
  """||K v - lambda v|| / |lambda_1| for every pair (not each pair's own lambda, and |.| of it):
  residual columns of norm 0.4 with eigenvalues (4, 1) are 0.1 each, and (-4, -1) too."""
  vectors = np.eye(2)
  for values in (np.array([4.0, 1.0]), np.array([-4.0, -1.0])):
    products = vectors * values + np.array([[0.0, 0.4], [0.4, 0.0]])
    np.testing.assert_allclose(spectrum.relative_residuals(products, vectors, values), [0.1, 0.1],
                               rtol=1e-12)
