"""`main.py --dry_run`: what a job will cost on the devices JAX sees, before any data is read or
anything is trained or written.

The train job's programs (phase 1; phase 2 when config.phase2.num_epochs > 0, or job phase2) and
the evaluators are compiled from shapes alone: XLA's memory analysis of the partitioned program
gives the bytes each device holds (arguments + outputs + temporaries, less donated buffers), and
the cost analysis of the lowered, whole-mesh program its FLOPs. The kernel and evolution jobs use
the kernel engine's own plan (ntk_scale.ntk.plan): tiles, memory per device, FLOPs. The infinite
job's analytic kernels are their tile program (ntk/function_tiles.py) compiled for the mesh, and
kernel regression is compiled as the job evaluates it, clean and under each attack. Times divide
the busiest device's FLOPs (a train step's spread evenly; a kernel's through its lockstep steps,
idle devices' work included) by the matmul rate measured here in a short probe at the program's
dtype and precision (train steps: their phase's compute_dtype and matmul_precision; evaluations:
config.eval_matmul_precision; kernels: config.kernel.dtype and precision, and the eigen_features
programs built on them float32 at that precision; LOBPCG rounds: config.spectrum.dtype and
precision; the infinite job's programs: config.infinite.dtype at highest; "default" is the
backend's, TF32 on GPUs and one bfloat16 pass on TPUs; float64 is timed with x64 on): lower bounds,
since convolutions and attacks' sequential steps run below that rate.
A worst_of attack (AutoAttack) is planned member by member on every example; evaluation runs each
member only on the examples still robust, so on a robust model those rows overstate its work.

Run it on the topology of the real job (on the pod, or with the same device count emulated) so
the per-device figures are the real ones. A plan that does not fit the per-device budget raises
PlanDoesNotFit naming the setting to change as soon as that program is compiled (the job itself
would refuse it only after loading the data).
The workdir is read, never written: its records are checked as the job checks them (another
experiment's config.json is refused) and a note says what it holds (`workdir_note`).
From a machine without the accelerators, `TargetDevices` (main.py's --dry_run_device_memory_gb
and --dry_run_tflops) plans for devices of that memory and matmul rates instead of the local ones:
budgets (the kernel's tile and band, the spectrum's method) follow the target's memory, times its
rates (one for every program, or one per dtype and precision: an H100's float32 at DEFAULT, TF32,
is ~7x its HIGHEST) and, with --dry_run_platform, passes that platform's checks; the memory
figures are XLA's analysis of the programs compiled for the local backend.

    python main.py --config configs/cifar10_resnet18.py --workdir /tmp/unused --dry_run
"""

import contextvars
import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from ntk_scale import infinite_job, parallel
from ntk_scale.checkpoint import CHECKPOINTS_DIR, Checkpoints
from ntk_scale.attacks import Attack, WorstOf, build_attack, build_attacks
from ntk_scale.cost_analysis import memory_per_device, program_flops
from ntk_scale.device_rates import matmul_rate
from ntk_scale.data.catalog import dataset_shape
from ntk_scale.data import load_digits
from ntk_scale.data import num_classes as dataset_classes
from ntk_scale.linearize import LinearizedModel
from ntk_scale.matmul_precision import default_precision
from ntk_scale.models import build_model
from ntk_scale.ntk.compiled_memory import abstract_tree
from ntk_scale.ntk.engine import fit_plan
from ntk_scale.ntk.function_tiles import kernel_tiles, tile_program, tile_vjp_program
from ntk_scale.ntk.evolution import check_evolution_settings, checkpoint_config, select_epochs
from ntk_scale.ntk.eigen_features import directions_program, most_rows
from ntk_scale.ntk.eigen_features_job import (check_eigen_features_config, check_num_test,
                                              directions_chunk, group_apply)
from ntk_scale.ntk.eigen_images_job import check_num_eigenvectors
from ntk_scale.ntk.eigen_images_job import kernel_config as eigen_images_kernel_config
from ntk_scale.ntk.kernel_eigenpairs import eigenpairs_config, resolve_eigensolver
from ntk_scale.ntk.job import (FIELDS as KERNEL_FIELDS, check_kernel_config, inference_apply,
                                plan_settings, select_examples)
from ntk_scale.ntk.plan import DEVICE_MEMORY_FRACTION, KernelPlanError, device_budget_bytes
from ntk_scale.ntk.spectrum_job import (SpectrumDoesNotFit, check_num_eigenpairs, check_spectrum_config,
                                         plan_spectrum)
from ntk_scale.ntk.tile_math import LogitSpec, parse_logits
from ntk_scale.train.experiment import (batch_step_of_update, build_train_steps, catalog_steps_per_epoch,
                                        check_common_config, check_save_interval,
                                        check_train_config, eval_matmul_precision, phase_steps,
                                        step_numerics)
from ntk_scale.train.loop import phase1_saves
from ntk_scale.train.optimizer import build_optimizer
from ntk_scale.train.phase2 import SEED_OFFSET, check_phase2_config, phase2_saves
from ntk_scale.train.state import TrainState
from ntk_scale.evaluate import evaluate_batch, transfer_keys
from ntk_scale.kernel_regression import kernel_scores
from ntk_scale.restore import check_phase
from ntk_scale.robust_dataset import attack_batch_size, split_targets, target_batch_program
from ntk_scale.workdir import check_experiment, check_workdir_path, phase2_name, records_experiment

class PlanDoesNotFit(ValueError):
  """A program needs more memory per device than the budget; the message names what to change."""


# The per-device budget of the plan plan_job is making: `_program` refuses a program over it as soon
# as it is compiled, not after every other program of the job has compiled too (minutes for a
# ResNet's attacks).
_PLAN_BUDGET: contextvars.ContextVar[float | None] = contextvars.ContextVar("plan_budget", default=None)


# What a refusal names when the budget is the target's (TargetDevices.memory_bytes), not a config
# field's: raising config.kernel.memory_budget_gb past the device's memory is no fix.
TARGET_MEMORY_FLAG = "--dry_run_device_memory_gb"


# (dtype, precision) of a program's matmuls: the rate measured for them bounds its time.
Matmul = tuple[str, str]
# The dtypes of the programs' matmuls: train steps' compute_dtype (float32 | bfloat16), evaluations
# float32, kernels, spectra and analytic kernels float32 | float64.
RATE_DTYPES = ("float32", "bfloat16", "float64")
RATE_PRECISIONS = ("default", "high", "highest")


