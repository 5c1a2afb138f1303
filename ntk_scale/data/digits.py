"""scikit-learn's handwritten digits: 1,797 real 8x8 images shipped inside the package (no network)."""

import numpy as np

from ntk_scale.data.dataset import Dataset, Split

# A fixed, stratified split so that every experiment sees the same test set, whatever its seed.
TEST_SIZE = 360
NUM_EXAMPLES = 1797
_SPLIT_SEED = 0
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)


def load_digits() -> Dataset:
  """Train (1,437) and test (360) splits; pixels 0..16 scaled to [0, 1], shape [N, 8, 8, 1]."""
  # scikit-learn takes ~2 s to import: only processes that load the digits pay for it.
  from sklearn.datasets import load_digits as sklearn_digits  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel

  bunch = sklearn_digits()
  images = (bunch.images / 16.0).astype(np.float32)[..., None]
  labels = bunch.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      images, labels, test_size=TEST_SIZE, stratify=labels, random_state=_SPLIT_SEED)
  return Dataset("digits", Split(x_train, y_train), Split(x_test, y_test), NUM_CLASSES)
