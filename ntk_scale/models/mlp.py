"""Fully connected ReLU networks of configurable width and depth."""

from typing import Any

import flax.linen as nn
import jax

from ntk_scale.models.layers import batch_norm, full_precision_logits


class MLP(nn.Module):
  """`depth` hidden ReLU layers of `width` units on the flattened image."""
  num_classes: int
  width: int = 512
  depth: int = 2
  batch_norm: bool = False
  dtype: Any = None  # of the computation (None: that of inputs and parameters); parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for i in range(self.depth):
      x = nn.Dense(self.width, use_bias=not self.batch_norm, dtype=self.dtype, name=f"dense{i + 1}")(x)
      x = nn.relu(batch_norm(self.batch_norm, train, self.dtype)(x))
    return full_precision_logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))