@dataclasses.dataclass(frozen=True)
class TargetDevices:
  """The devices a job will run on, where they are not the ones JAX sees here (None: these)."""
  memory_bytes: float | None = None  # each device's memory; the budget is DEVICE_MEMORY_FRACTION of it
  matmul_flops_per_s: float | None = None  # each device's matmul rate, for programs not in matmul_rates
  # ((dtype, precision), FLOP/s) of given kinds of matmul: an H100 runs float32 at DEFAULT (TF32) 7x
  # faster than at HIGHEST, so one rate for training's and the kernel's programs misstates one of them.
  matmul_rates: tuple[tuple[Matmul, float], ...] = ()
  platform: str | None = None  # "tpu", "gpu" or "cpu": whose checks the plan passed (parallel.planned_for)


def parse_matmul_rates(spec: str, flag: str = "--dry_run_tflops") -> tuple[float | None, dict[Matmul, float]]:
  """`spec` in TFLOP/s: "50" (every program), "float32:default=495,bfloat16:default=990" (those
  kinds of matmul), or both ("50,float32:default=495": 50 for every other kind). Returns
  (FLOP/s for every other kind or None, {(dtype, precision): FLOP/s}); errors name `flag`."""
  every, rates = None, {}
  for item in (i.strip() for i in spec.split(",") if i.strip()):
    kind, sep, value = item.rpartition("=")
    dtype, _, precision = kind.partition(":")
    try:
      number = float(value) * 1e12
    except ValueError:
      number = float("nan")
    if not (number > 0 and math.isfinite(number)) or (sep and (dtype not in RATE_DTYPES or precision
                                                                not in RATE_PRECISIONS)):
      raise ValueError(f"{flag}={spec!r}: {item!r} is not a rate; give TFLOP/s, for every program "
                       f"(50) or for one kind of matmul as dtype:precision=TFLOP/s (dtype one of "
                       f"{', '.join(RATE_DTYPES)}; precision one of {', '.join(RATE_PRECISIONS)}), "
                       f"e.g. 50,float32:default=495.")
    if sep:
      rates[(dtype, precision)] = number
    else:
      every = number
  return every, rates


@dataclasses.dataclass(frozen=True)
class ProgramCost:
  """One compiled program and how often the job runs it."""
  name: str
  calls: int
  flops_per_call: float
  bytes_per_device: float
  setting: str  # the config field that sizes it, named when it does not fit
  unbounded_loops: int = 0  # while loops of traced length in it, counted once
  # FLOPs of one call on its busiest device, when the devices' shares are uneven (the kernel's
  # lockstep steps); None: flops_per_call spread evenly over the devices.
  device_flops_per_call: float | None = None
  # Every program names its own: a job-wide default timed float64 LOBPCG rounds at float32's rate.
  matmul: Matmul = dataclasses.field(kw_only=True)

  @property
  def flops(self) -> float:
    return self.calls * self.flops_per_call


@dataclasses.dataclass(frozen=True)
class DryRun:
  job: str
  num_devices: int
  platform: str
  matmul_rates: dict[Matmul, float]  # per device, measured (or given) for each program's matmuls
  budget_bytes: float  # per device
  programs: list[ProgramCost]
  notes: list[str]
  target: TargetDevices = TargetDevices()

  @property
  def flops(self) -> float:
    return sum(p.flops for p in self.programs)

  def seconds(self, program: ProgramCost) -> float:
    """A lower bound: the busiest device's FLOPs at the measured rate of its matmuls."""
    per_call = program.device_flops_per_call or program.flops_per_call / self.num_devices
    return program.calls * per_call / self.matmul_rates[program.matmul]

  def describe(self) -> str:
    t = self.target
    if t.memory_bytes is None and t.platform in (None, self.platform):  # these devices
      devices = f"{self.num_devices} {self.platform} device(s)"
    else:
      of = "" if t.memory_bytes is None else f" of {_gib(t.memory_bytes)}"
      devices = (f"{self.num_devices} {t.platform + ' ' if t.platform else ''}devices{of} "
                 f"(compiled for {self.platform})")
    header = f"dry run of job {self.job!r} on {devices} in {jax.process_count()} process(es); "
    if not self.programs:  # no rate was measured, and there is no time to bound
      lines = [f"{header}budget {_gib(self.budget_bytes)} per device",
               "  no device programs: nothing to compile, count or time"]
      return "\n".join(lines + [f"  note: {n}" for n in self.notes])
    given = dict(t.matmul_rates)
    source = lambda m: "given" if m in given or t.matmul_flops_per_s else "measured"
    sources = {source(m) for m in self.matmul_rates}
    rate = sources.pop() if len(sources) == 1 else "given and measured"
    rates = f"{rate} matmul rate " + ", ".join(
        f"{dtype} at {precision.upper()} {value / 1e9:.4g} GFLOP/s"
        + (f" ({source((dtype, precision))})" if rate == "given and measured" else "")
        for (dtype, precision), value in self.matmul_rates.items())
    lines = [f"{header}{rates} per device; budget {_gib(self.budget_bytes)} per device",
             f"  {'program':<52s} {'calls':>9s} {'FLOP/call':>10s} {'memory/device':>14s} {'time >=':>10s}"]
    for p in self.programs:
      lines.append(f"  {p.name:<52s} {p.calls:>9,d} {p.flops_per_call:>10.3g} "
                   f"{_gib(p.bytes_per_device):>14s} {_duration(self.seconds(p)):>10s}")
    total = sum(self.seconds(p) for p in self.programs)
    lines.append(f"  total {self.flops:.3g} FLOP, at least {_duration(total)} at the "
                 f"{rate} matmul rate")
    lines += [f"  note: {n}" for n in self.notes]
    lines += [f"  note: {p.name} has {p.unbounded_loops} loop(s) of traced length, counted once"
              for p in self.programs if p.unbounded_loops]
    return "\n".join(lines)


def _gib(num_bytes: float) -> str:
  return f"{num_bytes / 2**30:.3g} GiB"


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.3g} s"
  if seconds < 7200:
    return f"{seconds / 60:.3g} min"
  return f"{seconds / 3600:.3g} h"


