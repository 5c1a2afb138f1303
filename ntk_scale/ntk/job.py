"""The `kernel` job: the empirical NTK of one checkpoint on a class-balanced subset, streamed to
`<workdir>/kernels/<name>/` tile by tile (see store.py), resumable.

    python main.py --config configs/digits.py --workdir workdirs/digits \
        --config.job=kernel --config.kernel.logits=trace --config.kernel.num_examples=500
"""

import contextlib
import functools
import logging
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from ntk_scale import files, parallel
from ntk_scale.config_numbers import is_finite_number, is_whole_number
from ntk_scale.data import (Dataset, check_seed, check_subset_size, class_balanced_subset,
                            load_dataset)
from ntk_scale.matmul_precision import check_precision, default_precision
from ntk_scale.ntk.engine import fit_plan, run_tiles
from ntk_scale.ntk.plan import FACTORING_MODES, METHODS, KernelPlanError, check_settings
from ntk_scale.ntk.store import (KernelStore, SecondsKept, TileWriter, agreed_done_tiles,
                                 open_on_every_process)
from ntk_scale.ntk.tile_math import parse_logits
from ntk_scale.preemption import Preempted, preemption_notices
from ntk_scale.profile import StepProfile, check_profile_steps
from ntk_scale.workdir import phase2_name

KERNELS_DIR = "kernels"
SPLITS = ("train", "test")
# The fields that make two kernels the same kernel; anything else (method, tile, budget) is how.
# A resumed kernel keeps how it was started (tile, method, factored layers), so that it equals the
# kernel of an uninterrupted run.
IDENTITY = ("source", "split", "logits", "dtype", "precision", "shape")
FIELDS = {"method": "config.kernel.method", "tile_size": "config.kernel.tile_size",
          "memory_budget": "config.kernel.memory_budget_gb", "logits": "config.kernel.logits",
          "rotate": "config.kernel.rotate", "band": "config.kernel.band",
          "logit_chunk": "config.kernel.logit_chunk",
          "factored_layers": "config.kernel.factored_layers"}


def check_kernel_config(config: ml_collections.ConfigDict, num_classes: int,
                        labels: np.ndarray | None) -> None:
  """Every config.kernel field, before anything is restored or computed; `labels` are those of
  config.kernel.split (None when that names no split)."""
  k = config.kernel
  parse_logits(k.logits, num_classes, "config.kernel.logits")
  check_precision(k.precision, "config.kernel.precision")
  check_profile_steps(config.get("profile_steps", 0))
  if k.method not in METHODS:
    raise ValueError(f"config.kernel.method={k.method!r} is not a kernel method; expected one of "
                     f"{', '.join(METHODS)}.")
  if k.dtype not in ("float32", "float64"):
    raise ValueError(f"config.kernel.dtype={k.dtype!r}; expected 'float32' or 'float64'.")
  parallel.check_float64_devices(k.dtype, "config.kernel.dtype",
                                 "use 'float32' (matmuls at config.kernel.precision 'highest')")
  if k.factored_layers not in FACTORING_MODES:
    raise ValueError(f"config.kernel.factored_layers={k.factored_layers!r}; expected one of "
                     f"{', '.join(FACTORING_MODES)}.")
  if not is_whole_number(k.phase) or k.phase not in (1, 2):
    raise ValueError(f"config.kernel.phase={k.phase!r}; expected 1 (the network) or 2 (phase 2's "
                     "linearized model).")
  check_kernel_subset(config, num_classes, labels)
  for name in ("tile_size", "band", "logit_chunk"):
    if not is_whole_number(k[name], 0):
      raise ValueError(f"config.kernel.{name}={k[name]!r} must be an integer >= 0 (0: chosen from "
                       "the memory budget).")
  budget = k.memory_budget_gb
  if not (budget == math.inf or is_finite_number(budget) and budget >= 0):
    raise ValueError(f"config.kernel.memory_budget_gb={budget!r} must be a number >= 0 (0: 80% of "
                     "the device's memory; inf: no limit).")
  if "/" in k.name or k.name in (".", ".."):
    raise ValueError(f"config.kernel.name={k.name!r} must be a plain directory name.")


def check_kernel_subset(config: ml_collections.ConfigDict, num_classes: int,
                        labels: np.ndarray | None) -> None:
  """config.kernel.split, num_examples and classes: the class-balanced subset `select_examples` draws
  from the split's `labels` (None when config.kernel.split names no split) exists. Counts labels
  already in memory: no sampling, nothing restored."""
  k = config.kernel
  if k.split not in SPLITS or labels is None:
    raise ValueError(f"config.kernel.split={k.split!r}; expected one of {', '.join(SPLITS)}.")
  check_seed(k.subset_seed, "config.kernel.subset_seed")
  classes = tuple(k.classes)
  if any(not is_whole_number(c) or not 0 <= c < num_classes for c in classes):
    raise ValueError(f"config.kernel.classes={classes} must be class indices in [0, {num_classes}).")
  repeated = sorted({c for c in classes if classes.count(c) > 1})
  if repeated:  # each listing would draw its own sample: the subset would repeat examples
    raise ValueError(f"config.kernel.classes={classes} lists class(es) {repeated} more than once; a "
                     f"class-balanced subset takes each class once.")
  check_subset_size("config.kernel.num_examples", k.num_examples, labels,
                    classes or range(num_classes), k.split,
                    f" with config.kernel.classes={classes}{f' (all {num_classes})' if not classes else ''}")


