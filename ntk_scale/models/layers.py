"""What all models share: the normalisation layer, and the dtype of their outputs."""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def batch_norm(enabled: bool, train: bool, dtype: Any = None) -> Callable[[jax.Array], jax.Array]:
  """BatchNorm with batch statistics in training and running averages in inference.

  Under a data-parallel jit the batch mean covers the global batch, so N devices give the
  statistics of one. The two-pass variance (not E[x^2] - E[x]^2) keeps float32 gradients
  reproducible across device counts: the one-pass form loses ~1e-5 relative accuracy to
  cancellation, which training amplifies. In a bfloat16 model (`dtype`) the statistics are still
  reduced and kept in float32 (flax's default). Returns the identity when `enabled` is False.
  """
  if not enabled:
    return lambda x: x
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      use_fast_variance=False, dtype=dtype)


def full_precision_logits(logits: jax.Array) -> jax.Array:
  """Logits of a model that computes in bfloat16, in float32 for the loss and the attacks' margins;
  float32 and float64 logits unchanged."""
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
