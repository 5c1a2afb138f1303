"""The `eigen_features` job: usefulness (clean accuracy) and robustness (accuracy under attack) of each
eigen-feature of a checkpoint's empirical NTK (see eigen_features.py), to
`<workdir>/eigen_features/<kernel name>/`: features.json, features.csv, usefulness_robustness.png
(and, until features.json is written, groups.partial/: each group's accuracies, which a killed or
preempted run takes back).

    python main.py --config configs/digits.py --workdir workdirs/digits --config.job=eigen_features \
        --config.eigen_features.attack.eps=0.1 --config.eigen_features.attack.step_size=0.025

The kernel is the kernel job's for config.kernel (computed first, or found on disk); the test
images are the first config.eigen_features.num_test of the test split, attacked with
config.eigen_features.attack against each feature group's own predictor.
Its eigenpairs are every one (dense float64 eigh of the kernel in host memory) or, above
kernel_eigenpairs.DENSE_MAX_ROWS rows or with config.eigen_features.eigensolver="top", the
spectrum job's top k (k = max(config.spectrum.num_eigenpairs, num_single)): the groups then end at
the k-th eigenvalue and the last row, "top<k>", is those k features together, not kernel regression.
Measured on digits (the command above on the benign `make demo` CNN after 15 epochs: class-0
kernel of 500 training images, all 360 test images, PGD-10 at eps 0.1; 6.6 min on 2 busy CPU
cores, one device):

    eigen-indices        clean   PGD       eigen-indices   clean   PGD
    0                    0.100   0.100     10-19           0.294   0.019
    1 .. 9 (each)        0.20    0.13-0.18 20-39           0.233   0.017
                                           40-79 .. 320-499 0.15-0.21 0.006-0.044
    all (= kernel regression)  0.994 / 0.742
The same command on the AMD EPYC VM whose benign demo model scores 99.7 / 54.7 / 52.2% (README),
with clean-misclassified test images kept clean under attack (AutoAttack's rule; 14.5 min beside
other jobs): indices 1-9 clean 0.20, PGD 0.14-0.19; 10-19 0.336 / 0.017; every later group
0.17-0.25 / 0.008-0.031; all 1.000 / 0.686.
Again on the Intel Xeon VM (2026-12-02; its demo model 100.0 / 55.3 / 50.6%), with groups up to the
float32 kernel's rounding (spectrum.rounding_floor): the demo kernel is of full rank above it, so
the groups are the same 16; indices 1-9 clean 0.19-0.20, PGD 0.12-0.19; 10-19 0.344 / 0.014; later
groups 0.20-0.27 / 0.006-0.033; all 0.997 / 0.708 (10.3 min beside the test suite).
With config.eigen_features.eigensolver=top and config.spectrum.num_eigenpairs=100 (the demo's
spectrum job's solve, read back; 4.5 min) every group up to index 79 is identical, 80-99 scores
0.153 / 0.017, and the top-100 predictor 0.994 / 0.717: as accurate as kernel regression on all
500 eigenpairs, 2.5 points less robust.
A single feature is a rank-one predictor (K(x,X) v_i times the class vector v_i^T Y), so it tells
at most two classes apart (0.20); the top ten keep most of that under attack (-0.02 to -0.07), every
group past index 10 falls to 0.01-0.04: the top eigen-features are the robust ones, the tail is
useful but not robust (as Tsilivis and Kempe find on CIFAR-10).

The infinite-width NTK shows the same (`configs/infinite_width.py:digits`, depth-2 ReLU NTK on 500
training images, 12 s):

    python main.py --config configs/infinite_width.py:digits --workdir W --config.job=eigen_features \
        --config.eigen_features.source=infinite --config.eigen_features.attack.eps=0.1 \
        --config.eigen_features.attack.step_size=0.025

indices 1-9: clean 0.17-0.20, PGD 0.07-0.19; groups past index 10: 0.26-0.41, PGD 0.000-0.039;
all: 0.972 / 0.819.
"""

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ntk_scale import files, parallel
from ntk_scale.attacks import build_attack
from ntk_scale.config_numbers import is_whole_number
from ntk_scale.data import Dataset, Split, load_dataset, num_classes
from ntk_scale.evaluate import Parameterized, evaluate
from ntk_scale.evaluation_progress import KeptResults, discard
from ntk_scale.kernel_regression import kernel_scores, regression_targets
from ntk_scale.models import build_model
from ntk_scale.ntk.eigen_features import (examples_per_device, feature_groups, feature_logits_fn,
                                          group_coefficients, most_rows, parameter_directions)
