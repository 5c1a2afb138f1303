"""A workdir's checkpoint back as a model for inference: the network (phase 1) or its linearization
around theta0 (phase 2), whichever a job asks for by phase and epoch.

The evaluate and kernel jobs read checkpoints through here, and phase 2 builds its model around
theta0 with `linearized_model`, so a phase-2 checkpoint is always read back with the very model
it was trained as. Only parameters and BatchNorm statistics are read (no optimizer state), with
the shapes the checkpoint records, so nothing is initialised or compiled to restore a model.
"""

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from ntk_scale import data, files, parallel
from ntk_scale.checkpoint import (CHECKPOINTS_DIR, CheckpointNotFoundError, Checkpoints,
                                  missing_initial_note)
from ntk_scale.config_numbers import is_finite_number, is_whole_number
from ntk_scale.linearize import LinearizedModel
from ntk_scale.models import build_model
from ntk_scale.workdir import CONFIG_FILE, PHASE2_DIR, phase2_directory, phase2_name

PHASES = (1, 2)
# The phase-2 fields that define the linearized model; they must match the experiment on disk.
_MODEL_FIELDS = ("linearization", "batch_norm", "from_epoch")


@dataclasses.dataclass(frozen=True)
class Restored:
  """A checkpoint ready for `model.apply(variables, x, train=False)`."""
  model: nn.Module | LinearizedModel  # phase 1: the flax network; phase 2: its LinearizedModel
  variables: dict[str, Any]  # {"params", "batch_stats"} ({} without BatchNorm), replicated on the mesh
  epoch: float  # of the checkpoint's own phase
  step: int  # of the checkpoint's own phase
  checkpoint_dir: str  # the checkpoint itself, <phase_dir>/checkpoints/<step>
  phase_dir: str  # the workdir (phase 1) or <workdir>/phase2/<name>/: evaluations go here

  def host_variables(self) -> tuple[Any, Any]:
    """(params, batch_stats) as numpy arrays from this process's own copy: no cross-host transfer,
    for programs each process runs on its own (or that replicate them over the mesh again)."""
    return (jax.tree.map(parallel.local_copy, self.variables["params"]),
            jax.tree.map(parallel.local_copy, self.variables.get("batch_stats", {})))


def theta0_step(config: ml_collections.ConfigDict, workdir: str) -> int:
  """The step of theta0, the phase-1 checkpoint at config.phase2.from_epoch (0: the initialisation);
  reads no arrays, so jobs call it to fail before any compute."""
  phase1 = Checkpoints(os.path.join(workdir, CHECKPOINTS_DIR), create=False)
  try:
    return phase1.step_for_epoch(config.phase2.from_epoch, "config.phase2.from_epoch",
                                 missing_initial_note(1))
  finally:
    phase1.close()


