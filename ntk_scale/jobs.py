"""The jobs `main.py` can run, chosen by `config.job`."""

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import jax
import ml_collections

from ntk_scale import compilation_cache, console, data, parallel, writer_lock
from ntk_scale.evaluate import evaluate_checkpoint
from ntk_scale.infinite_job import infinite_job
from ntk_scale.ntk.eigen_features_job import eigen_features_job
from ntk_scale.ntk.eigen_images_job import eigen_images_job
from ntk_scale.ntk.evolution import evolution_job
from ntk_scale.ntk.job import kernel_job
from ntk_scale.ntk.spectrum_job import spectrum_job
from ntk_scale.report import report_job
from ntk_scale.train.loop import check_phase2_from_epoch, phase1_saves, train_job
from ntk_scale.train.experiment import catalog_steps_per_epoch, check_train_config
from ntk_scale.train.phase2 import apply_loaders, check_phase2_config, phase2_and_evaluate
from ntk_scale.workdir import prepare_workdir

if TYPE_CHECKING:  # for the annotation only: dry_run() imports the module when it is called
  from ntk_scale.dry_run import DryRun

JOBS: dict[str, Callable[[ml_collections.ConfigDict, str], Any]] = {
    "train": train_job,  # phase 1 and its evaluation, then phase 2 if config.phase2.num_epochs > 0
    "phase2": phase2_and_evaluate,  # phase 2 alone, from the workdir's phase-1 checkpoints
    "evaluate": evaluate_checkpoint,  # one checkpoint: clean, robust and transfer accuracy
    "kernel": kernel_job,  # the empirical NTK of one checkpoint on a subset, to <workdir>/kernels/
    "spectrum": spectrum_job,  # top eigenpairs of config.kernel's kernel, to kernels/<name>/spectrum/
    "evolution": evolution_job,  # kernels of several checkpoints, how they move, to kernel_evolution/
    "eigen_features": eigen_features_job,  # usefulness and robustness of each eigen-feature of a kernel
    "eigen_images": eigen_images_job,  # images of a class kernel's top eigenvectors, to eigen_images/
    "infinite": infinite_job,  # infinite-width kernel regression, its attacks, transfer, robust data
    "report": report_job,  # every result of the workdir as PNGs and <workdir>/report/index.html
}


def dry_run(config: ml_collections.ConfigDict, device_memory_bytes: float | None = None,
            matmul_flops_per_s: float | None = None,
            matmul_rates: dict[tuple[str, str], float] | None = None,
            platform: str | None = None, workdir: str | None = None) -> "DryRun":
  """What `config.job` would cost on these devices, or on devices of the given memory, matmul
  rates (one for every program, and/or by (dtype, precision)) and platform (its checks: float64
  on TPUs); see ntk_scale/dry_run.py. Runs and writes nothing. check_config first, at the device
  count planned for: what `run` refuses before compute, the dry run refuses too, and with
  `workdir`, the records there that the job would refuse (another experiment's config.json), with
  a note of what the workdir holds."""
  from ntk_scale.dry_run import TargetDevices, plan_job, workdir_note

  compilation_cache.keep_xla_caches_out_of_buckets()  # the plan compiles; it keeps no programs
  with parallel.planned_for(platform):  # the target's platform checks (float64 on TPUs)
    config = check_config(config, jax.device_count())  # the mesh plan_job makes: every device
    note = None if workdir is None else workdir_note(config, workdir)
    plan = plan_job(config, TargetDevices(device_memory_bytes, matmul_flops_per_s,
                                          tuple((matmul_rates or {}).items()), platform))
  return plan if note is None else dataclasses.replace(plan, notes=[note, *plan.notes])


# Jobs that call prepare_workdir themselves, once their data-dependent checks have passed: they
# record the experiment, and a config recorded and then refused would refuse its corrected rerun.
RECORD_AFTER_THEIR_CHECKS = ("infinite", "eigen_features")


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> ml_collections.ConfigDict:
  """The checks of `config` that need no data, which every job makes before it records or reads
  anything (the launcher makes them before it launches): a known `config.job`, the seed, and for
  the train job its fields at `num_devices`, phase 2's from_epoch among phase 1's saves included;
  returns the config with `config.loaders` applied."""
  job = config.get("job", "train")
  if job not in JOBS:
    raise ValueError(f"config.job={job!r} is not a known job; expected one of {', '.join(JOBS)}.")
  data.check_seed(config.seed, "config.seed")
  config = apply_loaders(config)
  if job == "train":
    check_train_config(config, num_devices)
    if config.phase2.num_epochs > 0:
      check_phase2_config(config)
      check_phase2_from_epoch(config, phase1_saves(config, catalog_steps_per_epoch(config)))
  return config


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Checks the config, records it in `workdir` (or checks it matches), runs the job. Every field
  is checked before the config is recorded: a rerun with the field corrected would otherwise be
  refused as another experiment."""
  console.quiet_library_logs()
  config = check_config(config, jax.device_count())
  job = config.get("job", "train")
  compilation_cache.use_workdir_cache(config, workdir)  # before the job's first compilation
  try:
    if job not in RECORD_AFTER_THEIR_CHECKS:
      prepare_workdir(config, workdir)  # takes the writer locks of what the job writes
    result = JOBS[job](config, workdir)
  finally:
    writer_lock.release_all()
  # The processes leave together: one done early (process 0 alone writes an evolution's metrics and
  # plots, or the report) would otherwise wait at JAX's exit barrier, which after 5 minutes aborts
  # every process, process 0 mid-write. A collective waits as long as its peers live.
  parallel.barrier(f"ntk_scale job {job} finished")
  return result