from ntk_scale.ntk.job import (KERNELS_DIR, check_kernel_subset, inference_apply, kernel_job,
                              select_examples)
from ntk_scale.ntk.kernel_eigenpairs import (check_eigensolver, describe_choice, eigenpairs_config,
                                             kernel_eigenpairs)
from ntk_scale.ntk.spectrum import eigh, rounding_floor
from ntk_scale.ntk.plan import device_budget_bytes
from ntk_scale.ntk.spectrum_job import check_spectrum_config, solve_settings
from ntk_scale.ntk.store import KernelStore
from ntk_scale.ntk.tile_math import parse_logits
from ntk_scale.preemption import preemption_notices
from ntk_scale.workdir import prepare_workdir

FEATURES_DIR = "eigen_features"
GROUPS_DIR = "groups.partial"  # each group's accuracies, until features.json is written
SOURCES = ("empirical", "infinite")  # the kernel job's NTK of a checkpoint | config.infinite's
# The rules a record's settings name, so that records of earlier rules are made again (and the
# report marks them): groups cut at the kernel dtype's rounding, rows by patch-matmul gradients.
RANK_FLOOR, JACOBIAN_ROWS = "dtype_rounding", "patch_matmul"


def of_earlier_rules(record: dict[str, Any]) -> bool:
  """Whether features.json was made by rules the job has since changed (it would make it again):
  without its batch size, rank floor or, for an empirical kernel, its Jacobian rows."""
  settings = record.get("settings") or {}
  return ("batch_size" not in settings or settings.get("rank_floor") != RANK_FLOOR
          or (settings.get("source") == "empirical" and settings.get("jacobian_rows") != JACOBIAN_ROWS))


def check_eigen_features_config(config: ml_collections.ConfigDict) -> None:
  e = config.eigen_features
  for field in ("num_single", "num_test", "batch_size"):
    value = e[field]
    if not is_whole_number(value, 0 if field == "num_test" else 1):
      raise ValueError(f"config.eigen_features.{field}={value!r} must be an integer >= "
                       f"{0 if field == 'num_test' else 1}" + (" (0: the whole test split)."
                                                              if field == "num_test" else "."))
  if e.source not in SOURCES:
    raise ValueError(f"config.eigen_features.source={e.source!r}; expected one of {', '.join(SOURCES)}.")
  check_eigensolver(e.eigensolver, "config.eigen_features.eigensolver")
  if e.source == "infinite" and e.eigensolver == "top":
    raise ValueError("config.eigen_features.eigensolver='top' needs config.eigen_features.source="
                     "'empirical' (a stored kernel); an infinite-width kernel is computed in memory "
                     "and decomposed whole.")
  if e.source == "infinite" and config.get("infinite") is None:
    raise ValueError("config.eigen_features.source='infinite' needs a config.infinite section (the "
                     "analytic kernel); see configs/infinite_width.py.")
  if e.source == "infinite":
    from ntk_scale import infinite  # pylint: disable=import-outside-toplevel  (neural-tangents)
    infinite.check_architecture_config(config.infinite)
  if e.source == "empirical" and str(config.kernel.logits) == "full":
    raise ValueError("config.kernel.logits='full': eigen-features need a kernel of one class or the "
                     "trace.")
  build_attack(e.attack, prefix="config.eigen_features.attack", num_classes=num_classes(config.data))


