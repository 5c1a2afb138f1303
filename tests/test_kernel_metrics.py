"""Kernel evolution metrics on hand-built kernels whose answers are known."""

import numpy as np
import pytest

from ntk_scale.ntk import metrics
from ntk_scale.ntk.spectrum import eigh


def psd(n, seed):
  x = np.random.default_rng(seed).standard_normal((n, n))
  return x @ x.T


def test_similarity_of_identical_scaled_and_orthogonal_kernels():
  k = psd(6, 0)
  assert metrics.similarity(k, k) == pytest.approx(1.0)
  assert metrics.similarity(k, 3.5 * k) == pytest.approx(1.0)  # scale-free
  assert metrics.distance(k, 2 * k) == pytest.approx(0.0, abs=1e-12)
  e = np.eye(4)
  k1, k2 = np.outer(e[0], e[0]) + np.outer(e[1], e[1]), np.outer(e[2], e[2])
  assert metrics.similarity(k1, k2) == 0.0 and metrics.distance(k1, k2) == 1.0
  # Two diagonal kernels: s = <d1, d2> / (|d1| |d2|).
  d1, d2 = np.array([1.0, 2.0, 0.0]), np.array([2.0, 0.0, 1.0])
  assert metrics.similarity(np.diag(d1), np.diag(d2)) == pytest.approx(2 / (np.sqrt(5) * np.sqrt(5)))


def test_linear_path_moves_linearly_at_a_known_angle():
  k0, k1 = psd(5, 1), psd(5, 2)
  for t in (0.0, 0.25, 0.5, 1.0):
    kt = t * k1 + (1 - t) * k0
    assert metrics.relative_movement(kt, k0, k1) == pytest.approx(t)
    expected = np.vdot(kt, k0) / (np.linalg.norm(kt) * np.linalg.norm(k0))
    assert metrics.movement_angle(kt, k0) == pytest.approx(np.arccos(expected), abs=1e-7)
  assert metrics.movement_angle(k0, k0) == pytest.approx(0.0, abs=1e-7)
  assert metrics.movement_angle(np.diag([1.0, 0]), np.diag([0, 1.0])) == pytest.approx(np.pi / 2)
  with pytest.raises(ValueError, match="final kernel equals the initial"):
    metrics.relative_movement(k1, k0, k0)


def test_restriction_to_eigenspaces_separates_top_and_bottom_movement():
  """K_t moves only in the reference kernel's bottom eigenspace: the top eigenspace sees no
  movement; the bottom one sees all of it; V^T K V has the Frobenius geometry of P K P."""
  n, k = 8, 3
  k0 = psd(n, 3)
  ref = eigh(k0)
  top, bottom = ref.vectors[:, :k], ref.vectors[:, -k:]
  step = bottom @ np.diag([1.0, 2.0, 3.0]) @ bottom.T
  kt, kT = k0 + 0.5 * step, k0 + step
  assert np.linalg.norm(metrics.restrict_to_eigenspace(kt, top) -
                        metrics.restrict_to_eigenspace(k0, top)) == pytest.approx(0.0, abs=1e-9)
  bottom_movement = metrics.relative_movement(*(metrics.restrict_to_eigenspace(m, bottom)
                                                for m in (kt, k0, kT)))
  assert bottom_movement == pytest.approx(0.5)
  projector = bottom @ bottom.T
  for a, b in ((kt, k0), (kT, kt)):
    assert metrics.similarity(metrics.restrict_to_eigenspace(a, bottom),
                              metrics.restrict_to_eigenspace(b, bottom)) == pytest.approx(
        metrics.similarity(projector @ a @ projector, projector @ b @ projector))


def test_spectral_mass():
  values = np.array([1.0, 6.0, 3.0])  # any order
  assert metrics.spectral_mass(values, 1) == pytest.approx(0.6)
  assert metrics.spectral_mass(values, 3) == pytest.approx(1.0)
  assert metrics.spectral_mass([6.0, 3.0], 1, trace=20.0) == pytest.approx(0.3)  # only the top known
  with pytest.raises(ValueError, match="k=4"):
    metrics.spectral_mass(values, 4)


