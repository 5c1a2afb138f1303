"""The pieces every attack in attacks.py, fab.py and square_l2.py is built of: the losses they
follow, the order in which one adversarial point beats another, the projections and steps of the
L-inf and L2 balls, restarts that keep the strongest result, the ranking of target classes, and
Square Attack's schedule and acceptance (shared by its L-inf and L2 versions).

Conventions are those of `ntk_scale.attacks`: images NHWC in [0, 1], `logits_fn: images [N, ...]
-> logits [N, C]`, per-example quantities of shape [N]. Nothing here imports an attack, so every
attack module can import this one without a cycle.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

LogitsFn = Callable[[jax.Array], jax.Array]
Attack = Callable[[LogitsFn, jax.Array, jax.Array, jax.Array], jax.Array]
NORMS = ("linf", "l2")

# Keeps divisions by a zero gradient or zero perturbation finite (the step is then zero).
TINY = 1e-12


# --------------------------------------------------------------------------- losses

LossFn = Callable[[jax.Array, jax.Array], jax.Array]  # (logits [N, C], labels [N]) -> [N]


def check_classes(logits: jax.Array, needed: int, what: str) -> None:
  """Refuses a model with fewer than `needed` classes, naming `what` needs them."""
  if logits.shape[-1] < needed:
    raise ValueError(f"{what} needs at least {needed} classes; the model has {logits.shape[-1]}.")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy of each example, [N]: the loss of PGD, the FGSMs and APGD-CE, and the
  tie-break of `stronger` for every attack."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Difference of logits ratio (Croce and Hein 2020), [N]: -(z_y - max_{i != y} z_i) /
  (z_pi1 - z_pi3), z_pi the logits sorted in decreasing order. Unchanged when the logits are
  scaled or shifted, so it cannot be masked by a saturated softmax (the cross-entropy's gradient
  underflows for confident models); needs 3 classes."""
  check_classes(logits, 3, "the DLR loss")
  ordered = jnp.sort(logits, axis=-1)
  true = jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
  best_other = jnp.where(jnp.argmax(logits, -1) == labels, ordered[:, -2], ordered[:, -1])
  return -(true - best_other) / (ordered[:, -1] - ordered[:, -3] + TINY)


def targeted_dlr_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
  """The targeted DLR of APGD-T (Croce and Hein 2020), [N]: -(z_y - z_t) / (z_pi1 - (z_pi3 +
  z_pi4) / 2), toward class t; needs 4 classes."""
  check_classes(logits, 4, "the targeted DLR loss")
  ordered = jnp.sort(logits, axis=-1)
  true = jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
  target = jnp.take_along_axis(logits, targets[:, None], -1)[:, 0]
  return -(true - target) / (ordered[:, -1] - 0.5 * (ordered[:, -3] + ordered[:, -4]) + TINY)


def fooled_and_loss(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array,
                    loss_fn: LossFn = cross_entropy) -> tuple[jax.Array, jax.Array]:
  """Whether each example is misclassified, [N] bool, and its loss, [N] (one forward pass)."""
  logits = logits_fn(images)
  return jnp.argmax(logits, -1) != labels, loss_fn(logits, labels)


def loss_and_grad(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array,
                  loss_fn: LossFn = cross_entropy) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-example losses, their input gradients (the gradient of the sum is per example) and
  whether each example is misclassified, [N] bool."""
  def total(x):
    fooled, losses = fooled_and_loss(logits_fn, x, labels, loss_fn)
    return losses.sum(), (losses, fooled)

  grad, (losses, fooled) = jax.grad(total, has_aux=True)(images)
  return losses, grad, fooled


def stronger(fooled: jax.Array, loss: jax.Array, best_fooled: jax.Array,
             best_loss: jax.Array) -> jax.Array:
  """Per example, whether a point beats the best so far: a misclassified point beats a correctly
  classified one whatever the losses; between two of the same kind the higher loss wins.

  Loss alone is not enough: a correctly classified point can have a higher cross-entropy than a
  misclassified one (e.g. p_y = 0.36 against p_y = 0.47 with another class at 0.53), and keeping
  it would count as robust an example that another restart or iterate had already broken.
  """
  return (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))


# --------------------------------------------------------------------------- balls and steps

def per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes [N] values to broadcast against an [N, ...] batch."""
  return values.reshape((-1,) + (1,) * (like.ndim - 1))