def _program(name: str, jitted, args: tuple, calls: int, setting: str, *, matmul: Matmul,
             **static) -> ProgramCost:
  compiled = jitted.lower(*args, **static).compile()
  counted = program_flops(jitted, *args, **static)
  return _fitting(ProgramCost(name, calls, counted.flops, memory_per_device(compiled), setting,
                              counted.unbounded_loops, matmul=matmul))


def _fitting(program: ProgramCost) -> ProgramCost:
  """`program`, refused at once where it needs more than the budget of the plan being made (every
  ProgramCost of a plan is made through here)."""
  budget = _PLAN_BUDGET.get()
  if budget is not None and program.bytes_per_device > budget:
    raise PlanDoesNotFit(f"{program.name} needs {_gib(program.bytes_per_device)} per device but a "
                         f"device's budget is {_gib(budget)}; lower {program.setting} or use more "
                         f"devices.")
  return program


def _matmul_rate(matmul: Matmul) -> float:
  """The measured rate of `matmul`'s dtype and precision; float64 under x64, without which the
  probe's float64 arrays would be float32 and time float32's rate."""
  dtype, precision = matmul
  with jax.enable_x64(dtype == "float64"):
    return matmul_rate(precision, dtype=dtype)


def _batch(mesh, batch_size: int, image_shape: tuple[int, ...], mask: bool = False,
           dtype=jnp.float32) -> dict:
  sharding = parallel.batch_sharding(mesh)
  batch = {"images": jax.ShapeDtypeStruct((batch_size, *image_shape), dtype, sharding=sharding),
           "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)}
  if mask:
    batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32, sharding=sharding)
  return batch


def _variables(config: ml_collections.ConfigDict, image_shape: tuple[int, ...], phase: int = 1):
  """The model a job reading `phase`'s checkpoints runs, and the shapes of its parameters and
  BatchNorm statistics (a plan compiles from shapes alone): config.model, or for phase 2 its
  linearization (config.phase2) around a fresh initialisation of the same shapes (theta0 is a
  constant of the programs, so its values do not change their cost)."""
  model = build_model(config.model, dataset_classes(config.data))
  init = lambda: _state_variables(model, image_shape, config.seed)
  if phase == 2:
    phase2_name(config)  # where the job reads phase 2: a bad config.phase2.name is refused there
    theta0 = init()
    model = LinearizedModel(model, theta0["params"], theta0["batch_stats"], config.phase2.linearization,
                            config.phase2.batch_norm)
  variables = jax.eval_shape(init)
  return model, variables["params"], variables["batch_stats"]


def _train_programs(config: ml_collections.ConfigDict, mesh, section: ml_collections.ConfigDict,
                    optimizer: ml_collections.ConfigDict, model, num_epochs: float, flip_epoch: float | None, seed: int,
                    label: str, epochs_field: str) -> list[ProgramCost]:
  """The benign and adversarial step programs of one phase, with their counts; `epochs_field` names
  `num_epochs` in the config."""
  image_shape = dataset_shape(config.data)[0]
  steps_per_epoch = catalog_steps_per_epoch(config)
  total = phase_steps(num_epochs, steps_per_epoch, epochs_field)  # the job refuses zero steps too
  flip = None if flip_epoch is None else int(round(flip_epoch * steps_per_epoch))
  tx, _ = build_optimizer(optimizer, steps_per_epoch, total,
                          batch_step_of_update(flip, section.benign_step_first),
                          prefix=epochs_field.replace("num_epochs", "optimizer"))
  state = jax.eval_shape(lambda: TrainState.create(
      apply_fn=model.apply, tx=tx, **_state_variables(model, image_shape, seed)))
  state = abstract_tree(state, parallel.replicated_sharding(mesh))
  benign, adversarial = build_train_steps(config, section, seed, adversarial=flip is not None, model=model)
  batch = _batch(mesh, config.batch_size, image_shape)
  matmul = step_numerics(section)  # as build_train_steps reads them
  programs = []
  benign_steps = total if flip is None else min(flip, total)
  if benign_steps:
    programs.append(_program(f"{label} benign step", benign, (state, batch), benign_steps,
                             "config.batch_size", matmul=matmul))
  if flip is not None and total - flip > 0:
    programs.append(_program(f"{label} adversarial step ({section.attack.name})", adversarial,
                             (state, batch), total - flip, "config.batch_size", matmul=matmul))
  return programs