def check_num_test(config: ml_collections.ConfigDict, test_labels: np.ndarray) -> None:
  """config.eigen_features.num_test at most the test images the features are scored on (those of
  config.kernel.classes, or all): more would be recorded, and fewer scored."""
  num_test, classes = config.eigen_features.num_test, tuple(config.kernel.classes)
  scored = int(np.isin(test_labels, classes).sum()) if classes else len(test_labels)
  if num_test > scored:
    raise ValueError(f"config.eigen_features.num_test={num_test} exceeds the {scored} test images "
                     f"the features are scored on"
                     + (f" (of config.kernel.classes={classes})" if classes else "")
                     + "; 0 takes them all.")


def directions_chunk(config: ml_collections.ConfigDict, image_shape: tuple[int, ...], classes: int,
                     num_examples: int, rank: int, num_devices: int,
                     budget_bytes: float | None = None,
                     budget_bytes_field: str = "config.kernel.memory_budget_gb") -> int:
  """Training images per device and step of the parameter directions of config.kernel's empirical
  kernel of `num_examples` with numerical rank at most `rank` (known before the kernel is: a
  budget too small is refused before any compute, naming the fields). The budget is
  config.kernel.memory_budget_gb, else `budget_bytes` (a dry run's target, set by the flag
  `budget_bytes_field`), else this device's."""
  model = build_model(config.model, classes)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                             train=False))["params"]
  spec = parse_logits(config.kernel.logits, classes, "config.kernel.logits")
  budget = (config.kernel.memory_budget_gb * 2**30 or budget_bytes
            or device_budget_bytes(jax.local_devices()[0]))
  budget_field = (budget_bytes_field if budget_bytes and not config.kernel.memory_budget_gb
                  else "config.kernel.memory_budget_gb")
  return examples_per_device(budget, most_rows(rank, config.eigen_features.num_single),
                             spec.rows_per_example, classes,
                             sum(math.prod(x.shape) for x in jax.tree.leaves(params)), num_examples,
                             num_devices, budget_field=budget_field)


def _plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  single = rows[:-1]  # the last row is every group together
  x = [r["first_index"] + 1 for r in single]
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  ax.plot(x, [r["clean_accuracy"] for r in single], "o-", label="usefulness (clean accuracy)")
  ax.plot(x, [r["robust_accuracy"] for r in single], "s-", label="robustness (accuracy under attack)")
  ax.set_xscale("log")
  ax.set_xlabel("eigenvalue index (groups: first index)")
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  files.save_figure(fig, path, dpi=120)


@dataclasses.dataclass
class _Features:
  """One kernel's eigenvalues and feature groups, and each group's predictor as a model for
  evaluate(): `apply` with that group's `variables`."""
  source: str  # where the kernel came from, for the record
  eigenvalues: np.ndarray  # every eigenvalue, or the top k (eigensolver "top")
  trace: float  # the sum of every eigenvalue
  eigensolver: str  # "dense" | "top"
  groups: list
  # A group's predictor: apply(variables(g), x [B, ...]) -> [B, C]; g = len(groups) is every group
  # together. One `apply` for all groups: one compilation of the clean and the attacked programs.
  apply: Callable[[Any, jax.Array], jax.Array]
  variables: Callable[[int], Any]  # host arrays


def group_apply(model_apply: Callable, spec) -> Callable[[Any, jax.Array], jax.Array]:
  """An empirical kernel's feature group as evaluate()'s `apply`: (variables {"params", "stats",
  "directions" [C', K, P]}, x) -> logits [B, K], one function for every group (one compilation).
  Parameters and directions are arguments of the programs, never closed over: as constants (G * C
  * P numbers) they made lowering alone take minutes."""
  def apply(v, x):
    with_stats = lambda p, images: model_apply(p, images, v["stats"])
    return feature_logits_fn(with_stats, v["params"], v["directions"][None], spec)(x)[0]
  return apply


