"""Training augmentation (random crop of the zero-padded image, random horizontal flip) against a
brute-force numpy search over every crop and flip."""

import jax
import numpy as np
import pytest

from ntk_scale import parallel
from ntk_scale.data.augment import augment, crop_flip

PAD = 4


def _numpy_candidates(image: np.ndarray, pad: int) -> dict[tuple[int, int, bool], np.ndarray]:
  """Every (row offset, column offset, flipped) window of the zero-padded image, by plain slicing."""
  h, w, _ = image.shape
  padded = np.zeros((h + 2 * pad, w + 2 * pad, image.shape[-1]), image.dtype)
  padded[pad:pad + h, pad:pad + w] = image
  out = {}
  for i in range(2 * pad + 1):
    for j in range(2 * pad + 1):
      window = padded[i:i + h, j:j + w]
      out[(i, j, False)] = window
      out[(i, j, True)] = window[:, ::-1]
  return out


def _which_crop(image: np.ndarray, augmented: np.ndarray, pad: int) -> tuple[int, int, bool]:
  """The one (offset, flip) whose window equals `augmented`; pixels are distinct and non-zero, so
  at most one can when every window holds some of the image (height and width >= 2 pad + 1)."""
  matches = [k for k, v in _numpy_candidates(image, pad).items() if np.array_equal(v, augmented)]
  assert len(matches) == 1, matches
  return matches[0]


def _distinct_images(n: int, h: int, w: int, c: int) -> np.ndarray:
  """Pixel values 1..n*h*w*c, all distinct and non-zero (zero is the padding)."""
  return np.arange(1, n * h * w * c + 1, dtype=np.float32).reshape(n, h, w, c)


def test_crop_flip_is_a_window_of_the_padded_image_drawn_from_the_key():
  images = _distinct_images(16, 10, 9, 3)  # non-square, 3 channels: the flip is along the width
  key = jax.random.key(7)
  out = np.asarray(crop_flip(key, images, pad=PAD))
  assert out.shape == images.shape and out.dtype == images.dtype
  found = [_which_crop(x, y, PAD) for x, y in zip(images, out)]
  # The draws the docstring describes: one key for the crops (offsets uniform in 0..2 pad), one
  # for the flips (probability 1/2).
  crop_key, flip_key = jax.random.split(key)
  offsets = np.asarray(jax.random.randint(crop_key, (16, 2), 0, 2 * PAD + 1))
  flips = np.asarray(jax.random.bernoulli(flip_key, 0.5, (16, 1, 1, 1))).reshape(-1)
  assert found == [(int(i), int(j), bool(f)) for (i, j), f in zip(offsets, flips)]


def test_crop_flip_covers_every_offset_and_flips_half_the_time():
  images = _distinct_images(1000, 9, 9, 1)  # 9 >= 2 pad + 1: every window holds image pixels
  out = np.asarray(crop_flip(jax.random.key(0), images, pad=PAD))
  found = np.array([_which_crop(x, y, PAD) for x, y in zip(images, out)])
  for axis in (0, 1):  # 9 offsets a side, 1000 / 9 = 111 expected each (sd ~10)
    counts = np.bincount(found[:, axis], minlength=2 * PAD + 1)
    assert len(counts) == 2 * PAD + 1 and counts.min() > 70 and counts.max() < 155, counts
  assert 420 < found[:, 2].sum() < 580  # flips: 500 expected (sd ~16)
  # Different keys (steps) draw different crops; the same key the same ones.
  np.testing.assert_array_equal(out, np.asarray(crop_flip(jax.random.key(0), images, pad=PAD)))
  assert not np.array_equal(out, np.asarray(crop_flip(jax.random.key(1), images, pad=PAD)))


def test_crop_flip_on_a_sharded_batch_under_jit_equals_one_device():
  # The train step runs it under jit on a batch split over the mesh: the crops must not depend on
  # the number of devices, or a run on 4 devices would not equal a run on one.
  mesh = parallel.make_mesh()
  images = _distinct_images(8 * mesh.devices.size, 9, 9, 2)
  key = jax.random.fold_in(jax.random.key(3), 17)
  sharded = jax.device_put(images, parallel.batch_sharding(mesh))
  out = jax.jit(lambda k, x: augment("crop_flip", k, x))(key, sharded)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(crop_flip(key, images)))


def test_augment_crop_flip_pads_by_four():
  # The standard CIFAR augmentation pads by 4 (crops offset by up to 4 pixels each way); the train
  # step calls it through augment(), without a pad of its own, so the default is what runs.
  images = _distinct_images(64, 9, 9, 1)
  key = jax.random.key(5)
  out = np.asarray(augment("crop_flip", key, images))
  found = [_which_crop(x, y, PAD) for x, y in zip(images, out)]
  offsets = np.asarray(jax.random.randint(jax.random.split(key)[0], (64, 2), 0, 2 * PAD + 1))
  assert [f[:2] for f in found] == [(int(i), int(j)) for i, j in offsets]
  rows = {f[0] for f in found}
  assert 0 in rows and 2 * PAD in rows  # the extreme offsets: 4 pixels of padding either way


def test_none_is_the_identity_and_unknown_names_are_named():
  images = _distinct_images(2, 4, 4, 1)
  np.testing.assert_array_equal(np.asarray(augment("none", jax.random.key(0), images)), images)
  with pytest.raises(ValueError, match=r"config\.data\.augment='cutout'"):
    augment("cutout", jax.random.key(0), images)