def plan_settings(k: ml_collections.ConfigDict) -> dict:
  """`plan_for`'s settings from config.kernel: 0 and None leave a setting to the planner."""
  return dict(method=k.method, tile_size=k.tile_size or None, band=k.band or None,
              logit_chunk=k.logit_chunk or None, rotate=k.rotate,
              memory_budget_bytes=k.memory_budget_gb * 2**30 or None,
              factored_layers=k.factored_layers, fields=FIELDS)


def select_examples(config: ml_collections.ConfigDict, labels: np.ndarray) -> np.ndarray:
  """Indices into the split: a class-balanced subset (Loo et al.: 500), or every example."""
  k = config.kernel
  if k.num_examples == 0:
    return np.arange(len(labels)) if not k.classes else np.flatnonzero(np.isin(labels, k.classes))
  return class_balanced_subset(labels, k.num_examples, k.subset_seed, k.classes or None)


def kernel_name(config: ml_collections.ConfigDict, epoch: float, num_examples: int) -> str:
  """config.kernel.name, or one made of what the kernel is of; a phase-2 kernel names its experiment
  (config.phase2.name), so the kernels of several phase-2 experiments live side by side."""
  k = config.kernel
  if k.name:
    return k.name
  phase = "phase1" if k.phase == 1 else f"phase2_{phase2_name(config)}"
  return f"{phase}_epoch{epoch:g}_{subset_and_logits_name(k, num_examples)}"


def subset_and_logits_name(k: ml_collections.ConfigDict, num_examples: int) -> str:
  """`<split><N>[of<classes>]_<logits>` of a kernel section: train500_class0 (logit 0 of 500
  training images of every class), train142of0_trace (the traced kernel of class 0's 142), so a
  kernel restricted to some classes is not taken for one of every class of the same size."""
  classes = f"of{'-'.join(str(int(c)) for c in sorted(k.classes))}" if k.classes else ""
  logits = f"class{k.logits}" if str(k.logits).isdigit() else k.logits
  return f"{k.split}{num_examples}{classes}_{logits}"


@functools.lru_cache(maxsize=8)
def inference_apply(model, precision: str | None = None) -> Callable:
  """`f(params, x, batch_stats)` of a model in inference mode, one per model: the engine compiles
  per function, so every checkpoint of one model (the evolution job) shares one compilation.

  With `precision` (config.kernel.precision) its matmuls and convolutions are traced at that level,
  forward and backward: the eigen jobs' Jacobian rows are then the kernel's own. None leaves them
  to the caller's context (the tile loop sets config.kernel.precision around every program)."""
  def apply_fn(params, x, batch_stats):
    return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

  if precision is None:
    return apply_fn

  def at_precision(params, x, batch_stats):
    with default_precision(precision):
      return apply_fn(params, x, batch_stats)
  return at_precision


