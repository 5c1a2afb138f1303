"""The `eigen_images` job: an image for each top eigenvector of a class kernel K_c, and for its dual
weights K_c^{-1} y_c (see eigen_images.py), to `<workdir>/eigen_images/<kernel name>/`:
eigen_images.png (rows: eigenvectors, then the dual weights; columns: the image of +v, of -v),
images.npz and cosines.json (the cosine each image reached, and from grey). A rerun reloads them.

    python main.py --config configs/digits.py --workdir workdirs/digits --config.job=eigen_images \
        --config.eigen_images.logit=3

The kernel is the kernel job's for config.kernel with config.eigen_images.logit / epoch in place of
config.kernel.logits / epoch when set (found on disk, or computed first). Eigenvectors have the sign
that makes their entries sum to >= 0. cosines.json also records |J_c(X)^T u|^2 / lambda, which is 1
when the kernel on disk belongs to the restored checkpoint.

Kernels of any size: up to kernel_eigenpairs.DENSE_MAX_ROWS examples (config.eigen_images.eigensolver
"auto"), or with "dense", the kernel is read whole for a float64 eigh and a dense ridge solve
(config.eigen_images.solver); above it, or with "top", the eigenvectors are the spectrum job's top
eigenpairs (read back when already solved) and the dual weights come from conjugate gradients on
the kernel on disk, one streamed pass per iteration, preconditioned by those eigenpairs
(kernel_regression.ridge_coefficients_cg); cosines.json records the eigensolver and CG's iterations
and residual.

Measured (2-core CPU, 1 min each; the benign `make demo` digits CNN after 15 epochs, 500-image
kernels, default 300 Adam steps at 0.05): for classes 0 and 3 the +v images of the top four
eigenvectors reach cos 0.89/0.64/0.51/0.55 and 0.89/0.75/0.69/0.61 (from grey: 0.61/-0.18/0.04/
0.09 and 0.40/0.32/0.38/0.21). They are stroke patterns on a black background, not recognisable
digits at 8x8: eigenvector 0 of class 3 a bright vertical stroke in the central columns, where
most digits put ink, of class 0 a loop around a darker centre; the next ones vertical bars and
curved strokes. The -v image of eigenvector 0 is a smooth bright blob that stays at cos +0.35
(class 0) and +0.21 (class 3): the descent found no image whose gradient opposes the kernel's
dominant direction. The dual weights (ridge 1e-3) reach only cos 0.28 / 0.25 with noisy images
(K^{-1} y weights the small eigenvalues most). With eigensolver=top (class 3; the spectrum job's
top 100 in float32, dual weights by CG: 31 iterations to relative residual 5.8e-7) every cosine
is within 0.006 of these.
"""

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ntk_scale import files, parallel
from ntk_scale.config_numbers import is_finite_number, is_whole_number
from ntk_scale.data import load_dataset, num_classes
from ntk_scale.kernel_regression import (check_regression_config, regression_targets, ridge_coefficients,
                                         ridge_coefficients_cg)
from ntk_scale.ntk.eigen_features import parameter_directions
from ntk_scale.ntk.eigen_images import class_logit, optimise_images
from ntk_scale.ntk.job import SPLITS, check_kernel_config, inference_apply, kernel_job, select_examples
from ntk_scale.ntk.kernel_eigenpairs import (check_eigensolver, describe_choice, eigenpairs_config,
                                             top_eigenpairs)
from ntk_scale.ntk.spectrum import Eigenpairs, StoredKernelOperator, eigh
from ntk_scale.ntk.spectrum_job import check_spectrum_config, solve_settings
from ntk_scale.ntk.store import KernelStore
from ntk_scale.ntk.tile_math import parse_logits

IMAGES_DIR = "eigen_images"
PIXEL_RANGE = (0.0, 1.0)  # every dataset's images (ntk_scale/data/dataset.py); grey is the middle
RESULT_FILE, IMAGES_FILE, PLOT_FILE = "cosines.json", "images.npz", "eigen_images.png"


