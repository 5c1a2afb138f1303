"""The phase loop: set up, resume, train with periodic checkpoints, evaluate."""

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions

from ntk_scale import data, parallel
from ntk_scale.checkpoint import Checkpoints, save_schedule
from ntk_scale.data.augment import AUGMENTATIONS
from ntk_scale.attacks import build_attack
from ntk_scale.evaluate import build_eval_attacks, evaluate_and_save
from ntk_scale.models import build_model, check_model_config
from ntk_scale.train.optimizer import build_optimizer, check_optimizer_config
from ntk_scale.train.state import BATCH_NORM_MODES, count_parameters, create_train_state
from ntk_scale.train.steps import make_train_step
from ntk_scale.train.writers import create_writers
from ntk_scale.workdir import flatten_config


MODES = ("C", "A", "F")


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


def check_train_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Validates every field the train job reads, before any data is loaded or compiled."""
  check_model_config(config.model)
  data.check_data_config(config.data)
  check_optimizer_config(config.optimizer)
  if config.data.augment not in AUGMENTATIONS:
    raise ValueError(f"config.data.augment={config.data.augment!r}; expected one of "
                     f"{', '.join(AUGMENTATIONS)}.")
  for field in ("batch_size", "eval_batch_size"):
    parallel.check_batch_size(config[field], num_devices, f"config.{field}")
  if not config.num_epochs > 0:
    raise ValueError(f"config.num_epochs={config.num_epochs} must be positive.")
  bad = [e for e in config.checkpoint.fractional_epochs if not e > 0]
  if bad:  # epochs beyond num_epochs are allowed and skipped, so short variants keep the defaults
    raise ValueError(f"config.checkpoint.fractional_epochs has non-positive epochs {bad}.")
  if config.train.mode not in MODES:
    raise ValueError(f"config.train.mode={config.train.mode!r}; expected one of {', '.join(MODES)} "
                     f"(C benign, A adversarial, F benign then adversarial from flip_epoch).")
  if config.train.mode == "F" and not 0 < config.train.flip_epoch < config.num_epochs:
    raise ValueError(f"config.train.flip_epoch={config.train.flip_epoch} must lie inside (0, "
                     f"num_epochs={config.num_epochs}) for mode F.")
  if config.train.attack_batch_norm not in BATCH_NORM_MODES:
    raise ValueError(f"config.train.attack_batch_norm={config.train.attack_batch_norm!r}; expected "
                     f"one of {', '.join(BATCH_NORM_MODES)}.")
  if config.train.mode != "C":
    build_attack(config.train.attack, prefix="config.train.attack")
  build_eval_attacks(config)
  if not config.checkpoint.every_epochs > 0:
    raise ValueError(f"config.checkpoint.every_epochs={config.checkpoint.every_epochs} must be positive.")


def _check_finite(pending: list[tuple[int, dict]], checkpoints: Checkpoints, last_saved: int) -> dict:
  """Fetches the metrics of the steps since the last check; raises at the first non-finite loss."""
  fetched = [(step, jax.tree.map(np.asarray, jax.device_get(m))) for step, m in pending]
  for step, metrics in fetched:
    if not np.isfinite(metrics["loss"]):
      checkpoints.wait_until_finished()
      where = (f"step {last_saved} in {checkpoints.directory}" if last_saved
               else "none (no checkpoint was saved before the failure)")
      raise NonFiniteLossError(
          f"training loss became {metrics['loss']} at step {step}; stopping without saving. "
          f"Last good checkpoint: {where}. Lower config.optimizer.learning_rate or check the data.")
  return {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1]}


def first_adversarial_step(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int | None:
  """The batch step from which training is adversarial (None for benign training)."""
  return {"C": None, "A": 0, "F": int(round(config.train.flip_epoch * steps_per_epoch))}[config.train.mode]


def _batch_step_of_update(flip_step: int | None, two_updates: bool):
  """Maps optimizer updates to batch steps when adversarial batches take two updates each."""
  if flip_step is None or not two_updates:
    return None
  return lambda count: jnp.where(count < flip_step, count, flip_step + (count - flip_step) // 2)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its newest checkpoint, and evaluates on the test split."""
  # ----------------------------------------------------------------- Set-up
  mesh = parallel.make_mesh()
  check_train_config(config, mesh.devices.size)
  dataset = data.load_dataset(config.data)
  batches = data.TrainBatches(dataset.train, config.batch_size, config.seed, mesh)
  steps_per_epoch = batches.steps_per_epoch
  total_steps = int(round(config.num_epochs * steps_per_epoch))
  model = build_model(config.model, dataset.num_classes)
  flip_step = first_adversarial_step(config, steps_per_epoch)
  tx, learning_rate = build_optimizer(
      config.optimizer, steps_per_epoch, total_steps,
      _batch_step_of_update(flip_step, config.train.benign_step_first))
  state = create_train_state(model, tx, dataset.train.images.shape[1:], config.seed, mesh)
  logging.info("%s on %s: %d parameters, %d train / %d test examples, %d devices, %d steps/epoch.",
               config.model.name, dataset.name, count_parameters(state.params), len(dataset.train),
               len(dataset.test), mesh.devices.size, steps_per_epoch)

  # ----------------------------------------------------------------- Resume
  checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
  start_step = checkpoints.latest_step() or 0
  if start_step:
    state = checkpoints.restore(start_step, state)
    logging.info("Resumed from step %d (epoch %.3f).", start_step, start_step / steps_per_epoch)
  writer, jsonl = create_writers(workdir)
  if jsonl is not None:  # forget what was logged after the checkpoint we resume from
    jsonl.truncate(lambda r: r["step"] < start_step or (
        r["step"] == start_step and not any(k.startswith("test/") for k in r)))
  saves = save_schedule(steps_per_epoch, config.num_epochs, config.checkpoint.every_epochs,
                        config.checkpoint.fractional_epochs)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in flatten_config(config.to_dict()).items()})

  # ----------------------------------------------------------------- Train
  benign_step = make_train_step(config.data.augment, config.seed)
  adversarial_step = None if flip_step is None else make_train_step(
      config.data.augment, config.seed, build_attack(config.train.attack),
      benign_step_first=config.train.benign_step_first,
      attack_batch_norm=config.train.attack_batch_norm)
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps, every_secs=None)
  pending, last_saved = [], start_step
  for step in range(start_step, total_steps):
    adversarial = flip_step is not None and step >= flip_step
    state, metrics = (adversarial_step if adversarial else benign_step)(state, batches(step))
    done = step + 1
    pending.append((done, metrics))
    progress(done)
    if done % config.log_every_steps == 0 or done in saves:
      means = _check_finite(pending, checkpoints, last_saved)
      pending = []
      means.update(epoch=done / steps_per_epoch, learning_rate=float(learning_rate(done - 1)),
                   adversarial=float(adversarial))
      writer.write_scalars(done, {f"train/{k}": v for k, v in means.items()})
    if done in saves:
      checkpoints.save(done, state, saves[done])
      last_saved = done
  checkpoints.wait_until_finished()

  # ----------------------------------------------------------------- Evaluate
  results = evaluate_and_save(config, state, dataset, mesh, workdir, total_steps)
  writer.write_scalars(total_steps, {
      f"test/{name}/{k}" if name != "clean" else f"test/{k}": r[k]
      for name, r in results.items() for k in ("accuracy", "loss")})
  writer.flush()
  checkpoints.close()
  for name, r in results.items():
    logging.info("Test accuracy (%s) %.4f, loss %.4f after %g epochs.", name, r["accuracy"], r["loss"],
                 config.num_epochs)
  return {"state": state, "test": results["clean"], "results": results, "steps": total_steps}
