"""What a config's number fields accept: the two tests every config check shares.

A bool is not a number here, though Python counts True as 1: `--config.num_epochs=True` is a
mistake, not one epoch. NaN and the infinities are not finite numbers: they pass comparisons such
as `not value <= 0` and then train, attack or solve into NaN. The bounds and the messages stay
with each field's check, which knows what the field means.
"""

import math
from typing import Any

import numpy as np


def is_whole_number(value: Any, least: int | None = None) -> bool:
  """An int (numpy's too), not a bool; at least `least` when given."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    return False
  return least is None or value >= least


def is_finite_number(value: Any) -> bool:
  """A finite int or float (numpy's too), not a bool."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
    return False
  return math.isfinite(value)
