"""Injected class features and the DCT low-pass filter (Ortiz-Jimenez et al. 2023), on digits."""

import ml_collections
import numpy as np
import pytest
from scipy import fft

from ntk_scale.base_config import base_config
from ntk_scale.data import check_data_config, load_dataset, load_digits
from ntk_scale.data.feature_injection import (check_transform_config, class_directions,
                                              dct_basis_image, inject_features, low_pass,
                                              sign_carrier, zigzag_frequencies)


@pytest.fixture(scope="module")
def digits():
  return load_digits()


def _inject_config(**fields):
  c = base_config()
  c.data.transform.name = "inject"
  for k, v in fields.items():
    c.data.transform[k] = v
  return c.data


def test_directions_are_orthonormal_low_frequency_and_class_dependent():
  u = class_directions((8, 8, 3), num_classes=10, num_frequencies=14, seed=3)
  flat = u.reshape(10, -1)
  np.testing.assert_allclose(flat @ flat.T, np.eye(10), atol=1e-12)
  # Every direction is one of the 14 lowest non-constant DCT images (up to sign), same on each channel.
  allowed = zigzag_frequencies(8, 8)[1:15]
  for v in u:
    np.testing.assert_allclose(v[..., 0], v[..., 2])
    coefficients = fft.dctn(v[..., 0] * np.sqrt(3), norm="ortho")
    (i,), (j,) = np.nonzero(np.abs(coefficients) > 1e-9)
    assert (i, j) in allowed and abs(abs(coefficients[i, j]) - 1) < 1e-9
  # Deterministic in the seed; another seed gives other directions.
  np.testing.assert_array_equal(u, class_directions((8, 8, 3), 10, 14, seed=3))
  assert not np.allclose(u, class_directions((8, 8, 3), 10, 14, seed=4))


def test_injected_pattern_depends_on_the_class_and_has_pixel_size_beta(digits):
  beta = 0.25
  u = class_directions((8, 8, 1), 10, 10, seed=0)
  zeros = type(digits.train)(np.full((10, 8, 8, 1), 0.5, np.float32), np.arange(10, dtype=np.int32))
  delta = inject_features(zeros, u, beta).images - 0.5
  np.testing.assert_allclose(np.abs(delta).reshape(10, -1).max(axis=1), beta, rtol=1e-6)
  for y in range(10):  # the change of class y lies along u_y only
    along = delta[y].ravel() @ u.reshape(10, -1).T
    assert abs(along[y]) > 0 and np.allclose(np.delete(along, y), 0, atol=1e-6)


def test_beta_zero_is_the_identity(digits):
  out = load_dataset(_inject_config(beta=0.0))
  np.testing.assert_array_equal(out.train.images, digits.train.images)
  np.testing.assert_array_equal(out.test.images, digits.test.images)
  np.testing.assert_array_equal(out.train.labels, digits.train.labels)


def test_injection_applies_to_both_splits_and_removing_the_projection_leaves_only_the_feature(digits):
  out = load_dataset(_inject_config(beta=0.1))
  assert not np.array_equal(out.train.images, digits.train.images)
  assert not np.array_equal(out.test.images, digits.test.images)
  assert out.train.images.min() >= 0 and out.train.images.max() <= 1
  u = class_directions((8, 8, 1), 10, 10, seed=0).reshape(10, -1)
  # Without clipping, remove_projection makes x' . u_k = beta * [k == y] / max|u_y| exactly.
  split = type(digits.train)(0.45 + 0.1 * digits.train.images, digits.train.labels)
  perp = inject_features(split, u.reshape(10, 8, 8, 1), 0.05, remove_projection=True)
  coords = perp.images.reshape(len(split), -1).astype(np.float64) @ u.T
  expected = 0.05 / np.abs(u).max(axis=1)
  np.testing.assert_allclose(coords, np.eye(10)[split.labels] * expected, atol=1e-5)


def test_low_pass_keeps_low_frequencies_and_removes_high_ones():
  low = 0.5 + 0.2 * dct_basis_image(8, 8, (1, 2))
  high = 0.2 * dct_basis_image(8, 8, (5, 6))
  split = type(load_digits().train)(np.stack([low, low + high])[..., None].astype(np.float32),
                                    np.zeros(2, np.int32))
  out = low_pass(split, cutoff=4).images[..., 0]
  np.testing.assert_allclose(out[0], low, atol=1e-6)
  np.testing.assert_allclose(out[1], low, atol=1e-6)
  # At the full size every frequency is kept: the images themselves, not a rounded round trip.
  np.testing.assert_array_equal(low_pass(split, cutoff=8).images, split.images)


