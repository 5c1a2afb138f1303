"""Fully connected ReLU networks of configurable width and depth."""

import flax.linen as nn
import jax

from ntk_scale.models.layers import batch_norm


class MLP(nn.Module):
  """`depth` hidden ReLU layers of `width` units on the flattened image."""
  num_classes: int
  width: int = 512
  depth: int = 2
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for i in range(self.depth):
      x = nn.Dense(self.width, use_bias=not self.batch_norm, name=f"dense{i + 1}")(x)
      x = nn.relu(batch_norm(self.batch_norm, train)(x))
    return nn.Dense(self.num_classes, name="head")(x)
