"""Optimizers and learning-rate schedules from `config.optimizer`, with epochs converted to steps."""

import math
from typing import Callable

import jax
import ml_collections
import optax

from ntk_scale.config_numbers import is_finite_number

SCHEDULES = ("constant", "piecewise", "cosine", "cyclic")
OPTIMIZERS = ("sgd", "adam")


def check_optimizer_config(opt: ml_collections.ConfigDict, prefix: str = "config.optimizer") -> None:
  """Raises ValueError naming the field of the optimizer config at `prefix` that is invalid."""
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"{prefix}.name={opt.name!r}; expected one of {', '.join(OPTIMIZERS)}.")
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"{prefix}.schedule={opt.schedule!r}; expected one of {', '.join(SCHEDULES)}.")
  if not (is_finite_number(opt.learning_rate) and opt.learning_rate > 0):
    raise ValueError(f"{prefix}.learning_rate={opt.learning_rate} must be a positive finite number.")
  momentum, weight_decay = opt.get("momentum", 0.0), opt.get("weight_decay", 0.0)
  if not (is_finite_number(momentum) and 0 <= momentum < 1):
    raise ValueError(f"{prefix}.momentum={momentum} must lie in [0, 1) (0: plain SGD; Adam's b1).")
  if opt.name == "adam" and opt.get("nesterov", False):
    raise ValueError(f"{prefix}.nesterov=True is SGD's; {prefix}.name='adam' has no Nesterov "
                     f"variant here (set nesterov False).")
  if not (is_finite_number(weight_decay) and weight_decay >= 0):
    raise ValueError(f"{prefix}.weight_decay={weight_decay} must be a finite number >= 0.")
  # Out of these ranges the schedules run without error but not as described: a negative warm-up
  # starts below the learning rate, a peak past the end never reaches it.
  warmup = opt.get("warmup_epochs", 0.0)
  if opt.schedule == "cosine" and not (is_finite_number(warmup) and warmup >= 0):
    raise ValueError(f"{prefix}.warmup_epochs={warmup} must be a finite number >= 0.")
  if opt.schedule == "cyclic" and not 0 < opt.get("peak_fraction", 0.4) <= 1:
    raise ValueError(f"{prefix}.peak_fraction={opt.peak_fraction} must lie in (0, 1] (where in "
                     f"training the learning rate peaks).")
  if opt.schedule == "piecewise":
    if not all(is_finite_number(e) and e >= 0 for e in opt.get("decay_epochs", ())):
      raise ValueError(f"{prefix}.decay_epochs={tuple(opt.decay_epochs)} must be finite epochs >= 0.")
    factor = opt.get("decay_factor", 0.1)
    if not (is_finite_number(factor) and factor > 0):
      raise ValueError(f"{prefix}.decay_factor={factor} must be a positive finite number.")


def check_warmup(opt: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int,
                 prefix: str = "config.optimizer") -> None:
  """Refuses a cosine warm-up of at least the run's `total_steps`: its learning rate would never
  reach the peak, nor decay from it, yet the run would end as if it had."""
  if opt.schedule != "cosine":
    return
  warmup = opt.get("warmup_epochs", 0.0) * steps_per_epoch
  if warmup < math.inf:  # 1e308 epochs: inf steps, which round() refuses
    warmup = round(warmup)
  if warmup >= total_steps:
    raise ValueError(f"{prefix}.warmup_epochs={opt.warmup_epochs} is {warmup:g} steps, not fewer than "
                     f"the {total_steps} steps of the run ({total_steps / steps_per_epoch:g} epochs "
                     f"at {steps_per_epoch} steps per epoch): the learning rate would never peak nor "
                     f"decay; expected {prefix}.warmup_epochs < the run's epochs.")


def build_schedule(opt: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """constant; piecewise (x `decay_factor` after each of `decay_epochs`); cosine to 0 after
  `warmup_epochs` of linear warm-up; cyclic (linear 0 -> peak at `peak_fraction` of training -> 0,
  as in fast adversarial training)."""
  lr = opt.learning_rate
  if opt.schedule == "constant":
    return optax.constant_schedule(lr)
  if opt.schedule == "piecewise":
    boundaries = {}  # epochs that round to one step each still decay: their factors multiply
    for e in opt.get("decay_epochs", ()):
      step = int(round(e * steps_per_epoch))
      boundaries[step] = boundaries.get(step, 1.0) * opt.get("decay_factor", 0.1)
    return optax.piecewise_constant_schedule(lr, boundaries)
  if opt.schedule == "cosine":
    warmup = int(round(opt.get("warmup_epochs", 0.0) * steps_per_epoch))
    if warmup == 0:  # optax warns about a zero-length warm-up
      return optax.cosine_decay_schedule(lr, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1))
  peak = max(1, int(round(opt.get("peak_fraction", 0.4) * total_steps)))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, peak), optax.linear_schedule(lr, 0.0, max(1, total_steps - peak))],
      [peak])


def build_optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int,
                    batch_step_of_update: Callable[[jax.Array], jax.Array] | None = None,
                    prefix: str = "config.optimizer",
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD (momentum, Nesterov) or Adam (momentum as its b1), with L2 weight decay added to the
  gradient as in PyTorch's SGD.

  The schedule is defined on batch steps. When a batch takes more than one optimizer update
  (Loo et al.'s benign-then-adversarial updates), `batch_step_of_update` maps the optimizer's
  update count to the batch step, so epoch boundaries stay where the config puts them. `prefix`
  names `opt` in errors.
  """
  check_optimizer_config(opt, prefix)
  check_warmup(opt, steps_per_epoch, total_steps, prefix)
  batch_schedule = build_schedule(opt, steps_per_epoch, total_steps)
  schedule = (batch_schedule if batch_step_of_update is None
              else lambda count: batch_schedule(batch_step_of_update(count)))
  if opt.name == "sgd":
    momentum = opt.get("momentum", 0.0) or None
    base = optax.sgd(schedule, momentum=momentum, nesterov=opt.get("nesterov", False))
  else:  # momentum is Adam's first-moment decay b1 (the base config's 0.9 is optax's default)
    base = optax.adam(schedule, b1=opt.get("momentum", 0.9))
  weight_decay = opt.get("weight_decay", 0.0)
  tx = optax.chain(optax.add_decayed_weights(weight_decay), base) if weight_decay else base
  return tx, batch_schedule
