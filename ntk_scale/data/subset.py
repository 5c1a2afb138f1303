"""Class-balanced subsets, as the kernel jobs use (Loo et al.: 500 images of one class or of all)."""

from typing import Sequence

import numpy as np


def class_balanced_subset(labels: np.ndarray, size: int, seed: int,
                          classes: Sequence[int] | None = None) -> np.ndarray:
  """Indices of `size` examples, the same number from each of `classes` (default: all labels).

  Deterministic in `seed`; returned grouped by class, in the order of `classes`, and within a
  class in increasing index order, so a kernel over the subset has one block per class.
  """
  labels = np.asarray(labels)
  classes = np.unique(labels) if classes is None else np.asarray(classes)
  repeated = sorted({int(c) for c in classes if np.count_nonzero(classes == c) > 1})
  if repeated:  # each listing would draw its own examples: the subset would repeat some of them
    raise ValueError(f"classes {classes.tolist()} list class(es) {repeated} more than once; a "
                     f"class-balanced subset takes each class once.")
  if size <= 0 or size % len(classes):
    raise ValueError(f"subset size {size} must be a positive multiple of the number of classes "
                     f"({len(classes)}).")
  per_class = size // len(classes)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in classes:
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise ValueError(f"class {c} has {len(members)} examples; a balanced subset of {size} needs "
                       f"{per_class} per class.")
    chosen.append(np.sort(rng.choice(members, per_class, replace=False)))
  return np.concatenate(chosen)


def scarcest_class(labels: np.ndarray, classes: Sequence[int]) -> tuple[int, int]:
  """(class, count) of the class of `classes` with the fewest examples in `labels`: a balanced subset
  of these classes takes at most `count` of each. One count, no sampling, so config checks call it
  before any compute and name their own fields."""
  labels = np.asarray(labels)
  return min(((int(c), int(np.count_nonzero(labels == c))) for c in classes), key=lambda cc: cc[1])
