"""Adversarial attacks that run inside jit on a (sharded) batch.

What is here:
  pgd        projected gradient ascent (L-inf or L2), random start, best-of restarts
  fgsm       one signed-gradient step of size eps (Goodfellow et al. 2015)
  rs_fgsm    FGSM from a uniform random start, projected (Wong et al. 2020)
  n_fgsm     FGSM from larger noise, not projected (de Jorge et al. 2022)
  apgd_ce    APGD with cross-entropy (Croce and Hein 2020), L-inf or L2
  apgd_dlr   APGD on the DLR loss (invariant to the logits' scale: no softmax saturation)
  apgd_t     APGD-T: targeted DLR toward each of the top num_targets other classes
  fab_t      FAB-T (Croce and Hein 2020), L-inf or L2: the targeted Fast Adaptive Boundary attack,
             a minimal-norm search along the decision boundary (ntk_scale/fab.py)
  square     Square Attack (Andriushchenko et al. 2020), L-inf or L2 (ntk_scale/square_l2.py): random
             search on the logits only, blind to gradient masking
  worst_of   several of these on one batch, per example the strongest result (AutoAttack's count:
             apgd_ce + apgd_t + fab_t + square is its standard version)
  build_attack(config) -> attack(logits_fn, images, labels, key); build_attacks for several

Their losses, projections, steps and restarts are ntk_scale/attack_steps.py's.

Images are NHWC in [0, 1]; eps and step sizes are in pixel units of those images (8/255, not 8).
The model is `logits_fn: images [N, ...] -> logits [N, C]`, with parameters and BatchNorm state
closed over by the caller. Gradients are those of the summed per-example losses: with BatchNorm in
inference mode every example is attacked independently; in train mode (batch statistics) examples
interact through the statistics, as in PyTorch attacks on a model in train().

Random draws use global shapes, so a result does not depend on how many devices hold the batch;
loops are `lax.fori_loop`, so compile time does not grow with the number of steps. Results carry
no gradient (stop_gradient): adversarial training differentiates at the example, not through it.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ntk_scale.attack_steps import (NORMS, SQUARE_SCHEDULES, Attack, LogitsFn, LossFn,
                                    ascent_direction, best_of_restarts, check_norm, cross_entropy,
                                    dlr_loss, first_best, gradient_step, keep_lower_margin,
                                    keep_stronger, loss_and_grad, margin_loss, per_example, project,
                                    ranked_targets, square_fraction, stronger, strongest_of,
                                    targeted_dlr_loss, uniform_start)
from ntk_scale.base_config import pgd_default_step
from ntk_scale.config_numbers import is_finite_number, is_whole_number
from ntk_scale.fab import fab_t
from ntk_scale.square_l2 import square_l2

# --------------------------------------------------------------------------- attacks

def pgd(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *, eps: float,
        step_size: float, num_steps: int, norm: str = "linf", random_start: bool = True,
        restarts: int = 1, unroll: int | bool = 1) -> jax.Array:
  """Projected gradient ascent on the cross-entropy (Madry et al. 2018); returns the last iterate.

  L-inf takes signed-gradient steps and clips to the eps-box; L2 takes normalised-gradient steps
  and projects onto the eps-ball. Every iterate is clipped to [0, 1]. `unroll` is passed to
  `lax.fori_loop`: on XLA:CPU an unrolled loop runs the convolution gradients 2-3x faster (at a
  compile time that grows with the steps).
  """
  check_norm(norm)

  def attack_once(key):
    x_adv = uniform_start(key, images, eps, norm) if random_start else images

    def body(_, x_adv):
      return project(gradient_step(logits_fn, x_adv, labels, step_size, norm), images, eps, norm)

    return jax.lax.fori_loop(0, num_steps, body, x_adv, unroll=unroll)

  return best_of_restarts(attack_once, logits_fn, labels, key, restarts)


def fgsm(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, *, eps: float) -> jax.Array:
  """One signed-gradient step of size eps from the clean images, clipped to [0, 1]."""
  x_adv = jnp.clip(gradient_step(logits_fn, images, labels, eps, "linf"), 0.0, 1.0)
  return jax.lax.stop_gradient(x_adv)


def rs_fgsm(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *,
            eps: float, step_size: float | None = None) -> jax.Array:
  """FGSM from a uniform start in the eps-box, projected back to it (Wong et al. 2020).

  The default step is 1.25 * eps, the paper's choice.
  """
  step_size = 1.25 * eps if step_size is None else step_size
  x_adv = uniform_start(key, images, eps, "linf")
  x_adv = project(gradient_step(logits_fn, x_adv, labels, step_size, "linf"), images, eps, "linf")
  return jax.lax.stop_gradient(x_adv)


def n_fgsm(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *,
           eps: float, noise: float | None = None, step_size: float | None = None) -> jax.Array:
  """FGSM from uniform noise in [-noise, noise], NOT projected to the eps-box (de Jorge et al. 2022).

  Defaults (noise 2 * eps, step eps) are the paper's; the result lies within noise + step_size of
  the clean image in L-inf (3 * eps by default), and in [0, 1].
  """
  noise = 2.0 * eps if noise is None else noise
  step_size = eps if step_size is None else step_size
  x_adv = uniform_start(key, images, noise, "linf")
  x_adv = jnp.clip(gradient_step(logits_fn, x_adv, labels, step_size, "linf"), 0.0, 1.0)
  return jax.lax.stop_gradient(x_adv)


def _apgd_checkpoints(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Per iteration k (producing x^(k+1)): whether k + 1 is a checkpoint w_j, and w_j - w_{j-1}.

  p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), w_j = ceil(p_j * N);
  p is kept in integer hundredths so that no rounding moves a checkpoint.
  """
  is_checkpoint = np.zeros(num_steps, bool)
  period = np.ones(num_steps, np.int32)
  p_prev, p, w_prev = 0, 22, 0
  while True:
    w = -(-p * num_steps // 100)  # ceil(p / 100 * N)
    if w > num_steps:
      break
    if w > w_prev:
      is_checkpoint[w - 1], period[w - 1] = True, w - w_prev
      w_prev = w
    p_prev, p = p, p + max(p - p_prev - 3, 6)
  return is_checkpoint, period


def _apgd_run(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, eps: float,
              num_steps: int, norm: str, rho: float, loss_fn: LossFn) -> jax.Array:
  """One run of APGD on `loss_fn` from a uniform random start (see `apgd`)."""
  momentum = 0.75
  is_checkpoint, period = _apgd_checkpoints(num_steps)
  is_checkpoint, period = jnp.asarray(is_checkpoint), jnp.asarray(period, images.dtype)
  x0 = uniform_start(key, images, eps, norm)
  loss0, grad0, fooled0 = loss_and_grad(logits_fn, x0, labels, loss_fn)
  n = labels.shape[0]
  state = dict(x=x0, x_prev=x0, loss=loss0, grad=grad0,
               step=jnp.full((n,), 2.0 * eps, images.dtype),
               x_best=x0, loss_best=loss0, grad_best=grad0,
               increases=jnp.zeros((n,), images.dtype),
               loss_best_at_check=loss0, reduced_at_check=jnp.ones((n,), bool),
               x_out=x0, fooled_out=fooled0, loss_out=loss0)

  def body(k, s):
    x, x_prev = s["x"], s["x_prev"]
    alpha = jnp.where(k == 0, 1.0, momentum)
    step = per_example(s["step"], x)
    z = project(x + step * ascent_direction(s["grad"], norm), images, eps, norm)
    x_new = project(x + alpha * (z - x) + (1.0 - alpha) * (x - x_prev), images, eps, norm)
    loss, grad, fooled = loss_and_grad(logits_fn, x_new, labels, loss_fn)
    beats = stronger(fooled, loss, s["fooled_out"], s["loss_out"])

    increases = s["increases"] + (loss > s["loss"])
    improved = loss > s["loss_best"]
    x_best = jnp.where(per_example(improved, x), x_new, s["x_best"])
    grad_best = jnp.where(per_example(improved, x), grad, s["grad_best"])
    loss_best = jnp.where(improved, loss, s["loss_best"])

    at_check = is_checkpoint[k]
    too_few_increases = increases < rho * period[k]
    stalled = ~s["reduced_at_check"] & (s["loss_best_at_check"] >= loss_best)
    reduce = at_check & (too_few_increases | stalled)
    reduce_b = per_example(reduce, x)
    return dict(x=jnp.where(reduce_b, x_best, x_new), x_prev=x,
                loss=jnp.where(reduce, loss_best, loss),
                grad=jnp.where(reduce_b, grad_best, grad),
                step=jnp.where(reduce, s["step"] / 2, s["step"]),
                x_best=x_best, loss_best=loss_best, grad_best=grad_best,
                increases=jnp.where(at_check, 0.0, increases),
                loss_best_at_check=jnp.where(at_check, loss_best, s["loss_best_at_check"]),
                reduced_at_check=jnp.where(at_check, reduce, s["reduced_at_check"]),
                x_out=jnp.where(per_example(beats, x), x_new, s["x_out"]),
                fooled_out=s["fooled_out"] | fooled,
                loss_out=jnp.where(beats, loss, s["loss_out"]))

  return jax.lax.fori_loop(0, num_steps, body, state)["x_out"]


APGD_LOSSES = {"ce": cross_entropy, "dlr": dlr_loss}


def apgd(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *,
         eps: float, num_steps: int, norm: str = "linf", restarts: int = 1, rho: float = 0.75,
         loss: str = "ce") -> jax.Array:
  """APGD (Croce and Hein, ICML 2020) on the cross-entropy (loss "ce") or the DLR loss ("dlr"); returns, per example, a misclassified
  iterate if there was one (as AutoAttack's x_best_adv; of several, the highest-loss one), else
  the highest-loss point seen.

  Steps of size eta (2 * eps at first) with momentum 0.75 from a uniform random start. At each
  checkpoint w_j an example halves its eta and restarts from its best point when fewer than
  rho * (w_j - w_{j-1}) of the steps since w_{j-1} increased its loss, or when neither its eta
  nor its best loss changed since w_{j-1}. As in the authors' AutoAttack code, the second
  condition cannot fire at the first checkpoint (treated as if eta had just been halved).
  The step-size rule and the restarts from the best point use the highest-loss point alone; the
  returned point is the strongest iterate in `stronger`'s order (misclassified first, then
  loss), so robust accuracy counts an example broken by any iterate, as AutoAttack does.
  """
  check_norm(norm)
  if loss not in APGD_LOSSES:
    raise ValueError(f"loss={loss!r}; expected one of {', '.join(APGD_LOSSES)}.")
  attack_once = lambda key: _apgd_run(logits_fn, images, labels, key, eps, num_steps, norm, rho,
                                      APGD_LOSSES[loss])
  return best_of_restarts(attack_once, logits_fn, labels, key, restarts)


def apgd_ce(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array,
            **settings) -> jax.Array:
  """APGD on the cross-entropy (AutoAttack's first attack); see `apgd`."""
  return apgd(logits_fn, images, labels, key, loss="ce", **settings)


def apgd_dlr(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array,
             **settings) -> jax.Array:
  """APGD on the DLR loss: not fooled by rescaled logits (linearized models, kernel predictors);
  see `apgd`."""
  return apgd(logits_fn, images, labels, key, loss="dlr", **settings)


def apgd_t(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *,
           eps: float, num_steps: int, norm: str = "linf", num_targets: int = 9,
           rho: float = 0.75) -> jax.Array:
  """APGD-T (AutoAttack's second attack): APGD on the targeted DLR loss toward each of the
  `num_targets` classes the clean logits rank highest after the true one, one run each (key
  fold_in(key, r) for the r-th); per example the strongest result (`stronger`). AutoAttack
  ranks the clean logits including the true class, which differs only for examples the model
  already misclassifies."""
  check_norm(norm)
  ranked = ranked_targets(logits_fn(images), labels, num_targets, 4, "APGD-T")

  def toward(r):
    targets = jax.lax.dynamic_index_in_dim(ranked, r, axis=1, keepdims=False)
    loss_fn = lambda logits, labels: targeted_dlr_loss(logits, labels, targets)
    return _apgd_run(logits_fn, images, labels, jax.random.fold_in(key, r), eps, num_steps, norm,
                     rho, loss_fn)

  return strongest_of(toward, num_targets, logits_fn, labels)


# --------------------------------------------------------------------------- score-based

# Colour draws per query and example of Square Attack (the reference redraws until the window
# changes: with one channel half of the draws late in a run change nothing).
SQUARE_REDRAWS = 16


def _changing_colour(key: jax.Array, images: jax.Array, x_best: jax.Array, window: jax.Array,
                     eps: float) -> jax.Array:
  """Per example a +-eps colour per channel [n, 1, 1, c]: the first of SQUARE_REDRAWS draws that
  changes `x_best` inside `window` (the first draw where none does). The colour is constant per
  channel, so whether a draw changes the window is known from the two signs per channel."""
  n, c = images.shape[0], images.shape[-1]

  def differs(sign: float) -> jax.Array:  # [n, c]: some pixel of the window changes
    coloured = jnp.clip(images + sign * eps, 0.0, 1.0)
    return jnp.any(window & (jnp.abs(coloured - x_best) >= 1e-7), axis=(1, 2))

  signs = jax.random.rademacher(key, (SQUARE_REDRAWS, n, c), images.dtype)
  changes = jnp.any(jnp.where(signs > 0, differs(1.0), differs(-1.0)), axis=-1)  # [draws, n]
  first = jnp.argmax(changes, axis=0)
  chosen = jnp.take_along_axis(signs, first[None, :, None], axis=0)[0]  # [n, c]
  return eps * chosen[:, None, None, :]


def square(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *,
           eps: float, num_queries: int, p_init: float = 0.8, restarts: int = 1,
           norm: str = "linf", schedule: str = "rescaled") -> jax.Array:
  """Square Attack (Andriushchenko et al. 2020): random search that reads only the logits.

  The square's size follows `square_fraction`'s `schedule`: "rescaled" as in the authors' code,
  "fixed" as in AutoAttack's standard version.

  norm="l2" runs the L2 version, `ntk_scale.square_l2.square_l2`; what follows is the L-inf
  version.

  Starts from vertical stripes of +-eps; each query redraws one square window per example (its
  side from `square_fraction`, its place uniform) as a +-eps colour per channel, drawn again
  while it would leave the window as it is (up to SQUARE_REDRAWS draws), and keeps the change
  where it lowers the margin z_y - max_{j != y} z_j; an example stops once misclassified. This is
  the authors' reference (max-andr/square-attack) but for one thing: its corners stop one short
  of the last row and column (np.random.randint(0, H - side)), which on 8x8 digits leaves the
  last row and column out of every late, one-pixel square (Square-1000 on the adversarial digits
  model: 92.2% with its range, 90.6% with every place). AutoAttack's own version draws one window
  and colour for the whole batch per query and does not redraw. No gradient is used, so a model
  that hides its gradients (quantised inputs, saturated softmax) is attacked as well as one that
  does not: the check AutoAttack runs for gradient masking.
  """
  check_norm(norm)
  if norm == "l2":
    return square_l2(logits_fn, images, labels, key, eps=eps, num_queries=num_queries,
                     p_init=p_init, restarts=restarts, schedule=schedule)
  n, h, w, c = images.shape
  side_limit = max(min(h, w) - 1, 1)
  rows, cols = jnp.arange(h), jnp.arange(w)

  def attack_once(key):
    start_key, loop_key = jax.random.split(key)
    stripes = eps * jax.random.rademacher(start_key, (n, 1, w, c), images.dtype)
    x_best = jnp.clip(images + stripes, 0.0, 1.0)
    margin = margin_loss(logits_fn(x_best), labels)

    def query(i, carry):
      x_best, margin = carry
      h_key, w_key, sign_key = jax.random.split(jax.random.fold_in(loop_key, i), 3)
      side = jnp.sqrt(square_fraction(p_init, i, num_queries, schedule) * h * w)
      side = jnp.clip(jnp.round(side), 1, side_limit).astype(jnp.int32)
      top = jax.random.randint(h_key, (n, 1), 0, h - side + 1)
      left = jax.random.randint(w_key, (n, 1), 0, w - side + 1)
      in_rows = (rows >= top) & (rows < top + side)  # [n, h]
      in_cols = (cols >= left) & (cols < left + side)  # [n, w]
      window = in_rows[:, :, None, None] & in_cols[:, None, :, None]
      colour = _changing_colour(sign_key, images, x_best, window, eps)
      candidate = jnp.clip(jnp.where(window, images + colour, x_best), 0.0, 1.0)
      return keep_lower_margin(logits_fn, labels, candidate, x_best, margin)

    x_best, _ = jax.lax.fori_loop(0, num_queries, query, (x_best, margin))
    return x_best

  return best_of_restarts(attack_once, logits_fn, labels, key, restarts)


# --------------------------------------------------------------------------- by name

# fab_t is ntk_scale.fab's (the boundary-based attack).
ATTACKS = {"pgd": pgd, "fgsm": fgsm, "rs_fgsm": rs_fgsm, "n_fgsm": n_fgsm, "apgd_ce": apgd_ce,
           "apgd_dlr": apgd_dlr, "apgd_t": apgd_t, "fab_t": fab_t, "square": square}
_LINF_ONLY = ("fgsm", "rs_fgsm", "n_fgsm")


# --------------------------------------------------------------------------- from a config

def _positive(config: ml_collections.ConfigDict, field: str, prefix: str, required: bool,
              hint: str = "", below_one: bool = False) -> float | None:
  """`{prefix}.<field>`, a positive finite number; `below_one` for an L-inf length (eps, a step,
  noise), which at 1 or more spans every [0, 1] image."""
  value = config.get(field)
  if value is None:
    if required:
      raise ValueError(f"{prefix}.{field} is required for attack {config.name!r}{hint}.")
    return None
  if not (is_finite_number(value) and value > 0):
    raise ValueError(f"{prefix}.{field}={value!r} must be a positive finite number{hint}.")
  if below_one and value >= 1.0:
    raise ValueError(f"{prefix}.{field}={value!r}: an L-inf length of 1 or more spans every [0, 1] "
                     f"image; it is in pixel units of [0, 1] images (8/255, not 8).")
  return float(value)


def _count(config: ml_collections.ConfigDict, field: str, prefix: str, required: bool) -> int:
  value = config.get(field)
  if value is None and not required:
    return 1
  if not is_whole_number(value, 1):
    raise ValueError(f"{prefix}.{field}={value!r} must be an integer >= 1 for attack "
                     f"{config.name!r}.")
  return int(value)


def _number(config: ml_collections.ConfigDict, field: str, prefix: str, default: float,
            valid: Callable[[float], bool], expected: str) -> float:
  """`{prefix}.<field>` (default when unset), a number that `valid` accepts; the error says
  what is `expected`."""
  value = config.get(field, default)
  if not (is_finite_number(value) and valid(value)):
    raise ValueError(f"{prefix}.{field}={value!r} must {expected}.")
  return float(value)


def _num_targets(config: ml_collections.ConfigDict, prefix: str, num_classes: int | None) -> int:
  value = config.get("num_targets", 9)  # AutoAttack's
  if not is_whole_number(value, 1):
    raise ValueError(f"{prefix}.num_targets={value!r} must be an integer >= 1 (AutoAttack: 9, "
                     f"every class but the true one on CIFAR-10).")
  if num_classes is not None and value > num_classes - 1:
    raise ValueError(f"{prefix}.num_targets={value} must be at most {num_classes - 1}: the classes "
                     f"other than the true one, of the dataset's {num_classes}.")
  return value


# Every field some attack reads. A config may carry fields its own attack does not use (a pgd
# config whose name is overridden to fgsm keeps num_steps), but not a field no attack knows: a
# misspelt one ("restart") would silently leave the default in force.
ATTACK_FIELDS = ("name", "eps", "norm", "step_size", "num_steps", "restarts", "random_start", "unroll",
                 "noise", "rho", "num_targets", "alpha_max", "eta", "beta", "num_queries", "p_init",
                 "p_schedule", "attacks")


def build_attack(attack_config: ml_collections.ConfigDict, *, prefix: str = "config",
                 num_classes: int | None = None) -> Attack:
  """The attack of `attack_config` as `attack(logits_fn, images, labels, key) -> adversarial images`.

  Reads `name` and, as the attack uses them, `eps`, `step_size`, `num_steps`, `norm`, `restarts`,
  `random_start` (and `noise` for n_fgsm, `rho` for the APGD attacks, `num_targets` for apgd_t
  and fab_t, `alpha_max`, `eta` and `beta` for fab_t, `num_queries`, `p_init` and `p_schedule` for square,
  `attacks` for worst_of; fgsm, rs_fgsm and n_fgsm ignore num_steps and unroll, and refuse restarts
  other than 1). Every field is checked here, before any compute, and an error names it
  as `{prefix}.<field>`; with `num_classes` (the dataset's), also a num_targets the model's
  classes cannot supply. Call the result inside jit.
  """
  c = attack_config
  unknown = sorted(set(c.keys()) - set(ATTACK_FIELDS))
  if unknown:
    raise ValueError(f"{prefix}.{unknown[0]} is not a field of any attack; expected fields among "
                     f"{', '.join(ATTACK_FIELDS)}.")
  name = c.get("name")
  if name not in (*ATTACKS, "worst_of"):
    raise ValueError(f"{prefix}.name={name!r} is not a known attack; expected one of "
                     f"{', '.join(ATTACKS)}, worst_of.")
  units = " (pixel units of [0, 1] images, e.g. 8/255)"
  norm = c.get("norm")
  norm = "linf" if norm is None else norm
  if norm not in NORMS:
    raise ValueError(f"{prefix}.norm={norm!r} is not a known norm; expected one of {', '.join(NORMS)}.")
  if name in _LINF_ONLY and norm != "linf":
    raise ValueError(f"{prefix}.norm={norm!r}: attack {name!r} is defined for linf only.")
  linf = norm == "linf"
  eps = _positive(c, "eps", prefix, required=True, hint=units, below_one=linf)

  if name == "worst_of":
    return _build_worst_of(c, prefix, eps, norm, num_classes)
  if name in ("fgsm", "rs_fgsm", "n_fgsm"):
    _check_single_step(c, name, prefix)
  if name == "fgsm":
    return lambda logits_fn, images, labels, key: fgsm(logits_fn, images, labels, eps=eps)
  if name == "rs_fgsm":
    step_size = _positive(c, "step_size", prefix, required=False, hint=units, below_one=True)
    return lambda logits_fn, images, labels, key: rs_fgsm(logits_fn, images, labels, key, eps=eps,
                                                          step_size=step_size)
  if name == "n_fgsm":
    step_size = _positive(c, "step_size", prefix, required=False, hint=units, below_one=True)
    noise = _positive(c, "noise", prefix, required=False, hint=units + "; de Jorge et al.'s k = 2 is "
                      "2 * eps", below_one=True)
    return lambda logits_fn, images, labels, key: n_fgsm(logits_fn, images, labels, key, eps=eps,
                                                         noise=noise, step_size=step_size)

  restarts = _count(c, "restarts", prefix, required=False)
  if name == "square":
    num_queries = _count(c, "num_queries", prefix, required=True)
    p_init = c.get("p_init", 0.8)  # AutoAttack's
    if not (is_finite_number(p_init) and 0.0 < p_init <= 1.0):
      raise ValueError(f"{prefix}.p_init={p_init!r} must lie in (0, 1]: the fraction of the image "
                       f"the first squares cover.")
    schedule = c.get("p_schedule", "rescaled")  # the authors'; AutoAttack's: "fixed"
    if schedule not in SQUARE_SCHEDULES:
      raise ValueError(f"{prefix}.p_schedule={schedule!r} is not a schedule of the square's size; "
                       f"expected rescaled (to num_queries, as the authors' code) or fixed (as "
                       f"AutoAttack's standard version).")
    return lambda logits_fn, images, labels, key: square(
        logits_fn, images, labels, key, eps=eps, num_queries=num_queries, p_init=float(p_init),
        restarts=restarts, norm=norm, schedule=schedule)
  num_steps = _count(c, "num_steps", prefix, required=True)
  if name == "fab_t":  # defaults: AutoAttack's
    num_targets = _num_targets(c, prefix, num_classes)
    alpha_max = _number(c, "alpha_max", prefix, 0.1, lambda v: 0.0 <= v <= 1.0,
                        "lie in [0, 1] (the largest weight of the step from the clean image)")
    eta = _number(c, "eta", prefix, 1.05, lambda v: v >= 1.0, "be >= 1 (the overshoot)")
    beta = _number(c, "beta", prefix, 0.9, lambda v: 0.0 < v < 1.0,
                   "lie in (0, 1) (the backward step toward the clean image)")
    return lambda logits_fn, images, labels, key: fab_t(
        logits_fn, images, labels, key, eps=eps, num_steps=num_steps, num_targets=num_targets,
        restarts=restarts, alpha_max=alpha_max, eta=eta, beta=beta, norm=norm)
  if name in ("apgd_ce", "apgd_dlr", "apgd_t"):
    rho = c.get("rho", 0.75)
    if not (is_finite_number(rho) and 0.0 < rho < 1.0):
      raise ValueError(f"{prefix}.rho={rho!r} must lie in (0, 1).")
    if name == "apgd_t":
      if restarts != 1:
        raise ValueError(f"{prefix}.restarts={restarts}: apgd_t runs once per target class; set "
                         f"{prefix}.num_targets instead.")
      num_targets = _num_targets(c, prefix, num_classes)
      return lambda logits_fn, images, labels, key: apgd_t(
          logits_fn, images, labels, key, eps=eps, num_steps=num_steps, norm=norm,
          num_targets=num_targets, rho=rho)
    loss = "ce" if name == "apgd_ce" else "dlr"
    return lambda logits_fn, images, labels, key: apgd(
        logits_fn, images, labels, key, eps=eps, num_steps=num_steps, norm=norm,
        restarts=restarts, rho=rho, loss=loss)

  step_size = _positive(c, "step_size", prefix, required=True, hint=units, below_one=linf)
  random_start = c.get("random_start", True)
  if not isinstance(random_start, bool):
    raise ValueError(f"{prefix}.random_start={random_start!r} must be True or False.")
  if restarts > 1 and not random_start:
    raise ValueError(f"{prefix}.restarts={restarts} needs {prefix}.random_start=True; without a "
                     "random start every restart is the same run.")
  unroll = c.get("unroll", 1)
  if not is_whole_number(unroll, 1):
    raise ValueError(f"{prefix}.unroll={unroll!r} must be an integer >= 1 (loop iterations per "
                     f"unrolled body; num_steps unrolls fully).")
  return lambda logits_fn, images, labels, key: pgd(
      logits_fn, images, labels, key, eps=eps, step_size=step_size, num_steps=num_steps,
      norm=norm, random_start=random_start, restarts=restarts, unroll=unroll)


def _check_single_step(c: ml_collections.ConfigDict, name: str, prefix: str) -> None:
  """PGD's restarts and random_start, left on a pgd_linf config whose name was overridden: refused
  where they would ask for what a single-step attack does not do (num_steps and unroll are unused)."""
  restarts = c.get("restarts")
  if restarts is not None and restarts != 1:
    raise ValueError(f"{prefix}.restarts={restarts!r}: {name} is a single-step attack and runs once; "
                     f"set {prefix}.restarts=1.")
  step = c.get("step_size")
  if name == "fgsm" and step is not None and step != pgd_default_step(c.get("eps"), c.get("num_steps")):
    # pgd_linf's own step, which a config whose name was overridden keeps, is not a request.
    raise ValueError(f"{prefix}.step_size={step!r}: fgsm steps eps from the clean image; rs_fgsm and "
                     f"n_fgsm take a step_size.")
  if name != "fgsm" and c.get("random_start") is False:
    raise ValueError(f"{prefix}.random_start=False: {name} always starts from noise; set "
                     f"{prefix}.random_start=True, or {prefix}.name='fgsm' for no random start.")


def _build_worst_of(c: ml_collections.ConfigDict, prefix: str, eps: float, norm: str,
                    num_classes: int | None) -> "WorstOf":
  """The `worst_of` attack of every attack in `{prefix}.attacks` (name -> attack config, each with
  this eps and norm), run in the order of their names: a ConfigDict, which every config is, sorts
  its keys whatever order they were written in (AutoAttack's apgd_ce, apgd_t, fab_t, square is
  its own)."""
  members = c.get("attacks")
  if not isinstance(members, (ml_collections.ConfigDict, dict)) or not members:
    raise ValueError(f"{prefix}.attacks must map names to attack configs (e.g. apgd_ce and apgd_t) "
                     f"for attack 'worst_of'.")
  built = []
  for member_name in sorted(members):
    member = members[member_name]
    where = f"{prefix}.attacks.{member_name}"
    if not isinstance(member, (ml_collections.ConfigDict, dict)):
      raise ValueError(f"{where} must be an attack config, not {member!r}.")
    fields = dict(member.to_dict() if isinstance(member, ml_collections.ConfigDict) else member)
    if fields.get("name") == "worst_of":
      raise ValueError(f"{where}.name='worst_of': list its attacks in {prefix}.attacks instead.")
    for field, value in (("eps", eps), ("norm", norm)):
      if fields.get(field) is not None and fields[field] != value:
        raise ValueError(f"{where}.{field}={fields[field]!r} differs from {prefix}.{field}={value!r}: "
                         f"the worst case is over attacks of one threat model; leave it unset.")
    built.append(build_attack(ml_collections.ConfigDict({**fields, "eps": eps, "norm": norm}),
                              prefix=where, num_classes=num_classes))

  return WorstOf(tuple(members), tuple(built))


@dataclasses.dataclass(frozen=True, eq=False)
class WorstOf:
  """Several attacks of one threat model; called on a batch, every member runs on every example
  and each example keeps its strongest result (`stronger`: misclassified first, then
  cross-entropy), as AutoAttack's robust accuracy counts an example broken by any of its attacks.
  The i-th member gets key fold_in(key, i).

  `evaluate.evaluate` runs the members in turn instead, each only on the examples still robust
  (AutoAttack's order of work); called here, inside jit, the batch keeps its shape.
  """
  names: tuple[str, ...]
  members: tuple[Attack, ...]

  def __call__(self, logits_fn: LogitsFn, images: jax.Array, labels: jax.Array,
               key: jax.Array) -> jax.Array:
    run = lambda i: self.members[i](logits_fn, images, labels, jax.random.fold_in(key, i))
    best = first_best(run(0), logits_fn, labels)
    for i in range(1, len(self.members)):  # different programs: a Python loop, not a fori_loop
      best = keep_stronger(best, run(i), logits_fn, labels)
    return jax.lax.stop_gradient(best[0])


def build_attacks(named_configs: ml_collections.ConfigDict, prefix: str,
                  num_classes: int | None = None) -> dict[str, Attack]:
  """Several attacks, name -> attack, each checked; errors name `{prefix}.<name>.<field>`."""
  return {name: build_attack(c, prefix=f"{prefix}.{name}", num_classes=num_classes)
          for name, c in named_configs.items()}
