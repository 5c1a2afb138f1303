"""Phase 2 (Loo et al.): train only the model linearized around a phase-1 checkpoint theta0 (epoch 0:
the initialisation, the lazy / NTK-at-initialisation baseline).

The kernel of theta0 is frozen; the linearized (or centered) model is trained from theta = theta0
with its own optimizer, benign (mode C) or on adversarial examples crafted against the linearized
model itself (mode A). Everything lives under `<workdir>/phase2/<name>/` (config.phase2.name, by
default made of linearization, batch_norm, mode and from_epoch): config.json, checkpoints/,
metrics.jsonl, evaluations/ and adversarial/, so several phase-2 experiments share one phase 1.
It runs after phase 1 in the train job, or alone (config.job="phase2") from a workdir whose phase 1
is trained.
"""

import copy
import dataclasses
import os
from typing import Any

import ml_collections
from absl import logging
from flax import traverse_util
from jax.sharding import Mesh

from ntk_scale import data, parallel
from ntk_scale.attacks import build_attack
from ntk_scale.checkpoint import save_schedule
from ntk_scale.linearize import BATCH_NORM, LINEARIZATIONS, LinearizedModel
from ntk_scale.train.experiment import (MODES, batch_step_of_update, build_train_steps, check_common_config,
                                        check_benign_step_first, check_phase2_epochs, check_save_interval,
                                        check_step_numerics, phase_steps, step_numerics)
from ntk_scale.train.optimizer import build_optimizer, check_optimizer_config, check_warmup
from ntk_scale.train.phase import Phase, finish_phase, open_phase, train_phase
from ntk_scale.train.state import TrainState, create_train_state
from ntk_scale.restore import linearized_model, theta0_step
from ntk_scale.workdir import (CONFIG_FILE, NEW_PHASE2_NAME, phase2_directory,
                               phase2_name, phase2_record, record_or_check)

PHASE2_MODES = ("C", "A")
# Phase 2 draws its batch order and step randomness from seed + 1, not replaying phase 1's.
SEED_OFFSET = 1