@pytest.mark.parametrize("field, value, message", [
    ("name", "blur", "config.data.transform.name='blur'"),
    ("beta", -0.1, "config.data.transform.beta=-0.1"),
    ("num_frequencies", 5, "config.data.transform.num_frequencies=5"),
    ("num_frequencies", 64, "config.data.transform.num_frequencies=64 exceeds the 63"),
    ("seed", -1, r"config.data.transform.seed=-1 must be an integer in \[0, 2\*\*32\)"),
])
def test_bad_transform_fields_are_named_before_loading(field, value, message):
  with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
    check_data_config(_inject_config(**{field: value}))


def test_sign_carrier_ignores_num_frequencies_and_seed(digits):
  """The "sign" patterns are fixed: the dct carrier's num_frequencies and seed, unused, are not
  checked, and change nothing."""
  plain = load_dataset(_inject_config(beta=0.1, carrier="sign"))
  odd = _inject_config(beta=0.1, carrier="sign", num_frequencies=5, seed=-1)
  check_data_config(odd)
  np.testing.assert_array_equal(load_dataset(odd).train.images, plain.train.images)


def test_bad_low_pass_cutoff_is_named():
  c = base_config().data
  c.transform.name, c.transform.cutoff = "low_pass", 0
  with pytest.raises(ValueError, match=r"config\.data\.transform\.cutoff=0"):
    check_data_config(c)


def test_injection_on_2x2_images_matches_the_hand_derived_patterns():
  # The 2-point orthonormal DCT-II basis is [1, 1] / sqrt(2) and [1, -1] / sqrt(2); the three
  # non-constant 2x2 basis images are their outer products, +-1/2 on each pixel, so the pattern
  # beta * u / max|u| is +-beta on every pixel and channel, with these sign layouts:
  layouts = {(0, 1): [[1, -1], [1, -1]], (1, 0): [[1, 1], [-1, -1]], (1, 1): [[1, -1], [-1, 1]]}
  beta = 0.1
  u = class_directions((2, 2, 3), num_classes=3, num_frequencies=3, seed=1)
  x = np.full((4, 2, 2, 3), 0.5, np.float32)
  x[3] = 0.95  # near the top of the box: the + pixels clip to 1
  labels = np.array([0, 1, 2, 0], np.int32)
  out = inject_features(type(load_digits().train)(x, labels), u, beta).images.astype(np.float64)
  found = []
  for y in range(3):
    delta = out[y] - 0.5
    assert np.all(delta == delta[..., :1])  # the same on every channel
    sign = np.sign(delta[0, 0, 0])
    layout = [k for k, v in layouts.items()
              if np.allclose(delta[..., 0], beta * sign * np.array(v), atol=1e-7)]
    assert len(layout) == 1, delta[..., 0]
    found.append(layout[0])
  assert sorted(found) == sorted(layouts)  # each class its own frequency
  # The last image, class 0 again: its pattern, clipped to [0, 1].
  expected = np.clip(0.95 + (out[0] - 0.5), 0.0, 1.0)
  np.testing.assert_allclose(out[3], expected, atol=1e-7)
  assert out[3].max() == 1.0 and np.isclose(out[3].min(), 0.85)


