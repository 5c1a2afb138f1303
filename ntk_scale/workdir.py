"""The workdir's record of its experiment: `<workdir>/config.json`, written once and checked on resume."""

import json
import os
import re

import jax
import ml_collections
from flax import traverse_util

from ntk_scale import files, writer_lock
from ntk_scale.base_config import base_config
from ntk_scale.checkpoint import CheckpointNotFoundError

CONFIG_FILE = "config.json"
# <workdir>/phase2/<config.phase2.name>/: one phase-2 experiment's config.json, checkpoints, metrics,
# evaluations and adversarial sets; several experiments share the workdir's phase 1.
PHASE2_DIR = "phase2"
# <workdir>/transfer/<name>/: the train workdir of each finite network the infinite job trains.
TRANSFER_DIR = "transfer"
# Fields that change how a job runs or what it evaluates, but not the trained model; they may
# differ between runs on one workdir (a prefix ending in "." covers a whole section). Phase 2 is
# recorded and checked on its own, in <workdir>/phase2/<name>/config.json; `loaders` is applied to
# train.mode (recorded) before the check.
RUNTIME_FIELDS = ("job", "log_every_steps", "profile_steps", "compilation_cache", "eval_batch_size",
                  "eval_matmul_precision", "data.data_dir", "data.download", "save_adversarial",
                  "eval_attacks.", "evaluate.", "phase2.", "loaders", "kernel.", "spectrum.", "evolution.",
                  "eigen_features.", "eigen_images.", "train.co_monitor.")
# The phase2 job reads phase-1 checkpoints and trains no phase 1: its length and saves don't matter.
PHASE2_JOB_FREE_FIELDS = ("num_epochs", "checkpoint.")


def is_runtime_field(name: str, fields: tuple[str, ...] = RUNTIME_FIELDS) -> bool:
  return any(name == f or (f.endswith(".") and name.startswith(f)) for f in fields)


class WorkdirConfigMismatchError(ValueError):
  """The workdir holds a different experiment."""


def config_differences(saved: dict, current: dict,
                       runtime: tuple[str, ...] = RUNTIME_FIELDS) -> list[str]:
  """Human-readable `field: saved -> current` lines for every result-relevant field that differs.

  A field absent from `saved` that holds its base_config default in `current` is no difference:
  fields are added with defaults that keep the old behaviour, so older workdirs still resume.
  """
  a, b = traverse_util.flatten_dict(saved, sep="."), traverse_util.flatten_dict(current, sep=".")
  defaults = traverse_util.flatten_dict(json.loads(base_config().to_json()), sep=".")
  same = lambda k: a.get(k) == b.get(k) or (k not in a and k in defaults and b.get(k) == defaults[k])
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if not is_runtime_field(k, runtime) and not same(k)]


NEW_WORKDIR = "Use a new --workdir, or the original config."
NEW_PHASE2_NAME = "Set another config.phase2.name to run it beside this one, or use the original config."


def check_recorded(path: str, current: dict, runtime: tuple[str, ...] = RUNTIME_FIELDS,
                   remedy: str = NEW_WORKDIR) -> bool:
  """Raises WorkdirConfigMismatchError if `path` records a different experiment; False if absent."""
  if not files.exists(path):
    return False
  try:
    saved = files.read_json(path)
  except files.UnreadableRecordError as e:
    raise WorkdirConfigMismatchError(
        f"{path} is not a readable config record ({e.__cause__}); it is written whole or not at all, "
        f"so it was changed by hand or its disk failed. Restore it, or use a new --workdir.") from e
  diffs = config_differences(saved, current, runtime)
  if diffs:
    raise WorkdirConfigMismatchError(
        f"{path} holds a different experiment; resuming would mix two runs. Differing fields:\n  "
        + "\n  ".join(diffs) + "\n" + remedy)
  return True


def record_or_check(path: str, current: dict, runtime: tuple[str, ...] = RUNTIME_FIELDS,
                    remedy: str = NEW_WORKDIR) -> None:
  """Records `current` at `path` (process 0), or checks that it is the experiment already there."""
  if not check_recorded(path, current, runtime, remedy):
    _record(path, current)


def _record(path: str, current: dict) -> None:
  """Writes the record `current` at `path` (process 0 for every process)."""
  if jax.process_index() != 0:
    return
  files.make_dirs(os.path.dirname(path))
  files.write_json(path, current, indent=2, sort_keys=True)


def phase2_name(config: ml_collections.ConfigDict) -> str:
  """The phase-2 experiment's name: `config.phase2.name`, or when that is empty one made of the
  fields that define the linearized model and its training data,
  `<linearization>[_loose]_<mode>_from<from_epoch>` (e.g. centered_C_from3, linear_loose_A_from0.5).
  Experiments that differ in other fields (optimizer, attack, length) need explicit names."""
  p = config.phase2
  name = p.get("name", "") or (f"{p.linearization}{'_loose' if p.batch_norm == 'loose' else ''}"
                               f"_{p.mode}_from{p.from_epoch:g}")
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
    raise ValueError(f"config.phase2.name={name!r} must be a directory name: letters, digits, '.', "
                     f"'_' and '-', starting with a letter or digit.")
  return name


