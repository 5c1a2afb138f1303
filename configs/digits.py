"""The default demo: the small CNN (with BatchNorm) on scikit-learn's handwritten digits.

The digits ship inside scikit-learn, so this runs with no network:

    python main.py --config configs/digits.py --workdir workdirs/digits

Expected: about 98-99% test accuracy on the 360 test images after 15 epochs, in under a minute
of training on 2 CPU cores. `configs/digits.py:smoke` trains a narrower CNN for 3 epochs in a
few seconds and still reaches about 98%.
"""

import ml_collections

from ntk_scale.base_config import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.data.name = "digits"
  c.model.name = "cnn"
  c.model.width = 32
  c.model.batch_norm = True
  c.optimizer.learning_rate = 0.1
  c.optimizer.schedule = "cosine"
  c.optimizer.weight_decay = 5e-4
  c.batch_size = 64
  c.num_epochs = 15.0
  c.log_every_steps = 50
  if arg == "smoke":
    c.model.width = 16
    c.num_epochs = 3.0
    c.log_every_steps = 10
  elif arg:
    raise ValueError(f"configs/digits.py: unknown arg {arg!r}; expected '' or 'smoke'.")
  return c
