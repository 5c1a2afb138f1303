"""A training set optimised to be robust through kernel regression (Tsilivis, Su and Kempe, "Can we
achieve robustness from data alone?", arXiv 2207.11727).

The bi-level problem as implemented here (the paper's method section was not readable;
configs/infinite_width.py says what of the paper was): the optimised images X_s (the "support"
set, labels fixed) are those whose kernel-regression predictor f(.; X_s, Y) = K(., X_s) (K(X_s,
X_s) + lambda I)^{-1} Y has the smallest *adversarial* loss on original training data (the
"targets"):

    min_{X_s}  E_{(x, y) ~ targets}  max_{||delta|| <= eps}  loss(f(x + delta; X_s, Y), y).

Each outer step draws a target batch, solves the inner maximisation with multi-step PGD against
the current predictor (X_s held fixed), and moves X_s by the gradient of the outer loss at those
adversarial points through the kernel solve (Danskin: the attack is not differentiated), with
Adam, as KIP does for dataset distillation (Nguyen et al. 2021). The images stay in [0, 1] and,
with `data_eps`, within that L-inf distance of the originals.

At CIFAR-10 scale (Myrtle-5, 5,000 images) neither the Gram matrix K(X_s, X_s) nor its gradient
fits one call: every pair carries a (H W)^2 covariance, terabytes for the whole matrix. So each
step's gradient (`objective_and_gradient`) is assembled from pieces that do, on every device of
every host: the Gram matrix tile by tile (function_tiles.function_kernel), the ridge solve and its
pullback on one device (an N x N matrix), the attack and the outer loss over target batches of
`batch_size` split across the devices (scores against `tile` support images at a time,
kernel_regression.kernel_scores), and the Gram matrix's pullback tile by tile
(function_tiles.function_kernel_vjp). Its value and gradient equal those of the one-call
`adversarial_objective`. The optimisation saves its state (images, Adam's moments, the objective so
far) every `checkpoint_every` outer steps with Orbax, so a killed run resumes where it stopped and
ends with the images an uninterrupted one would have; a preempted one (SIGTERM,
ntk_scale/preemption.py) saves the step it was in and stops.

Where the targets come from (`target_holdout`): 0, the default, attacks the original training
images of the optimised set: the same rows, but their unoptimised pixels, fixed throughout, not the
moving support X_s (the predictor interpolates X_s, which starts at them and moves away); a count
n >= 1 or a fraction in (0, 1) sets that many training images aside (split_targets, seeded) as
targets only, and optimises the rest, so the objective is measured around points the
predictor was not fitted on. The paper's choice could not be checked, so the default keeps the
earlier one (on digits the held-out variant did worse; configs/infinite_width.py).
"""

import contextlib
import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from ntk_scale import files, parallel, preemption, writer_lock
from ntk_scale.attacks import Attack, build_attack, build_attacks
from ntk_scale.config_numbers import is_finite_number, is_whole_number
from ntk_scale.data import Split, eval_batches
from ntk_scale.kernel_regression import (KernelFn, kernel_scores, predictor, regression_targets,
                                         ridge_coefficients)
from ntk_scale.ntk.function_tiles import function_kernel, function_kernel_vjp
from ntk_scale.preemption import Preempted, preemption_notices

LOSSES = ("cross_entropy", "mse")
PREFIX = "config.infinite.robust_data"


def num_holdout(target_holdout: int | float, num_train: int) -> int:
  """How many training images `target_holdout` sets aside as targets: 0, none (the targets are the
  original images of the optimised set); a whole number (int or integral float), that many; a
  non-integral float in (0, 1), that fraction of `num_train`, rounded. Checked; the error names the field."""
  value = target_holdout
  if not is_finite_number(value):
    raise ValueError(f"{PREFIX}.target_holdout={value!r} must be 0 (the targets are the optimised "
                     f"training images), a number of held-out images or a fraction in (0, 1).")
  if isinstance(value, float) and not value.is_integer():
    if not 0 < value < 1:
      raise ValueError(f"{PREFIX}.target_holdout={value!r}: a fraction must lie in (0, 1).")
    count = int(round(value * num_train))
  else:
    count = int(value)
  if count < 0 or count >= num_train or (value and count == 0):
    raise ValueError(f"{PREFIX}.target_holdout={value!r} sets aside {count} of the {num_train} "
                     f"training images; it must leave at least one target and one image to optimise.")
  return count


