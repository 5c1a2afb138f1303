"""An experiment's set-up, shared by the jobs: checked config, mesh, data, model, optimizer, state."""

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from ntk_scale import data, parallel
from ntk_scale.attacks import build_attack, build_attacks
from ntk_scale.config_numbers import is_finite_number, is_whole_number
from ntk_scale.data.catalog import dataset_shape
from ntk_scale.data.augment import AUGMENTATIONS
from ntk_scale.linearize import LinearizedModel
from ntk_scale.matmul_precision import check_precision
from ntk_scale.models import build_model, check_model_config
from ntk_scale.profile import check_profile_steps
from ntk_scale.train.collapse import check_co_monitor_config
from ntk_scale.train.grad_align import CLEAN_GRADIENT
from ntk_scale.train.optimizer import build_optimizer, check_optimizer_config, check_warmup
from ntk_scale.train.state import BATCH_NORM_MODES, TrainState, count_parameters, create_train_state
from ntk_scale.train.steps import TrainStep, make_train_step

MODES = ("C", "A", "F")
# config.train.compute_dtype (config.phase2.compute_dtype): that of phase 1's (phase 2's) train steps
# (activations, matmul inputs, the training attack); parameters, optimizer state and BatchNorm
# statistics stay float32.
COMPUTE_DTYPES = ("float32", "bfloat16")


def check_common_config(config: ml_collections.ConfigDict, num_devices: int, *,
                        training: bool = True) -> None:
  """Validates the fields both phases read: model, data, phase-1 optimizer, batches, logging, eval
  attacks. `training` False (the evaluate job): not config.batch_size, which evaluation never
  reads; a workdir trained on another device count may have one these devices do not divide."""
  check_model_config(config.model)
  data.check_data_config(config.data)
  data.check_seed(config.seed, "config.seed")
  check_optimizer_config(config.optimizer)
  if config.data.augment not in AUGMENTATIONS:
    raise ValueError(f"config.data.augment={config.data.augment!r}; expected one of "
                     f"{', '.join(AUGMENTATIONS)}.")
  for field in ("batch_size", "eval_batch_size") if training else ("eval_batch_size",):
    parallel.check_batch_size(config[field], num_devices, f"config.{field}")
  if not is_whole_number(config.log_every_steps, 1):
    raise ValueError(f"config.log_every_steps={config.log_every_steps!r} must be an integer >= 1 (the "
                     f"steps between logged metrics).")
  check_profile_steps(config.get("profile_steps", 0))
  check_precision(eval_matmul_precision(config), "config.eval_matmul_precision")
  build_attacks(config.eval_attacks, "config.eval_attacks", data.num_classes(config.data))


def check_train_config(config: ml_collections.ConfigDict, num_devices: int, *,
                       epochs_field: str = "config.num_epochs") -> None:
  """Validates every field the train job reads, before any data is loaded or compiled; the step
  counts too, at the train split's size in the catalog, so that the job refuses them before its
  workdir records the config (a rerun with the field corrected would be another experiment).
  `epochs_field`: where the user set config.num_epochs (the infinite job's networks: their own)."""
  check_common_config(config, num_devices)
  if not 0 < config.num_epochs < math.inf:
    raise ValueError(f"config.num_epochs={config.num_epochs} must be positive and finite (to run "
                     f"phase 2 alone from an existing workdir, use config.job='phase2').")
  check_phase2_epochs(config.phase2.num_epochs)
  fractional = tuple(config.checkpoint.fractional_epochs)
  bad = [e for e in fractional if not (is_finite_number(e) and e > 0)]
  if bad:  # epochs beyond num_epochs are allowed and skipped, so short variants keep the defaults
    raise ValueError(f"config.checkpoint.fractional_epochs={fractional!r} must be positive finite "
                     f"epochs; {bad!r} are not.")
  if config.train.mode not in MODES:
    raise ValueError(f"config.train.mode={config.train.mode!r}; expected one of {', '.join(MODES)} "
                     f"(C benign, A adversarial, F benign then adversarial from flip_epoch).")
  if config.train.mode == "F" and not 0 < config.train.flip_epoch < config.num_epochs:
    raise ValueError(f"config.train.flip_epoch={config.train.flip_epoch} must lie inside (0, "
                     f"{epochs_field}={config.num_epochs}) for mode F.")
  if config.train.mode != "F" and config.train.flip_epoch:
    raise ValueError(f"config.train.flip_epoch={config.train.flip_epoch} is read in mode F only; "
                     f"config.train.mode={config.train.mode!r} would ignore it (set mode F, or "
                     f"flip_epoch 0).")
  check_benign_step_first(config.train, "config.train")
  check_step_numerics(config.train, "config.train")
  if config.train.attack_batch_norm not in BATCH_NORM_MODES:
    raise ValueError(f"config.train.attack_batch_norm={config.train.attack_batch_norm!r}; expected "
                     f"one of {', '.join(BATCH_NORM_MODES)}.")
  if config.train.mode != "C":
    build_attack(config.train.attack, prefix="config.train.attack",
                 num_classes=data.num_classes(config.data))
  _check_grad_align(config.train)
  check_co_monitor_config(config.train.get("co_monitor"), dataset_shape(config.data)[2],
                          num_classes=data.num_classes(config.data))
  if not config.checkpoint.every_epochs > 0:
    raise ValueError(f"config.checkpoint.every_epochs={config.checkpoint.every_epochs} must be positive.")
  train_steps(config, catalog_steps_per_epoch(config), epochs_field)


