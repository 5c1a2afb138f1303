"""Saved adversarial sets: `<workdir>/adversarial/<name>/`, plain .npy arrays and a JSON record.

Format (read with `np.load(path, allow_pickle=False)` from any language with an npy reader):
  images.npy             float32 [N, H, W, C] in [0, 1], the adversarial examples
  labels.npy             int32 [N], true labels
  predictions.npy        int32 [N], the attacked model's predictions on `images`
  clean_predictions.npy  int32 [N], its predictions on the clean inputs
  meta.json              attack config, dataset, split, checkpoint step, accuracies
The directory is written under a temporary name and renamed, so a reader never sees half a set.
"""

import json
import os
import shutil
from typing import Any

import numpy as np

ARRAYS = ("images", "labels", "predictions", "clean_predictions")


def save_adversarial_set(directory: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
  """Writes the set atomically, replacing any previous set of that name."""
  missing = set(ARRAYS) - set(arrays)
  if missing:
    raise ValueError(f"adversarial set {directory} lacks arrays {sorted(missing)}")
  tmp = directory.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for name in ARRAYS:
    np.save(os.path.join(tmp, f"{name}.npy"), arrays[name], allow_pickle=False)
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  if os.path.exists(directory):
    shutil.rmtree(directory)
  os.replace(tmp, directory)


def load_adversarial_set(directory: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The arrays and record of a saved set; a clear error when it is missing or incomplete."""
  paths = {name: os.path.join(directory, f"{name}.npy") for name in ARRAYS}
  absent = [p for p in [*paths.values(), os.path.join(directory, "meta.json")] if not os.path.exists(p)]
  if absent:
    raise FileNotFoundError(f"{directory} is not a complete adversarial set; missing {absent}. "
                            f"Sets are written by the train or evaluate job with save_adversarial=True.")
  arrays = {name: np.load(path, allow_pickle=False) for name, path in paths.items()}
  with open(os.path.join(directory, "meta.json")) as f:
    return arrays, json.load(f)
