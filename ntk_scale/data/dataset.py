"""The in-memory dataset type that every source returns."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  """Images as float32 NHWC in [0, 1] and integer labels."""
  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.ndim != 4 or len(self.images) != len(self.labels):
      raise ValueError(f"expected images [N, H, W, C] and labels [N]; got {self.images.shape} "
                       f"and {self.labels.shape}")

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train: Split
  test: Split
  num_classes: int