def check_phase2_epochs(num_epochs: float) -> None:
  """config.phase2.num_epochs as every job that reads it sees it: a finite number >= 0 (0: no phase
  2). NaN and -1 would fail every `> 0` test and skip phase 2 silently; inf has no step count."""
  if not (is_finite_number(num_epochs) and num_epochs >= 0):
    raise ValueError(f"config.phase2.num_epochs={num_epochs!r} must be a finite number >= 0 (0: no "
                     f"phase 2).")


def catalog_steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """Steps per epoch over the train split at the catalog's size (no data loaded), as TrainBatches
  counts them; a batch larger than the split is refused."""
  _, train_size, _ = dataset_shape(config.data)
  if config.batch_size > train_size:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the {train_size} training "
                     f"examples of {config.data.name}.")
  return train_size // config.batch_size


def step_numerics(section: ml_collections.ConfigDict) -> tuple[str, str]:
  """(compute_dtype, matmul_precision) of a phase's train steps, from config.train or config.phase2;
  float32 at the backend's default where the section predates the fields."""
  return section.get("compute_dtype", "float32"), section.get("matmul_precision", "default")


def eval_matmul_precision(config: ml_collections.ConfigDict) -> str:
  """config.eval_matmul_precision, the precision of every evaluation of a network; the backend's
  default where the config predates the field."""
  return config.get("eval_matmul_precision", "default")


def check_step_numerics(section: ml_collections.ConfigDict, prefix: str) -> None:
  """`<prefix>.compute_dtype` and `<prefix>.matmul_precision` (config.train or config.phase2)."""
  compute_dtype, precision = step_numerics(section)
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"{prefix}.compute_dtype={compute_dtype!r}; expected one of "
                     f"{', '.join(COMPUTE_DTYPES)} (the dtype the phase's train steps compute in).")
  check_precision(precision, f"{prefix}.matmul_precision")


def check_benign_step_first(section: ml_collections.ConfigDict, prefix: str) -> None:
  """Refuses `benign_step_first` in mode C, where there is no adversarial update to precede."""
  if section.get("benign_step_first", False) and section.mode == "C":
    raise ValueError(f"{prefix}.benign_step_first=True adds a benign update before each "
                     f"adversarial one; {prefix}.mode='C' has none (set mode A or F, or "
                     f"benign_step_first False).")


def _check_grad_align(train: ml_collections.ConfigDict) -> None:
  """config.train.grad_align: a weight >= 0, and > 0 only with adversarial training (A or F)."""
  weight = train.get("grad_align", 0.0)
  if not (is_finite_number(weight) and weight >= 0):
    raise ValueError(f"config.train.grad_align={weight!r} must be a finite number >= 0 (GradAlign's "
                     f"weight).")
  if weight > 0 and train.mode == "C":
    raise ValueError(f"config.train.grad_align={weight} regularises adversarial training; set "
                     f"config.train.mode to A or F (e.g. with config.train.attack.name='fgsm').")
  clean = train.get("grad_align_clean", "constant")
  if clean not in CLEAN_GRADIENT:
    raise ValueError(f"config.train.grad_align_clean={clean!r}; expected one of "
                     f"{', '.join(CLEAN_GRADIENT)} (GradAlign's grad_x L(x): held constant as in the "
                     f"authors' code, or differentiated as in the paper's formula).")