def _state_variables(model, image_shape: tuple[int, ...], seed: int) -> dict:
  variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)), train=False)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _eval_programs(config: ml_collections.ConfigDict, mesh, model, label: str) -> list[ProgramCost]:
  """The clean and attacked evaluations over the test split."""
  image_shape, _, test_size = dataset_shape(config.data)
  calls = -(-test_size // config.eval_batch_size)
  state = jax.eval_shape(lambda: TrainState.create(
      apply_fn=model.apply, tx=optax.identity(), **_state_variables(model, image_shape, config.seed)))
  state = abstract_tree(state, parallel.replicated_sharding(mesh))
  batch = _batch(mesh, config.eval_batch_size, image_shape, mask=True)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  num_classes = dataset_classes(config.data)
  matmul = ("float32", eval_matmul_precision(config))
  with default_precision(matmul[1]):  # as evaluate_and_save compiles them
    programs = [_program(f"{label} clean evaluation", evaluate_batch, (state, batch, key), calls,
                         "config.eval_batch_size", matmul=matmul, num_classes=num_classes, attack=None)]
    for name, attack in build_attacks(config.eval_attacks, "config.eval_attacks").items():
      programs += _attacked(f"{label} evaluation under {name}", attack, (state, batch, key), calls,
                            "config.eval_batch_size", matmul=matmul, num_classes=num_classes)
  return programs


def _attacked(what: str, attack: Attack, args: tuple, calls: int, setting: str,
              **static) -> list[ProgramCost]:
  """An evaluation under `attack` as `evaluate` runs it: one program, or for a worst_of one per
  member, each planned on every example (evaluate attacks only those still robust: an upper bound
  on the member's work, its memory exact)."""
  if not isinstance(attack, WorstOf):
    return [_program(what, evaluate_batch, args, calls, setting, attack=attack, **static)]
  return [_program(f"{what}: {name}, at most every example", evaluate_batch, args, calls, setting,
                   attack=member, **static) for name, member in zip(attack.names, attack.members)]


def _phase1(config: ml_collections.ConfigDict, mesh) -> tuple[list[ProgramCost], list[str]]:
  check_train_config(config, mesh.devices.size)
  model = build_model(config.model, dataset_classes(config.data))
  flip = {"C": None, "A": 0.0, "F": config.train.flip_epoch}[config.train.mode]  # in epochs
  programs = _train_programs(config, mesh, config.train, config.optimizer, model, config.num_epochs, flip, config.seed,
                             "phase 1", "config.num_epochs")
  programs += _eval_programs(config, mesh, model, "phase 1")
  notes = []
  if config.train.co_monitor.every_steps > 0:
    notes.append("the catastrophic-overfitting monitor's evaluations are not counted")
  return programs, notes


def _phase2(config: ml_collections.ConfigDict, mesh) -> list[ProgramCost]:
  """Phase 2 trains the model linearized around a phase-1 checkpoint: here around a fresh
  initialisation of the same shapes (theta0 is a constant of the programs)."""
  check_common_config(config, mesh.devices.size)
  check_phase2_config(config)
  p = config.phase2
  # As build_phase2, before any compute: an interval under one step would list ~1/interval epochs.
  check_save_interval(p.checkpoint_every_epochs, catalog_steps_per_epoch(config),
                      "config.phase2.checkpoint_every_epochs")
  image_shape, _, _ = dataset_shape(config.data)
  linearized, _, _ = _variables(config, image_shape, phase=2)
  programs = _train_programs(config, mesh, p, p.optimizer, linearized, p.num_epochs, 0 if p.mode == "A" else None,
                             config.seed + SEED_OFFSET, "phase 2", "config.phase2.num_epochs")
  return programs + _eval_programs(config, mesh, linearized, "phase 2")


@functools.lru_cache(maxsize=1)
def _digits():
  """The embedded digits, read once per process: a dry run asks for both splits' labels, and for
  the kernel's subset once per program it plans."""
  return load_digits()


def _split_labels(config: ml_collections.ConfigDict, split: str, split_size: int | None,
                  classes: tuple[int, ...] = ()) -> np.ndarray | None:
  """Labels of `split` for a job's own subset checks: the embedded digits' own; for a dataset not
  read here, `split_size` of them dealt evenly over the subset's `classes` (all by default): its
  counts per class are unknown, so the check refuses no subset the data could supply, and the job
  checks again with the real labels."""
  if split_size is None:
    return None
  if config.data.name == "digits":
    return getattr(_digits(), split).labels
  classes = np.asarray(tuple(classes) or range(dataset_classes(config.data)))
  return classes[np.arange(split_size) % len(classes)]


def _kernel_examples(config: ml_collections.ConfigDict) -> int:
  """The examples of config.kernel's subset, after the kernel job's checks of every config.kernel
  field: the job's own subset of the embedded digits; for other data (not read here) from the
  catalog's split sizes, a class subset as an even share of the split."""
  k = config.kernel
  _, train_size, test_size = dataset_shape(config.data)
  split_size = {"train": train_size, "test": test_size}.get(k.split)
  labels = _split_labels(config, k.split, split_size, tuple(k.classes))
  check_kernel_config(config, dataset_classes(config.data), labels)
  if config.data.name == "digits":
    return len(select_examples(config, labels))
  n = split_size if k.num_examples == 0 else k.num_examples
  if k.classes:
    n = min(n, math.ceil(split_size / dataset_classes(config.data)) * len(k.classes))
  return n


def _spectrum(config: ml_collections.ConfigDict, mesh, device_budget: float,
              budget_flag: str | None = None) -> tuple[list[ProgramCost], list[str]]:
  """The spectrum job's plan (spectrum_job.plan_spectrum): for the sharded method its LOBPCG round
  (at most max_iters / round_iters of them), compiled from the kernel's shape; other methods as a
  note. `budget_flag`: the flag that gave `device_budget`, named in a refusal where
  config.spectrum.memory_budget_gb leaves the budget to it."""
  s = config.spectrum
  num_classes = dataset_classes(config.data)
  check_spectrum_config(config, num_classes)
  spec = parse_logits(config.kernel.logits, num_classes, "config.kernel.logits")
  n = _kernel_examples(config)
  check_num_eigenpairs(s, spec.matrix_rows(n))  # the whole split's or classes' rows
  with jax.enable_x64(s.dtype == "float64"):
    try:
      plan = plan_spectrum(s, (n, n, *spec.tile_suffix), mesh, device_budget,
                           budget_flag or "config.spectrum.memory_budget_gb")
    except SpectrumDoesNotFit as e:
      raise PlanDoesNotFit(str(e)) from e
  if plan.method == "dense":
    return [], [f"spectrum: a dense eigendecomposition of the {plan.size} x {plan.size} matrix (not "
                f"modelled)"]
  if plan.sharded is None:
    return [], ["spectrum: method 'streamed' runs on the host (not modelled)"]
  engine = plan.sharded
  if plan.method == "streamed":
    return [], [f"spectrum: the sharded round needs {_gib(engine.bytes_per_device())} per device; "
                f"method auto streams the kernel from disk on the host instead (not modelled)"]
  rounds = math.ceil(s.max_iters / s.round_iters)
  cost = _fitting(ProgramCost(f"spectrum: top {s.num_eigenpairs} of {plan.size} rows, LOBPCG round",
                              rounds, engine.flops_per_round(), engine.bytes_per_device() or 0.0,
                              "config.spectrum.memory_budget_gb or config.spectrum.num_eigenpairs",
                              matmul=(s.dtype, s.precision)))
  return [cost], [f"spectrum: at most {rounds} rounds ({s.max_iters} iterations); most kernels "
                  f"converge in far fewer"]


def _kernel(config: ml_collections.ConfigDict, copies: int, label: str,
            target_budget: float | None = None) -> ProgramCost:
  """The kernel engine's plan for config.kernel (the network, or for config.kernel.phase=2 its
  linearization), its memory by XLA's analysis of its compiled programs; planned for `target_budget` bytes per device where
  config.kernel.memory_budget_gb leaves the budget to the device."""
  k = config.kernel
  image_shape = dataset_shape(config.data)[0]
  n = _kernel_examples(config)
  model, params, stats = _variables(config, image_shape, phase=k.phase)
  dtype = np.dtype(k.dtype)
  cast = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), tree)
  images = np.broadcast_to(np.zeros((), dtype), (n, *image_shape))  # shapes only, nothing allocated
  with jax.enable_x64(k.dtype == "float64"):
    settings = plan_settings(k)
    if settings["memory_budget_bytes"] is None and target_budget is not None:
      settings["memory_budget_bytes"] = target_budget  # refusals name the flag that set it
      settings["fields"] = {**KERNEL_FIELDS, "memory_budget": TARGET_MEMORY_FLAG}
    plan = fit_plan(inference_apply(model), cast(params), images, None, k.logits,
                    precision=k.precision, **settings, model_state=cast(stats))
  tiles = len(plan.tiles())
  return _fitting(ProgramCost(f"{label}: {plan.layout()}, {tiles} tiles", copies, plan.flops,
                              plan.bytes_per_device,
                              "config.kernel.tile_size or config.kernel.memory_budget_gb",
                              device_flops_per_call=plan.device_flops, matmul=(k.dtype, k.precision)))