def l2_norm(x: jax.Array) -> jax.Array:
  """Per-example L2 norm over all non-batch axes, shaped to broadcast against `x`."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))


def project_linf(x_adv: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  """The nearest point to `x_adv` in the L-inf ball of radius `eps` around `x`."""
  return jnp.clip(x_adv, x - eps, x + eps)


def project_l2(x_adv: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  """The nearest point to `x_adv` in the L2 ball of radius `eps` around `x`, per example."""
  delta = x_adv - x
  return x + delta * jnp.minimum(1.0, eps / jnp.maximum(l2_norm(delta), TINY))


def check_norm(norm: str) -> None:
  """Refuses a norm no attack implements."""
  if norm not in NORMS:
    raise ValueError(f"norm={norm!r} is not supported; expected one of {', '.join(NORMS)}.")


def project(x_adv: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
  """Projection onto the eps-ball of `norm`, then onto the image box [0, 1].

  For L-inf the composition is the exact projection onto the intersection; for L2 the result
  stays in both sets (clipping moves a point toward x coordinate by coordinate).
  """
  ball = project_linf if norm == "linf" else project_l2
  return jnp.clip(ball(x_adv, x, eps), 0.0, 1.0)


def ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  """Steepest-ascent direction of unit `norm`: sign(grad) for L-inf, grad/|grad|_2 for L2."""
  if norm == "linf":
    return jnp.sign(grad)
  return grad / jnp.maximum(l2_norm(grad), TINY)


def uniform_start(key: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
  """A point drawn uniformly from the eps-ball of `norm` around each example, clipped to [0, 1].

  L2: a Gaussian direction, normalised, at radius eps * U^(1/d) with d the pixels per example
  (uniform in volume, not on the sphere).
  """
  if norm == "linf":
    delta = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
  else:
    direction_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(direction_key, x.shape, x.dtype)
    d = np.prod(x.shape[1:])
    radius = eps * jax.random.uniform(radius_key, x.shape[:1], x.dtype) ** (1.0 / d)
    delta = direction / jnp.maximum(l2_norm(direction), TINY) * per_example(radius, x)
  return jnp.clip(x + delta, 0.0, 1.0)


def gradient_step(logits_fn: LogitsFn, x_adv: jax.Array, labels: jax.Array, step_size: float,
                  norm: str) -> jax.Array:
  """`x_adv` moved by `step_size` along the steepest-ascent direction of the cross-entropy
  (unprojected)."""
  _, grad, _ = loss_and_grad(logits_fn, x_adv, labels)
  return x_adv + step_size * ascent_direction(grad, norm)


# --------------------------------------------------------------------------- the strongest result

def first_best(x_adv: jax.Array, logits_fn: LogitsFn, labels: jax.Array) -> tuple[jax.Array, ...]:
  """The running best (images, fooled, cross-entropy) of `keep_stronger`, from one result."""
  return (x_adv, *fooled_and_loss(logits_fn, x_adv, labels))


def keep_stronger(best: tuple[jax.Array, ...], x_adv: jax.Array, logits_fn: LogitsFn,
                  labels: jax.Array) -> tuple[jax.Array, ...]:
  """The running best with `x_adv` taken per example where it is stronger (`stronger`, by the
  cross-entropy)."""
  best_x, best_fooled, best_loss = best
  fooled, loss = fooled_and_loss(logits_fn, x_adv, labels)
  better = stronger(fooled, loss, best_fooled, best_loss)
  return (jnp.where(per_example(better, best_x), x_adv, best_x), best_fooled | fooled,
          jnp.where(better, loss, best_loss))


def strongest_of(run: Callable[[jax.Array], jax.Array], count: int, logits_fn: LogitsFn,
                 labels: jax.Array) -> jax.Array:
  """Per example, the strongest of run(0), ..., run(count - 1) in `stronger`'s order (by the
  cross-entropy); run(r) for r >= 1 in a fori_loop (one compiled copy), r traced."""
  best = run(0)
  if count > 1:
    best, _, _ = jax.lax.fori_loop(
        1, count, lambda r, carry: keep_stronger(carry, run(r), logits_fn, labels),
        first_best(best, logits_fn, labels))
  return jax.lax.stop_gradient(best)


def best_of_restarts(attack_once: Callable[[jax.Array], jax.Array], logits_fn: LogitsFn,
                     labels: jax.Array, key: jax.Array, restarts: int) -> jax.Array:
  """Runs `attack_once(fold_in(key, r))` for r < restarts and keeps, per example, the worst case:
  a misclassified result if any restart found one, the one of highest loss among those of the
  same kind (see `stronger`). Robust accuracy is then the per-example worst case over restarts.

  Restart 0 always uses `fold_in(key, 0)` and is computed outside the loop, so adding restarts
  never weakens an example relative to a single run with the same key.
  """
  return strongest_of(lambda r: attack_once(jax.random.fold_in(key, r)), restarts, logits_fn,
                      labels)


# --------------------------------------------------------------------------- targets

def ranked_targets(logits: jax.Array, labels: jax.Array, num_targets: int, min_classes: int,
                   attack: str) -> jax.Array:
  """The classes by clean logit, highest first, the true class last ([N, C]): the targets of a
  targeted attack toward its `num_targets` first (checked against the classes there are)."""
  num_classes = logits.shape[-1]
  check_classes(logits, min_classes, attack)
  if not 1 <= num_targets <= num_classes - 1:
    raise ValueError(f"num_targets={num_targets} must lie in [1, {num_classes - 1}] (the classes "
                     f"other than the true one).")
  others = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), -jnp.inf, logits)
  return jnp.argsort(-others, axis=-1)


# --------------------------------------------------------------------------- Square Attack's

# Square Attack's schedule (Andriushchenko et al. 2020): the fraction of the image a square covers
# is p_init, halved after each of these query counts of a 10,000-query run. The authors' code
# rescales them to the run's own length ("rescaled"); AutoAttack's standard version keeps them
# as they are whatever the length (resc_schedule=False: "fixed").
_SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
SQUARE_SCHEDULES = ("rescaled", "fixed")


def square_fraction(p_init: float, query: jax.Array | int, num_queries: int,
                    schedule: str = "rescaled") -> jax.Array:
  """The fraction of pixels Square Attack's square covers at `query` (0-based) of `num_queries`.

  "fixed" halves it after query t of each t in _SQUARE_HALVINGS. "rescaled" halves it once
  query * 10000 // num_queries passes t, i.e. from query ceil((t + 1) num_queries / 10000) on:
  those queries are computed here in Python's integers (query * 10000 in int32 wrapped past
  214,748 queries and reset the square)."""
  if schedule not in SQUARE_SCHEDULES:
    raise ValueError(f"schedule={schedule!r}; expected one of {', '.join(SQUARE_SCHEDULES)}.")
  starts = [t + 1 if schedule == "fixed" else -(-(t + 1) * num_queries // 10000)
            for t in _SQUARE_HALVINGS]
  halvings = jnp.sum(jnp.asarray(query) >= jnp.asarray(starts))
  return p_init / 2.0 ** halvings


def margin_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """z_y - max_{j != y} z_j, [N]: negative exactly when the example is misclassified."""
  true = jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
  return true - jnp.max(others, -1)


def keep_lower_margin(logits_fn: LogitsFn, labels: jax.Array, candidate: jax.Array,
                      x_best: jax.Array, margin: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Square Attack's acceptance, either norm: per example the candidate replaces x_best where it
  lowers the margin of an example not yet misclassified; (x_best, margin) updated."""
  new_margin = margin_loss(logits_fn(candidate), labels)
  better = (new_margin < margin) & (margin >= 0)
  return (jnp.where(per_example(better, x_best), candidate, x_best),
          jnp.where(better, new_margin, margin))