def build_train_steps(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict, seed: int,
                      adversarial: bool, model: nn.Module | LinearizedModel
                      ) -> tuple[TrainStep, TrainStep | None]:
  """A phase's benign step and, if `adversarial`, its adversarial one, built alike for both phases.

  `section` (config.train or config.phase2) names the attack, `benign_step_first`, the
  `compute_dtype`, the `matmul_precision` and, for phase 1, GradAlign's weight `grad_align` (its
  noise uses the attack's eps); the augmentation and the attack's BatchNorm mode
  (config.train.attack_batch_norm) are the experiment's. `model` is the phase's (the network, or
  phase 2's LinearizedModel): the steps compute with its `clone(dtype=compute_dtype)`, on the train
  state's variables.
  """
  compute_dtype, precision = step_numerics(section)
  compute_apply_fn = (None if compute_dtype == "float32"
                      else model.clone(dtype=jnp.dtype(compute_dtype)).apply)
  numerics = dict(compute_apply_fn=compute_apply_fn, matmul_precision=precision)
  benign = make_train_step(config.data.augment, seed, **numerics)
  if not adversarial:
    return benign, None
  return benign, make_train_step(config.data.augment, seed, build_attack(section.attack),
                                 benign_step_first=section.benign_step_first,
                                 attack_batch_norm=config.train.attack_batch_norm,
                                 grad_align=float(section.get("grad_align", 0.0)),
                                 grad_align_eps=section.attack.get("eps"),
                                 grad_align_clean=section.get("grad_align_clean", "constant"),
                                 **numerics)


MAX_STEPS = 1e15  # steps of any phase: a count past it is a typo, and past ~1e308 not a number


def phase_steps(num_epochs: float, steps_per_epoch: int, field: str) -> int:
  """The batch steps of `num_epochs` epochs (`field` names the setting). A count that rounds to zero
  is refused: such a phase would train nothing and save no checkpoint, yet exit as if it succeeded;
  so is one past any run (1e308 epochs: no whole number of steps)."""
  if not num_epochs * steps_per_epoch < MAX_STEPS:
    raise ValueError(f"{field}={num_epochs} is {num_epochs * steps_per_epoch:.3g} steps at "
                     f"{steps_per_epoch} steps per epoch; expected fewer than {MAX_STEPS:.0e}.")
  steps = int(round(num_epochs * steps_per_epoch))
  if steps < 1:
    raise ValueError(f"{field}={num_epochs} is {num_epochs * steps_per_epoch:.3g} of a step at "
                     f"{steps_per_epoch} steps per epoch, which rounds to 0 steps; expected at least "
                     f"one step: {field} >= {1 / steps_per_epoch:.3g}.")
  return steps


def check_save_interval(every_epochs: float, steps_per_epoch: int, field: str) -> None:
  """A checkpoint interval (`field`) of at least one step: one that rounds to 0 steps would list a
  checkpoint epoch for every multiple of it (1e-12 epochs: 10^12 of them per epoch) before the
  first step. inf (no regular checkpoint, only the end) passes; a NaN or non-positive interval is
  left to the check that names it as such."""
  if is_finite_number(every_epochs) and every_epochs > 0:
    phase_steps(every_epochs, steps_per_epoch, field)


