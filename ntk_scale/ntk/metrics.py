"""How far a kernel moved and how well it fits the labels: the measures of NTK evolution in
Loo et al. 2022 ("Evolution of Neural Tangent Kernels under Benign and Adversarial Training") and
Tsilivis & Kempe 2022 ("What Can the Neural Tangent Kernel Tell Us About Adversarial Robustness?").

Pure numpy on in-memory kernels: [N, N] (per logit or traced) or [N, N, C, C] ("full"), which
every function reads as the (N*C) x (N*C) matrix of spectrum.as_matrix. Frobenius products of
symmetric kernels need no transpose: Tr(K1 K2^T) = sum_ij K1_ij K2_ij.
"""

import numpy as np

from ntk_scale.ntk.spectrum import as_matrix


def _pair(k1: np.ndarray, k2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  a, b = as_matrix(np.asarray(k1, np.float64)), as_matrix(np.asarray(k2, np.float64))
  if a.shape != b.shape:
    raise ValueError(f"kernels of different shapes {a.shape} and {b.shape} cannot be compared.")
  return a, b


def similarity(k1: np.ndarray, k2: np.ndarray) -> float:
  """s(K1, K2) = Tr(K1 K2^T) / (||K1||_F ||K2||_F), the cosine between kernels: 1 for kernels equal
  up to scale, 0 for orthogonal ones (Loo et al. 2022, kernel distance = 1 - s)."""
  a, b = _pair(k1, k2)
  norms = np.linalg.norm(a) * np.linalg.norm(b)
  if norms == 0:
    raise ValueError("the similarity of a zero kernel is undefined.")
  return float(np.clip(np.vdot(a, b) / norms, -1.0, 1.0))


def distance(k1: np.ndarray, k2: np.ndarray) -> float:
  """Kernel distance 1 - s(K1, K2) (Loo et al. 2022; Fort et al. 2020): scale-free, so it measures
  how the kernel's shape changed, not how much it grew."""
  return 1.0 - similarity(k1, k2)


def relative_movement(k_t: np.ndarray, k_0: np.ndarray, k_final: np.ndarray) -> float:
  """||K_t - K_0||_F / ||K_T - K_0||_F: how much of its total movement the kernel has made by t,
  the radius of Tsilivis & Kempe 2022's polar plot (their angle is `movement_angle`)."""
  a, b = _pair(k_t, k_0)
  total = np.linalg.norm(as_matrix(np.asarray(k_final, np.float64)) - b)
  if total == 0:
    raise ValueError("the final kernel equals the initial one: relative movement is undefined.")
  return float(np.linalg.norm(a - b) / total)


def movement_angle(k_t: np.ndarray, k_0: np.ndarray) -> float:
  """arccos s(K_t, K_0) in radians: the polar angle of Tsilivis & Kempe 2022 (0: same direction)."""
  return float(np.arccos(similarity(k_t, k_0)))


def restrict_to_eigenspace(kernel: np.ndarray, vectors: np.ndarray) -> np.ndarray:
  """V^T K V for orthonormal columns V (eigenvectors of a reference kernel, e.g. its top or bottom
  k): the kernel's action on that eigenspace. The projection P K P with P = V V^T has the same
  Frobenius norms and products, so every metric above gives the same value on either; this one is
  k x k (Tsilivis & Kempe 2022 track movement of the top and bottom eigenspaces separately; their
  code truncates each kernel to its own top k instead, which gives other numbers)."""
  matrix = as_matrix(np.asarray(kernel, np.float64))
  vectors = np.asarray(vectors, np.float64)
  if vectors.ndim != 2 or vectors.shape[0] != matrix.shape[0]:
    raise ValueError(f"eigenvectors of shape {vectors.shape} do not match a {matrix.shape} kernel.")
  return vectors.T @ matrix @ vectors


def spectral_mass(eigenvalues: np.ndarray, k: int, trace: float | None = None) -> float:
  """Share of the spectrum in the top k eigenvalues, sum_{i<k} lambda_i / Tr K (Loo et al. 2022:
  the kernel concentrates on few directions as training goes on; Tsilivis & Kempe's code measures
  sum_{i<k} lambda_i^2 / sum lambda_i^2, which is larger). `trace` defaults to the sum of
  `eigenvalues`; pass Tr K when only the top of the spectrum was computed."""
  values = np.sort(np.asarray(eigenvalues, np.float64))[::-1]
  if not 1 <= k <= len(values):
    raise ValueError(f"k={k} is not in [1, {len(values)}] (the eigenvalues given).")
  total = float(values.sum()) if trace is None else float(trace)
  if total <= 0:
    raise ValueError(f"the kernel's trace is {total}; spectral mass needs a positive one.")
  return float(values[:k].sum() / total)


def centered_one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[N, C] one-hot labels centred over the examples, Y - 1 p^T with p the class frequencies
  (H Y, H = I - 1 1^T / N, as Cortes et al. 2012 centre targets): each column is one class's
  zero-mean target, rows still sum to 0, and a class absent from the subset is a zero column.
  On a class-balanced subset of all C classes this is one-hot minus 1/C; on two classes it is
  +-1/2, so the alignment is Cristianini et al.'s binary one. (One-hot minus 1/C on a subset of
  the classes, or unbalanced ones, leaves a constant in Y Y^T that label-blind kernels align with.)"""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0 or labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must be a non-empty vector of class indices in [0, {num_classes}).")
  one_hot = np.eye(num_classes)[labels]
  return one_hot - one_hot.mean(axis=0)


def target_alignment(kernel: np.ndarray, targets: np.ndarray) -> float:
  """Kernel-target alignment <K, Y Y^T>_F / (||K||_F ||Y Y^T||_F) (Cristianini et al. 2002, as
  used by Loo et al. 2022): for one target vector y it is y^T K y / (||K||_F ||y||^2); for a
  target per class (columns of Y) the numerator sums y_c^T K y_c over classes. 1 for K = Y Y^T."""
  matrix = as_matrix(np.asarray(kernel, np.float64))
  y = np.asarray(targets, np.float64)
  y = y[:, None] if y.ndim == 1 else y
  if y.ndim != 2 or y.shape[0] != matrix.shape[0]:
    raise ValueError(f"targets of shape {np.shape(targets)} do not match a {matrix.shape} kernel.")
  return alignment_from_parts(float(np.sum(y * (matrix @ y))), float(np.linalg.norm(matrix)), y)


def alignment_from_parts(quadratic: float, kernel_norm: float, targets: np.ndarray) -> float:
  """target_alignment from sum_c y_c^T K y_c and ||K||_F, for a kernel too large to hold: both
  come from streamed passes over it (one product K Y, and the Frobenius Gram of the kernels)."""
  y = np.asarray(targets, np.float64)
  y = y[:, None] if y.ndim == 1 else y
  target_norm = np.linalg.norm(y.T @ y)  # = ||Y Y^T||_F, computed in C x C
  if target_norm == 0 or kernel_norm == 0:
    raise ValueError("alignment with a zero kernel or zero targets is undefined.")
  return quadratic / (kernel_norm * target_norm)


def label_targets(labels: np.ndarray, num_classes: int, full: bool = False) -> np.ndarray:
  """The targets of label_alignment: centred one-hot labels [N, C] (one column per class) for an
  [N, N] kernel, the one column vec(Y) [N * C, 1] (row i*C + a) for a full [N, N, C, C] kernel."""
  if np.unique(np.asarray(labels)).size < 2:
    raise ValueError("label alignment needs examples of at least two classes; these are all of one.")
  targets = centered_one_hot(labels, num_classes)
  return targets.reshape(-1, 1) if full else targets


def label_alignment(kernel: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
  """target_alignment with one-hot labels centred over the examples (centered_one_hot): per class
  for an [N, N] kernel, and as the one vector vec(Y) (row i*C + a) for a full [N, N, C, C] kernel,
  whose rows are (example, logit). Undefined for examples of a single class (no target varies)."""
  return target_alignment(kernel, label_targets(labels, num_classes, np.ndim(kernel) == 4))


def frobenius_gram(kernels: list[np.ndarray]) -> np.ndarray:
  """G_ij = Tr(K_i K_j^T) for every pair: every metric between kernels of one subset follows from
  it, and it can be accumulated over row panels of kernels that do not fit in memory together."""
  flat = np.stack([as_matrix(np.asarray(k, np.float64)).reshape(-1) for k in kernels])
  return flat @ flat.T


def similarity_from_gram(gram: np.ndarray) -> np.ndarray:
  """s(K_i, K_j) for every pair, from their Frobenius Gram matrix."""
  norms = np.sqrt(np.diag(gram))
  if np.any(norms == 0):
    raise ValueError("the similarity of a zero kernel is undefined.")
  return np.clip(gram / np.outer(norms, norms), -1.0, 1.0)


def movement_from_gram(gram: np.ndarray, initial: int = 0, final: int = -1) -> np.ndarray:
  """relative_movement of every kernel from kernel `initial` towards kernel `final`, from their
  Gram matrix: ||K_t - K_0||^2 = G_tt + G_00 - 2 G_t0."""
  diag = np.diag(gram)
  squared = np.maximum(diag + diag[initial] - 2 * gram[:, initial], 0.0)
  if squared[final] == 0:
    raise ValueError("the final kernel equals the initial one: relative movement is undefined.")
  return np.sqrt(squared / squared[final])


def similarity_matrix(kernels: list[np.ndarray]) -> np.ndarray:
  """s(K_i, K_j) for every pair of kernels."""
  return similarity_from_gram(frobenius_gram(kernels))


def velocity_from_similarity(similarities: np.ndarray, epochs: list[float]) -> np.ndarray:
  """Distance between consecutive kernels per epoch elapsed, (1 - s(K_i, K_{i+1})) / (t_{i+1} - t_i)
  (Fort et al. 2020, as Loo et al. 2022 plot it): fast early in training, then settling."""
  times = np.asarray(epochs, np.float64)
  if similarities.shape != (len(times), len(times)) or len(times) < 2:
    raise ValueError(f"kernel velocity needs >= 2 kernels with one epoch each; got "
                     f"{similarities.shape[0]} kernels and {len(times)} epochs.")
  steps = np.diff(times)
  if np.any(steps <= 0):
    raise ValueError(f"epochs must increase strictly; got {times.tolist()}.")
  return (1.0 - np.diagonal(similarities, offset=1)) / steps


def kernel_velocity(kernels: list[np.ndarray], epochs: list[float]) -> np.ndarray:
  """velocity_from_similarity of kernels at `epochs`."""
  if len(kernels) != len(epochs):
    raise ValueError(f"{len(kernels)} kernels but {len(epochs)} epochs.")
  return velocity_from_similarity(similarity_matrix(kernels), epochs)