def linearized_model(config: ml_collections.ConfigDict, workdir: str,
                     mesh: Mesh | None = None) -> tuple[LinearizedModel, int]:
  """Phase 2's model: the network of config.model linearized (config.phase2.linearization and
  batch_norm) around theta0, the phase-1 checkpoint at config.phase2.from_epoch; and theta0's step.
  theta0 is replicated on `mesh` (default: all devices)."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  p = config.phase2
  from_step = theta0_step(config, workdir)
  model = build_model(config.model, data.num_classes(config.data))
  phase1 = Checkpoints(os.path.join(workdir, CHECKPOINTS_DIR), create=False)
  theta0 = phase1.restore_variables(from_step, parallel.replicated_sharding(mesh))
  phase1.close()
  return LinearizedModel(model, theta0["params"], theta0["batch_stats"], p.linearization,
                         p.batch_norm), from_step


def _phase2_checkpoints(config: ml_collections.ConfigDict, workdir: str) -> Checkpoints:
  """The checkpoints of the phase-2 experiment `config` names, checked against its record."""
  directory = phase2_directory(config, workdir)
  record_path = os.path.join(directory, CONFIG_FILE)
  if not files.exists(record_path):
    parent = os.path.join(workdir, PHASE2_DIR)
    names = [n for n in files.list_dir(parent) if files.exists(os.path.join(parent, n, CONFIG_FILE))]
    raise CheckpointNotFoundError(
        f"no phase-2 experiment {phase2_name(config)!r} in {parent} (config.phase2.name; when empty "
        f"it is made of linearization, batch_norm, mode and from_epoch); experiments there: "
        f"{names or 'none (run config.job=phase2 first)'}.")
  recorded = files.read_json(record_path)["phase2"]
  diffs = [f"config.phase2.{k}: {recorded.get(k)!r} there, {config.phase2[k]!r} here"
           for k in _MODEL_FIELDS if recorded.get(k) != config.phase2[k]]
  if diffs:
    raise ValueError(f"{directory} was trained as another linearized model; restoring it with this "
                     f"config would apply its parameters to the wrong model:\n  " + "\n  ".join(diffs))
  return Checkpoints(os.path.join(directory, CHECKPOINTS_DIR), create=False)


def _find_step(checkpoints: Checkpoints, epoch: float | None, field: str, how_to_train: str,
               initial_note: str) -> tuple[int, float]:
  """(step, epoch) of the checkpoint at `epoch`, or of the newest of the schedule when None (not
  one saved at a preemption, which goes once the run resumes); `initial_note` says why epoch 0 is
  missing, if it is asked for and is."""
  if epoch is not None:
    step = checkpoints.step_for_epoch(epoch, field, initial_note)
    return step, next(e for e, s in checkpoints.epochs().items() if s == step)
  epochs = checkpoints.scheduled_epochs()
  if not epochs:
    raise CheckpointNotFoundError(f"no checkpoint in {checkpoints.directory}; {how_to_train} first.")
  return max((s, e) for e, s in epochs.items())


def saved_epochs(config: ml_collections.ConfigDict, workdir: str, phase: int) -> list[float]:
  """Every saved epoch of `phase` (1: the network; 2: the experiment config.phase2.name) of the
  schedule, fractional ones included (not a preempted run's extra one), in order; reads no arrays,
  so jobs can check the epochs they need before compute."""
  checkpoints = (Checkpoints(os.path.join(workdir, CHECKPOINTS_DIR), create=False) if phase == 1
                 else _phase2_checkpoints(config, workdir))
  try:
    return sorted(checkpoints.scheduled_epochs())
  finally:
    checkpoints.close()


def check_phase(phase: Any, fields: str) -> None:
  """`<fields>.phase` names a phase a checkpoint can be read from (the dry run checks it too); an
  int, not True, which `in` would take for phase 1."""
  if not is_whole_number(phase) or phase not in PHASES:
    raise ValueError(f"{fields}.phase={phase!r}; expected 1 (the network's checkpoints) or 2 (the "
                     f"linearized model of phase 2, config.phase2.name).")


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str, *, phase: int,
                          epoch: float | None, mesh: Mesh | None = None,
                          fields: str | None = None) -> Restored:
  """The checkpoint of `phase` at `epoch` of that phase (None: the newest; fractional epochs such
  as 0.125 included; phase 1's epoch 0 is its initialisation) as a model and its variables,
  replicated on `mesh` (default: all devices).

  Phase 1 reads `<workdir>/checkpoints/` with the network of config.model. Phase 2 reads the
  experiment config.phase2.name (`<workdir>/phase2/<name>/`) with the model phase 2 trained:
  `linearized_model(config, workdir)`. `config` is as the jobs see it (config.loaders applied).
  Errors name `<fields>.phase` / `<fields>.epoch` (default fields: `config.<config.job>`, e.g.
  config.evaluate) and list the epochs, or the phase-2 experiments, that exist.
  """
  fields = fields or f"config.{config.get('job', 'evaluate')}"
  check_phase(phase, fields)
  if epoch is not None and not is_finite_number(epoch):
    raise ValueError(f"{fields}.epoch={epoch!r}; expected an epoch number or None (the newest).")
  mesh = parallel.make_mesh() if mesh is None else mesh
  if phase == 1:
    checkpoints = Checkpoints(os.path.join(workdir, CHECKPOINTS_DIR), create=False)
    step, found = _find_step(checkpoints, epoch, f"{fields}.epoch",
                             "train this workdir (config.job='train')", missing_initial_note(1))
    model = build_model(config.model, data.num_classes(config.data))
  else:
    checkpoints = _phase2_checkpoints(config, workdir)
    step, found = _find_step(checkpoints, epoch, f"{fields}.epoch", "run phase 2 (config.job='phase2')",
                             missing_initial_note(2, config.phase2.from_epoch))
    model, _ = linearized_model(config, workdir, mesh)
  variables = checkpoints.restore_variables(step, parallel.replicated_sharding(mesh))
  checkpoints.close()
  return Restored(model, variables, float(found), int(step),
                  os.path.join(checkpoints.directory, str(step)), os.path.dirname(checkpoints.directory))
