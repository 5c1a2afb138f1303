"""Phase 1 of Loo et al. (NeurIPS 2022): ResNet-18 (CIFAR stem) on CIFAR-10 with benign data.

    python main.py --config configs/cifar10_resnet18.py --workdir workdirs/cifar10_resnet18

Settings from Loo et al.: ResNet-18 with a 3x3 stride-1 stem and no max-pool, inputs in [0, 1]
without normalisation, SGD with learning rate 0.1 and momentum 0.9, batch 128, learning rate x0.1
after epochs 100 and 150 (200 epochs), checkpoints every epoch and at epochs 0.125 ... 2.5.
Random crop (pad 4) and horizontal flip, and weight decay 5e-4, are the standard CIFAR recipe; the
issue that specified this config does not name Loo et al.'s values for them.

Expected: about 95% clean test accuracy for this recipe (not yet measured with ntk_scale: no GPU run
has been made). `:smoke` runs 8 steps of a width-4 ResNet-18 in seconds on a CPU (accuracy ~10%);
it is what the tests run under `tfds.testing.mock_data`.
"""

import ml_collections

from ntk_scale.base_config import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.data.name = "cifar10"
  c.data.augment = "crop_flip"
  c.model.name = "resnet18"
  c.model.width = 64
  c.model.batch_norm = True
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "piecewise"
  c.optimizer.decay_epochs = (100, 150)
  c.optimizer.decay_factor = 0.1
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 200.0
  c.log_every_steps = 100
  if arg == "smoke":
    c.model.width = 4
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_epochs = 8 / (50_000 // 8)  # 8 steps on the real dataset
    c.log_every_steps = 4
  elif arg:
    raise ValueError(f"configs/cifar10_resnet18.py: unknown arg {arg!r}; expected '' or 'smoke'.")
  return c