def test_alignment_of_the_target_kernel_is_one():
  y = np.array([1.0, -1.0, 1.0, 1.0, -1.0])
  assert metrics.target_alignment(np.outer(y, y), y) == pytest.approx(1.0)
  assert metrics.target_alignment(np.eye(5), y) == pytest.approx(5 / (np.sqrt(5) * 5))
  labels = np.array([0, 1, 2, 2, 1, 0, 0])
  targets = metrics.centered_one_hot(labels, 3)
  np.testing.assert_allclose(targets.sum(axis=1), 0, atol=1e-12)
  assert metrics.label_alignment(targets @ targets.T, labels, 3) == pytest.approx(1.0)
  # On a class-balanced subset a constant kernel (it ignores the labels) has zero alignment.
  balanced = np.array([0, 1, 2, 2, 1, 0])
  assert metrics.label_alignment(np.ones((6, 6)), balanced, 3) == pytest.approx(0.0, abs=1e-12)
  # Full kernels: the one target vec(Y) over (example, logit) rows.
  vec = targets.reshape(-1)
  full = np.outer(vec, vec).reshape(7, 3, 7, 3).transpose(0, 2, 1, 3)
  assert metrics.label_alignment(full, labels, 3) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="class indices"):
    metrics.centered_one_hot(np.array([0, 3]), 3)


def test_similarity_matrix_and_velocity():
  k0, k1 = psd(4, 4), psd(4, 5)
  kernels = [k0, 0.5 * (k0 + k1), k1]
  s = metrics.similarity_matrix(kernels)
  assert s.shape == (3, 3)
  np.testing.assert_allclose(np.diag(s), 1.0)
  np.testing.assert_allclose(s, s.T)
  assert s[0, 2] == pytest.approx(metrics.similarity(k0, k1))
  velocity = metrics.kernel_velocity(kernels, [0.0, 0.5, 2.0])
  np.testing.assert_allclose(velocity, [metrics.distance(k0, kernels[1]) / 0.5,
                                        metrics.distance(kernels[1], k1) / 1.5])
  with pytest.raises(ValueError, match="increase strictly"):
    metrics.kernel_velocity(kernels, [0.0, 1.0, 1.0])
  movement = metrics.movement_from_gram(metrics.frobenius_gram(kernels))
  np.testing.assert_allclose(movement, [metrics.relative_movement(k, k0, k1) for k in kernels])
  np.testing.assert_allclose(movement, [0.0, 0.5, 1.0])


def test_full_kernels_compare_as_matrices():
  jac = np.random.default_rng(6).standard_normal((4, 2, 9))
  full = np.einsum("iap,jbp->ijab", jac, jac)
  assert metrics.similarity(full, 2 * full) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="different shapes"):
    metrics.similarity(full, np.eye(4))


def test_alignment_on_a_two_class_subset_is_cristianinis_binary_alignment():
  """Kernels of a subset of the classes (config.kernel.classes) or of an unbalanced split: the
  targets are centred over the examples, so two classes of ten give Cristianini et al.'s binary
  alignment y^T K y / (||K||_F N), y = +-1, and a kernel blind to the labels (constant) scores 0.
  (One-hot minus 1/C gave a constant kernel 0.62 here, above a kernel that separates the classes.)"""
  rng = np.random.default_rng(7)
  labels = np.array([3, 5] * 6)
  y = np.where(labels == 3, 1.0, -1.0)
  x = rng.standard_normal((12, 20))
  x[:, 0] += 2 * y
  k = x @ x.T
  binary = float(y @ k @ y) / (np.sqrt(np.sum(k * k)) * 12)
  assert metrics.label_alignment(k, labels, 10) == pytest.approx(binary, rel=1e-12)
  assert metrics.label_alignment(np.ones((12, 12)), labels, 10) == pytest.approx(0.0, abs=1e-12)
  unbalanced = np.array([0] * 6 + [1] * 2 + [2] * 2)
  assert metrics.label_alignment(np.ones((10, 10)), unbalanced, 3) == pytest.approx(0.0, abs=1e-12)
  np.testing.assert_allclose(metrics.centered_one_hot(unbalanced, 3).sum(axis=0), 0.0, atol=1e-12)
  with pytest.raises(ValueError, match="at least two classes"):
    metrics.label_alignment(k, np.full(12, 3), 10)  # a one-class subset: no target varies


