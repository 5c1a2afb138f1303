"""Images of kernel eigenvectors (Loo et al. 2022, their visualize_ntk_features.py): which input
does a direction of a class kernel K_c "mean"?

K_c(x, x') = <g(x), g(x')> with g(x) = grad_theta f_c(x), so a vector u of weights on the training
subset X (an eigenvector of K_c, or the dual weights K_c^{-1} y_c of kernel regression) is the
parameter direction v = sum_j u_j g(x_j) = J_c(X)^T u (eigen_features.parameter_directions, over
every device). The image of v is the x whose own feature
g(x) points most nearly along v: x maximising cos(g(x), v), found by gradient ascent on the pixels
from a grey image (the gradient with respect to x of a function of a gradient with respect to theta:
second-order autodiff). Minimising the cosine instead gives the image of -v.

Every function takes `logit_fn(params, x) -> [B]`, the logit f_c (BatchNorm in inference mode), so
examples never interact and per-image gradients are exact.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

LogitFn = Callable[[Any, jax.Array], jax.Array]


def class_logit(apply_fn: Callable, class_index: int) -> LogitFn:
  """`params, x -> f_c(x)` [B] from `apply_fn(params, x) -> logits [B, C]`."""
  return lambda params, x: apply_fn(params, x)[:, class_index]


def cosine_fn(logit_fn: LogitFn, params) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`(images [M, ...], directions [M, P]) -> cos(g(x_m), v_m)` [M], differentiable in the images."""
  theta, unravel = ravel_pytree(params)
  tiny = jnp.finfo(theta.dtype).tiny

  def one(x, v):
    g = jax.grad(lambda t: logit_fn(unravel(t), x[None])[0])(theta)
    # The tiny shift keeps the gradient finite where g or v vanish; it changes no cosine we can see.
    return jnp.dot(g, v) / jnp.sqrt((jnp.sum(g * g) + tiny) * (jnp.sum(v * v) + tiny))

  return jax.vmap(one)


@functools.partial(jax.jit, static_argnames=("logit_fn", "learning_rate", "pixel_range"))
def optimise_images(logit_fn: LogitFn, params, directions: jax.Array, signs: jax.Array,
                    start: jax.Array, steps: int | jax.Array, *, learning_rate: float,
                    pixel_range: tuple[float, float] = (0.0, 1.0)) -> tuple[jax.Array, jax.Array]:
  """Adam ascent on `signs[m] * cos(g(x_m), v_m)` from `start` [M, ...] for `steps` steps, pixels
  clipped to `pixel_range` after every step; (images, their cosines [M]).

  Each image is the best iterate of its run: through ReLUs the cosine jumps where an activation
  pattern changes, and Adam's momentum can step from a better point to a worse one.
  """
  cosines = cosine_fn(logit_fn, params)
  optimiser = optax.adam(learning_rate)
  per_image = lambda a: a.reshape((-1,) + (1,) * (start.ndim - 1))

  def loss(images):
    cos = cosines(images, directions)
    return -jnp.sum(signs * cos), cos

  def keep_best(images, cos, best, best_cos):
    better = signs * cos > signs * best_cos
    return jnp.where(per_image(better), images, best), jnp.where(better, cos, best_cos)

  def step(_, carry):
    images, state, best, best_cos = carry
    (_, cos), grads = jax.value_and_grad(loss, has_aux=True)(images)
    best, best_cos = keep_best(images, cos, best, best_cos)
    updates, state = optimiser.update(grads, state, images)
    return jnp.clip(optax.apply_updates(images, updates), *pixel_range), state, best, best_cos

  worst = jnp.where(signs > 0, -jnp.inf, jnp.inf).astype(start.dtype)
  images, _, best, best_cos = jax.lax.fori_loop(0, steps, step,
                                                (start, optimiser.init(start), start, worst))
  return keep_best(images, cosines(images, directions), best, best_cos)
