"""The tiny job of tests/test_multihost.py: configs/digits.py:smoke with a 16-wide MLP, one epoch,
and one 2-step PGD evaluation attack (multi-process attacks are exercised; compiles stay short)."""

import importlib.util
import os

from ntk_scale.base_config import pgd_linf

_DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.py")


def get_config(arg: str = ""):
  spec = importlib.util.spec_from_file_location("digits_config", _DIGITS)
  digits = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(digits)
  c = digits.get_config(",".join(["smoke"] + [v for v in arg.split(",") if v]))
  c.model.name, c.model.width, c.num_epochs = "mlp", 16, 1.0
  c.eval_attacks.pgd = pgd_linf(digits.EPS, num_steps=2)
  del c.eval_attacks["apgd"]
  return c
