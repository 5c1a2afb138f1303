"""Saved adversarial sets: `<workdir>/adversarial/<name>/`, plain .npy arrays and a JSON record.

Format (read with `np.load(path, allow_pickle=False)` from any language with an npy reader):
  images.npy             float32 [N, H, W, C] in [0, 1], the adversarial examples
  labels.npy             int32 [N], true labels
  predictions.npy        int32 [N], the attacked model's predictions on `images`
  clean_predictions.npy  int32 [N], its predictions on the clean inputs
  meta.json              attack config, dataset, split, checkpoint step, accuracies
meta.json is removed first and written last (each file is written whole): a set without it is
incomplete, and loading it says so.
"""

import os
from typing import Any

import numpy as np

from ntk_scale import files

ARRAYS = ("images", "labels", "predictions", "clean_predictions")


def save_adversarial_set(directory: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
  """Writes the set atomically, replacing any previous set of that name."""
  missing = set(ARRAYS) - set(arrays)
  if missing:
    raise ValueError(f"adversarial set {directory} lacks arrays {sorted(missing)}")
  meta_path = os.path.join(directory, "meta.json")
  if files.exists(meta_path):
    files.remove(meta_path)
  files.make_dirs(directory)
  for name in ARRAYS:
    files.save_array(os.path.join(directory, f"{name}.npy"), arrays[name])
  files.write_json(meta_path, meta, indent=2, sort_keys=True)


def read_set_meta(directory: str) -> dict[str, Any] | None:
  """The record of the whole set in `directory` (meta.json, written last), or None where there is
  none."""
  meta_path = os.path.join(directory, "meta.json")
  return files.read_json(meta_path) if files.exists(meta_path) else None


def is_whole_set(directory: str) -> bool:
  """Whether every array of the set in `directory` is there and as long as its header says (read
  from the headers: a rerun checks its sets without loading them)."""
  return all(files.is_whole_array(os.path.join(directory, f"{name}.npy")) for name in ARRAYS)


def load_adversarial_set(directory: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The arrays and record of a saved set; a clear error when it is missing or incomplete."""
  paths = {name: os.path.join(directory, f"{name}.npy") for name in ARRAYS}
  absent = [p for p in [*paths.values(), os.path.join(directory, "meta.json")] if not files.exists(p)]
  if absent:
    raise FileNotFoundError(f"{directory} is not a complete adversarial set; missing {absent}. "
                            f"Sets are written by the train or evaluate job with save_adversarial=True.")
  arrays = {name: files.load_array(path) for name, path in paths.items()}
  return arrays, files.read_json(os.path.join(directory, "meta.json"))
