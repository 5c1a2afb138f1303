"""The phase loop: set up, resume, train with periodic checkpoints, evaluate."""

import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions

from ntk_scale import data, parallel
from ntk_scale.checkpoint import Checkpoints, save_schedule
from ntk_scale.data.augment import AUGMENTATIONS
from ntk_scale.evaluate import evaluate_clean
from ntk_scale.models import build_model, check_model_config
from ntk_scale.train.optimizer import build_optimizer, check_optimizer_config
from ntk_scale.train.state import TrainState, count_parameters, create_train_state
from ntk_scale.train.steps import make_train_step
from ntk_scale.train.writers import create_writers
from ntk_scale.workdir import flatten_config


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
  tx, learning_rate = build_optimizer(config.optimizer, steps_per_epoch, total_steps)
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
  train_step = make_train_step(config.data.augment, config.seed)
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps, every_secs=None)
  pending, last_saved = [], start_step
  for step in range(start_step, total_steps):
    state, metrics = train_step(state, batches(step))
    done = step + 1
    pending.append((done, metrics))
    progress(done)
    if done % config.log_every_steps == 0 or done in saves:
      means = _check_finite(pending, checkpoints, last_saved)
      pending = []
      means.update(epoch=done / steps_per_epoch, learning_rate=float(learning_rate(done - 1)))
      writer.write_scalars(done, {f"train/{k}": v for k, v in means.items()})
    if done in saves:
      checkpoints.save(done, state, saves[done])
      last_saved = done
  checkpoints.wait_until_finished()

  # ----------------------------------------------------------------- Evaluate
  results = evaluate_clean(state, dataset.test, config.eval_batch_size, mesh, dataset.num_classes)
  writer.write_scalars(total_steps, {"test/accuracy": results["accuracy"], "test/loss": results["loss"]})
  writer.flush()
  checkpoints.close()
  logging.info("Test accuracy %.4f, loss %.4f after %g epochs.", results["accuracy"], results["loss"],
               config.num_epochs)
  return {"state": state, "test": results, "steps": total_steps}

