"""Global batches in a deterministic order: epoch e of seed s is always the same permutation."""

from typing import Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from ntk_scale import parallel
from ntk_scale.config_numbers import is_whole_number
from ntk_scale.data.dataset import Split


# jax.random.key keeps a seed's low 32 bits without x64 (key(2**32 + 4) is key(4): two runs of one
# stream) and takes none of 2**63 or more.
SEED_LIMIT = 2**32


def check_seed(seed: object, field: str) -> None:
  """Raises ValueError naming `field` unless `seed` is an integer in [0, 2**32): numpy's generators
  take no negative seed, and jax's would alias a larger one or fail mid-run, after the config was
  recorded, without naming the field."""
  if not is_whole_number(seed, 0) or seed >= SEED_LIMIT:
    raise ValueError(f"{field}={seed!r} must be an integer in [0, 2**32).")


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The permutation of the training set used in `epoch`; a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


class TrainBatches:
  """Training batches addressed by global step; the last partial batch of an epoch is dropped.

  Addressing by step rather than iterating makes resumption exact: step k of a resumed run
  reads the same rows as step k of an uninterrupted one.
  """

  def __init__(self, split: Split, global_batch_size: int, seed: int, mesh: Mesh):
    if len(split) < global_batch_size:
      raise ValueError(f"config.batch_size={global_batch_size} exceeds the {len(split)} training "
                       f"examples.")
    self._arrays = {"images": split.images, "labels": split.labels}
    self._num_examples = len(split)
    self._batch_size = global_batch_size
    self._seed = seed
    self._mesh = mesh
    self._cached_epoch = (None, None)
    self.steps_per_epoch = len(split) // global_batch_size

  def _order(self, epoch: int) -> np.ndarray:
    if self._cached_epoch[0] != epoch:
      self._cached_epoch = (epoch, epoch_order(self._num_examples, self._seed, epoch))
    return self._cached_epoch[1]

  def rows(self, step: int) -> np.ndarray:
    """Global row indices of the batch at `step`."""
    epoch, i = divmod(step, self.steps_per_epoch)
    return self._order(epoch)[i * self._batch_size:(i + 1) * self._batch_size]

  def __call__(self, step: int) -> dict[str, jax.Array]:
    return parallel.global_batch(self._mesh, self._arrays, self.rows(step))


def eval_batches(split: Split, global_batch_size: int, mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
  """The whole split in order; the last batch is padded and its padding has mask 0."""
  arrays = {"images": split.images, "labels": split.labels,
            "mask": np.ones(len(split), np.float32)}
  n = len(split)
  for start in range(0, n, global_batch_size):
    rows = np.arange(start, start + global_batch_size)
    batch = parallel.global_batch(mesh, arrays, np.minimum(rows, n - 1))
    if rows[-1] >= n:  # zero the mask of padding rows
      pad = {"mask": (rows < n).astype(np.float32)}
      batch["mask"] = parallel.global_batch(mesh, pad, np.arange(global_batch_size))["mask"]
    yield batch
