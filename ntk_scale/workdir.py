"""The workdir's record of its experiment: `<workdir>/config.json`, written once and checked on resume."""

import json
import os
from typing import Any

import jax
import ml_collections

CONFIG_FILE = "config.json"
# Fields that change how a job runs or what it evaluates, but not the trained model; they may
# differ between runs on one workdir (a prefix ending in "." covers a whole section).
RUNTIME_FIELDS = ("job", "log_every_steps", "eval_batch_size", "data.data_dir", "data.download",
                  "save_adversarial", "eval_attacks.", "evaluate.")


def is_runtime_field(name: str) -> bool:
  return any(name == f or (f.endswith(".") and name.startswith(f)) for f in RUNTIME_FIELDS)


class WorkdirConfigMismatchError(ValueError):
  """The workdir holds a different experiment."""


def flatten_config(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flatten_config(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(saved: dict, current: dict) -> list[str]:
  """Human-readable `field: saved -> current` lines for every result-relevant field that differs."""
  a, b = flatten_config(saved), flatten_config(current)
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if not is_runtime_field(k) and a.get(k) != b.get(k)]


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates `workdir` and records `config`, or checks that it is the experiment already there.

  Rerunning a command on its workdir resumes it; pointing a different experiment at it is an
  error, because resuming would silently mix two runs.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    diffs = config_differences(saved, current)
    if diffs:
      raise WorkdirConfigMismatchError(
          f"{path} holds a different experiment; resuming would mix two runs. Differing fields:\n  "
          + "\n  ".join(diffs) + "\nUse a new --workdir, or the original config.")
    return
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
