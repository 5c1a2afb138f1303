"""ResNet-18 with the CIFAR stem: a 3x3 stride-1 convolution and no max-pool."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ntk_scale.models.layers import batch_norm, full_precision_logits

# One pixel on every side for 3x3 (as PyTorch's padding=1), none for the 1x1 shortcut. Flax's "SAME"
# would pad stride-2 convolutions only at the end, centring them one pixel off the shortcut.
_PAD = {3: ((1, 1), (1, 1)), 1: "VALID"}


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (He et al., 2016)."""
  features: int
  strides: int
  batch_norm: bool
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda y: batch_norm(self.batch_norm, train, self.dtype)(y)  # a new layer (own statistics) per use
    conv = lambda f, k, s, name: nn.Conv(f, (k, k), (s, s), padding=_PAD[k],
                                         use_bias=not self.batch_norm, dtype=self.dtype, name=name)
    y = nn.relu(norm(conv(self.features, 3, self.strides, "conv1")(x)))
    y = norm(conv(self.features, 3, 1, "conv2")(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = norm(conv(self.features, 1, self.strides, "shortcut")(x))
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 for 32x32 inputs (11.2M parameters at width 64 with 10 classes)."""
  num_classes: int
  width: int = 64
  batch_norm: bool = True
  dtype: Any = None  # of the computation (None: that of inputs and parameters); parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nn.Conv(self.width, (3, 3), padding=_PAD[3], use_bias=not self.batch_norm, dtype=self.dtype,
                name="stem")(x)
    x = nn.relu(batch_norm(self.batch_norm, train, self.dtype)(x))
    for stage, features in enumerate((self.width, 2 * self.width, 4 * self.width, 8 * self.width)):
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, self.batch_norm, self.dtype,
                       name=f"stage{stage + 1}_block{block + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return full_precision_logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))
