"""The train job: phase 1 (the network) in the workdir, then phase 2 (its linearization) if asked."""

import os
from typing import Any

import ml_collections
from flax import traverse_util

from ntk_scale import files
from ntk_scale.checkpoint import (CHECKPOINTS_DIR, CheckpointNotFoundError, Checkpoints, is_initial,
                                  same_epoch, save_schedule)
from ntk_scale.data import Dataset
from ntk_scale.restore import theta0_step
from ntk_scale.train.co_monitor import CoMonitor
from ntk_scale.train.experiment import build_experiment, build_train_steps
from ntk_scale.train.phase import NonFiniteLossError, Phase, finish_phase, open_phase, train_phase
from ntk_scale.train.phase2 import check_phase2_config, phase2_and_evaluate

__all__ = ["NonFiniteLossError", "check_phase2_from_epoch", "phase1_saves", "train_and_evaluate",
           "train_job"]


def phase1_saves(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict[int, float]:
  """Step -> epoch of every checkpoint phase 1 saves at `steps_per_epoch`, its initialisation too."""
  return save_schedule(steps_per_epoch, config.num_epochs, config.checkpoint.every_epochs,
                       config.checkpoint.fractional_epochs, initial=True)


def check_phase2_from_epoch(config: ml_collections.ConfigDict, saves: dict[int, float]) -> None:
  """config.phase2.from_epoch is one of phase 1's `saves` (phase1_saves), for a train job that runs
  phase 2. jobs.check_config asks at the catalog's steps per epoch, before the workdir records the
  config: recorded, a refused config would refuse its corrected rerun as another experiment."""
  from_epoch = config.phase2.from_epoch
  if not any(same_epoch(e, from_epoch) for e in saves.values()):
    raise CheckpointNotFoundError(
        f"config.phase2.from_epoch={from_epoch} is not an epoch phase 1 saves; it saves epochs "
        f"{sorted(saves.values())} (config.checkpoint.every_epochs and fractional_epochs, and the end).")


def _check_phase2_start(config: ml_collections.ConfigDict, saves: dict[int, float], workdir: str) -> None:
  """Fails before training on a bad phase-2 config or a `from_epoch` phase 1 will not save (again,
  at the loaded split's size); also on from_epoch 0 when phase 1 resumes a run that predates initial
  checkpoints (it saves none)."""
  if not config.phase2.num_epochs > 0:
    return
  check_phase2_config(config)
  check_phase2_from_epoch(config, saves)
  directory = os.path.join(workdir, CHECKPOINTS_DIR)
  if is_initial(config.phase2.from_epoch) and files.exists(directory):
    phase1 = Checkpoints(directory)
    resumed = phase1.latest_step() is not None
    phase1.close()
    if resumed:  # a run saves step 0 before any other: if it lacks one, the error says why
      theta0_step(config, workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Dataset | None = None) -> dict[str, Any]:
  """Phase 1: trains `config` in `workdir`, resuming from its newest checkpoint, and evaluates on
  the test split; on `dataset` instead of config.data's when given."""
  exp = build_experiment(config, dataset)
  saves = phase1_saves(config, exp.steps_per_epoch)
  _check_phase2_start(config, saves, workdir)
  benign_step, adversarial_step = build_train_steps(config, config.train, config.seed,
                                                    adversarial=exp.flip_step is not None,
                                                    model=exp.model)
  monitor = None
  if config.train.co_monitor.every_steps > 0:
    monitor = CoMonitor(config, exp.dataset, exp.mesh, exp.steps_per_epoch, saves, workdir)
  phase = Phase(workdir, exp.batches, benign_step, adversarial_step, exp.flip_step,
                exp.steps_per_epoch, exp.total_steps, saves, exp.learning_rate, config.log_every_steps,
                monitor=monitor, profile_steps=config.get("profile_steps", 0))
  hparams = {k: str(v) for k, v in traverse_util.flatten_dict(config.to_dict(), sep=".").items()}
  state, start_step, checkpoints, writer = open_phase(phase, exp.state, hparams)
  if monitor is not None:
    monitor.resume(workdir, start_step)
  state = train_phase(phase, state, start_step, checkpoints, writer)
  if monitor is not None:
    monitor.finish()
  return finish_phase(config, phase, state, config.num_epochs, exp.dataset, exp.mesh, checkpoints,
                      writer, label="Phase 1")


def train_job(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The `train` job: phase 1 (when complete, only its evaluation, whose record holds the attacks
  already done), then phase 2 when config.phase2.num_epochs > 0; phase 2's result is under
  "phase2"."""
  result = train_and_evaluate(config, workdir)
  if config.phase2.num_epochs > 0:
    result["phase2"] = phase2_and_evaluate(config, workdir)
  return result