def _eigenpairs(config: ml_collections.ConfigDict, solver: str, size: int, mesh, budget: float,
                job: str, kernels: str, budget_flag: str | None = None
                ) -> tuple[list[ProgramCost], list[str]]:
  """How a job gets a kernel's eigenpairs: for solver "top" the spectrum job's LOBPCG rounds for
  config.spectrum's top eigenpairs, for "dense" a note (one eigendecomposition on the host per
  kernel; `kernels`: "the" or "each")."""
  if solver == "top":
    return _spectrum(config, mesh, budget, budget_flag)
  return [], [f"{job}: every eigenpair of {kernels} {size}-row kernel, one float64 "
              f"eigendecomposition on the host (not modelled)"]


def _eigen_job(config: ml_collections.ConfigDict, job: str, mesh, budget: float,
               target_budget: float | None) -> tuple[list[ProgramCost], list[str]]:
  """The eigen_features / eigen_images job's kernel and, when it is decomposed by the spectrum job
  (eigensolver top, or auto above DENSE_MAX_ROWS rows), that job's LOBPCG rounds; what follows
  (the feature groups' evaluation, the image optimisation, CG) as notes."""
  if job == "eigen_images":
    config = eigen_images_kernel_config(config)  # checks config.eigen_images; its class and epoch
    section, needed = config.eigen_images, config.eigen_images.num_eigenvectors
  else:
    check_eigen_features_config(config)
    section, needed = config.eigen_features, config.eigen_features.num_single
    # The job's checks before it loads the data, in its order, whatever the kernel's source.
    build_attack(section.attack, prefix="config.eigen_features.attack")
    parallel.check_batch_size(section.batch_size, mesh.devices.size,
                              "config.eigen_features.batch_size")
  n = _kernel_examples(config)  # one class or the trace: one matrix row per example
  if job == "eigen_images":
    check_num_eigenvectors(section, n)
  else:
    _, _, test_size = dataset_shape(config.data)
    check_num_test(config, _split_labels(config, "test", test_size))
  if job == "eigen_features" and section.source == "infinite":
    image_shape = dataset_shape(config.data)[0]
    return ([_analytic_kernel(config.infinite, dataset_classes(config.data), image_shape, n, mesh,
                              "analytic kernel")],
            [f"eigen_features: every eigenpair of the {n}-row analytic kernel, one float64 "
             "eigendecomposition on the host (not modelled); then every feature group's predictor, "
             "clean and under config.eigen_features.attack on the test images (not modelled)"])
  programs = [_kernel(config, 1, "kernel", target_budget)]
  solver, spectrum_config = eigenpairs_config(config, section.eigensolver, n, needed)
  spectrum, notes = _eigenpairs(spectrum_config, solver, n, mesh, budget, job, "the",
                                None if target_budget is None else TARGET_MEMORY_FLAG)
  programs += spectrum
  if job == "eigen_features":
    rank = spectrum_config.spectrum.num_eigenpairs if solver == "top" else n
    programs += _eigen_feature_programs(config, mesh, n, rank, target_budget)
  else:
    notes.append("eigen_images: then the Adam steps on the images (not modelled)"
                 + (f"; the dual weights by CG, at most {section.cg_max_iters} passes over the kernel "
                    f"on the host" if solver == "top" else ""))
  return programs, notes


def _eigen_feature_programs(config: ml_collections.ConfigDict, mesh, n: int, rank: int,
                            target_budget: float | None) -> list[ProgramCost]:
  """What the eigen_features job runs after the eigenpairs of an empirical kernel of n images and
  numerical rank at most `rank`: the parameter directions, then every group's predictor clean and
  under attack (the model of config.kernel.phase, whose Jacobian rows the kernel has)."""
  image_shape, classes = dataset_shape(config.data)[0], dataset_classes(config.data)
  chunk = directions_chunk(config, image_shape, classes, n, rank, mesh.size, target_budget,
                           TARGET_MEMORY_FLAG)
  model, params, stats = _variables(config, image_shape, phase=config.kernel.phase)
  spec = parse_logits(config.kernel.logits, classes, "config.kernel.logits")
  rows = most_rows(rank, config.eigen_features.num_single)
  apply = inference_apply(model, config.kernel.precision)  # as the job's, at the kernel's precision
  matmul = ("float32", config.kernel.precision)  # float32 parameters and images
  return ([_parameter_directions(mesh, apply, params, stats, spec, image_shape, n, chunk, rows,
                                 matmul)]
          + _feature_evaluations(config, mesh, model, params, stats, spec, rows, matmul))


