"""Dataset transforms for catastrophic-overfitting studies: injected class features and DCT low-pass.

Ortiz-Jimenez et al. 2023 ("Catastrophic overfitting can be induced with discriminative non-robust
features") add to every image of class y a fixed low-frequency pattern v_y, x' = x + beta * v_y:
a feature that is perfectly discriminative but, for beta below the attack's eps, not robust.
Single-step adversarial training (FGSM) then overfits catastrophically for a range of beta; they
also low-pass filter the data to show where in the spectrum the trouble lives.

Two carriers (config.data.transform.carrier):
- "dct": orthonormal class directions u_y (in L2, over all pixels and channels): class y gets one
  of the `num_frequencies` lowest-frequency 2D DCT basis images (zig-zag order, the constant one
  excluded), the same pattern on every channel, with a sign; which frequency and sign each class
  gets is drawn from `seed`, so a config names the features exactly.
- "sign": the authors' own (create_linf_carrier in data/injection.py of gortizji/co_features):
  the sign of the DCT basis images of frequencies (0, 1), (1, 0), (1, 1), (2, 1), (1, 2) for
  classes 0-4 and their negatives for classes 5-9, so every pixel moves by exactly beta before
  the clip below; 10 classes; `num_frequencies` and `seed` unused.
beta is in pixel units: the injected pattern is beta * u_y / max|u_y|, so its largest pixel change
is beta, comparable with an L-inf eps. Results are clipped to [0, 1] so that the attacks'
eps-balls stay inside the image box (the authors' code did not clip; near 0 or 1 part of the
pattern is cut). With `remove_projection`, x's own component in the span of the patterns is
removed first (their "perp" data), so that before the clip the injected feature is the only
information the data carries along those directions.

The clip matters on digits, whose backgrounds are exactly 0: every move below 0 is cut there. At
beta 0.15 the sign carrier moves 61% of the pixels and leaves 32% unmoved; with remove_projection
and nothing injected (beta 0; the dct directions of configs/catastrophic_overfitting.py:perp), the
clip puts back coordinates along the patterns of up to 0.24 (mean 0.035), from which a
nearest-class-mean classifier is 41% accurate (80% from the original images' coordinates; chance
10%). The injected feature is still perfectly discriminative, but
`perp` data are not free of the images' own information along it.
"""

import dataclasses

import ml_collections
import numpy as np
from scipy import fft

from ntk_scale.config_numbers import is_finite_number, is_whole_number
from ntk_scale.data.batches import check_seed
from ntk_scale.data.dataset import Dataset, Split

TRANSFORMS = ("none", "inject", "low_pass")
CARRIERS = ("dct", "sign")
# The "sign" carrier's frequencies (row, column) for classes 0-4; classes 5-9 are their negatives.
SIGN_FREQUENCIES = ((0, 1), (1, 0), (1, 1), (2, 1), (1, 2))


def zigzag_frequencies(height: int, width: int) -> list[tuple[int, int]]:
  """All (row, column) DCT frequencies ordered from low to high: by i + j, then by i."""
  return sorted(((i, j) for i in range(height) for j in range(width)), key=lambda f: (f[0] + f[1], f[0]))


def dct_basis_image(height: int, width: int, frequency: tuple[int, int]) -> np.ndarray:
  """The orthonormal 2D DCT-II basis image of `frequency`, shape [height, width], unit L2 norm."""
  coefficients = np.zeros((height, width))
  coefficients[frequency] = 1.0
  return fft.idctn(coefficients, norm="ortho")


def class_directions(image_shape: tuple[int, int, int], num_classes: int, num_frequencies: int,
                     seed: int) -> np.ndarray:
  """Orthonormal class directions u_y, shape [num_classes, H, W, C], float64.

  Each class gets a distinct frequency among the `num_frequencies` lowest non-constant ones and a
  sign, both drawn from `seed`.
  """
  height, width, channels = image_shape
  candidates = zigzag_frequencies(height, width)[1:1 + num_frequencies]
  if len(candidates) < num_classes:
    raise ValueError(f"{num_classes} classes need num_frequencies >= {num_classes} and an image with "
                     f"that many non-constant DCT frequencies; got {num_frequencies} for {image_shape}.")
  rng = np.random.default_rng(seed)
  chosen = rng.choice(len(candidates), num_classes, replace=False)
  signs = rng.choice([-1.0, 1.0], num_classes)
  directions = np.stack([s * dct_basis_image(height, width, candidates[k]) for k, s in zip(chosen, signs)])
  return np.repeat(directions[..., None], channels, axis=-1) / np.sqrt(channels)


def sign_carrier(image_shape: tuple[int, int, int]) -> np.ndarray:
  """The "sign" carrier's patterns, [10, H, W, C] of +-1: the sign of the DCT basis image of
  SIGN_FREQUENCIES[y % 5] on every channel, negated for y >= 5 (10 classes, images whose sides are
  multiples of 4: check_transform_config; other sides put zeros of no sign on some pixels)."""
  height, width, channels = image_shape
  base = np.stack([np.sign(dct_basis_image(height, width, f)) for f in SIGN_FREQUENCIES])
  patterns = np.concatenate([base, -base])
  return np.repeat(patterns[..., None], channels, axis=-1)