def first_adversarial_step(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int | None:
  """The batch step from which training is adversarial (None for benign training)."""
  return {"C": None, "A": 0, "F": int(round(config.train.flip_epoch * steps_per_epoch))}[config.train.mode]


def train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int,
                epochs_field: str = "config.num_epochs") -> tuple[int, int | None]:
  """Phase 1's (total steps, first adversarial step) at `steps_per_epoch`. Refuses a phase (1, or
  the train job's 2) of zero steps, a cosine warm-up as long as its phase, and a mode-F flip at the
  first or past the last step, which would train all adversarially or all benignly; a refusal
  names config.num_epochs as `epochs_field`."""
  total_steps = phase_steps(config.num_epochs, steps_per_epoch, epochs_field)
  check_warmup(config.optimizer, steps_per_epoch, total_steps, "config.optimizer")
  check_save_interval(config.checkpoint.every_epochs, steps_per_epoch, "config.checkpoint.every_epochs")
  if config.phase2.num_epochs > 0:  # the train job's phase 2 steps through this split at this batch
    # size: a phase 2 of zero steps is refused now, not after phase 1 has trained.
    phase2_steps = phase_steps(config.phase2.num_epochs, steps_per_epoch, "config.phase2.num_epochs")
    # Its optimizer's own fields first: check_warmup turns a NaN warm-up into steps.
    check_optimizer_config(config.phase2.optimizer, "config.phase2.optimizer")
    check_warmup(config.phase2.optimizer, steps_per_epoch, phase2_steps, "config.phase2.optimizer")
    check_save_interval(config.phase2.checkpoint_every_epochs, steps_per_epoch,
                        "config.phase2.checkpoint_every_epochs")
  flip_step = first_adversarial_step(config, steps_per_epoch)
  if config.train.mode == "F" and not 1 <= flip_step <= total_steps - 1:
    raise ValueError(f"config.train.flip_epoch={config.train.flip_epoch} is step {flip_step} of the "
                     f"{total_steps} steps of {epochs_field}={config.num_epochs} at "
                     f"{steps_per_epoch} steps per epoch, so mode F would train all "
                     f"{'adversarially' if flip_step < 1 else 'benignly'}; expected a flip step in "
                     f"[1, {total_steps - 1}]: config.train.flip_epoch from {1 / steps_per_epoch:.10g} "
                     f"to {(total_steps - 1) / steps_per_epoch:.10g}.")
  return total_steps, flip_step


def batch_step_of_update(flip_step: int | None, two_updates: bool
                         ) -> Callable[[jnp.ndarray], jnp.ndarray] | None:
  """Maps optimizer updates to batch steps when adversarial batches take two updates each."""
  if flip_step is None or not two_updates:
    return None
  return lambda count: jnp.where(count < flip_step, count, flip_step + (count - flip_step) // 2)


@dataclasses.dataclass
class Experiment:
  mesh: Mesh
  dataset: data.Dataset
  batches: data.TrainBatches
  steps_per_epoch: int
  total_steps: int
  flip_step: int | None  # first adversarial batch step; None for benign training
  learning_rate: optax.Schedule  # as a function of the batch step
  model: nn.Module
  state: TrainState  # freshly initialised, replicated over the mesh


def build_experiment(config: ml_collections.ConfigDict,
                     dataset: data.Dataset | None = None) -> Experiment:
  """Checks the whole config first, then loads the data (unless a `dataset` is given, e.g. an
  optimised training set), refuses step counts it cannot train (`train_steps`, at the loaded split's
  size) and initialises the train state."""
  mesh = parallel.make_mesh()
  check_train_config(config, mesh.devices.size)
  dataset = data.load_dataset(config.data) if dataset is None else dataset
  batches = data.TrainBatches(dataset.train, config.batch_size, config.seed, mesh)
  steps_per_epoch = batches.steps_per_epoch
  total_steps, flip_step = train_steps(config, steps_per_epoch)
  tx, learning_rate = build_optimizer(
      config.optimizer, steps_per_epoch, total_steps,
      batch_step_of_update(flip_step, config.train.benign_step_first))
  model = build_model(config.model, dataset.num_classes)
  state = create_train_state(model, tx, dataset.train.images.shape[1:], config.seed, mesh)
  logging.info("%s on %s: %d parameters, %d train / %d test examples, %d devices, %d steps/epoch.",
               config.model.name, dataset.name, count_parameters(state.params), len(dataset.train),
               len(dataset.test), mesh.devices.size, steps_per_epoch)
  return Experiment(mesh, dataset, batches, steps_per_epoch, total_steps, flip_step, learning_rate, model,
                    state)