def phase2_directory(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`<workdir>/phase2/<name>/`, where the phase-2 experiment of `config` lives."""
  return os.path.join(workdir, PHASE2_DIR, phase2_name(config))


def phase2_record(config: ml_collections.ConfigDict) -> dict:
  """What <workdir>/phase2/<name>/config.json holds: the phase-2 section, every field
  result-relevant, with the name resolved (an empty and an explicit equal name are one experiment)."""
  record = json.loads(config.phase2.to_json())
  record["name"] = phase2_name(config)
  return {"phase2": record}


def records_experiment(config: ml_collections.ConfigDict) -> bool:
  """Whether `config.job` makes a workdir's experiment from nothing, and so records it: train, and
  the training-free infinite-width jobs (infinite; eigen_features of config.infinite's kernel). The
  others read what those left (checkpoints, kernels): recording their config in a workdir never
  trained would refuse the train job that comes later with another config."""
  job = config.get("job", "train")
  return job in ("train", "infinite") or (
      job == "eigen_features" and config.eigen_features.get("source", "empirical") == "infinite")


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates `workdir` and records `config`, or checks that it is the experiment already there.

  Rerunning a command on its workdir resumes it; pointing a different experiment at it is an
  error, because resuming would silently mix two runs. Only jobs that make the experiment
  (`records_experiment`) record it; the others check a record that exists and write nothing here,
  so one run on an empty workdir leaves it empty (it fails reading the checkpoints it needs, or,
  the report, here; the report needs a record, not this config's: it reads results only). The
  phase-2 record, if any, is checked here too (phase 2 writes it when it starts); the phase2 job
  needs a recorded phase 1. A job that writes an experiment (phase 1's or phase 2's) first takes
  its writer lock (writer_lock.py), held until the job ends: a second copy is refused.
  """
  check_workdir_path(workdir)
  job = config.get("job", "train")
  if job == "phase2":  # before its lock is made there: a run on an empty workdir leaves it empty
    _check_phase1_recorded(config, workdir)
  # One job at a time writes an experiment, and the one that holds it checks and makes its records.
  if job in ("train", "infinite"):  # eigen_features of an infinite kernel records, but reads only
    writer_lock.hold(writer_lock.lock_path(workdir), job, workdir)
  if job == "phase2" or (job == "train" and config.phase2.num_epochs > 0):
    writer_lock.hold(writer_lock.lock_path(workdir, phase2_name(config)), job,
                     phase2_directory(config, workdir))
  if not check_experiment(config, workdir) and records_experiment(config):
    _record(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json()))


def check_workdir_path(workdir: str) -> None:
  """Refuses a --workdir that cannot be one: empty, a file, or a cloud path other than gs://."""
  if not workdir.strip():
    raise ValueError("--workdir is empty; give the directory (or gs:// path) for the run's files.")
  if files.is_cloud(workdir) and not workdir.startswith("gs://"):
    raise ValueError(f"--workdir={workdir}: a workdir is a local directory or a gs:// bucket path.")
  if files.exists(workdir) and not files.is_dir(workdir):
    raise ValueError(f"--workdir={workdir} is a file; a workdir is a directory (a new one, or a "
                     f"run's to resume it).")


def check_experiment(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """prepare_workdir's checks of the records, reading only (the dry run makes them too): raises
  WorkdirConfigMismatchError where the workdir holds another experiment, CheckpointNotFoundError
  where the job needs one it lacks; returns whether `config.json` records this experiment."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json())
  job = config.get("job", "train")
  if job == "report":  # reads the workdir's results, never its config: any recorded experiment
    if not files.exists(path):
      raise CheckpointNotFoundError(f"{workdir} holds no experiment ({path} is missing), so nothing "
                                    f"to report; run config.job='train' or 'infinite' there first.")
    return True
  if job == "phase2":
    _check_phase1_recorded(config, workdir)
    recorded = True
  else:
    recorded = check_recorded(path, current)
  if config.phase2.num_epochs > 0:
    check_recorded(os.path.join(phase2_directory(config, workdir), CONFIG_FILE), phase2_record(config),
                   (), NEW_PHASE2_NAME)
  return recorded


def _check_phase1_recorded(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The phase2 job's phase 1: recorded, and the same experiment but for its length and saves,
  which the phase2 job does not read."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not check_recorded(path, json.loads(config.to_json()), RUNTIME_FIELDS + PHASE2_JOB_FREE_FIELDS):
    raise CheckpointNotFoundError(f"{workdir} has no phase-1 run ({path} is missing); train phase 1 "
                                  f"there first (config.job='train').")
