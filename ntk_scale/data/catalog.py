"""Image shapes and split sizes of every dataset, known without reading it: `--dry_run` sizes a
job's programs for a dataset that is not on this machine (or not downloaded yet) from these."""

import ml_collections

from ntk_scale.data import digits

# name -> (image shape, train examples, test examples), as load_dataset returns them
SHAPES: dict[str, tuple[tuple[int, ...], int, int]] = {
    "digits": (digits.IMAGE_SHAPE, digits.NUM_EXAMPLES - digits.TEST_SIZE, digits.TEST_SIZE),
    "cifar10": ((32, 32, 3), 50_000, 10_000),
    "cifar100": ((32, 32, 3), 50_000, 10_000),
    "mnist": ((28, 28, 1), 60_000, 10_000),
    "fashion_mnist": ((28, 28, 1), 60_000, 10_000),
    "svhn_cropped": ((32, 32, 3), 73_257, 26_032),
}


def dataset_shape(data_config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], int, int]:
  """(image shape, train size, test size) of config.data.name."""
  if data_config.name not in SHAPES:
    raise ValueError(f"config.data.name={data_config.name!r} is not a known dataset; expected one "
                     f"of {', '.join(SHAPES)}.")
  return SHAPES[data_config.name]
