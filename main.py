"""Runs one ntk_scale experiment: `python main.py --config configs/digits.py --workdir DIR`.

Rerunning the same command on the same workdir resumes it.
"""

from absl import app, flags
from ml_collections import config_flags

from ntk_scale import console  # noqa: F401  (sets the TF log level before TensorFlow loads)
from ntk_scale import jobs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, `file.py` or `file.py:arg`; override fields with --config.a.b=v.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the job's memory per device, FLOPs and a time bound on these devices; "
    "run nothing, write nothing.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DRY_RUN.value:
    print(jobs.dry_run(_CONFIG.value).describe())
    return
  result = jobs.run(_CONFIG.value, _WORKDIR.value)
  for name, r in result.get("results", {}).items():
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
  print(f"results in {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main)
