"""The jitted, data-parallel train steps: benign, adversarial, and Loo et al.'s benign-then-adversarial."""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from ntk_scale.attacks import Attack
from ntk_scale.data.augment import augment
from ntk_scale.train.state import TrainState, logits_fn

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the batch."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _sgd_update(state: TrainState, images: jax.Array, labels: jax.Array) -> tuple[TrainState, Metrics]:
  """One optimizer update on (images, labels), BatchNorm in training mode."""

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images,
                                     train=True, mutable=["batch_stats"])
    return cross_entropy(logits, labels), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
  return state, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
                 "grad_norm": optax.tree.norm(grads)}


def make_train_step(augmentation: str, seed: int, attack: Attack | None = None, *,
                    benign_step_first: bool = False, attack_batch_norm: str = "inference") -> TrainStep:
  """A jitted step `(state, batch) -> (state, metrics)` that donates the incoming state.

  Without `attack` the step trains on the (augmented) batch. With it, the step trains on the
  attack's adversarial examples of the batch, crafted against the current model; with
  `benign_step_first` it first takes an update on the clean batch and then one on adversarial
  examples crafted against the updated model (the variant in Loo et al.'s code: two optimizer
  updates per batch). Metrics are those of the last update.

  The step's randomness is `fold_in(key(seed), state.step)`, so it depends on nothing a resumed
  run could lose. Under jit over the mesh the batch means (loss, BatchNorm statistics) span the
  global batch; XLA inserts the cross-device reductions.
  """
  base_key = jax.random.key(seed)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    augment_key, attack_key = jax.random.split(jax.random.fold_in(base_key, state.step))
    images, labels = augment(augmentation, augment_key, batch["images"]), batch["labels"]
    if attack is None:
      return _sgd_update(state, images, labels)
    if benign_step_first:
      state, _ = _sgd_update(state, images, labels)
    adversarial = attack(logits_fn(state, attack_batch_norm), images, labels, attack_key)
    return _sgd_update(state, adversarial, labels)

  return jax.jit(step, donate_argnums=0)