def split_targets(target_holdout: int | float, num_train: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(rows optimised, rows attacked as targets) of the training set. With no holdout both are all
  rows; otherwise a seeded random `num_holdout` rows are the targets and the rest are optimised
  (disjoint, each sorted)."""
  count = num_holdout(target_holdout, num_train)
  if count == 0:
    return np.arange(num_train), np.arange(num_train)
  order = np.random.default_rng(seed).permutation(num_train)
  return np.sort(order[count:]), np.sort(order[:count])


def check_robust_data_config(section: ml_collections.ConfigDict, num_train: int,
                             num_classes: int | None = None) -> None:
  """Every config.infinite.robust_data field, before any kernel is computed."""
  for field, least in (("num_steps", 0), ("target_batch_size", 1), ("checkpoint_every", 1)):
    value = section[field]
    if not is_whole_number(value, least):
      raise ValueError(f"{PREFIX}.{field}={value!r} must be an integer >= {least}.")
  holdout = num_holdout(section.target_holdout, num_train)
  if section.target_batch_size > (holdout or num_train):
    where = (f"held out by {PREFIX}.target_holdout={section.target_holdout!r}" if holdout
             else "(the training images)")
    raise ValueError(f"{PREFIX}.target_batch_size={section.target_batch_size} exceeds the "
                     f"{holdout or num_train} target images {where}.")
  if not (is_finite_number(section.learning_rate) and section.learning_rate > 0):
    raise ValueError(f"{PREFIX}.learning_rate={section.learning_rate!r} must be a positive finite "
                     f"number.")
  if section.data_eps is not None and not (is_finite_number(section.data_eps) and section.data_eps > 0):
    raise ValueError(f"{PREFIX}.data_eps={section.data_eps!r} must be a positive finite number (an "
                     f"L-inf bound on the change of each pixel) or None (no bound, as in the paper).")
  if section.loss not in LOSSES:
    raise ValueError(f"{PREFIX}.loss={section.loss!r}; expected one of {', '.join(LOSSES)}.")
  if section.network_width is not None and not is_whole_number(section.network_width, 0):
    raise ValueError(f"{PREFIX}.network_width={section.network_width!r} must be an integer >= 1, "
                     f"0 (no network trained on the robust set) or None (the largest transfer "
                     f"width).")
  build_attack(section.attack, prefix=f"{PREFIX}.attack", num_classes=num_classes)
  build_attacks(section.eval_attacks, f"{PREFIX}.eval_attacks", num_classes)


def outer_losses(logits: jax.Array, labels: jax.Array, loss: str) -> jax.Array:
  """Per-example outer loss of the predictor's scores: cross-entropy, or the squared error to the
  regression targets (one-hot minus 1/C) that kernel regression itself fits."""
  if loss == "cross_entropy":
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = regression_targets(labels, logits.shape[-1], logits.dtype)
  return 0.5 * jnp.sum((logits - targets) ** 2, -1)


def outer_loss(logits: jax.Array, labels: jax.Array, loss: str) -> jax.Array:
  """The mean of `outer_losses`."""
  return outer_losses(logits, labels, loss).mean()


def adversarial_objective(kernel_fn: KernelFn, support: jax.Array, support_labels: jax.Array,
                          targets: jax.Array, target_labels: jax.Array, key: jax.Array, *,
                          attack: Attack, num_classes: int, regularizer: float, solver: str,
                          loss: str) -> jax.Array:
  """The outer objective at `support`: the loss of kernel regression fitted on (support, labels) on
  `attack`'s examples of the targets, crafted against that same predictor (held fixed)."""
  fit = lambda s: predictor(kernel_fn, s, support_labels, num_classes, regularizer=regularizer,
                            solver=solver)
  x_adv = jax.lax.stop_gradient(attack(fit(jax.lax.stop_gradient(support)), targets, target_labels, key))
  return outer_loss(fit(support)(x_adv), target_labels, loss)


@functools.lru_cache(maxsize=8)
def target_batch_program(kernel_fn: KernelFn, attack: Attack, loss: str, block_size: int,
                          mesh: Mesh):
  """One batch of targets, split over the devices: the attack against the predictor with the
  support and coefficients held fixed, then the batch's share of the outer loss and its gradient
  in the support and the coefficients, summed over the devices."""

  def run(support, coefficients, batch, key, total):
    scores = lambda s, a, x: kernel_scores(kernel_fn, x, s, a, block_size)
    x_adv = jax.lax.stop_gradient(attack(functools.partial(scores, support, coefficients),
                                         batch["images"], batch["labels"], key))
    share = lambda s, a: jnp.sum(outer_losses(scores(s, a, x_adv), batch["labels"], loss)
                                 * batch["mask"]) / total
    value, (d_support, d_coefficients) = jax.value_and_grad(share, (0, 1))(support, coefficients)
    return value, d_support, d_coefficients

  return jax.jit(run, out_shardings=parallel.replicated_sharding(mesh))


def objective_and_gradient(kernel_fn: KernelFn, support: np.ndarray, support_labels: np.ndarray,
                           targets: np.ndarray, target_labels: np.ndarray, key: jax.Array, *,
                           attack: Attack, num_classes: int, regression: ml_collections.ConfigDict,
                           loss: str, tile: int, batch_size: int, mesh: Mesh
                           ) -> tuple[float, np.ndarray]:
  """`adversarial_objective` at `support` and its gradient in the support (numpy, on every
  process), assembled from pieces that each fit a device (module docstring). Targets go to the
  attack `batch_size` at a time, batch b with the key fold_in(key, b)."""
  gram = function_kernel(kernel_fn, support, tile=tile, mesh=mesh)
  regression_y = regression_targets(jnp.asarray(support_labels), num_classes, gram.dtype)
  coefficients, solve_pullback = jax.vjp(
      lambda k: ridge_coefficients(k, regression_y, regression.regularizer, regression.solver),
      jnp.asarray(gram))
  if not np.all(np.isfinite(coefficients)):
    raise FloatingPointError(f"kernel regression on the optimised images gave non-finite "
                             f"coefficients (solver {regression.solver!r}, regularizer "
                             f"{regression.regularizer}): raise config.infinite.regression.regularizer.")
  program = target_batch_program(kernel_fn, attack, loss, tile, mesh)
  fixed = parallel.replicate({"support": support, "coefficients": np.asarray(coefficients)}, mesh)
  value, d_support, d_coefficients = 0.0, np.zeros_like(support), np.zeros_like(coefficients)
  with jax.default_matmul_precision("highest"):
    for b, batch in enumerate(eval_batches(Split(targets, target_labels), batch_size, mesh)):
      parts = program(fixed["support"], fixed["coefficients"], batch, jax.random.fold_in(key, b),
                      float(len(targets)))
      value, d_support, d_coefficients = (total + parallel.local_copy(part) for total, part in zip(
          (value, d_support, d_coefficients), parts))
  (d_gram,) = solve_pullback(jnp.asarray(d_coefficients))
  d_support = d_support + function_kernel_vjp(kernel_fn, support, np.asarray(d_gram), tile=tile,
                                              mesh=mesh)
  return float(value), d_support


class _Progress:
  """The optimisation's state under `directory`, saved with Orbax (written whole or not at all):
  the images, Adam's state and the objective of every step so far."""

  def __init__(self, directory: str):
    self._manager = preemption.CheckpointManager(
        directory if files.is_cloud(directory) else os.path.abspath(directory),
        item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             enable_async_checkpointing=False))

  def restore(self, like: dict[str, Any]) -> tuple[int, dict[str, Any], list[float]]:
    """(steps done, state shaped like `like`, objective values); (0, like, []) when none saved."""
    step = self._manager.latest_step()
    if step is None:
      return 0, like, []
    saved = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(like), meta=ocp.args.JsonRestore()))
    return step, jax.tree.map(np.asarray, saved["state"]), list(saved["meta"]["objective"])

  def save(self, step: int, state: dict[str, Any], objective: list[float]) -> None:
    writer_lock.check_claims(f"saving step {step} of the robust set")
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"objective": objective})))

  def close(self) -> None:
    self._manager.close()


