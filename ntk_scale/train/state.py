"""The train state: parameters, BatchNorm statistics and optimizer state, replicated over the mesh."""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import Mesh

from ntk_scale import parallel


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], seed: int, mesh: Mesh) -> TrainState:
  """Initialises the model from `seed` directly into replicated device memory.

  Every process computes the same initialisation, so no broadcast is needed across hosts.
  """

  def init():
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables.get("batch_stats", {}), tx=tx)
    return state.replace(step=jnp.zeros((), jnp.int32))

  return jax.jit(init, out_shardings=parallel.replicated_sharding(mesh))()


def count_parameters(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


BATCH_NORM_MODES = ("inference", "train")


def logits_fn(state: TrainState, batch_norm: str = "inference") -> Callable[[jax.Array], jax.Array]:
  """The model as a function of its input alone, as evaluators and attacks see it.

  BatchNorm uses the running averages ("inference") or the statistics of the batch it is given
  ("train"; the running averages are not updated).
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  if batch_norm == "inference":
    return lambda x: state.apply_fn(variables, x, train=False)
  if batch_norm == "train":
    return lambda x: state.apply_fn(variables, x, train=True, mutable=["batch_stats"])[0]
  raise ValueError(f"batch_norm={batch_norm!r}; expected one of {', '.join(BATCH_NORM_MODES)}.")
