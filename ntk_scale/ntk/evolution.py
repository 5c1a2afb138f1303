"""The `evolution` job: the empirical NTK of one fixed subset at several checkpoints, and how it
moves (Loo et al. 2022; Tsilivis & Kempe 2022): distance to the final kernel, relative movement
and angle from the first one (also restricted to the top and bottom eigenspaces), spectral mass,
kernel-target alignment and velocity, written to `<workdir>/kernel_evolution/<name>/`:

    metrics.json       every metric per checkpoint, the pairwise similarity matrix, the spectra
    metrics.csv        the per-checkpoint metrics as a table
    distance_to_final.png, polar.png, spectra.png

    python main.py --config configs/digits.py --workdir workdirs/digits \
        --config.job=evolution --config.kernel.num_examples=500

Each kernel is the kernel job's (`<workdir>/kernels/<name>/`), so one already on disk is reused
and an interrupted one resumes; metrics.json records what its metrics are of (each kernel's
identity, the epochs and the settings), and a rerun with the same reads them back.
Kernels are read by row panels, one at a time. Each checkpoint's spectrum is either every
eigenpair (a dense float64 eigendecomposition, the kernel in host memory) or, for large kernels
or with config.evolution.eigensolver="top", the spectrum job's top eigenpairs (kernel_eigenpairs.py),
which leaves the bottom-k eigenspace's columns empty: the smallest eigenpairs of a large kernel are
not within reach. They are empty too when the bottom-k eigenvectors are null space (a kernel of
more rows than the network has parameters): the kernel is zero there.
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from ntk_scale import files
from ntk_scale.checkpoint import is_initial, missing_initial_note, same_epoch
from ntk_scale.config_numbers import is_finite_number, is_whole_number
from ntk_scale.data import load_dataset
from ntk_scale.ntk import metrics
from ntk_scale.ntk.job import (SPLITS, check_kernel_config, kernel_job, select_examples,
                              subset_and_logits_name)
from ntk_scale.ntk.kernel_eigenpairs import (check_eigensolver, dense_eigenpairs, describe_choice,
                                             resolve_eigensolver, top_eigenpairs, with_num_eigenpairs)
from ntk_scale.ntk.spectrum import Eigenpairs, StoredKernelOperator, rounding_floor
from ntk_scale.ntk.spectrum_job import check_spectrum_config, solve_settings
from ntk_scale.ntk.store import KernelStore
from ntk_scale.ntk.tile_math import parse_logits
from ntk_scale.train.collapse import CO_FILE
from ntk_scale.train.experiment import catalog_steps_per_epoch
from ntk_scale.workdir import phase2_name

EVOLUTION_DIR = "kernel_evolution"
METRICS_JSON, METRICS_CSV = "metrics.json", "metrics.csv"
EIGENSPACE_OF = ("final", "initial")
PANEL_BYTES = 256 * 2**20  # per kernel, when the Gram matrix of all of them is streamed


def of_earlier_rules(record: dict[str, Any]) -> bool:
  """Whether metrics.json was made before its settings were recorded (2026-12-02): the job makes it
  again (velocities then came from nominal epochs, and other rules have changed since)."""
  return "settings" not in record


def evolution_name(config: ml_collections.ConfigDict, num_examples: int) -> str:
  """config.evolution.name, or phase1_<split><N>[of<classes>]_<logits> (phase2_<experiment>_... for
  phase 2)."""
  e = config.evolution
  if e.name:
    return e.name
  phase = "phase1" if e.phase == 1 else f"phase2_{phase2_name(config)}"
  return (f"{phase}_{subset_and_logits_name(config.kernel, num_examples)}"
          + ("_collapse" if e.around_collapse else ""))


def check_evolution_settings(config: ml_collections.ConfigDict) -> None:
  """The config.evolution fields that need no workdir, before anything is read or computed."""
  e = config.evolution
  if not is_whole_number(e.phase) or e.phase not in (1, 2):  # True is no phase, though True == 1
    raise ValueError(f"config.evolution.phase={e.phase!r}; expected 1 (the network) or 2 (phase 2's "
                     f"linearized model, config.phase2.name).")
  if e.eigenspace_of not in EIGENSPACE_OF:
    raise ValueError(f"config.evolution.eigenspace_of={e.eigenspace_of!r}; expected one of "
                     f"{', '.join(EIGENSPACE_OF)}.")
  check_eigensolver(e.eigensolver, "config.evolution.eigensolver")
  for field in ("top_k", "num_eigenvalues"):  # counts: 2.5 would fail after the kernels were computed
    value = e[field]
    if not is_whole_number(value, 1):
      raise ValueError(f"config.evolution.{field}={value!r} must be an integer >= 1.")
  if "/" in e.name or e.name in (".", ".."):
    raise ValueError(f"config.evolution.name={e.name!r} must be a plain directory name.")
  if not all(is_finite_number(x) for x in e.epochs):
    raise ValueError(f"config.evolution.epochs={tuple(e.epochs)!r} must be epoch numbers.")
  span = e.get("around_collapse", 0.0)
  if not (is_finite_number(span) and span >= 0):
    raise ValueError(f"config.evolution.around_collapse={span!r} must be a number of epochs >= 0 "
                     "(0: off).")
  if span and (e.epochs or e.phase != 1):
    raise ValueError("config.evolution.around_collapse chooses phase-1 epochs itself; leave "
                     "config.evolution.epochs empty and config.evolution.phase=1.")
  # select_epochs refuses these too, but only after the data and the workdir are read: refused here,
  # the dry run refuses them as well. It alone can refuse two listed epochs that are apart here but
  # both within 1e-9 of one saved checkpoint (same_epoch is not transitive): that needs the saved list.
  asked = sorted(float(x) for x in e.epochs)
  if len(asked) == 1:  # empty: every saved checkpoint
    raise ValueError(f"config.evolution.epochs selects 1 checkpoint(s) ({tuple(e.epochs)!r}); "
                     f"kernel evolution needs at least two (or leave it empty: every saved one).")
  for low, high in zip(asked, asked[1:]):
    if same_epoch(low, high):  # as select_epochs matches them
      raise ValueError(f"config.evolution.epochs lists epoch {low:g} twice "
                       f"({tuple(e.epochs)!r}); list each checkpoint once.")


def collapse_epochs(workdir: str, saved: list[float], span: float) -> tuple[list[float], dict]:
  """The saved epochs within `span` epochs of the recorded collapse (the checkpoints the CO monitor
  kept just before and after it included), and the collapse record."""
  path = os.path.join(workdir, CO_FILE)
  if not files.exists(path):
    raise ValueError(f"config.evolution.around_collapse needs {path}, which training writes when the "
                     f"catastrophic-overfitting monitor is on (config.train.co_monitor.every_steps > 0).")
  summary = files.read_json(path)
  if not summary.get("collapsed"):
    raise ValueError(f"config.evolution.around_collapse: {path} records no collapse (last measured at "
                     f"epoch {(summary.get('last') or {}).get('epoch', '?')}); nothing to look at.")
  collapse = summary["collapse"]
  kept = summary.get("checkpoint_epochs", {})
  low = kept.get("before", collapse["before"]["epoch"] if collapse.get("before") else collapse["epoch"])
  high = kept.get("after", collapse["epoch"])
  epochs = [x for x in saved if low - span - 1e-9 <= x <= high + span + 1e-9]
  record = {"epoch": collapse["epoch"], "before": low, "after": high,
            "sustained": summary.get("sustained"), "peak_epoch": collapse["peak"]["epoch"]}
  return epochs, record


def select_epochs(config: ml_collections.ConfigDict, saved: list[float], matrix_size: int
                  ) -> list[float]:
  """The checkpoints' epochs, in order: config.evolution.epochs, each one saved, or every saved
  one (phase 1's initialisation, epoch 0, included where the run saved it); and a check that
  config.evolution.top_k fits the kernel's matrix_size."""
  e = config.evolution
  if e.top_k > matrix_size:
    raise ValueError(f"config.evolution.top_k={e.top_k} must be at most {matrix_size} (the kernel is "
                     f"{matrix_size} x {matrix_size}).")
  if not e.epochs:
    epochs = list(saved)
  else:
    epochs = []
    for asked in sorted(float(x) for x in e.epochs):
      match = [s for s in saved if same_epoch(s, asked)]
      if not match:
        why = (f" ({missing_initial_note(e.phase, config.phase2.from_epoch)})"
               if saved and is_initial(asked) else "")
        raise ValueError(f"config.evolution.epochs includes {asked:g}, which phase {e.phase} did not "
                         f"save{why}; saved epochs: {saved or 'none (train this workdir first)'}.")
      if match[0] in epochs:
        raise ValueError(f"config.evolution.epochs lists epoch {asked:g} twice.")
      epochs.append(match[0])
  if len(epochs) < 2:
    raise ValueError(f"config.evolution.epochs selects {len(epochs)} checkpoint(s) of phase "
                     f"{e.phase} (saved: {saved or 'none'}); kernel evolution needs at least two.")
  return epochs


def stored_gram(stores: list[KernelStore], max_panel_bytes: int = PANEL_BYTES) -> np.ndarray:
  """metrics.frobenius_gram of kernels on disk, accumulated over row panels read in step, so no
  kernel is ever whole in memory."""
  shape = stores[0].shape
  if any(s.shape != shape for s in stores):
    raise ValueError(f"kernels of different shapes: {[s.shape for s in stores]}.")
  row_bytes = int(np.prod(shape[1:])) * 8
  rows = max(1, max_panel_bytes // row_bytes)
  gram = np.zeros((len(stores), len(stores)))
  for start in range(0, shape[0], rows):
    panel = slice(start, min(start + rows, shape[0]))
    flat = np.stack([s.read(rows=panel).astype(np.float64).reshape(-1) for s in stores])
    gram += flat @ flat.T
  return gram


def stored_products(store: KernelStore, blocks: list[np.ndarray]) -> list[np.ndarray]:
  """K B for each block B of columns, by one streamed pass over a kernel on disk (the eigenspace
  restrictions V^T K V of metrics.restrict_to_eigenspace and the label alignment's K Y share it).
  The calling process reads every panel itself: the job runs the metrics on process 0 alone, so a
  product shared between processes would wait forever for the others."""
  operator = StoredKernelOperator(store, "float64", PANEL_BYTES, process=(0, 1))
  product = operator.matmat(np.concatenate(blocks, axis=1))
  return np.split(product, np.cumsum([b.shape[1] for b in blocks])[:-1], axis=1)


def checkpoint_config(config: ml_collections.ConfigDict, epoch: float, matrix_size: int
                      ) -> ml_collections.ConfigDict:
  """config for the kernel (and spectrum) job of one checkpoint: config.kernel's subset and
  settings at this epoch; config.spectrum's, for the eigenpairs the metrics need (the top
  num_eigenvalues and top_k)."""
  e = config.evolution
  one = with_num_eigenpairs(config, max(e.num_eigenvalues, e.top_k), matrix_size)
  one.kernel.phase = int(config.evolution.phase)
  one.kernel.epoch = float(epoch)
  one.kernel.name = ""
  return one


def _movement(gram: np.ndarray) -> dict[str, np.ndarray]:
  """Similarity to the final kernel, relative movement and angle from the first, from the Gram
  matrix of the kernels (whole, or all restricted to one eigenspace)."""
  similarity = metrics.similarity_from_gram(gram)
  return {"similarity_to_final": similarity[:, -1], "distance_to_final": 1 - similarity[:, -1],
          "relative_movement": metrics.movement_from_gram(gram),
          "angle": np.arccos(similarity[:, 0])}


def null_space_size(values: np.ndarray, dtype: str) -> int:
  """How many of a kernel's eigenvalues (every one, largest first) are zero within the rounding of
  its stored `dtype` (spectrum.rounding_floor of sum |lambda|, the trace for a PSD kernel)."""
  return int(np.sum(np.abs(values) <= rounding_floor(dtype, np.abs(values).sum())))


def elapsed_epochs(stores: list[KernelStore], epochs: list[float], steps_per_epoch: int) -> list[float]:
  """Each kernel's checkpoint as epochs trained, its step over `steps_per_epoch`: a fractional
  epoch's checkpoint is at round(epoch * steps_per_epoch), e.g. step 6 of 22 for epoch 0.25 (0.273
  epochs), so its nominal epoch made an early velocity up to 27% off on digits. The nominal epochs
  where a step is not within rounding of its epoch (another batch size than the checkpoints')."""
  elapsed = [store.meta["source"]["step"] / steps_per_epoch for store in stores]
  if any(abs(t - e) > 0.5 / steps_per_epoch + 1e-12 for t, e in zip(elapsed, epochs)):
    return list(epochs)
  return elapsed


def evolution_metrics(stores: list[KernelStore], epochs: list[float], top_k: int,
                      eigenspace_of: str = "final", num_eigenvalues: int = 100,
                      top_spectra: list[tuple[Eigenpairs, float]] | None = None,
                      elapsed: list[float] | None = None) -> dict[str, Any]:
  """Every metric of the kernels in `stores` (one subset, checkpoints at `epochs`, in order);
  velocity over `elapsed` (elapsed_epochs; default the epochs).

  Spectra: every eigenpair of each kernel read whole (dense), or with `top_spectra` the top
  eigenpairs and trace of each (the spectrum job's, for kernels too large to decompose whole),
  when the bottom-k eigenspace is unknown and its columns are None. They are None too when the
  reference kernel's null space has top_k dimensions or more (more kernel rows than the network has
  parameters): its bottom-k eigenvectors would be an arbitrary part of it, on which the reference
  kernel is zero, so every bottom-k metric would compare rounding noise.
  """
  rows: list[dict[str, Any]] = [{"epoch": e, "kernel": os.path.basename(s.directory)}
                                for e, s in zip(epochs, stores)]
  spectra, reference = [], None
  for t, (row, store) in enumerate(zip(rows, stores)):
    pairs, trace = dense_eigenpairs(store) if top_spectra is None else top_spectra[t]
    spectra.append(pairs.values[:num_eigenvalues].tolist())
    row.update(top_eigenvalue=float(pairs.values[0]), trace=trace,
               spectral_mass_top_k=metrics.spectral_mass(pairs.values, top_k, trace))
    if t == (0 if eigenspace_of == "initial" else len(stores) - 1):
      reference = pairs
  gram = stored_gram(stores)
  spaces = {"top_k": reference.vectors[:, :top_k]}
  null_space = (None if top_spectra is not None
                else null_space_size(reference.values, stores[0].meta["dtype"]))
  if null_space is not None and null_space < top_k:
    spaces["bottom_k"] = reference.vectors[:, -top_k:]
  labels, num_classes = stores[0].labels(), int(stores[0].meta["num_classes"])
  targets = (metrics.label_targets(labels, num_classes, full=len(stores[0].shape) == 4)
             if np.unique(labels).size > 1 else None)  # one class: no target varies
  restricted = {space: [] for space in spaces}
  for t, (row, store) in enumerate(zip(rows, stores)):
    products = stored_products(store, list(spaces.values()) + ([] if targets is None else [targets]))
    for (space, vectors), product in zip(spaces.items(), products):
      restricted[space].append(vectors.T @ product)
    row["label_alignment"] = None if targets is None else metrics.alignment_from_parts(
        float(np.sum(targets * products[-1])), float(np.sqrt(gram[t, t])), targets)
  similarity = metrics.similarity_from_gram(gram)
  columns = {"": _movement(gram)}
  for space, kernels in restricted.items():
    columns[f"_{space}"] = _movement(metrics.frobenius_gram(kernels))
  if "bottom_k" not in spaces:
    columns["_bottom_k"] = {key: [None] * len(stores) for key in columns[""]}
  elapsed = list(epochs) if elapsed is None else elapsed
  velocity = [None] + metrics.velocity_from_similarity(similarity, elapsed).tolist()
  for t, row in enumerate(rows):
    for suffix, values in columns.items():
      for key, value in values.items():
        row[f"{key}{suffix}"] = None if value[t] is None else float(value[t])
    row["velocity"] = velocity[t]
  return {"epochs": epochs, "elapsed_epochs": elapsed, "kernels": [r["kernel"] for r in rows],
          "top_k": top_k,
          "eigenspace_of": eigenspace_of, "eigensolver": "dense" if top_spectra is None else "top",
          "null_space_size": null_space,
          "checkpoints": rows, "similarity_matrix": similarity.tolist(), "eigenvalues": spectra}


def evolution_job(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Checks every setting, computes (or finds) each checkpoint's kernel, writes metrics and plots."""
  # Imported here: training jobs need neither checkpoints restored for inference nor matplotlib.
  from ntk_scale.ntk.evolution_plots import PLOTS, plot_evolution  # pylint: disable=import-outside-toplevel
  from ntk_scale.restore import saved_epochs  # pylint: disable=import-outside-toplevel

  e, k = config.evolution, config.kernel
  check_evolution_settings(config)
  dataset = load_dataset(config.data)
  split = getattr(dataset, k.split) if k.split in SPLITS else None
  check_kernel_config(config, dataset.num_classes, split.labels if split else None)
  num_examples = len(select_examples(config, split.labels))
  spec = parse_logits(k.logits, dataset.num_classes)
  saved = saved_epochs(config, workdir, e.phase)
  collapse = None
  if e.around_collapse:
    saved, collapse = collapse_epochs(workdir, saved, e.around_collapse)
  size = spec.matrix_rows(num_examples)
  epochs = select_epochs(config, saved, size)
  solver = resolve_eigensolver(e.eigensolver, size)
  configs = [checkpoint_config(config, epoch, size) for epoch in epochs]
  if solver == "top":
    check_spectrum_config(configs[0], dataset.num_classes)
  if jax.process_index() == 0:
    print(f"kernel evolution: {len(epochs)} checkpoints of phase {e.phase} (epochs "
          f"{', '.join(f'{x:g}' for x in epochs)}), {num_examples} {k.split} examples; "
          + describe_choice(solver, e.eigensolver, "config.evolution.eigensolver", size,
                            configs[0].spectrum.num_eigenpairs, " of each kernel")
          + ("" if solver == "dense" else f", so no bottom-{e.top_k} eigenspace"), flush=True)
  kernels = [kernel_job(one, workdir) for one in configs]
  incomplete = [r["kernel"] for r in kernels if not r["complete"]]
  if incomplete:
    raise RuntimeError(f"kernels not complete after their jobs: {incomplete}; rerun to resume.")
  top_spectra = ([top_eigenpairs(one, workdir, r) for one, r in zip(configs, kernels)]
                 if solver == "top" else None)
  directory = os.path.join(workdir, EVOLUTION_DIR, evolution_name(config, num_examples))
  result = {"directory": directory, "kernels": kernels,
            "tiles_computed": sum(r["tiles_computed"] for r in kernels)}
  if jax.process_index() != 0:
    return result
  stores = [KernelStore.open(r["kernel"]) for r in kernels]
  # What the metrics are of: a rerun with the same reads them back (each dense eigendecomposition
  # and the Gram matrix's pass over every kernel were made again).
  settings = {"kernels": [store.identity_digest() for store in stores], "epochs": list(epochs),
              "top_k": e.top_k, "eigenspace_of": e.eigenspace_of, "num_eigenvalues": e.num_eigenvalues,
              "eigensolver": solver,
              "spectrum": solve_settings(configs[0].spectrum) if solver == "top" else None}
  saved = files.read_result(os.path.join(directory, METRICS_JSON), settings)
  if saved is not None and all(files.exists(os.path.join(directory, name)) for name in PLOTS):
    print(f"kernel evolution in {directory}: read back", flush=True)
    return {**result, "plots": [os.path.join(directory, name) for name in PLOTS], "metrics": saved}
  elapsed = elapsed_epochs(stores, epochs, catalog_steps_per_epoch(config))
  results = evolution_metrics(stores, epochs, e.top_k, e.eigenspace_of, e.num_eigenvalues,
                              top_spectra, elapsed)
  results["settings"] = settings
  results["phase"] = int(e.phase)
  if collapse is not None:
    results["collapse"] = collapse
  files.make_dirs(directory)
  files.write_json(os.path.join(directory, METRICS_JSON), results, indent=2)
  files.write_csv(os.path.join(directory, METRICS_CSV), results["checkpoints"])
  if results["null_space_size"] is not None and results["null_space_size"] >= e.top_k:
    print(f"kernel evolution: the {e.eigenspace_of} kernel's null space has "
          f"{results['null_space_size']} dimensions, at least config.evolution.top_k={e.top_k}: "
          f"its bottom-{e.top_k} eigenspace is null space, so those columns are empty.", flush=True)
  result["plots"] = plot_evolution(results, directory)
  result["metrics"] = results
  print(f"kernel evolution written to {directory}", flush=True)
  return result