def kernel_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config whose config.kernel is this job's kernel; checks config.eigen_images first."""
  e = config.eigen_images
  for field, low in (("num_eigenvectors", 1), ("steps", 1), ("cg_max_iters", 1)):
    if not is_whole_number(e[field], low):
      raise ValueError(f"config.eigen_images.{field}={e[field]!r} must be an integer >= {low}.")
  for field, why in (("learning_rate", "Adam, on [0, 1] pixels"),
                     ("cg_tol", "CG's relative residual ||y - (K + lambda I) x|| / ||y||")):
    value = e[field]
    if not (is_finite_number(value) and value > 0):
      raise ValueError(f"config.eigen_images.{field}={value!r} must be a number > 0 ({why}).")
  check_regression_config(e, "config.eigen_images")
  check_eigensolver(e.eigensolver, "config.eigen_images.eigensolver")
  config = config.copy_and_resolve_references()
  if e.logit != "":
    config.kernel.logits = str(e.logit)
  if e.epoch is not None:
    config.kernel.epoch = e.epoch
  field = "config.eigen_images.logit" if e.logit != "" else "config.kernel.logits"
  if parse_logits(config.kernel.logits, num_classes(config.data), field).kind != "class":
    raise ValueError(f"{field}={config.kernel.logits!r}: eigen-images need the kernel of one class "
                     f"(a class index such as '0').")
  if e.num_eigenvectors > config.kernel.num_examples > 0:
    raise ValueError(f"config.eigen_images.num_eigenvectors={e.num_eigenvectors} exceeds the "
                     f"kernel's {config.kernel.num_examples} examples (config.kernel.num_examples).")
  return config


def check_num_eigenvectors(e: ml_collections.ConfigDict, size: int) -> None:
  """config.eigen_images.num_eigenvectors at most the class kernel's `size` examples (kernel_config
  checks a num_examples set; 0 takes the whole class, known once its labels are)."""
  if e.num_eigenvectors > size:
    raise ValueError(f"config.eigen_images.num_eigenvectors={e.num_eigenvectors} exceeds the {size} "
                     f"examples of the class kernel (config.kernel.num_examples, classes).")