def _finished_kernel(config: ml_collections.ConfigDict, workdir: str,
                     dataset: Dataset) -> dict[str, Any]:
  """The kernel job's result for config.kernel, computed or resumed until complete."""
  kernel = kernel_job(config, workdir, dataset)
  if not kernel["complete"]:
    raise RuntimeError(f"kernel {kernel['kernel']} is not complete; rerun to resume it.")
  return kernel


def _empirical(config: ml_collections.ConfigDict, workdir: str, dataset, kernel: dict[str, Any],
               solver: str) -> _Features:
  """Groups of the kernel job's empirical NTK of a checkpoint, as J(x) W_g (eigen_features.py),
  from every eigenpair or, for a large kernel, the spectrum job's top ones (the groups then stop
  at the k-th eigenvalue and the last row is the top-k predictor, not kernel regression)."""
  from ntk_scale.restore import restore_for_inference  # pylint: disable=import-outside-toplevel

  store = KernelStore.open(kernel["kernel"])
  spec = parse_logits(config.kernel.logits, dataset.num_classes, "config.kernel.logits")
  train_images = getattr(dataset, config.kernel.split).images[store.indices()]
  pairs, trace = kernel_eigenpairs(config, workdir, kernel, solver)  # config.spectrum's top k for top
  groups = feature_groups(pairs.values, config.eigen_features.num_single,
                          rounding_floor(store.meta["dtype"], trace))
  coefficients = _coefficients(pairs, groups, store.labels(), dataset.num_classes)

  restored = restore_for_inference(config, workdir, phase=config.kernel.phase,
                                   epoch=store.meta["source"]["epoch"], fields="config.kernel")
  model_apply = inference_apply(restored.model, config.kernel.precision)  # as the kernel's rows
  params, stats = restored.host_variables()
  directions = parameter_directions(lambda p, x: model_apply(p, x, stats), params, train_images,
                                    coefficients.astype(np.float32), spec,
                                    memory_budget_bytes=config.kernel.memory_budget_gb * 2**30 or None)
  return _Features(kernel["kernel"], pairs.values, trace, solver, groups, group_apply(model_apply, spec),
                   lambda g: {"params": params, "stats": stats, "directions": np.asarray(directions[g])})


def _infinite(config: ml_collections.ConfigDict, workdir: str, dataset) -> _Features:
  """Groups of config.infinite's analytic kernel (ntk_scale/infinite.py) on config.kernel's subset
  of the training split, as K(x, X) A_g with the kernel function differentiated by the attack."""
  from ntk_scale import infinite  # pylint: disable=import-outside-toplevel  (neural-tangents)

  section = config.infinite
  split = getattr(dataset, config.kernel.split)
  indices = select_examples(config, split.labels)
  train_images, labels = split.images[indices], split.labels[indices]
  store = infinite.kernel_store(section, os.path.join(workdir, KERNELS_DIR), train_images, labels)
  pairs = eigh(infinite.kernel_matrix(section, dataset.num_classes, train_images, store=store),
               name=f"kernel {store.directory}")
  trace = float(pairs.values.sum())
  groups = feature_groups(pairs.values, config.eigen_features.num_single,
                          rounding_floor(section.dtype, trace))
  coefficients = _coefficients(pairs, groups, labels, dataset.num_classes).astype(np.float32)
  kernel_fn = infinite.kernel_function(section, dataset.num_classes)
  x_train = jnp.asarray(train_images)
  return _Features(store.directory, pairs.values, trace, "dense", groups,
                   lambda a, x: kernel_scores(kernel_fn, x, x_train, a, section.batch_size),
                   lambda g: np.asarray(coefficients[g]))


def _whole_name(features: _Features) -> str:
  """The last row's group: "all" (ridgeless kernel regression) from every eigenpair, "top<k>" (the
  predictor of the top k eigen-features) from the top k."""
  return "all" if features.eigensolver == "dense" else f"top{len(features.eigenvalues)}"


