"""The phase loop: set up, resume, train with periodic checkpoints, evaluate."""

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions

from ntk_scale.attacks import build_attack
from ntk_scale.checkpoint import Checkpoints, save_schedule
from ntk_scale.evaluate import evaluate_and_save, write_evaluation
from ntk_scale.train.experiment import build_experiment
from ntk_scale.train.steps import make_train_step
from ntk_scale.train.writers import create_writers
from ntk_scale.workdir import flatten_config


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


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
  exp = build_experiment(config)
  mesh, dataset, state, flip_step = exp.mesh, exp.dataset, exp.state, exp.flip_step
  steps_per_epoch, total_steps, learning_rate = exp.steps_per_epoch, exp.total_steps, exp.learning_rate
  batches = exp.batches

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
  write_evaluation(workdir, total_steps, config.num_epochs, results)
  writer.write_scalars(total_steps, {
      f"test/{name}/{k}" if name != "clean" else f"test/{k}": r[k]
      for name, r in results.items() for k in ("accuracy", "loss")})
  writer.flush()
  checkpoints.close()
  for name, r in results.items():
    logging.info("Test accuracy (%s) %.4f, loss %.4f after %g epochs.", name, r["accuracy"], r["loss"],
                 config.num_epochs)
  return {"state": state, "test": results["clean"], "results": results, "steps": total_steps}