def inject_features(split: Split, directions: np.ndarray, beta: float,
                    remove_projection: bool = False) -> Split:
  """x' = clip(x [- P x] + beta * u_y / max|u_y|, 0, 1) for each example, P the orthogonal
  projection on the span of the patterns u (orthonormal or not)."""
  x = split.images.astype(np.float64)
  flat_u = directions.reshape(len(directions), -1)
  if remove_projection:
    flat_x = x.reshape(len(x), -1)
    _, singular, basis = np.linalg.svd(flat_u, full_matrices=False)
    basis = basis[singular > 1e-10 * singular[0]]  # "sign": 5 directions for 10 classes
    x = (flat_x - (flat_x @ basis.T) @ basis).reshape(x.shape)
  patterns = directions / np.abs(flat_u).max(axis=1).reshape((-1,) + (1,) * (directions.ndim - 1))
  x = x + beta * patterns[split.labels]
  return Split(np.clip(x, 0.0, 1.0).astype(np.float32), split.labels)


def low_pass(split: Split, cutoff: int) -> Split:
  """Keeps the DCT frequencies (i, j) with i < cutoff and j < cutoff of each channel, clipped to [0, 1].
  A cutoff at or past both sides keeps every frequency: the images come back unchanged (the DCT
  round trip would move pixels by rounding)."""
  if cutoff >= max(split.images.shape[1:3]):
    return Split(split.images.astype(np.float32), split.labels)
  coefficients = fft.dctn(split.images.astype(np.float64), axes=(1, 2), norm="ortho")
  coefficients[:, cutoff:, :, :] = 0.0
  coefficients[:, :, cutoff:, :] = 0.0
  images = fft.idctn(coefficients, axes=(1, 2), norm="ortho")
  return Split(np.clip(images, 0.0, 1.0).astype(np.float32), split.labels)


def check_transform_config(transform: ml_collections.ConfigDict | None,
                           image_shape: tuple[int, int, int] | None, num_classes: int) -> None:
  """Raises ValueError naming the `config.data.transform` field that is wrong, before any data loads.

  `image_shape` (H, W, C) may be None when it is not known without loading; the size checks that
  need it are then left to `apply_transform`.
  """
  if transform is None:
    return
  p = "config.data.transform"
  name = transform.get("name", "none")
  if name not in TRANSFORMS:
    raise ValueError(f"{p}.name={name!r}; expected one of {', '.join(TRANSFORMS)}.")
  if name == "inject":
    carrier = transform.get("carrier", "dct")
    if carrier not in CARRIERS:
      raise ValueError(f"{p}.carrier={carrier!r}; expected one of {', '.join(CARRIERS)} (ours, or "
                       f"Ortiz-Jimenez et al.'s sign patterns).")
    # A side N not a multiple of 4 puts a zero of cos(pi k (2n + 1) / 2N), k = 1 or 2, on a pixel
    # (k (2n + 1) = N times an odd number), whose sign is rounding's: it moved by +-beta or not at all.
    if carrier == "sign" and (num_classes != 2 * len(SIGN_FREQUENCIES) or image_shape is not None
                              and (image_shape[0] % 4 or image_shape[1] % 4)):
      raise ValueError(f"{p}.carrier='sign' is the authors' carrier for 10 classes of images whose "
                       f"height and width are multiples of 4; this dataset has {num_classes} classes"
                       + (f" of {image_shape[0]}x{image_shape[1]}." if image_shape else "."))
    beta = transform.get("beta")
    if not (is_finite_number(beta) and beta >= 0):
      raise ValueError(f"{p}.beta={beta!r} must be a finite number >= 0 (pixel units of [0, 1] "
                       f"images, the largest change of a pixel, comparable with an L-inf eps).")
    if carrier == "dct":  # "sign" has fixed patterns: num_frequencies and seed are unused there
      k = transform.get("num_frequencies")
      if not is_whole_number(k, num_classes):
        raise ValueError(f"{p}.num_frequencies={k!r} must be an integer >= the {num_classes} classes "
                         f"(each class gets a distinct low frequency).")
      if image_shape is not None and k > image_shape[0] * image_shape[1] - 1:
        raise ValueError(f"{p}.num_frequencies={k} exceeds the {image_shape[0] * image_shape[1] - 1} "
                         f"non-constant DCT frequencies of {image_shape[0]}x{image_shape[1]} images.")
      check_seed(transform.get("seed"), f"{p}.seed")
    if not isinstance(transform.get("remove_projection"), bool):
      raise ValueError(f"{p}.remove_projection={transform.get('remove_projection')!r} must be True or False.")
  if name == "low_pass":
    cutoff = transform.get("cutoff")
    if not is_whole_number(cutoff, 1):
      raise ValueError(f"{p}.cutoff={cutoff!r} must be an integer >= 1 (frequencies kept per axis).")


def apply_transform(dataset: Dataset, transform: ml_collections.ConfigDict | None) -> Dataset:
  """`dataset` with `config.data.transform` applied to its train and test splits alike."""
  shape = dataset.train.images.shape[1:]
  check_transform_config(transform, shape, dataset.num_classes)
  name = "none" if transform is None else transform.get("name", "none")
  if name == "none":
    return dataset
  if name == "inject":
    if transform.get("carrier", "dct") == "sign":
      u = sign_carrier(shape)
    else:
      u = class_directions(shape, dataset.num_classes, transform.num_frequencies, transform.seed)
    fn = lambda s: inject_features(s, u, transform.beta, transform.remove_projection)
  else:
    fn = lambda s: low_pass(s, transform.cutoff)
  return dataclasses.replace(dataset, train=fn(dataset.train), test=fn(dataset.test))