def kernel_job(config: ml_collections.ConfigDict, workdir: str,
               dataset: Dataset | None = None) -> dict[str, Any]:
  """Plans, prints the plan, then computes every tile not yet on disk. `dataset`: config.data
  already loaded by the job that asks for the kernel (a tfds split takes seconds to read again)."""
  from ntk_scale.restore import restore_for_inference  # the kernel job's only tie to training

  k = config.kernel
  dataset = dataset or load_dataset(config.data)
  split = getattr(dataset, k.split) if k.split in SPLITS else None
  check_kernel_config(config, dataset.num_classes, split.labels if split else None)
  indices = select_examples(config, split.labels)
  images, labels = split.images[indices], split.labels[indices]

  restored = restore_for_inference(config, workdir, phase=k.phase,
                                   epoch=None if k.epoch is None else float(k.epoch))
  model, batch_stats = restored.model, restored.variables.get("batch_stats", {})
  apply_fn = inference_apply(model)

  directory = os.path.join(workdir, KERNELS_DIR, kernel_name(config, restored.epoch, len(indices)))
  spec = parse_logits(k.logits, dataset.num_classes)
  meta = {"source": {"phase": int(k.phase), "epoch": float(restored.epoch), "step": int(restored.step),
                     "checkpoint": os.path.relpath(restored.checkpoint_dir, workdir),
                     "model": repr(model) if k.phase == 2 else config.model.name},
          "split": k.split, "logits": spec.describe(), "dtype": k.dtype, "precision": k.precision,
          "shape": [len(indices), len(indices), *spec.tile_suffix], "num_classes": dataset.num_classes,
          "data": config.data.name,
          "complete": False}  # until the last tile is stored: a kill leaves it so (an existing kernel keeps its own)
  existing = KernelStore.open(directory) if files.exists(os.path.join(directory, "kernel.json")) else None
  tile = k.tile_size or None
  if existing is not None:
    existing.check_same(meta, IDENTITY, indices)  # before any compilation or compute
    if tile and min(tile, len(indices)) != existing.tile:  # the plan clips a tile to the kernel
      raise ValueError(f"config.kernel.tile_size={tile} but {directory} was started with tile "
                       f"{existing.tile}; unset the field to resume, or use another "
                       f"config.kernel.name.")
    tile = existing.tile
    started_with = existing.meta["method"]
    if k.method not in ("auto", started_with):
      raise ValueError(f"config.kernel.method={k.method!r} but {directory} was started with method "
                       f"{started_with!r}; set it to 'auto' to resume, or use another "
                       f"config.kernel.name.")
    method = started_with
    settings = plan_settings(k)
    check_settings(spec, method=method, tile=tile, band=settings["band"],
                   logit_chunk=settings["logit_chunk"], fields=FIELDS)
    # Read back: no plan, no compilation, whatever this machine's memory; unless a chunk is gone.
    if existing.meta.get("complete") and not parallel.agree(
        jax.process_index() == 0 and bool(existing.drop_tiles_without_chunks(mirror=True))):
      if jax.process_index() == 0:
        print(f"kernel {directory} is complete: read back", flush=True)
      return {"kernel": directory, "shape": existing.meta["shape"], "tiles": len(existing.done_tiles()),
              "tiles_computed": 0, "seconds": 0.0, "method": method, "tile": existing.tile,
              "tflop_per_s": 0.0, "complete": True}
  else:
    method = k.method

  with jax.enable_x64(True) if k.dtype == "float64" else contextlib.nullcontext():
    host_copy = lambda a: parallel.local_copy(a).astype(k.dtype, copy=False)
    params = jax.tree.map(host_copy, restored.variables["params"])
    batch_stats = jax.tree.map(host_copy, batch_stats)
    images = images.astype(k.dtype)
    mesh = parallel.make_mesh()
    try:
      plan = fit_plan(apply_fn, params, images, None, k.logits, mesh=mesh, precision=k.precision,
                      **{**plan_settings(k), "tile_size": tile, "method": method},
                      model_state=batch_stats)
    except KernelPlanError as error:
      if existing is None or k.tile_size:
        raise
      raise KernelPlanError(f"{directory} was started with tile {existing.tile}, which these "
                            f"settings cannot resume: {error} Use another config.kernel.name to "
                            f"start a new kernel.") from error
    if jax.process_index() == 0:
      print(f"kernel plan: {plan.describe()}", flush=True)
    leaf_names = [jax.tree_util.keystr(path)
                  for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    meta.update(tile=plan.tile, method=plan.method,
                factored=[leaf_names[layer.leaf] for layer in plan.factored_layers])
    if existing is not None and existing.meta.get("factored", meta["factored"]) != meta["factored"]:
      raise ValueError(f"config.kernel.factored_layers={k.factored_layers!r} factors "
                       f"{meta['factored']}, but {directory} was started factoring "
                       f"{existing.meta['factored']}; set the field as it was to resume, or use "
                       f"another config.kernel.name.")
    store = open_on_every_process(directory, meta, IDENTITY, indices, labels)
    done = agreed_done_tiles(store, plan.tiles(), mirror=True)
    total = len(plan.tiles())
    if done and jax.process_index() == 0:
      print(f"resuming {directory}: {len(done)} of {total} tiles already on disk", flush=True)
    stopped, clock = [], SecondsKept(store)
    with preemption_notices() as noticed:

      def stop(step: int) -> bool:
        """After each step: keeps kernel.json's seconds current; on a preemption notice, stops
        (the finished tiles are stored first)."""
        clock.tick()
        if noticed():
          stopped.append(step)
        return bool(stopped)

      with TileWriter(store, mirror=True) as write:  # tiles go to disk while the next are computed
        computed = run_tiles(apply_fn, params, images, None, plan, write, precision=k.precision,
                             done=done, mesh=mesh, model_state=batch_stats, stop=stop,
                             profile=StepProfile(directory, 0, None, config.get("profile_steps", 0),
                                                 skip=0))  # compiled by the plan's memory check
    seconds = time.time() - clock.started
  parallel.barrier("kernel tiles written")
  logging.info("kernel %s: this process computed %d tiles in %.1f s", directory, computed, seconds)
  finished = store.done_tiles()
  remaining = total - len(finished)
  computed = len(finished - done)  # by every process
  fraction = computed / max(total, 1)
  result = {"kernel": directory, "shape": meta["shape"], "tiles": total, "tiles_computed": computed,
            "seconds": seconds, "method": plan.method, "tile": plan.tile,
            "tflop_per_s": plan.flops * fraction / max(seconds, 1e-9) / 1e12, "complete": remaining == 0}
  if jax.process_index() == 0:
    store.update_meta(complete=remaining == 0, seconds=clock.total(seconds))
  # Readers on every process (the spectrum's) refuse a kernel.json that does not say complete yet.
  parallel.barrier("kernel metadata written")
  if stopped and remaining:
    raise Preempted(f"{len(finished)} of {total} tiles of {directory} are stored", stopped[0])
  return result
