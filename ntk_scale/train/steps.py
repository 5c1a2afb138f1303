"""The jitted, data-parallel standard train step."""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from ntk_scale.data.augment import augment
from ntk_scale.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the batch."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(augmentation: str, seed: int) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """A jitted step `(state, batch) -> (state, metrics)` that donates the incoming state.

  The step's randomness is `fold_in(key(seed), state.step)`, so it depends on nothing a resumed
  run could lose. Under jit over the mesh the batch mean (loss, BatchNorm statistics) spans the
  global batch; XLA inserts the cross-device reductions.
  """
  base_key = jax.random.key(seed)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    key = jax.random.fold_in(base_key, state.step)
    images = augment(augmentation, key, batch["images"])

    def loss_fn(params):
      logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images,
                                       train=True, mutable=["batch_stats"])
      return cross_entropy(logits, batch["labels"]), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    metrics = {"loss": loss,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"]),
               "grad_norm": optax.tree.norm(grads)}
    return state, metrics

  return jax.jit(step, donate_argnums=0)