def test_degenerate_inputs_are_refused_not_turned_into_nan():
  """A zero kernel (no direction), a zero trace, a negative label (np.eye(C)[-1] is silently the
  last class) and a single kernel (no step to take a velocity over) each raise, rather than give
  NaN, another class's targets or an empty velocity."""
  zero = np.zeros((3, 3))
  with pytest.raises(ValueError, match="zero kernel"):
    metrics.similarity(zero, np.eye(3))
  with pytest.raises(ValueError, match="zero kernel"):
    metrics.similarity_from_gram(np.diag([1.0, 0.0]))
  with pytest.raises(ValueError, match="zero kernel or zero targets"):
    metrics.target_alignment(zero, np.array([1.0, -1.0, 0.0]))
  with pytest.raises(ValueError, match="trace is 0.0"):
    metrics.spectral_mass(np.zeros(3), 1)
  with pytest.raises(ValueError, match="class indices"):
    metrics.centered_one_hot(np.array([0, -1, 1]), 3)
  with pytest.raises(ValueError, match=">= 2 kernels"):
    metrics.velocity_from_similarity(np.ones((1, 1)), [0.0])


def test_movement_a_rounding_below_zero_is_zero_not_nan():
  """Gram entries summed over row panels can break Cauchy-Schwarz by a rounding: ||K_1 - K_0||^2 =
  1 + 1 - 2 (1 + 4e-16) < 0 here, which is a kernel that did not move (0), not sqrt of a negative."""
  gram = np.array([[1.0, 1.0 + 4e-16, 0.0], [1.0 + 4e-16, 1.0, 0.0], [0.0, 0.0, 1.0]])
  np.testing.assert_array_equal(metrics.movement_from_gram(gram), [0.0, 0.0, 1.0])


def test_opposite_kernels_have_similarity_minus_one():
  """s(K, -K) = -1: the cosine is clipped to [-1, 1] against rounding only, so a kernel that turned
  against its start keeps its sign (clipped at 0 it would read as orthogonal, a distance of 1)."""
  k = psd(5, 8)
  assert metrics.similarity(k, -k) == pytest.approx(-1.0, abs=1e-12)
  assert metrics.distance(k, -k) == pytest.approx(2.0, abs=1e-12)
  s = metrics.similarity_from_gram(metrics.frobenius_gram([k, -k]))
  np.testing.assert_allclose(s, [[1.0, -1.0], [-1.0, 1.0]], atol=1e-12)


def test_gram_movement_and_velocity_refuse_what_they_cannot_measure():
  """movement_from_gram of a final kernel equal to the initial one is undefined (0 / 0, not NaN);
  a 3 x 3 similarity matrix with 2 epochs is refused, not a velocity of 2 steps over 1 interval;
  k = 0 top eigenvalues is no spectral mass."""
  k0, k1 = psd(4, 9), psd(4, 10)
  with pytest.raises(ValueError, match="final kernel equals the initial"):
    metrics.movement_from_gram(metrics.frobenius_gram([k0, k1, k0]))
  with pytest.raises(ValueError, match="3 kernels and 2 epochs"):
    metrics.velocity_from_similarity(metrics.similarity_matrix([k0, k1, k0]), [0.0, 1.0])
  with pytest.raises(ValueError, match="k=0"):
    metrics.spectral_mass(np.array([3.0, 1.0]), 0)


def test_mismatched_shapes_are_refused_naming_them():
  """Eigenvectors or targets with another row count than the kernel, and an empty label vector,
  are refused with messages saying so (not numpy's matmul or zero-size reduction errors)."""
  k = psd(4, 11)
  with pytest.raises(ValueError, match=r"eigenvectors of shape \(5, 2\) do not match"):
    metrics.restrict_to_eigenspace(k, np.ones((5, 2)))
  with pytest.raises(ValueError, match=r"targets of shape \(5,\) do not match"):
    metrics.target_alignment(k, np.ones(5))
  with pytest.raises(ValueError, match="non-empty vector of class indices"):
    metrics.centered_one_hot(np.array([], int), 3)
