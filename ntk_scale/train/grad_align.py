"""GradAlign (Andriushchenko and Flammarion, NeurIPS 2020): a regulariser against catastrophic overfitting.

FGSM training overfits catastrophically when the loss stops being locally linear in the input:
the single gradient step then no longer finds the worst case in the eps-ball. GradAlign keeps the
input gradient at x aligned with the input gradient at a random point of the ball,

    R = lambda * E_x [1 - cos(grad_x L(x + eta), grad_x L(x))],   eta ~ U([-eps, eps]^d),

added to the adversarial training loss and differentiated with respect to the parameters through
the input gradients (double backpropagation: about three times an FGSM step). The authors' code
(train.py of tml-epfl/understanding-fast-adv-training), and Ortiz-Jimenez et al.'s for the
injected-feature study (GradAlign in train/utils.py of gortizji/co_features), hold grad_x L(x)
constant (the FGSM gradient, detached) and differentiate only grad_x L(x + eta); the paper's
formula differentiates both (`CLEAN_GRADIENT`). Either way the mean runs, as in their code, over
the examples whose two gradients are both nonzero.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

LogitsFn = Callable[[jax.Array], jax.Array]

# Floor of a gradient's largest entry when it is scaled by it: keeps the cosine and its parameter
# gradient finite when an input gradient is exactly zero (a saturated example; it is then left out of
# the mean). Near float32's smallest normal number, so every gradient that is not zero is scaled.
_SMALLEST = 1e-37

# config.train.grad_align_clean: how the penalty treats grad_x L(x).
CLEAN_GRADIENT = ("constant", "differentiated")


def input_gradients(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example input gradients of the cross-entropy, [N, ...] (gradient of the summed losses)."""
  total = lambda x: optax.softmax_cross_entropy_with_integer_labels(logits_fn(x), labels).sum()
  return jax.grad(total)(images)


def _unit_rows(g: jax.Array) -> jax.Array:
  """Each example's gradient [N, D] over its norm (0 for a zero gradient). Scaled by its largest
  entry first: the squared norm of a confident example's gradient (|g| ~ 1e-12 and less) would
  underflow in float32, and a floor under it would shrink the cosine towards 0 however well the two
  gradients align. Scaled, the sum of squares is 0 or at least 1, so its floor of 0.5 touches only
  zero gradients (where d|g|/dg is NaN, even behind a max). The scale is held constant for autodiff:
  g / |g| does not depend on it, and its own derivative (1 / scale^2) overflows."""
  g = g / jax.lax.stop_gradient(jnp.maximum(jnp.max(jnp.abs(g), axis=1, keepdims=True), _SMALLEST))
  return g / jnp.sqrt(jnp.maximum(jnp.sum(g * g, axis=1, keepdims=True), 0.5))


def gradient_cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-example cosine similarity of two [N, ...] gradient batches, shape [N]: the dot product of
  the two normalised gradients, as in GradAlign's code."""
  return jnp.sum(_unit_rows(a.reshape(len(a), -1)) * _unit_rows(b.reshape(len(b), -1)), axis=1)


def grad_align_penalty(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array,
                       eps: float, clean_gradient: str = "constant") -> jax.Array:
  """Mean of 1 - cos(grad_x L(x + eta), grad_x L(x)) over the examples where neither gradient is
  zero (0 if there are none), eta uniform in the L-inf eps-box drawn from `key`.

  Unweighted (multiply by config.train.grad_align); differentiable in whatever `logits_fn` closes
  over, through grad_x L(x + eta) only (`clean_gradient` "constant", the authors' code) or through
  both gradients ("differentiated"). As in their code, x + eta is not clipped to the image box.
  Their grad_x L(x) is the FGSM step's own gradient, at x for FGSM from zero (GradAlign's setting);
  here it is always at x.
  """
  eta = jax.random.uniform(key, images.shape, images.dtype, -eps, eps)
  clean = input_gradients(logits_fn, images, labels)
  if clean_gradient == "constant":
    clean = jax.lax.stop_gradient(clean)
  noisy = input_gradients(logits_fn, images + eta, labels)
  nonzero = lambda g: jnp.any(g.reshape(len(g), -1) != 0, axis=1)
  counted = nonzero(clean) & nonzero(noisy)
  terms = jnp.where(counted, 1.0 - gradient_cosine(noisy, clean), 0.0)
  return terms.sum() / jnp.maximum(counted.sum(), 1)
