"""Class-balanced subsets, as the kernel jobs use (Loo et al.: 500 images of one class or of all)."""

from typing import Sequence

import numpy as np

from ntk_scale.config_numbers import is_whole_number


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


def check_subset_size(field: str, size: int, labels: np.ndarray, classes: Sequence[int],
                      split: str, context: str = "") -> None:
  """`field`=`size`: 0 (every example of `classes`) or a class-balanced subset of them that the
  `split` split's `labels` can supply. Counts only, no sampling: config checks call it before any
  compute, and its errors name `field` (followed by `context`, e.g. the field that chose the
  classes)."""
  groups = len(classes)
  if not is_whole_number(size) or not 0 <= size <= len(labels) or size % groups:
    raise ValueError(f"{field}={size!r}{context} must be 0 (all) or a multiple of {groups} (the "
                     f"number of classes in the subset) in [{groups}, {len(labels)}] (a "
                     f"class-balanced subset of the {split} split).")
  if size:
    scarce, count = scarcest_class(labels, classes)
    if count < size // groups:
      raise ValueError(f"{field}={size}{context} takes {size // groups} {split} examples of each "
                       f"class, but class {scarce} has {count} {split} examples: use at most "
                       f"{count * groups}, or 0 for every example of the classes.")