def apply_loaders(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with Loo et al.'s two-letter `loaders` (e.g. "AC") mapped onto
  train.mode and phase2.mode; `config` itself when loaders is empty."""
  loaders = config.get("loaders", "")
  if not loaders:
    return config
  if (not isinstance(loaders, str) or len(loaders) != 2 or loaders[0] not in MODES
      or loaders[1] not in PHASE2_MODES):
    raise ValueError(f"config.loaders={loaders!r}; expected two letters: the phase-1 mode "
                     f"({', '.join(MODES)}) then the phase-2 mode ({', '.join(PHASE2_MODES)}), "
                     f"e.g. 'CC' or 'AC'.")
  config = copy.deepcopy(config)
  config.train.mode, config.phase2.mode = loaders[0], loaders[1]
  return config


def check_phase2_config(config: ml_collections.ConfigDict) -> None:
  """Validates config.phase2 before any data is loaded or compiled."""
  p = config.phase2
  check_phase2_epochs(p.num_epochs)  # NaN, inf, -1
  if not p.num_epochs > 0:
    raise ValueError(f"config.phase2.num_epochs={p.num_epochs} must be positive to run phase 2.")
  if not p.from_epoch >= 0:
    raise ValueError(f"config.phase2.from_epoch={p.from_epoch} must be a phase-1 epoch >= 0 (0: the "
                     f"initialisation).")
  if p.linearization not in LINEARIZATIONS:
    raise ValueError(f"config.phase2.linearization={p.linearization!r}; expected one of "
                     f"{', '.join(LINEARIZATIONS)}.")
  if p.batch_norm not in BATCH_NORM:
    raise ValueError(f"config.phase2.batch_norm={p.batch_norm!r}; expected one of "
                     f"{', '.join(BATCH_NORM)}.")
  if p.mode not in PHASE2_MODES:
    raise ValueError(f"config.phase2.mode={p.mode!r}; expected one of {', '.join(PHASE2_MODES)} "
                     f"(C benign, A adversarial against the linearized model).")
  check_benign_step_first(p, "config.phase2")
  phase2_name(config)  # a valid directory name
  if p.mode == "A":
    build_attack(p.attack, prefix="config.phase2.attack", num_classes=data.num_classes(config.data))
  check_optimizer_config(p.optimizer, "config.phase2.optimizer")
  check_step_numerics(p, "config.phase2")
  compute_dtype, _ = step_numerics(p)
  if compute_dtype != "float32" and p.linearization == "centered_nonlinear":
    raise ValueError(f"config.phase2.compute_dtype={compute_dtype!r} with linearization "
                     f"'centered_nonlinear': its f(x; theta) - f(x; theta0) subtracts two nearly "
                     f"equal outputs, which {compute_dtype} would round away; use float32.")
  if not p.checkpoint_every_epochs > 0:
    raise ValueError(f"config.phase2.checkpoint_every_epochs={p.checkpoint_every_epochs} must be "
                     f"positive.")


@dataclasses.dataclass
class Phase2:
  phase: Phase
  state: TrainState  # fresh: theta = theta0, step 0
  model: LinearizedModel
  dataset: data.Dataset
  mesh: Mesh
  from_step: int  # the phase-1 checkpoint's step


def phase2_saves(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict[int, float]:
  """Step -> epoch of every checkpoint phase 2 saves at `steps_per_epoch`. No step-0 checkpoint:
  phase 2 starts from theta0, which phase 1's checkpoint already holds."""
  p = config.phase2
  return save_schedule(steps_per_epoch, p.num_epochs, p.checkpoint_every_epochs, ())


def build_phase2(config: ml_collections.ConfigDict, workdir: str) -> Phase2:
  """Checks the config and finds the phase-1 checkpoint, then loads the data and refuses epochs of
  zero steps and a cosine warm-up as long as the phase (all before any compute), then builds the
  linearized model around the checkpoint and phase 2's fresh train state, steps and schedule."""
  mesh = parallel.make_mesh()
  check_common_config(config, mesh.devices.size)
  check_phase2_config(config)
  p = config.phase2
  directory = phase2_directory(config, workdir)  # a bad config.phase2.name fails here
  theta0_step(config, workdir)  # CheckpointNotFoundError lists the epochs

  dataset = data.load_dataset(config.data)
  batches = data.TrainBatches(dataset.train, config.batch_size, config.seed + SEED_OFFSET, mesh)
  steps_per_epoch = batches.steps_per_epoch
  total_steps = phase_steps(p.num_epochs, steps_per_epoch, "config.phase2.num_epochs")
  check_warmup(p.optimizer, steps_per_epoch, total_steps, "config.phase2.optimizer")
  check_save_interval(p.checkpoint_every_epochs, steps_per_epoch, "config.phase2.checkpoint_every_epochs")
  image_shape = dataset.train.images.shape[1:]
  linearized, from_step = linearized_model(config, workdir, mesh)

  flip_step = 0 if p.mode == "A" else None
  tx, learning_rate = build_optimizer(p.optimizer, steps_per_epoch, total_steps,
                                      batch_step_of_update(flip_step, p.benign_step_first),
                                      prefix="config.phase2.optimizer")
  state = create_train_state(linearized, tx, image_shape, config.seed, mesh)
  benign_step, adversarial_step = build_train_steps(config, p, config.seed + SEED_OFFSET,
                                                    adversarial=p.mode == "A", model=linearized)
  saves = phase2_saves(config, steps_per_epoch)
  phase = Phase(directory, batches, benign_step, adversarial_step, flip_step,
                steps_per_epoch, total_steps, saves, learning_rate, config.log_every_steps,
                "config.phase2.optimizer.learning_rate", profile_steps=config.get("profile_steps", 0))
  logging.info("Phase 2: %s from phase-1 epoch %g (step %d), %d steps.", linearized, p.from_epoch,
               from_step, total_steps)
  return Phase2(phase, state, linearized, dataset, mesh, from_step)


def phase2_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Phase 2 in `<workdir>/phase2/<name>/`, resumed from its newest checkpoint, then evaluated there:
  clean and robust accuracy, and the sizes of the outputs' components f0(x) and J(x)(theta-theta0)."""
  p2 = build_phase2(config, workdir)
  phase, directory = p2.phase, p2.phase.directory
  record_or_check(os.path.join(directory, CONFIG_FILE), phase2_record(config), (), NEW_PHASE2_NAME)
  hparams = {k: str(v) for k, v in
             traverse_util.flatten_dict({"phase2": config.phase2.to_dict()}, sep=".").items()}
  state, start_step, checkpoints, writer = open_phase(phase, p2.state, hparams)
  state = train_phase(phase, state, start_step, checkpoints, writer)
  return finish_phase(config, phase, state, config.phase2.num_epochs, p2.dataset, p2.mesh, checkpoints,
                      writer, label="Phase 2", linearized=p2.model)
