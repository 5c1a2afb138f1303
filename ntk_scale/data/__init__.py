"""Datasets behind one interface: `load_dataset(config.data)` returns in-memory train/test splits."""

import ml_collections

from ntk_scale.data.batches import TrainBatches, check_seed, epoch_order, eval_batches
from ntk_scale.data.dataset import Dataset, Split
from ntk_scale.data import catalog, digits
from ntk_scale.data.digits import load_digits
from ntk_scale.data.feature_injection import apply_transform, check_transform_config
from ntk_scale.data.subset import check_subset_size, class_balanced_subset, scarcest_class
from ntk_scale.data.tfds_source import TFDS_DATASETS, DatasetUnavailableError, load_tfds

DATASET_NAMES = ("digits",) + tuple(TFDS_DATASETS)


def check_data_config(data_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming `config.data.name` when it is not a known dataset, or the field of
  `config.data.transform` that is wrong."""
  if data_config.name not in DATASET_NAMES:
    raise ValueError(f"config.data.name={data_config.name!r} is not a known dataset; expected one "
                     f"of {', '.join(DATASET_NAMES)}.")
  is_digits = data_config.name == "digits"
  # The catalog's image shape: a transform too large for the images is refused before the train job
  # records its config, not once the data has loaded.
  check_transform_config(data_config.get("transform"), catalog.dataset_shape(data_config)[0],
                         digits.NUM_CLASSES if is_digits else TFDS_DATASETS[data_config.name][2])
  transform, augment = data_config.get("transform"), data_config.get("augment", "none")
  if transform is not None and transform.get("name") == "inject" and augment != "none":
    raise ValueError(f"config.data.augment={augment!r} with config.data.transform.name='inject': the "
                     f"features are added where the data loads, so a crop would shift and a flip "
                     f"mirror each class's pattern (a mirrored sign pattern is another class's); set "
                     f"config.data.augment='none', as Ortiz-Jimenez et al. train.")


def num_classes(data_config: ml_collections.ConfigDict) -> int:
  """The number of classes of `config.data.name`, known without loading the data (to size a model
  before restoring its checkpoint)."""
  check_data_config(data_config)
  return digits.NUM_CLASSES if data_config.name == "digits" else TFDS_DATASETS[data_config.name][2]


def load_dataset(data_config: ml_collections.ConfigDict) -> Dataset:
  """The dataset named by `config.data.name` (with `data_dir` and `download` for tfds ones), with
  `config.data.transform` applied to both splits."""
  check_data_config(data_config)
  if data_config.name == "digits":
    dataset = load_digits()
  else:
    dataset = load_tfds(data_config.name, data_config.get("data_dir"), data_config.get("download", True))
  return apply_transform(dataset, data_config.get("transform"))


__all__ = ["DATASET_NAMES", "Dataset", "DatasetUnavailableError", "Split", "TrainBatches",
           "check_data_config", "check_seed", "class_balanced_subset", "epoch_order", "eval_batches",
           "load_dataset", "load_digits", "load_tfds", "num_classes", "scarcest_class",
           "check_subset_size"]
