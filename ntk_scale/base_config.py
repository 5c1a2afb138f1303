"""Every config field with its default; the files in configs/ start from `base_config()`."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "train"
  c.seed = 0  # initialisation, data order and augmentation all derive from it

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # digits | cifar10 | cifar100 | mnist | fashion_mnist | svhn_cropped
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # tfds data_dir
  c.data.download = True  # tfds may download when the dataset is not prepared
  c.data.augment = "none"  # none | crop_flip

  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn"  # resnet18 | cnn | mlp
  c.model.width = 32
  c.model.depth = 2  # mlp only
  c.model.batch_norm = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"  # sgd | adam
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"  # constant | piecewise | cosine | cyclic
  c.optimizer.decay_epochs = ()  # piecewise: multiply by decay_factor after each
  c.optimizer.decay_factor = 0.1
  c.optimizer.warmup_epochs = 0.0  # cosine
  c.optimizer.peak_fraction = 0.4  # cyclic

  c.batch_size = 128  # global, over all devices
  c.eval_batch_size = 512
  c.num_epochs = 10.0
  c.log_every_steps = 50

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_epochs = 1.0
  # Loo et al. also saved these early fractional epochs, where the kernel moves fastest.
  c.checkpoint.fractional_epochs = (0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5)
  return c
