"""Runs one ntk_scale experiment: `python main.py --config configs/digits.py --workdir DIR`.

Rerunning the same command on the same workdir resumes it.
"""

import sys
import traceback

import jax
from absl import app, flags
from ml_collections import config_flags

from ntk_scale import console  # sets the TF log level before TensorFlow loads
from ntk_scale import jobs, parallel, preemption
from ntk_scale.config_fields import missing_field_message
from ntk_scale.preemption import Preempted
from ntk_scale.workdir import phase2_directory

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, `file.py` or `file.py:arg`; override fields with --config.a.b=v.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the job's memory per device, FLOPs and a time bound on these devices; "
    "run nothing, write nothing.")
_TARGET_MEMORY = flags.DEFINE_float(
    "dry_run_device_memory_gb", None, "With --dry_run: plan for devices with this much memory each "
    "(GiB; e.g. 80 for an H100, 32 for a TPU v4 chip) instead of the ones JAX sees here.")
_TARGET_TFLOPS = flags.DEFINE_string(
    "dry_run_tflops", None, "With --dry_run: each device's matmul rate (TFLOP/s) for the time bound, "
    "instead of the rates measured here: one for every program (50), and/or per dtype:precision "
    "(50,float32:default=495,bfloat16:default=990: an H100 at HIGHEST, TF32 and bfloat16).")
_TARGET_PLATFORM = flags.DEFINE_enum(
    "dry_run_platform", None, list(parallel.PLATFORMS), "With --dry_run: plan for this platform's "
    "devices: its checks (float64 on TPUs) instead of this machine's.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-process job: find the coordinator and this process's id with JAX's "
    "cluster detection (TPU pods, SLURM, Open MPI, Kubernetes).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 60, "A process silent this long is dead and the others stop with an error.")
flags.mark_flags_as_required(["config", "workdir"])

ERROR_EXIT_WAIT_S = 10  # how long a failed process waits for the others to leave the job with it


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, except that an override of a field the config lacks (which ml_collections
  reports as a bare AttributeError, KeyError or, below a string, TypeError) is refused naming the
  flag and the fields its parent has; --noconfig.<field> (a boolean's False) included."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError):
    files = [f"--config={b}" for a, b in zip(argv[1:], argv[2:]) if a == "--config"]
    files += [a for a in argv[1:] if a.startswith("--config=")]
    fields = [a.split("=", 1)[0].split(".", 1)[1] for a in argv[1:]
              if a.startswith(("--config.", "--noconfig."))]
    if len(files) != 1:
      raise
    values = flags.FlagValues()  # the config as its file builds it, without the overrides
    holder = config_flags.DEFINE_config_file("config", None, "config", flag_values=values,
                                             sys_argv=[argv[0], files[0]])
    values([argv[0], files[0]])
    for field in fields:
      message = missing_field_message(holder.value, field)
      if message:
        raise SystemExit(f"FATAL Flags parsing error: {message}") from None
    raise


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  targets = (_TARGET_MEMORY.value, _TARGET_TFLOPS.value, _TARGET_PLATFORM.value)
  if not _DRY_RUN.value and any(t is not None for t in targets):
    raise app.UsageError("--dry_run_device_memory_gb, --dry_run_tflops and --dry_run_platform plan a "
                         "job; they need --dry_run.")
  every, rates = None, {}
  if _TARGET_TFLOPS.value is not None:
    from ntk_scale.dry_run import parse_matmul_rates  # pylint: disable=import-outside-toplevel
    try:
      every, rates = parse_matmul_rates(_TARGET_TFLOPS.value)
    except ValueError as error:
      raise app.UsageError(str(error)) from None
  console.quiet_library_logs()  # before the first jax call, whose backend probe logs at INFO
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  auto=_DISTRIBUTED.value, heartbeat_timeout_s=_HEARTBEAT.value)
  if _DRY_RUN.value:
    plan = jobs.dry_run(
        _CONFIG.value, None if _TARGET_MEMORY.value is None else _TARGET_MEMORY.value * 2**30,
        every, rates, _TARGET_PLATFORM.value, _WORKDIR.value).describe()
    if jax.process_index() == 0:
      print(plan)
    return
  try:
    result = jobs.run(_CONFIG.value, _WORKDIR.value)
  except Preempted as stopped:  # every process saved at the same step and stops here
    print(f"process {jax.process_index()}: {stopped}", file=sys.stderr, flush=True)
    parallel.exit_together(preemption.exit_code())
  except BaseException:
    if jax.process_count() == 1:
      raise
    # Every process may have failed alike (a bad field, a NaN loss): they leave together. Others may
    # instead be blocked in a collective, where JAX's shutdown barrier would hold this one for five
    # minutes: after ERROR_EXIT_WAIT_S it exits alone, and the others' collectives fail.
    traceback.print_exc()
    print(f"process {jax.process_index()} of {jax.process_count()} stopped on the error above and "
          f"exits within {ERROR_EXIT_WAIT_S} s, so the others stop too. A failed collective or a lost "
          "connection means another process died first (see its log); rerunning the same command "
          "resumes from the last checkpoint.", file=sys.stderr, flush=True)
    parallel.exit_together(1, ERROR_EXIT_WAIT_S)
  if jax.process_index() != 0:  # one report per job, from process 0
    return
  if "report" in result:
    print(f"report in {result['report']}")
    return
  if "spectrum" in result:  # the job printed its summary line
    print(f"spectrum in {result['spectrum']}")
    return
  if "eigen_features" in result:
    print(f"eigen-features in {result['eigen_features']}")
    return
  phase2_job = _CONFIG.value.get("job") == "phase2"  # its results are phase 2's alone
  for name, r in result.get("results", {}).items():
    name = "phase 2 " + name if phase2_job else name
    print(f"{name:>24s} test accuracy {r['accuracy']:.4f}  (loss {r['loss']:.4f})")
  for name, r in result.get("phase2", {}).get("results", {}).items():
    print(f"{'phase 2 ' + name:>24s} test accuracy {r['accuracy']:.4f}  (loss {r['loss']:.4f})")
  if "kernel" in result:
    shape = " x ".join(map(str, result["shape"]))
    print(f"kernel {shape}: {result['tiles_computed']} of {result['tiles']} tiles computed in "
          f"{result['seconds']:.1f} s ({result['tflop_per_s'] * 1e3:.1f} GFLOP/s, method "
          f"{result['method']}, tile {result['tile']}), complete: {result['complete']}")
    print(f"kernel in {result['kernel']}")
    return
  print(f"results in {phase2_directory(_CONFIG.value, _WORKDIR.value) if phase2_job else _WORKDIR.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