def test_sign_carrier_is_the_authors_hand_derived_patterns(digits):
  """Ortiz-Jimenez et al.'s carrier on 8x8 images: class 0 is the sign of cos(pi (2n + 1) / 16)
  along columns (+ on columns 0-3, - on 4-7), class 2 that of rows times columns, class 5 minus
  class 0; every pixel moves by exactly beta, and removing the projection removes x's component
  in the 5-dimensional span of the 10 patterns."""
  halves = np.repeat([1.0, -1.0], 4)
  out = load_dataset(_inject_config(beta=0.1, carrier="sign"))
  patterns = {0: np.tile(halves, (8, 1)), 2: np.outer(halves, halves), 5: -np.tile(halves, (8, 1))}
  split = type(digits.train)(0.45 + 0.1 * digits.train.images, digits.train.labels)
  v = sign_carrier((8, 8, 1))
  for y, pattern in patterns.items():
    np.testing.assert_array_equal(v[y, :, :, 0], pattern)
  delta = inject_features(split, v, 0.05).images - split.images
  np.testing.assert_allclose(np.abs(delta), 0.05, atol=1e-6)
  np.testing.assert_allclose(delta, 0.05 * v[split.labels], atol=1e-6)
  perp = inject_features(split, v, 0.05, remove_projection=True).images.astype(np.float64)
  basis = np.linalg.qr(v[:5].reshape(5, -1).T)[0]  # classes 0-4 span all 10
  rest = (perp - 0.05 * v[split.labels]).reshape(len(split), -1)
  np.testing.assert_allclose(rest @ basis, 0, atol=1e-5)
  assert out.train.images.min() >= 0 and out.train.images.max() <= 1
  with pytest.raises(ValueError, match=r"config\.data\.transform\.carrier='plaid'"):
    check_data_config(_inject_config(beta=0.1, carrier="plaid"))


def test_injection_with_augmentation_is_refused_and_the_cifar10_setting_has_none():
  """crop_flip ran on the injected training images: a flip mirrors a pattern, and a mirrored sign
  pattern is another class's (class y+5's for six classes), so about 30% of CIFAR-10 training
  images carried another class's feature while the test images did not. The authors' loaders have
  no augmentation; their learning rate peaks halfway, their final PGD-50 steps 2/255 with 10
  restarts."""
  from test_train import load_config
  c = load_config("catastrophic_overfitting", "data=cifar10,beta=0.0314")
  assert c.data.augment == "none" and c.optimizer.peak_fraction == 0.5
  assert c.eval_attacks.pgd.num_steps == 50 and c.eval_attacks.pgd.restarts == 10
  assert c.eval_attacks.pgd.step_size == pytest.approx(2 / 255)
  check_data_config(c.data)
  c.data.augment = "crop_flip"
  with pytest.raises(ValueError, match="config.data.augment='crop_flip' with "
                                       "config.data.transform.name='inject'"):
    check_data_config(c.data)


def test_the_sign_carrier_needs_sides_that_are_multiples_of_4():
  """cos(pi k (2n + 1) / 2N) of frequency k = 1 or 2 is zero on a pixel where k (2n + 1) is N times
  an odd number (N odd, or twice an odd number), where the pattern's sign is rounding's: those
  pixels moved by beta or not at all. The datasets' sides (8, 28, 32) are multiples of 4."""
  from ntk_scale.data.feature_injection import check_transform_config
  transform = _inject_config(beta=0.1, carrier="sign").transform
  for shape in ((8, 8, 1), (28, 28, 1), (32, 32, 3), (4, 12, 1)):
    check_transform_config(transform, shape, 10)
    assert np.all(np.abs(sign_carrier(shape)) == 1)
  for shape in ((7, 7, 1), (6, 8, 1), (8, 10, 1), (3, 3, 1), (2, 2, 1)):
    with pytest.raises(ValueError, match=r"carrier='sign' is the authors' carrier for 10 classes of "
                                         r"images whose height and width are multiples of 4"):
      check_transform_config(transform, shape, 10)
  assert np.any(sign_carrier((7, 7, 1)) == 0) and np.any(sign_carrier((6, 8, 1)) == 0)


def test_zigzag_order_goes_by_anti_diagonal_then_row():
  """The order that names features by seed: a transposed order (ties broken by column) gave every
  seed the transposed directions."""
  assert zigzag_frequencies(3, 3)[:6] == [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0)]
  assert zigzag_frequencies(2, 3) == [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (1, 2)]