def _plot(images: np.ndarray, titles: list[str], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = len(images) // 2
  fig, axes = plt.subplots(rows, 2, figsize=(4.4, 2.2 * rows + 0.4), squeeze=False)
  for ax, image, name in zip(axes.ravel(), images, titles):
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
    ax.set_title(name, fontsize=7)
    ax.set_axis_off()
  fig.suptitle(title, fontsize=8)
  files.save_figure(fig, path, dpi=120)


def _targets(store: KernelStore, num_classes: int) -> np.ndarray:
  """The regression targets Y (one-hot minus 1/C) of the kernel's examples, [N, C] float64."""
  with jax.enable_x64(True), jax.default_device(parallel.float64_device()):
    return np.asarray(regression_targets(jnp.asarray(store.labels()), num_classes, jnp.float64))


def dense_weights(store: KernelStore, num_classes: int, c: int, e: ml_collections.ConfigDict
                  ) -> tuple[Eigenpairs, np.ndarray, dict]:
  """Every eigenpair of the kernel read whole (float64 eigh) and its dual weights (K + lambda I)^{-1}
  y_c by config.eigen_images.solver; non-finite weights (Cholesky of a singular kernel) raise, not
  written as NaN."""
  matrix = store.read().astype(np.float64)
  pairs = eigh(matrix, name=f"kernel {store.directory}")
  with jax.enable_x64(True), jax.default_device(parallel.float64_device()):
    dual = np.asarray(ridge_coefficients(jnp.asarray(matrix), jnp.asarray(_targets(store, num_classes)),
                                         e.regularizer, e.solver))[:, c]
  if not np.all(np.isfinite(dual)):
    raise FloatingPointError(f"config.eigen_images.regularizer={e.regularizer!r} with "
                             f"config.eigen_images.solver={e.solver!r} gave non-finite dual weights: "
                             f"the kernel is singular or not positive definite; raise the regularizer "
                             f"or use solver 'eigh' or 'lstsq'.")
  return pairs, dual, {"method": e.solver}


def top_weights(config: ml_collections.ConfigDict, workdir: str, kernel: dict, num_classes: int,
                c: int, e: ml_collections.ConfigDict) -> tuple[Eigenpairs, np.ndarray, dict]:
  """config.spectrum's top eigenpairs (the spectrum job's: solved, resumed or read back) and the
  dual weights by CG on the kernel on disk, preconditioned by those eigenpairs: nothing reads the
  kernel whole. Every process solves the same system from the same files, as each decomposes the
  kernel in dense mode."""
  pairs, trace = top_eigenpairs(config, workdir, kernel)
  store = KernelStore.open(kernel["kernel"])
  shift = e.regularizer * trace / store.shape[0]  # ridge_coefficients' lambda: mean(diag K) = Tr K / N
  dual, solve = ridge_coefficients_cg(StoredKernelOperator(store, "float64"),
                                      _targets(store, num_classes)[:, c], shift,
                                      (pairs.values, pairs.vectors), e.cg_tol, e.cg_max_iters)
  if not solve["converged"] and jax.process_index() == 0:
    print(f"warning: CG for the dual weights stopped after {solve['iterations']} iterations at "
          f"relative residual {solve['relative_residual']:.2e} > {e.cg_tol:g}; raise "
          f"config.eigen_images.cg_max_iters (or config.eigen_images.regularizer).", flush=True)
  return pairs, dual, solve


def eigen_images_job(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Kernel (found or computed), its eigenvectors and dual weights, one optimised image per sign."""
  from ntk_scale.restore import restore_for_inference  # pylint: disable=import-outside-toplevel

  e = config.eigen_images
  config = kernel_config(config)
  dataset = load_dataset(config.data)
  split = getattr(dataset, config.kernel.split) if config.kernel.split in SPLITS else None
  check_kernel_config(config, dataset.num_classes, split.labels if split else None)
  size = len(select_examples(config, split.labels))  # a class kernel: one matrix row per example
  check_num_eigenvectors(e, size)
  solver, spectrum_config = eigenpairs_config(config, e.eigensolver, size, e.num_eigenvectors)
  if solver == "top":
    check_spectrum_config(spectrum_config, dataset.num_classes)
  c = int(config.kernel.logits)
  if jax.process_index() == 0:
    choice = describe_choice(solver, e.eigensolver, "config.eigen_images.eigensolver", size,
                             spectrum_config.spectrum.num_eigenpairs)
    dual_by = e.solver if solver == "dense" else "conjugate gradients"
    print(f"eigen-images of class {c}: {choice}, dual weights by {dual_by}", flush=True)
  kernel = kernel_job(config, workdir, dataset)
  if not kernel["complete"]:
    raise RuntimeError(f"kernel {kernel['kernel']} is not complete; rerun to resume it.")
  directory = os.path.join(workdir, IMAGES_DIR, os.path.basename(kernel["kernel"]))
  result_path = os.path.join(directory, RESULT_FILE)
  settings = {"num_eigenvectors": e.num_eigenvectors, "steps": e.steps, "learning_rate": e.learning_rate,
              "regularizer": e.regularizer, "eigensolver": solver,
              "kernel": KernelStore.open(kernel["kernel"]).identity_digest()}  # a recomputed kernel too
  settings.update({"solver": e.solver} if solver == "dense" else
                  {"spectrum": solve_settings(spectrum_config.spectrum), "cg_tol": e.cg_tol,
                   "cg_max_iters": e.cg_max_iters})
  saved = files.read_result(result_path, settings)
  if saved is not None:
    return {"eigen_images": directory, **saved}

  store = KernelStore.open(kernel["kernel"])
  pairs, dual, dual_solver = (
      dense_weights(store, dataset.num_classes, c, e) if solver == "dense"
      else top_weights(spectrum_config, workdir, kernel, dataset.num_classes, c, e))
  k = min(e.num_eigenvectors, len(pairs.values))
  vectors = pairs.vectors[:, :k]  # oriented: entries summing to >= 0
  weights = np.concatenate([vectors, dual[:, None]], axis=1)  # [N, k + 1]

  restored = restore_for_inference(config, workdir, phase=config.kernel.phase,
                                   epoch=store.meta["source"]["epoch"], fields="config.eigen_images")
  params, batch_stats = restored.host_variables()
  model_apply = inference_apply(restored.model, config.kernel.precision)  # as the kernel's rows
  apply_fn = lambda p, x: model_apply(p, x, batch_stats)
  logit_fn = class_logit(apply_fn, c)
  train_images = getattr(dataset, config.kernel.split).images[store.indices()]
  unit_weights = (weights / np.linalg.norm(weights, axis=0)).astype(np.float32)
  # J_c(X)^T u over every device, a memory budget's examples at a time: the subset may be large
  directions = jnp.asarray(parameter_directions(apply_fn, params, train_images, unit_weights[None],
                                                parse_logits(c, dataset.num_classes))[0, 0])
  # |v|^2 = u^T K u = lambda for a unit eigenvector: the kernel on disk is this model's.
  direction_check = (np.sum(np.asarray(directions[:k], np.float64) ** 2, -1) / pairs.values[:k]).tolist()

  directions = jnp.repeat(directions, 2, axis=0)  # +v, -v for every row
  signs = jnp.tile(jnp.array([1.0, -1.0]), k + 1)
  grey = jnp.full((len(signs), *train_images.shape[1:]), sum(PIXEL_RANGE) / 2, jnp.float32)
  run = lambda steps: optimise_images(logit_fn, params, directions, signs, grey, steps,
                                      learning_rate=float(e.learning_rate), pixel_range=PIXEL_RANGE)
  _, initial = run(0)  # the same program: the step count is traced
  images, final = jax.device_get(run(e.steps))
  names = [f"eigenvector {i}" for i in range(k)] + ["dual weights"]
  record = {"settings": settings, "source_kernel": kernel["kernel"], "class": c, "epoch": store.meta["source"]["epoch"],
            "steps": e.steps, "learning_rate": e.learning_rate, "regularizer": e.regularizer,
            "eigensolver": solver, "dual_solver": dual_solver,
            "eigenvalues": pairs.values[:k].tolist(), "direction_norm_over_eigenvalue": direction_check,
            "rows": [{"name": name, "positive_cosine": float(final[2 * i]),
                      "negative_cosine": float(final[2 * i + 1]),
                      "grey_cosine": float(initial[2 * i])} for i, name in enumerate(names)]}
  if jax.process_index() == 0:
    files.make_dirs(directory)
    files.write_atomic(os.path.join(directory, IMAGES_FILE),
                  lambda f: np.savez(f, images=images, signs=np.asarray(signs), weights=weights))
    titles = [f"{name}{f' (λ={pairs.values[i // 2]:.3g})' if i < 2 * k else ''} {'+' if s > 0 else '-'}v"
              f"\ncos {cos:+.3f}" for i, (name, s, cos) in
              enumerate(zip(np.repeat(names, 2), np.asarray(signs), final))]
    _plot(images, titles, os.path.join(directory, PLOT_FILE),
          f"{os.path.basename(kernel['kernel'])}: images x maximising ±cos(∇θ f_{c}(x), v)")
    files.write_json(result_path, record, indent=2)
    print(f"eigen-images written to {directory}", flush=True)
  return {"eigen_images": directory, **record}
