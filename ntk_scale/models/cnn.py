"""The small CNN of Tsilivis and Kempe's experiments: conv 32-32-pool-64-64-128-128-avgpool-dense."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ntk_scale.models.layers import batch_norm, full_precision_logits


class SmallCNN(nn.Module):
  """3x3 ReLU convolutions, one 2x2 max-pool after the first pair, global average pool."""
  num_classes: int
  width: int = 32
  batch_norm: bool = False
  dtype: Any = None  # of the computation (None: that of inputs and parameters); parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    w = self.width
    for i, features in enumerate((w, w, 2 * w, 2 * w, 4 * w, 4 * w)):
      x = nn.Conv(features, (3, 3), padding="SAME", use_bias=not self.batch_norm, dtype=self.dtype,
                  name=f"conv{i + 1}")(x)
      x = nn.relu(batch_norm(self.batch_norm, train, self.dtype)(x))
      if i == 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return full_precision_logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))