def test_low_pass_removes_the_cutoff_frequency_on_each_axis_clips_and_keeps_zeros_at_full_size(digits):
  """The frequency at the cutoff itself goes (rows and columns alike), the result is clipped to
  [0, 1] as the undone DCT of the kept frequencies, and at the full size the images (black zeros
  included) come back exactly."""
  flat = np.full((8, 8), 0.5)
  for frequency in ((4, 0), (0, 4)):
    images = (flat + 0.1 * dct_basis_image(8, 8, frequency))[None, :, :, None]
    out = low_pass(type(digits.train)(images.astype(np.float32), np.zeros(1, np.int32)), cutoff=4)
    np.testing.assert_allclose(out.images[0, :, :, 0], 0.5, atol=1e-6)
  coefficients = fft.dctn(digits.train.images.astype(np.float64), axes=(1, 2), norm="ortho")
  coefficients[:, 2:] = 0.0
  coefficients[:, :, 2:] = 0.0
  expected = np.clip(fft.idctn(coefficients, axes=(1, 2), norm="ortho"), 0, 1)
  out = low_pass(digits.train, cutoff=2)
  assert out.images.min() >= 0 and expected.min() == 0  # the clip matters here
  np.testing.assert_allclose(out.images, expected, atol=1e-6)
  np.testing.assert_array_equal(low_pass(digits.train, cutoff=8).images, digits.train.images)


def test_each_class_draws_its_frequency_and_sign_from_the_seed():
  """The seed names the features: numpy's Generator of `seed` draws the classes' distinct
  frequencies among the `num_frequencies` lowest non-constant ones, then a sign per class; each
  direction's one DCT coefficient (of sign s) must show both draws, and both signs occur."""
  for seed in (0, 3):
    u = class_directions((8, 8, 1), num_classes=10, num_frequencies=14, seed=seed)
    rng = np.random.default_rng(seed)
    frequencies = rng.choice(14, 10, replace=False)
    signs = rng.choice([-1.0, 1.0], 10)
    assert set(signs) == {-1.0, 1.0}
    candidates = zigzag_frequencies(8, 8)[1:15]
    for v, k, s in zip(u, frequencies, signs):
      expected = np.zeros((8, 8))
      expected[candidates[k]] = s
      np.testing.assert_allclose(fft.dctn(v[..., 0], norm="ortho"), expected, atol=1e-12)


def test_sign_carrier_classes_3_and_4_are_frequencies_2_1_and_1_2():
  """(row, column) frequencies (2, 1) and (1, 2) of 8x8 images, written out from the DCT-II basis
  cos(pi k (2n + 1) / 16): k = 1 is + on 0-3 and - on 4-7, k = 2 (cos(pi (2n + 1) / 8)) is + on
  0-1 and 6-7 and - on 2-5. Classes 8 and 9 are their negatives."""
  halves = np.array([1, 1, 1, 1, -1, -1, -1, -1], float)
  quarters = np.array([1, 1, -1, -1, -1, -1, 1, 1], float)
  n = np.arange(8)
  for k, signs in ((1, halves), (2, quarters)):  # the hand-written signs are the basis's
    np.testing.assert_array_equal(np.sign(np.cos(np.pi * k * (2 * n + 1) / 16)), signs)
  v = sign_carrier((8, 8, 2))
  np.testing.assert_array_equal(v[3, :, :, 1], np.outer(quarters, halves))
  np.testing.assert_array_equal(v[4, :, :, 1], np.outer(halves, quarters))
  np.testing.assert_array_equal(v[8, :, :, 0], -np.outer(quarters, halves))
  np.testing.assert_array_equal(v[9, :, :, 0], -np.outer(halves, quarters))


def test_sign_carrier_refuses_other_than_10_classes():
  """Its patterns are 10; CIFAR-100's labels 10-99 would have none. Refused before loading (the
  image shape not yet known) and after."""
  transform = _inject_config(beta=0.1, carrier="sign").transform
  message = r"carrier='sign' is the authors' carrier for 10 classes.*this dataset has 100 classes"
  for shape in (None, (32, 32, 3)):
    with pytest.raises(ValueError, match=message):
      check_transform_config(transform, shape, 100)
  check_transform_config(transform, None, 10)


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_remove_projection_must_be_a_bool(value):
  """base_config's field is a bool that a ConfigDict keeps one; a transform written without it (a
  sweep's dict, a config of its own) can hold anything, and 1 or "yes" is not what is meant."""
  fields = {"name": "inject", "carrier": "sign", "beta": 0.1}
  if value is not None:
    fields["remove_projection"] = value
  message = r"config\.data\.transform\.remove_projection=.* must be True or False"
  with pytest.raises(ValueError, match=message):
    check_transform_config(ml_collections.ConfigDict(fields), (8, 8, 1), 10)
  fields["remove_projection"] = True
  check_transform_config(ml_collections.ConfigDict(fields), (8, 8, 1), 10)
