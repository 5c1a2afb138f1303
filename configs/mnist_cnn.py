"""The small CNN (conv 32-32-pool-64-64-128-128-avgpool-dense) on MNIST from tensorflow-datasets.

    python main.py --config configs/mnist_cnn.py --workdir workdirs/mnist_cnn

MNIST is downloaded by tensorflow-datasets on first use (or read from --config.data.data_dir).
Expected: about 99.3% test accuracy after 10 epochs (not yet measured with ntk_scale: this machine
has no network to download MNIST). The CNN has BatchNorm; SGD at lr 0.1 with momentum 0.9 and weight
decay 5e-4 on a cosine schedule, batches of 128, evaluation batches of 1000, training metrics
logged every 100 steps. `:smoke` runs one epoch of a width-8 CNN, logged every 10 steps.
"""

import ml_collections

from ntk_scale.base_config import base_config, parse_variants

VARIANTS = ("smoke",)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = parse_variants(arg, VARIANTS, "configs/mnist_cnn.py")
  c = base_config()
  c.data.name = "mnist"
  c.model.name = "cnn"
  c.model.width = 32
  c.model.batch_norm = True
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "cosine"
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 10.0
  c.log_every_steps = 100
  if "smoke" in variants:
    c.model.width = 8
    c.num_epochs = 1.0
    c.log_every_steps = 10
  return c
