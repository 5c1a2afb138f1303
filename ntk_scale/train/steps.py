"""The jitted, data-parallel train steps: benign, adversarial, and Loo et al.'s benign-then-adversarial."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ntk_scale.attacks import Attack
from ntk_scale.data.augment import augment
from ntk_scale.matmul_precision import default_precision
from ntk_scale.train.grad_align import grad_align_penalty
from ntk_scale.train.state import TrainState, logits_fn

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the batch."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _optimizer_update(state: TrainState, images: jax.Array, labels: jax.Array,
                      regulariser: Callable[[Any], jax.Array] | None = None,
                      weight: float = 0.0) -> tuple[TrainState, Metrics]:
  """One optimizer update on (images, labels), BatchNorm in training mode; with `regulariser`
  (a function of the parameters), on cross-entropy + weight * regulariser. Metrics report the
  cross-entropy as "loss" and the unweighted regulariser under "grad_align"."""

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images,
                                     train=True, mutable=["batch_stats"])
    loss = cross_entropy(logits, labels)
    penalty = regulariser(params) if regulariser is not None else jnp.zeros(())
    return loss + weight * penalty, (loss, penalty, logits, updates)

  (_, (loss, penalty, logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
  metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
             "grad_norm": optax.tree.norm(grads)}
  if regulariser is not None:
    metrics["grad_align"] = penalty
  return state, metrics


def make_train_step(augmentation: str, seed: int, attack: Attack | None = None, *,
                    benign_step_first: bool = False, attack_batch_norm: str = "inference",
                    grad_align: float = 0.0, grad_align_eps: float | None = None,
                    grad_align_clean: str = "constant",
                    compute_apply_fn: Callable | None = None,
                    matmul_precision: str = "default") -> TrainStep:
  """A jitted step `(state, batch) -> (state, metrics)` that donates the incoming state.

  Without `attack` the step trains on the (augmented) batch. With it, the step trains on the
  attack's adversarial examples of the batch, crafted against the current model; with
  `benign_step_first` it first takes an update on the clean batch and then one on adversarial
  examples crafted against the updated model (the variant in Loo et al.'s code: two optimizer
  updates per batch). Metrics are those of the last update. With `grad_align` > 0 (and an
  attack), the adversarial update adds GradAlign's penalty at eps `grad_align_eps` on the clean
  batch (Andriushchenko and Flammarion 2020; see grad_align.py; `grad_align_clean` says how it
  treats grad_x L(x)), the model seen as the attack sees it. With `compute_apply_fn` (the state's
  model in another compute dtype, e.g. bfloat16: same variables) the whole step, attack included,
  computes with it; the state keeps its own `apply_fn`, the one evaluations use. Its matmuls and
  convolutions run at `matmul_precision` ("default": the backend's, TF32 on GPUs and one bfloat16
  pass on TPUs; "high": TF32 and three passes; "highest": float32).

  The step's randomness is `fold_in(key(seed), state.step)`, so it depends on nothing a resumed
  run could lose. Under jit over the mesh the batch means (loss, BatchNorm statistics) span the
  global batch; XLA inserts the cross-device reductions.
  """
  if grad_align and (attack is None or grad_align_eps is None):
    raise ValueError("GradAlign (grad_align > 0) regularises adversarial training: it needs an attack "
                     "and the eps of its noise.")
  base_key = jax.random.key(seed)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    with default_precision(matmul_precision):
      if compute_apply_fn is None:
        return updates(state, batch)
      new_state, metrics = updates(state.replace(apply_fn=compute_apply_fn), batch)
    return new_state.replace(apply_fn=state.apply_fn), metrics

  def updates(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    augment_key, attack_key = jax.random.split(jax.random.fold_in(base_key, state.step))
    images, labels = augment(augmentation, augment_key, batch["images"]), batch["labels"]
    if attack is None:
      return _optimizer_update(state, images, labels)
    if benign_step_first:
      state, _ = _optimizer_update(state, images, labels)
    adversarial = attack(logits_fn(state, attack_batch_norm), images, labels, attack_key)
    if not grad_align:
      return _optimizer_update(state, adversarial, labels)
    noise_key = jax.random.fold_in(attack_key, 1)
    penalty = lambda params: grad_align_penalty(logits_fn(state.replace(params=params), attack_batch_norm),
                                                images, labels, noise_key, grad_align_eps,
                                                grad_align_clean)
    return _optimizer_update(state, adversarial, labels, penalty, grad_align)

  return jax.jit(step, donate_argnums=0)
