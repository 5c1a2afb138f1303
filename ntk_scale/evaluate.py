"""Evaluators shared by the training loop and the command line: clean accuracy on a split."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ntk_scale.data import Split, eval_batches
from ntk_scale.train.state import TrainState


@functools.partial(jax.jit, static_argnames="num_classes")
def _eval_sums(state: TrainState, batch: dict[str, jax.Array], num_classes: int) -> dict[str, jax.Array]:
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, batch["images"],
                          train=False)
  mask = batch["mask"]
  correct = (jnp.argmax(logits, -1) == batch["labels"]) * mask
  one_hot = jax.nn.one_hot(batch["labels"], num_classes) * mask[:, None]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  return {"correct": correct.sum(), "loss": (losses * mask).sum(), "count": mask.sum(),
          "class_correct": (one_hot * correct[:, None]).sum(0), "class_count": one_hot.sum(0)}


def evaluate_clean(state: TrainState, split: Split, batch_size: int, mesh: Mesh,
                   num_classes: int) -> dict[str, float | list[float]]:
  """Accuracy, mean loss and per-class accuracy of the model in inference mode (BatchNorm frozen)."""
  totals = None
  for batch in eval_batches(split, batch_size, mesh):
    sums = _eval_sums(state, batch, num_classes)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float64), totals)
  return {"accuracy": float(totals["correct"] / totals["count"]),
          "loss": float(totals["loss"] / totals["count"]),
          "per_class_accuracy": (totals["class_correct"] / np.maximum(totals["class_count"], 1)).tolist()}