def _coefficients(pairs, groups: list, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """A_g for every group, then their sum (ridgeless kernel regression on the numerical rank)."""
  targets = np.asarray(regression_targets(jnp.asarray(labels), num_classes), np.float64)
  coefficients = group_coefficients(pairs.values, pairs.vectors, targets, groups)
  return np.concatenate([coefficients, coefficients.sum(0, keepdims=True)])


def _scored_test_split(dataset: Dataset, classes: tuple[int, ...], apply: Callable
                       ) -> tuple[Split, Callable, int]:
  """The test images the features are scored on, the predictor that scores them, and its classes.
  A kernel of some classes (config.kernel.classes; Tsilivis and Kempe's binary CIFAR-10 pairs)
  predicts among those: its test images are theirs, labelled by place in `classes`, and its
  logits those classes' columns (the others' regression targets are the same -1/C for every
  training image, and are no prediction)."""
  if not classes:
    return dataset.test, apply, dataset.num_classes
  chosen = np.asarray(classes)
  keep = np.isin(dataset.test.labels, chosen)
  place = np.searchsorted(np.sort(chosen), dataset.test.labels[keep])
  labels = np.argsort(chosen)[place].astype(dataset.test.labels.dtype)
  columns = jnp.asarray(chosen)
  return (Split(dataset.test.images[keep], labels),
          lambda variables, x: apply(variables, x)[:, columns], len(chosen))


def eigen_features_job(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The kernel (found or computed), its eigenpairs, every feature group's clean and robust accuracy."""
  e = config.eigen_features
  check_eigen_features_config(config)
  attack = build_attack(e.attack, prefix="config.eigen_features.attack")
  mesh = parallel.make_mesh()
  parallel.check_batch_size(e.batch_size, mesh.devices.size, "config.eigen_features.batch_size")
  dataset = load_dataset(config.data)
  split = getattr(dataset, config.kernel.split, None)
  check_kernel_subset(config, dataset.num_classes, None if split is None else split.labels)
  indices = select_examples(config, split.labels)
  num_examples = len(indices)
  check_num_test(config, dataset.test.labels)
  solver, spectrum_config = eigenpairs_config(config, e.eigensolver, num_examples, e.num_single)
  solver = solver if e.source == "empirical" else "dense"  # an infinite-width kernel: in memory
  if solver == "top":  # before the kernel is computed
    check_spectrum_config(spectrum_config, dataset.num_classes)
  if e.source == "empirical":  # the parameter directions fit a device, also before the kernel
    directions_chunk(config, split.images.shape[1:], dataset.num_classes, num_examples,
                     spectrum_config.spectrum.num_eigenpairs if solver == "top" else num_examples,
                     mesh.devices.size)
  prepare_workdir(config, workdir)  # every field checked: the infinite source records the config
  # The output's name first: a finished result is read back without any kernel algebra.
  kernel = None if e.source == "infinite" else _finished_kernel(config, workdir, dataset)
  settings = {"source": e.source, "num_single": e.num_single, "num_test": e.num_test,
              "attack": e.attack.to_dict(), "seed": config.seed, "eigensolver": solver,
              # each batch of the attack draws its own random start (a result read back at another
              # batch size was another attack's)
              "batch_size": e.batch_size,
              # the solve's settings: other eigenpairs (another tol, say) are other features
              "spectrum": solve_settings(spectrum_config.spectrum) if solver == "top" else None,
              # groups stop at the kernel dtype's rounding (spectrum.rounding_floor); records of the
              # earlier rule (1e-10 lambda_1, which grouped float32 rounding) are made again
              "rank_floor": RANK_FLOOR}
  if config.kernel.classes:  # scored among those classes on their test images
    settings["test_classes"] = list(config.kernel.classes)
  if kernel is None:
    name = (f"infinite_{config.infinite.architecture}_{config.infinite.kernel}_{config.kernel.split}"
            f"{num_examples}")
    # The kernel's store name (its digest covers the subset's images): config.kernel's subset
    # fields are runtime fields, so another subset_seed or classes must not read back this result.
    from ntk_scale import infinite  # pylint: disable=import-outside-toplevel
    settings["kernel"] = infinite.kernel_store_name(config.infinite, split.images[indices])
  else:
    name = os.path.basename(kernel["kernel"])  # the kernel store refuses another subset
    settings["kernel"] = KernelStore.open(kernel["kernel"]).identity_digest()  # and a recomputed one
    # Jacobian rows with patch-matmul convolution weight gradients: records made with JAX's own
    # rule, whose accuracies were wrong for convolutional models on several devices, are made again.
    settings["jacobian_rows"] = JACOBIAN_ROWS
  directory = os.path.join(workdir, FEATURES_DIR, name)
  result_path = os.path.join(directory, "features.json")
  saved = files.read_result(result_path, settings)
  if saved is not None:
    discard(os.path.join(directory, GROUPS_DIR))  # left by a kill between the result and its removal
    return {"eigen_features": directory, **saved}
  if kernel is None:
    features = _infinite(config, workdir, dataset)
  else:
    if jax.process_index() == 0:
      print(f"eigen-features of {kernel['kernel']}: "
            + describe_choice(solver, e.eigensolver, "config.eigen_features.eigensolver", num_examples,
                              spectrum_config.spectrum.num_eigenpairs), flush=True)
    features = _empirical(spectrum_config, workdir, dataset, kernel, solver)
  groups = features.groups

  test, apply, scored_classes = _scored_test_split(dataset, config.kernel.classes, features.apply)
  n = e.num_test or len(test)
  test = Split(test.images[:n], test.labels[:n])
  clean, robust = [], []
  key = jax.random.key(config.seed)
  with preemption_notices() as noticed:  # each group's accuracies kept until features.json is written
    kept = KeptResults(os.path.join(directory, GROUPS_DIR),
                       {**settings, "source_kernel": features.source},
                       noticed)
    for g in range(len(groups) + 1):  # data-parallel over every device of every host
      label = groups[g].name if g < len(groups) else _whole_name(features)
      accuracies = kept.get({"group": g}, f"eigen-feature group {label}")
      if accuracies is None:
        model = Parameterized(apply, parallel.replicate(features.variables(g), mesh))
        accuracies = {
            "clean": evaluate(model, test, e.batch_size, mesh, scored_classes)["accuracy"],
            "robust": evaluate(model, test, e.batch_size, mesh, scored_classes, attack=attack,
                               key=key)["accuracy"]}
        if jax.process_index() == 0:
          print(f"eigen-feature group {label}: clean {accuracies['clean']:.3f}, {e.attack.name} "
                f"{accuracies['robust']:.3f}", flush=True)
        kept.put({"group": g}, accuracies)
      clean.append(accuracies["clean"])
      robust.append(accuracies["robust"])

  rows = []
  for i, group in enumerate(groups + [None]):
    indices = group.indices if group else np.arange(sum(len(g.indices) for g in groups))
    rows.append({"group": group.name if group else _whole_name(features), "first_index": int(indices[0]),
                 "num_features": int(len(indices)),
                 "eigenvalue": float(features.eigenvalues[indices[0]]),
                 "spectral_share": float(features.eigenvalues[indices].sum() / features.trace),
                 "clean_accuracy": float(clean[i]), "robust_accuracy": float(robust[i])})
  record = {"settings": settings, "source_kernel": features.source, "num_test": n,
            "classes": list(config.kernel.classes) or None,
            "eigensolver": features.eigensolver,
            "num_eigenpairs": len(features.eigenvalues), "attack": e.attack.to_dict(), "groups": rows}
  if jax.process_index() == 0:
    files.make_dirs(directory)
    files.write_csv(os.path.join(directory, "features.csv"), rows)
    _plot(rows, os.path.join(directory, "usefulness_robustness.png"),
          f"eigen-features of {name}, {e.attack.name} eps {e.attack.eps:g}")
    files.write_json(result_path, record, indent=2)
    print(f"eigen-features written to {directory}", flush=True)
  kept.discard()
  return {"eigen_features": directory, **record}