def _parameter_directions(mesh, apply, params, stats, spec: LogitSpec, image_shape: tuple[int, ...],
                          n: int, chunk: int, rows: int, matmul: Matmul) -> ProgramCost:
  """The parameter directions J(X)^T A_g of n training images, `chunk` per device and step, for
  `rows` rows of A (the groups and their sum)."""
  classes = spec.num_classes
  zeros = lambda tree: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)
  theta, unravel = ravel_pytree(zeros(params))
  stats = zeros(stats)
  program = directions_program(lambda p, x: apply(p, x, stats), spec, unravel, mesh)
  size = chunk * mesh.size
  batch = parallel.batch_sharding(mesh)
  args = (jax.ShapeDtypeStruct(theta.shape, theta.dtype, sharding=parallel.replicated_sharding(mesh)),
          jax.ShapeDtypeStruct((size, *image_shape), jnp.float32, sharding=batch),
          jax.ShapeDtypeStruct((size, rows, classes), jnp.float32, sharding=batch),
          jax.ShapeDtypeStruct((mesh.size, rows, spec.rows_per_example, classes, theta.size),
                               theta.dtype, sharding=batch))
  per_device = program_flops(program, *args)  # the per-device body: its own images
  return _fitting(ProgramCost(
      f"eigen_features: parameter directions ({rows - 1} groups at most), {chunk} images per device",
      -(-n // size), per_device.flops * mesh.size, memory_per_device(program.lower(*args).compile()),
      "config.kernel.memory_budget_gb", per_device.unbounded_loops,
      device_flops_per_call=per_device.flops, matmul=matmul))


def _feature_evaluations(config: ml_collections.ConfigDict, mesh, model, params, stats,
                         spec: LogitSpec, groups: int, matmul: Matmul) -> list[ProgramCost]:
  """Each of at most `groups` feature predictors J(x) W_g (eigen_features_job.group_apply) on the
  test images, clean and under config.eigen_features.attack, in batches of
  config.eigen_features.batch_size over the mesh."""
  e = config.eigen_features
  (image_shape, _, test_size), classes = dataset_shape(config.data), spec.num_classes
  replicated = parallel.replicated_sharding(mesh)
  num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  variables = {**abstract_tree({"params": params, "stats": stats}, replicated),
               "directions": jax.ShapeDtypeStruct((spec.rows_per_example, classes, num_params),
                                                  jnp.float32, sharding=replicated)}
  args = (variables, _batch(mesh, e.batch_size, image_shape, mask=True),
          jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
  num_test = e.num_test or test_size  # check_num_test: at most the test split
  calls = groups * -(-num_test // e.batch_size)
  apply = group_apply(inference_apply(model, config.kernel.precision), spec)
  what = f"eigen_features: each group's predictor ({groups - 1} groups and all at most)"
  attack = build_attack(e.attack, prefix="config.eigen_features.attack")
  return ([_program(f"{what}, clean", evaluate_batch, args, calls, "config.eigen_features.batch_size",
                    matmul=matmul, num_classes=classes, attack=None, apply=apply)]
          + _attacked(f"{what} under {e.attack.name}", attack, args, calls,
                      "config.eigen_features.batch_size", matmul=matmul, num_classes=classes,
                      apply=apply))


def _analytic_kernel(section: ml_collections.ConfigDict, num_classes: int,
                     image_shape: tuple[int, ...], n: int, mesh, label: str) -> ProgramCost:
  """config.infinite's analytic kernel of n images with themselves: its tile program (one tile of
  batch_size per device per step, function_tiles.py) compiled for this mesh, times its steps."""
  from ntk_scale import infinite  # pylint: disable=import-outside-toplevel  (neural-tangents)

  return _tile_loop(section, infinite.kernel_function(section, num_classes), image_shape, n, mesh,
                    f"{label}: {n} x {n}")


def _tile_loop(section: ml_collections.ConfigDict, kernel_fn, image_shape: tuple[int, ...], n: int,
               mesh, label: str, pullback: bool = False) -> ProgramCost:
  """A tile loop of function_tiles.py over the tiles i <= j of n images: the kernel's tile
  program, or with `pullback` the Gram pullback's (blocks and a cotangent tile per device)."""
  program = (tile_vjp_program if pullback else tile_program)(kernel_fn, mesh)
  tile = section.batch_size
  tiles = len(kernel_tiles(n, n, tile, symmetric=True))
  dtype, data = np.dtype(section.dtype), parallel.batch_sharding(mesh)
  block = jax.ShapeDtypeStruct((mesh.size * tile, *image_shape), dtype, sharding=data)
  args = (block, block) + ((jax.ShapeDtypeStruct((mesh.size * tile, tile), dtype, sharding=data),)
                           if pullback else ())
  with jax.enable_x64(section.dtype == "float64"):
    memory = memory_per_device(program.lower(*args).compile())
    per_tile = program_flops(program, *args)  # the per-device body: one tile
  return _fitting(ProgramCost(f"{label} in tiles of {tile}, {tiles} tiles",
                              -(-tiles // mesh.size), per_tile.flops * mesh.size, memory,
                              "config.infinite.batch_size", per_tile.unbounded_loops,
                              device_flops_per_call=per_tile.flops,
                              matmul=(section.dtype, "highest")))


def _robust_set(config: ml_collections.ConfigDict, mesh, num_optimised: int) -> list[ProgramCost]:
  """The robust set's outer steps (robust_dataset.objective_and_gradient), each: the Gram matrix of
  the optimised images in tiles, the attack and outer gradient per batch of targets (split over
  the devices, scores in blocks of config.infinite.batch_size), the Gram's pullback in tiles."""
  from ntk_scale import infinite  # pylint: disable=import-outside-toplevel  (neural-tangents)

  s, num_classes = config.infinite, dataset_classes(config.data)
  r, image_shape, m = s.robust_data, dataset_shape(config.data)[0], num_optimised
  kernel_fn = infinite.kernel_function(s, num_classes)
  per_step = lambda p: dataclasses.replace(p, calls=p.calls * r.num_steps)
  gram = _analytic_kernel(s, num_classes, image_shape, m, mesh, "robust set, each step: Gram")
  pullback = _tile_loop(s, kernel_fn, image_shape, m, mesh, "robust set, each step: Gram pullback",
                        pullback=True)
  size = attack_batch_size(r.target_batch_size, config.eval_batch_size, mesh.size)
  fixed, batch = _regression_inputs(config, mesh, m, size)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  program = target_batch_program(kernel_fn, build_attack(r.attack, prefix="config.infinite.robust_data.attack"),
                                 r.loss, s.batch_size, mesh)
  with jax.enable_x64(s.dtype == "float64"):
    targets = _program(f"robust set, each step: {r.attack.name} and outer gradient, {size} targets",
                       program, (fixed["train"], fixed["coefficients"], batch, key, 1.0),
                       -(-r.target_batch_size // size),
                       "config.eval_batch_size or config.infinite.batch_size",
                       matmul=(s.dtype, "highest"))
  return [per_step(gram), per_step(targets), per_step(pullback)]


def _kernel_regression(config: ml_collections.ConfigDict, mesh, n: int, models: int,
                       attacks: dict[str, tuple[ml_collections.ConfigDict, int]]) -> list[ProgramCost]:
  """Kernel regression on n training images, clean (`models` models) and under each attack (its
  config field -> (config, how many models it attacks)), over the test split in batches of
  config.eval_batch_size: scores K(batch, X) A, config.infinite.batch_size training images at a
  time, as the job computes them."""
  from ntk_scale import infinite  # pylint: disable=import-outside-toplevel  (neural-tangents)

  s, num_classes = config.infinite, dataset_classes(config.data)
  test_size = dataset_shape(config.data)[2]
  kernel_fn = infinite.kernel_function(s, num_classes)
  apply = _regression_scores(kernel_fn, s.batch_size)
  size = config.eval_batch_size
  variables, batch = _regression_inputs(config, mesh, n, size)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  calls = -(-(s.num_test or test_size) // size)
  setting = "config.eval_batch_size or config.infinite.batch_size"
  matmul = (s.dtype, "highest")  # kernel_scores' matmuls
  built = {field: build_attack(c, prefix=field) for field, (c, _) in attacks.items()}
  programs = []
  with jax.enable_x64(s.dtype == "float64"):
    programs.append(_program(f"kernel regression ({n} images), clean ({models} model(s))",
                             evaluate_batch, (variables, batch, key), calls * models, setting,
                             matmul=matmul, num_classes=num_classes, attack=None, apply=apply))
    for name, (_, attacked) in attacks.items():
      programs += _attacked(f"kernel regression under {name.rpartition('.')[2]} ({attacked} model(s))",
                            built[name], (variables, batch, key), calls * attacked, setting,
                            matmul=matmul, num_classes=num_classes, apply=apply)
  return programs


def _regression_inputs(config: ml_collections.ConfigDict, mesh, n: int, size: int
                       ) -> tuple[dict[str, jax.ShapeDtypeStruct], dict[str, jax.ShapeDtypeStruct]]:
  """Shapes of kernel regression on n training images in config.infinite.dtype: its training
  images and coefficients (replicated), and a masked batch of `size` images split over the
  devices (as eval_batches makes them)."""
  image_shape, dtype = dataset_shape(config.data)[0], np.dtype(config.infinite.dtype)
  replicated = parallel.replicated_sharding(mesh)
  fixed = {"train": jax.ShapeDtypeStruct((n, *image_shape), dtype, sharding=replicated),
           "coefficients": jax.ShapeDtypeStruct((n, dataset_classes(config.data)), dtype,
                                                sharding=replicated)}
  return fixed, _batch(mesh, size, image_shape, mask=True, dtype=dtype)


@functools.lru_cache(maxsize=4)
def _regression_scores(kernel_fn, block_size: int):
  """apply(variables, images) = K(images, train) @ coefficients as the job computes it (blocks of
  block_size training images), one function per kernel."""
  return lambda v, images: kernel_scores(kernel_fn, images, v["train"], v["coefficients"], block_size)


def _infinite(config: ml_collections.ConfigDict, mesh) -> tuple[list[ProgramCost], list[str]]:
  """The infinite job: the training kernels (the whole subset's, then the optimised set's), kernel
  regression clean and under every attack (each distinct attack config once per model it is run
  against: the original set's model, the optimised set's and, with held-out targets, the original
  subset's); the rest as notes."""
  infinite_job.require_infinite_section(config)
  s, num_classes = config.infinite, dataset_classes(config.data)
  image_shape, train_size, test_size = dataset_shape(config.data)
  infinite_job.check_infinite_config(config, _split_labels(config, "train", train_size), num_classes,
                                     _split_labels(config, "test", test_size))
  n = s.num_train or train_size
  optimised, _ = split_targets(s.robust_data.target_holdout, n, config.seed)
  held_out = len(optimised) < n
  programs = [_analytic_kernel(s, num_classes, image_shape, n, mesh, "training kernel")]
  if s.robust_data.num_steps or held_out:  # else the "optimised" set is the original one
    programs.append(_analytic_kernel(s, num_classes, image_shape, len(optimised), mesh,
                                     "optimised set's kernel"))
  # Each distinct attack config once per model: the original set's model runs them all, the
  # optimised set's (and the original subset's) the evaluation attacks.
  attacks: dict[str, list] = {}
  listed = [(f"config.infinite.attacks.{name}", c) for name, c in s.attacks.items()]
  evaluated = [(f"config.infinite.robust_data.eval_attacks.{name}", c)
               for name, c in s.robust_data.eval_attacks.items()]
  for field, c in listed + evaluated:
    attacks.setdefault(json.dumps(c.to_dict(), sort_keys=True), [field, c, 1])
  for _, c in evaluated:
    attacks[json.dumps(c.to_dict(), sort_keys=True)][2] += 2 if held_out else 1
  programs += _kernel_regression(config, mesh, n, 3 if held_out else 2,
                                 {field: (c, models) for field, c, models in attacks.values()})
  if s.robust_data.num_steps:
    programs += _robust_set(config, mesh, len(optimised))
  notes = [f"infinite: each kernel regression solved on the host ({s.regression.solver}, about "
           f"{n ** 3 / 3:.3g} FLOP for the whole set; not modelled)",
           f"infinite: the robust set's {s.robust_data.num_steps} outer steps each solve and pull back "
           f"a {len(optimised)}-image kernel regression on one device (not modelled)",
           "infinite: the finite networks' training and evaluation are not modelled"]
  return programs, notes


def plan_job(config: ml_collections.ConfigDict, target: TargetDevices = TargetDevices()) -> DryRun:
  """The programs of `config.job` on this topology, their memory per device, FLOPs and a time bound;
  PlanDoesNotFit (or KernelPlanError) when one needs more memory than a device has. `target`: plan
  for devices of that memory and rate instead of these. `config` has passed jobs.check_config, as
  jobs.dry_run makes it: an unknown job would plan no program."""
  job = config.get("job", "train")
  mesh = parallel.make_mesh()
  if target.memory_bytes is not None and not target.memory_bytes > 0:
    raise ValueError(f"the target devices' memory ({target.memory_bytes!r} bytes) must be positive.")
  for value in [target.matmul_flops_per_s, *dict(target.matmul_rates).values()]:
    if value is not None and not value > 0:
      raise ValueError(f"the target devices' matmul rate ({value!r}) must be positive.")
  target_budget = (None if target.memory_bytes is None
                   else DEVICE_MEMORY_FRACTION * target.memory_bytes)
  budget = target_budget or device_budget_bytes(jax.local_devices()[0])
  budget_flag = None if target_budget is None else TARGET_MEMORY_FLAG
  planning = _PLAN_BUDGET.set(budget)
  try:
    programs, notes = _job_programs(config, job, mesh, budget, budget_flag, target_budget)
  finally:
    _PLAN_BUDGET.reset(planning)
  given = dict(target.matmul_rates)
  rates = {p.matmul: given.get(p.matmul) or target.matmul_flops_per_s or _matmul_rate(p.matmul)
           for p in programs}
  return DryRun(job, mesh.devices.size, jax.local_devices()[0].platform, rates, budget, programs, notes,
                target)


def workdir_note(config: ml_collections.ConfigDict, workdir: str) -> str:
  """What `workdir` holds for the job: its experiment (and for training, the newest checkpoint to
  resume from) or none yet. Raises where the job would refuse the workdir (another experiment's
  config.json; the report or the phase2 job without a trained experiment)."""
  job = config.get("job", "train")
  check_workdir_path(workdir)
  if check_experiment(config, workdir):
    held = f"{workdir} holds this experiment (config.json)"
    if job != "train":
      return f"{held}; the job reads what it needs there"
    newest = Checkpoints(os.path.join(workdir, CHECKPOINTS_DIR), create=False).latest_step()
    return (f"{held}; training resumes from its checkpoint of step {newest}" if newest is not None
            else f"{held}; no checkpoint yet, so training starts from step 0")
  if records_experiment(config):
    return f"{workdir} holds no experiment yet: the job records this one there"
  return (f"{workdir} holds no experiment yet (no config.json): the {job} job reads a trained "
          f"one's checkpoints or kernels there, and would stop for want of them")


def _scheduled_epochs(config: ml_collections.ConfigDict, phase: int) -> list[float]:
  """The epochs `phase` saves by the config's schedule at the catalog's size: those a finished run's
  checkpoints hold (phase 1's initialisation included); [] for phase 2 when the config does not
  give its length (a job that reads phase 2 names the experiment, not its schedule)."""
  steps_per_epoch = catalog_steps_per_epoch(config)
  if phase == 1:
    return sorted(phase1_saves(config, steps_per_epoch).values())
  if not config.phase2.num_epochs > 0:
    return []
  return sorted(phase2_saves(config, steps_per_epoch).values())


def _job_programs(config: ml_collections.ConfigDict, job: str, mesh, budget: float,
                  budget_flag: str | None, target_budget: float | None
                  ) -> tuple[list[ProgramCost], list[str]]:
  """`config.job`'s programs and notes (plan_job)."""
  programs, notes = [], []
  # Phase 2's evaluations (the train, phase2 and evaluate jobs') also measure these.
  phase2_components = (f"{job}: phase 2's output components f0(x) and J(theta - theta0), one more "
                       f"pass over the clean and attacked test images (not modelled)")
  if job == "train":
    programs, notes = _phase1(config, mesh)
    if config.phase2.num_epochs > 0:
      programs += _phase2(config, mesh)
      notes.append(phase2_components)
  elif job == "phase2":
    programs, notes = _phase2(config, mesh), [phase2_components]
  elif job == "evaluate":
    check_common_config(config, mesh.devices.size, training=False)
    phase = config.evaluate.phase
    check_phase(phase, "config.evaluate")
    if phase == 2:
      notes.append(phase2_components)
    transfer_sets = config.evaluate.transfer_sets
    transfer_keys(transfer_sets)  # a set listed twice: refused as the job refuses it
    if transfer_sets:
      notes.append(f"evaluate: then {len(transfer_sets)} saved set(s) of config.evaluate.transfer_sets, "
                   f"one clean pass each (not modelled)")
    model, _, _ = _variables(config, dataset_shape(config.data)[0], phase=phase)
    programs = _eval_programs(config, mesh, model, "evaluate" if phase == 1 else "evaluate phase 2")
  elif job == "kernel":
    programs = [_kernel(config, 1, "kernel", target_budget)]
  elif job == "spectrum":
    programs, notes = _spectrum(config, mesh, budget, budget_flag)
    programs.insert(0, _kernel(config, 1, "kernel", target_budget))
  elif job == "evolution":
    check_evolution_settings(config)
    epochs = tuple(config.evolution.epochs)
    count = len(epochs) if epochs else 1
    spec = parse_logits(config.kernel.logits, dataset_classes(config.data), "config.kernel.logits")
    size = spec.matrix_rows(_kernel_examples(config))
    scheduled = _scheduled_epochs(config, int(config.evolution.phase)) if epochs else []
    if scheduled:  # the job checks the epochs against the checkpoints; a plan, against the schedule
      select_epochs(config, scheduled, size)
    one = checkpoint_config(config, 0.0, size)  # config.evolution.phase's kernel, as the job's
    programs = [_kernel(one, count, f"kernel of {count} checkpoint(s)" if epochs else "kernel per checkpoint",
                        target_budget)]
    if not epochs:
      notes.append("config.evolution.epochs is empty (every saved checkpoint): the time is per checkpoint")
    spectrum, spectrum_notes = _eigenpairs(
        one, resolve_eigensolver(config.evolution.eigensolver, size), size, mesh, budget,
        "evolution", "each", budget_flag)
    programs += [dataclasses.replace(p, calls=p.calls * count) for p in spectrum]
    notes += spectrum_notes
  elif job in ("eigen_features", "eigen_images"):
    programs, notes = _eigen_job(config, job, mesh, budget, target_budget)
  elif job == "infinite":
    programs, notes = _infinite(config, mesh)
  elif job == "report":  # a sweep's dry runs may include it
    notes = ["report: renders the workdir's results into report/index.html on the host"]
  return programs, notes


__all__ = ["DryRun", "KernelPlanError", "PlanDoesNotFit", "ProgramCost", "TargetDevices", "plan_job"]