def attack_batch_size(target_batch_size: int, batch_size: int | None, num_devices: int) -> int:
  """Targets attacked per call: `batch_size` (a multiple of the devices), but no more than the
  target batch padded to the devices (None: that)."""
  whole = -(-target_batch_size // num_devices) * num_devices
  if batch_size is not None:
    parallel.check_batch_size(batch_size, num_devices, "the robust set's attack batch size")
  return min(batch_size or whole, whole)


def optimise_dataset(section: ml_collections.ConfigDict, kernel_fn: KernelFn, images: np.ndarray,
                     labels: np.ndarray, num_classes: int, regression: ml_collections.ConfigDict,
                     seed: int, targets: tuple[np.ndarray, np.ndarray] | None = None, *,
                     tile: int | None = None, batch_size: int | None = None,
                     mesh: Mesh | None = None, checkpoint_dir: str | None = None,
                     ) -> tuple[np.ndarray, dict[str, Any]]:
  """The optimised `images` (same shape, labels unchanged) and a record of the run: the objective on
  each step's target batch before the step ("objective"), and the largest pixel change.

  `targets` (images, labels) are the points attacked at each step; None: `images` as given (the
  originals, fixed), never the optimised support. `tile`: images per Gram tile and per block of a
  score (default: all in one); `batch_size`: targets attacked at a time over the devices of `mesh`
  (default: the whole target batch, padded to the devices). With `checkpoint_dir` (one directory
  per run's settings) the state is saved there every section.checkpoint_every steps and a rerun
  continues from it."""
  attack = build_attack(section.attack, prefix=f"{PREFIX}.attack")
  mesh = mesh or parallel.make_mesh()
  originals = np.asarray(images)
  target_images, target_labels = (originals, np.asarray(labels)) if targets is None else (
      np.asarray(targets[0], originals.dtype), np.asarray(targets[1]))
  if section.target_batch_size > len(target_images):
    raise ValueError(f"{PREFIX}.target_batch_size={section.target_batch_size} exceeds the "
                     f"{len(target_images)} target images.")
  tile = tile or len(originals)
  batch_size = attack_batch_size(section.target_batch_size, batch_size, mesh.size)
  low, high = 0.0, 1.0
  if section.data_eps is not None:
    low = np.maximum(originals - section.data_eps, 0.0)
    high = np.minimum(originals + section.data_eps, 1.0)
  optimizer = optax.adam(section.learning_rate)

  @jax.jit
  def update(support, opt_state, gradient, low, high):
    updates, opt_state = optimizer.update(gradient, opt_state, support)
    return jnp.clip(optax.apply_updates(support, updates), low, high), opt_state

  state = {"support": originals, "opt_state": jax.tree.map(np.asarray, optimizer.init(originals))}
  progress = _Progress(checkpoint_dir) if checkpoint_dir and section.num_steps else None
  done, state, values = progress.restore(state) if progress else (0, state, [])
  if done:
    logging.info("robust set: resuming after step %d of %d", done, section.num_steps)
  key = jax.random.key(seed)
  started = time.time()
  # A preemption notice (SIGTERM) saves the step it came in and stops; without a checkpoint
  # directory nothing could resume, so SIGTERM keeps its usual effect.
  with preemption_notices() if progress else contextlib.nullcontext(lambda: False) as noticed:
    for i in range(done, section.num_steps):
      batch_key, attack_key = jax.random.split(jax.random.fold_in(key, i))
      rows = np.asarray(jax.random.choice(batch_key, len(target_images),
                                          (section.target_batch_size,), replace=False))
      value, gradient = objective_and_gradient(
          kernel_fn, state["support"], labels, target_images[rows], target_labels[rows], attack_key,
          attack=attack, num_classes=num_classes, regression=regression, loss=section.loss,
          tile=tile, batch_size=batch_size, mesh=mesh)
      support, opt_state = update(state["support"], state["opt_state"], gradient, low, high)
      state = jax.tree.map(np.asarray, {"support": support, "opt_state": opt_state})
      values.append(value)
      preempted = noticed() and i + 1 < section.num_steps
      if progress and ((i + 1) % section.checkpoint_every == 0 or i + 1 == section.num_steps
                       or preempted):
        progress.save(i + 1, state, values)
        logging.info("robust set: step %d of %d, objective %.4g, %.0f s", i + 1, section.num_steps,
                     value, time.time() - started)
      if preempted:
        progress.close()
        raise Preempted(f"step {i + 1} of {section.num_steps} of the robust set's optimisation is "
                        f"saved in {checkpoint_dir}", i + 1)
  if progress:
    progress.close()
  support = state["support"]
  return support, {"objective": values, "num_optimised": len(support), "num_targets": len(target_images),
                   "max_pixel_change": float(np.max(np.abs(support - originals)))}
