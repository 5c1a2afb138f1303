"""The `infinite` job: kernel regression with an analytic infinite-width kernel, training-free
adversarial examples (Tsilivis and Kempe 2022) and their transfer to finite networks, and a robust
training set optimised through kernel regression (Tsilivis, Su and Kempe, arXiv 2207.11727;
ntk_scale/robust_dataset.py).

    python main.py --config configs/infinite_width.py:digits --workdir workdirs/infinite_digits

Kernel regression is scored by ntk_scale.evaluate.evaluate, the evaluator of the networks, given its
`logits_fn`, each (model, attack) once (_Evaluations): an attack is known by its config and keyed
by it, so PGD-20 listed in both config.infinite.attacks and robust_data.eval_attacks is one
evaluation and one number. The robust dataset is compared side by side with the original one:
kernel regression fitted on each, and the CNN of one width (robust_data.network_width) trained on
each (network_width=0: kernel regression alone, no network trained on either set), all clean and
under robust_data.eval_attacks (PGD, APGD-CE and APGD-T; Square too with `:square`) on the same
test images. The original set is the training set kernel regression is fitted on: the
class-balanced config.infinite.num_train subset when that is set, else the whole training split.
With robust_data.target_holdout the optimised set is the original set less the held-out targets,
and the comparison adds that subset's original images ("original_subset"). The transfer networks
train on the whole training split, whatever num_train.

Writes to the workdir: results.json (every accuracy), adversarial/<attack>/ (the kernel's
adversarial test sets, ntk_scale/adversarial_sets.py), transfer/width<W>/ (each finite network's
train workdir on the whole training split; transfer/original/ the comparison's network on a
num_train subset, transfer/robust_dataset/ the one on the optimised set, transfer/original_subset/
with held-out targets) and robust_dataset.npz (images in config.infinite.dtype, labels, rows and
target_rows into the training split, settings; np.load(..., allow_pickle=False)),
robust_dataset_steps/<settings digest>/ (the optimisation's state every
robust_data.checkpoint_every steps, Orbax, removed once the set is written), kernels/infinite_<...>/
(the training kernels of the original and optimised sets, tile by tile on every device of every
host: ntk/function_tiles.py) and evaluations.partial/ (each kernel-regression evaluation with its
examples, evaluation_progress.KeptResults, removed once results.json is written).
A rerun of a finished run reads results.json back (made with the same `_evaluation_settings`).
A rerun of an unfinished one reads back the kernels, a robust_dataset.npz made with the same
settings and the kept evaluations (also when it changes only runtime fields such as
log_every_steps or data.data_dir, eval_batch_size aside: `_evaluation_settings`), the robust set's
optimisation continues from its last saved step, and the networks resume. A preemption notice
(SIGTERM) stops the job once the evaluation or optimisation step it is in is kept.
"""

import copy
import hashlib
import io
import json
import os
import time
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ntk_scale import files, infinite, parallel
from ntk_scale.adversarial_sets import save_adversarial_set
from ntk_scale.attacks import build_attacks
from ntk_scale.config_numbers import is_finite_number, is_whole_number
from ntk_scale.data import Dataset, Split, check_subset_size, class_balanced_subset, load_dataset
from ntk_scale.evaluate import Model, evaluate, transfer_rate
from ntk_scale.evaluation_progress import KeptResults, discard
from ntk_scale.kernel_regression import KernelRegression, check_regression_config
from ntk_scale.matmul_precision import default_precision
from ntk_scale.ntk.job import KERNELS_DIR
from ntk_scale.preemption import preemption_notices
from ntk_scale.robust_dataset import (attack_batch_size, check_robust_data_config, num_holdout,
                                      optimise_dataset, split_targets)
from ntk_scale.train.experiment import check_train_config, eval_matmul_precision, train_steps

RESULTS_FILE = "results.json"
ROBUST_DATASET_FILE = "robust_dataset.npz"
ROBUST_DATASET_STEPS_DIR = "robust_dataset_steps"  # the optimisation's saved state, per settings
EVALUATIONS_DIR = "evaluations.partial"  # kernel regression's scores, until results.json is written


def require_infinite_section(config: ml_collections.ConfigDict) -> None:
  """The infinite job's config has its section (the job and its dry run both ask)."""
  if config.get("infinite") is None:
    raise ValueError("config.job='infinite' needs a config.infinite section (the analytic kernel and "
                     "its experiments); see configs/infinite_width.py.")


def check_infinite_config(config: ml_collections.ConfigDict, labels: np.ndarray,
                          num_classes: int, test_labels: np.ndarray | None = None,
                          num_devices: int | None = None) -> None:
  """Every field the job reads, before any kernel is computed: config.infinite, config.eval_batch_size
  (every evaluation's batch) and, when finite networks are trained, the fields of their training
  (`_check_finite_networks`); `labels` are the training split's, `test_labels` the test split's
  (None: num_test is not checked against them); `num_devices` (default: all) split the batches."""
  require_infinite_section(config)
  _refuse_fields_of_the_train_job(config)
  num_devices = jax.device_count() if num_devices is None else num_devices
  s = config.infinite
  infinite.check_architecture_config(s)
  check_regression_config(s.regression, "config.infinite.regression")
  num_train = len(labels)
  check_subset_size("config.infinite.num_train", s.num_train, labels, range(num_classes), "training")
  if test_labels is not None:
    check_subset_size("config.infinite.num_test", s.num_test, test_labels, range(num_classes), "test")
  build_attacks(s.attacks, "config.infinite.attacks", num_classes)
  if any(not is_whole_number(w, 1) for w in s.transfer.widths):
    raise ValueError(f"config.infinite.transfer.widths={tuple(s.transfer.widths)} must be integers >= 1.")
  images = s.num_train or num_train
  check_robust_data_config(s.robust_data, images, num_classes)
  optimised = images - num_holdout(s.robust_data.target_holdout, images)
  # The network trained on the robust set (unless network_width is 0), after hours.
  if config.batch_size > optimised and s.robust_data.network_width != 0:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the {optimised} images of "
                     f"the robust set (config.infinite.num_train, less robust_data.target_holdout) "
                     f"that a network of robust_data.network_width is trained on.")
  # Kernel regression is evaluated in these batches, over the devices, right after its kernel.
  parallel.check_batch_size(config.eval_batch_size, num_devices, "config.eval_batch_size")
  _check_finite_networks(config, len(labels), optimised, num_devices)


def _refuse_fields_of_the_train_job(config: ml_collections.ConfigDict) -> None:
  """The train job's fields that `_finite_config` replaces for the job's networks, when set: a
  `--config.num_epochs=50` trained them for config.infinite.transfer.num_epochs without a word."""
  from ntk_scale.base_config import base_config  # pylint: disable=import-outside-toplevel

  default = base_config()
  instead = {"num_epochs": "config.infinite.transfer.num_epochs",
             "eval_attacks": "config.infinite.attacks and robust_data.eval_attacks",
             "checkpoint.fractional_epochs": "none: the networks save whole epochs",
             "phase2.num_epochs": "none: the networks have no phase 2"}
  for field, use in instead.items():
    section, _, name = field.rpartition(".")
    value = (config[section] if section else config)[name]
    unset = (default[section] if section else default)[name]
    # An empty eval_attacks of a locked config (as main.py gives it) is not equal to the default's.
    if value == unset or (field == "eval_attacks" and not value):
      continue
    shown = f"<attacks {', '.join(value)}>" if field == "eval_attacks" else repr(value)
    raise ValueError(f"config.{field}={shown} is not read by the infinite job, whose networks "
                     f"it would leave as they are; it reads {use}.")


def _network_width(config: ml_collections.ConfigDict) -> int:
  """The width of the network trained on the original and the robust set (0: none)."""
  s = config.infinite
  width = s.robust_data.network_width
  return max(s.transfer.widths, default=config.model.width) if width is None else width


def _networks(config: ml_collections.ConfigDict) -> list[tuple[int, ml_collections.ConfigDict | None]]:
  """(width, eval_attacks) of each network trained on the whole training split, in order: the
  transfer widths and, when that split is the robust-set comparison's original set (no num_train
  subset), the comparison's width (evaluated under its eval_attacks); with a subset that network
  trains on the subset, as kernel regression is fitted on it (`_subset_network`)."""
  s = config.infinite
  shared = 0 if s.num_train else _network_width(config)
  return [(w, s.robust_data.eval_attacks if w == shared else None)
          for w in sorted(set(s.transfer.widths) | ({shared} if shared else set()))]


def _subset_network(config: ml_collections.ConfigDict) -> bool:
  """Whether the comparison's original-set network trains apart from the transfer networks, on the
  config.infinite.num_train subset (transfer/original/)."""
  return bool(config.infinite.num_train and _network_width(config))


def _check_finite_networks(config: ml_collections.ConfigDict, train_size: int, robust_size: int,
                           num_devices: int) -> None:
  """The train-job checks of every finite network the job trains (each config as `_train_finite`
  builds it), before any kernel: they would otherwise fail only once its training starts, after
  the kernels, the attacks and the robust set. `train_size` images (the training split) train
  the transfer networks, config.infinite.num_train (else the split) the comparison's network on
  the original set, `robust_size` (the robust set) those on the optimised set and its originals."""
  s, width = config.infinite, _network_width(config)
  networks = _networks(config) + ([(width, s.robust_data.eval_attacks)] if _subset_network(config)
                                  else [])
  if not networks:
    return
  num_epochs = config.infinite.transfer.num_epochs
  if not (is_finite_number(num_epochs) and num_epochs > 0):
    raise ValueError(f"config.infinite.transfer.num_epochs={num_epochs!r} must be a positive finite "
                     f"number (the epochs each finite network trains).")
  # Refusals name the networks' config.num_epochs as the field the user sets.
  epochs_field = "config.infinite.transfer.num_epochs"
  sizes = (([train_size] if _networks(config) else [])
           + ([s.num_train or train_size, robust_size] if width else []))
  for network_width, eval_attacks in networks:
    c = _finite_config(config, network_width, eval_attacks)
    check_train_config(c, num_devices, epochs_field=epochs_field)  # at the catalog's training split
    for size in sizes:  # the robust set's size too (warm-up, checkpoint interval, mode F's flip)
      train_steps(c, size // c.batch_size, epochs_field)


def _evaluation_settings(config: ml_collections.ConfigDict) -> dict[str, str]:
  """What every kept kernel-regression evaluation depends on: the config less the runtime fields
  (workdir.RUNTIME_FIELDS: logging, data_dir, the networks' evaluation, ...), which a rerun on the
  workdir may change, so that such a rerun takes them back; eval_batch_size stays (each batch of
  an attack draws its own random start). eval_matmul_precision is left out: kernel regression
  computes at HIGHEST whatever it says."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel

  from ntk_scale.workdir import is_runtime_field

  fields = {k: v for k, v in traverse_util.flatten_dict(json.loads(config.to_json()), sep=".").items()
            if k == "eval_batch_size" or not is_runtime_field(k)}
  return {"config": hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()}


def _results_settings(config: ml_collections.ConfigDict) -> dict[str, str]:
  """What results.json depends on: the kept evaluations' settings and the precision the networks
  are evaluated at (kernel regression ignores it; the networks' rows do not)."""
  return {**_evaluation_settings(config), "eval_matmul_precision": config.eval_matmul_precision}


def _say(text: str) -> None:
  """A line of the job's output, from process 0 (every process computes the same)."""
  if jax.process_index() == 0:
    print(text, flush=True)


def _write_json(path: str, record: dict) -> None:
  if jax.process_index() == 0:  # one writer per file
    files.write_json(path, record, indent=2)


def _train_finite(config: ml_collections.ConfigDict, workdir: str, width: int, name: str = "",
                  dataset=None, eval_attacks: ml_collections.ConfigDict | None = None):
  """A finite network (config.model at `width`) trained on `dataset` (default config.data's) in
  <workdir>/transfer/<name or width<W>>/, evaluated clean and under `eval_attacks`."""
  from ntk_scale.train.loop import train_and_evaluate
  from ntk_scale.workdir import TRANSFER_DIR, prepare_workdir

  c = _finite_config(config, width, eval_attacks)
  directory = os.path.join(workdir, TRANSFER_DIR, name or f"width{width}")
  prepare_workdir(c, directory)
  return train_and_evaluate(c, directory, dataset)


def _finite_config(config: ml_collections.ConfigDict, width: int,
                   eval_attacks: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """The train config of the finite network of `width` (`_train_finite`; the up-front checks).
  Phase 1 only: train_and_evaluate never runs phase 2, so config.phase2 is not the networks' (its
  from_epoch would be checked against their saves only once the first one trains)."""
  c = copy.deepcopy(config)
  c.job = "train"
  c.model.width = width
  c.num_epochs = config.infinite.transfer.num_epochs
  c.phase2.num_epochs = 0.0
  c.eval_attacks = eval_attacks or ml_collections.ConfigDict()
  c.save_adversarial = False
  c.checkpoint.fractional_epochs = ()
  return c


def _robust_dataset(section: ml_collections.ConfigDict, path: str, kernel_fn, x: np.ndarray,
                    y: np.ndarray, rows: tuple[np.ndarray, np.ndarray], num_classes: int,
                    seed: int, batch_size: int | None = None, mesh=None,
                    split_rows: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
  """The optimised images of x[rows[0]] (attacking x[rows[1]]): read back from `path` when made with
  these settings and training images, else optimised (robust_dataset.py) and written there
  atomically, in x's dtype, so a rerun fits kernel regression on the very same images. The
  optimisation saves its state beside `path`, in a directory named by these settings and images,
  and a killed run continues from it (the directory is removed once the set is written);
  `batch_size` targets are attacked at a time. `split_rows`: the training split's row of each of
  x's (default x is the split), so the file's rows and target_rows index the split."""
  optimised, targets = rows
  split_rows = np.arange(len(x)) if split_rows is None else np.asarray(split_rows)
  saved_rows = {"rows": split_rows[optimised], "target_rows": split_rows[targets]}
  fields = {k: v for k, v in section.robust_data.to_dict().items() if k != "checkpoint_every"}
  # Targets are attacked in batches with a key each: the batch size decides the random starts.
  attack_batches = attack_batch_size(section.robust_data.target_batch_size, batch_size,
                                     (mesh or parallel.make_mesh()).size)
  settings = json.dumps({"robust_data": fields, "attack_batch_size": attack_batches,
                         "regression": section.regression.to_dict(), "kernel": {
                             k: section[k] for k in ("architecture", "depth", "w_std", "b_std", "kernel")},
                         "seed": seed, "num_train": len(x)}, sort_keys=True)
  # The settings and the training images, labels and rows: a set is read back only for all of them
  # (a file without it, written before it was recorded, is optimised again).
  identity = hashlib.sha256(settings.encode() + x.tobytes() + y.tobytes() + optimised.tobytes()
                            + targets.tobytes()).hexdigest()[:16]
  kept = None
  if files.exists(path):
    with np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False) as stored:
      if ("identity" in stored and str(stored["identity"]) == identity
          and stored["images"].dtype == x.dtype):
        kept = {k: stored[k] for k in stored.files}
  if kept is not None:
    # A set written when its rows indexed the num_train subset (the identity hashes those, so it
    # is still this set) is given the split's rows; its images and record stay as they are.
    if jax.process_index() == 0 and not all(np.array_equal(kept.get(k), v)
                                            for k, v in saved_rows.items()):
      files.write_atomic(path, lambda f: np.savez(f, **{**kept, **saved_rows}))
    return kept["images"], json.loads(str(kept["record"]))
  started = time.time()
  held_out = len(optimised) < len(x)
  steps_dir = os.path.join(os.path.dirname(path), ROBUST_DATASET_STEPS_DIR, identity)
  robust, record = optimise_dataset(section.robust_data, kernel_fn, x[optimised], y[optimised],
                                    num_classes, section.regression, seed,
                                    targets=(x[targets], y[targets]) if held_out else None,
                                    tile=section.batch_size, batch_size=batch_size, mesh=mesh,
                                    checkpoint_dir=steps_dir)
  record["seconds"] = time.time() - started
  robust = robust.astype(x.dtype)
  if jax.process_index() == 0:
    files.write_atomic(path, lambda f: np.savez(f, images=robust, labels=y[optimised], **saved_rows,
                                                settings=settings, identity=identity,
                                                record=json.dumps(record)))
    if files.exists(steps_dir):  # the set is written: its steps' state (3x the images) is not needed
      files.remove_tree(steps_dir)
      if not files.list_dir(os.path.dirname(steps_dir)):
        files.remove_tree(os.path.dirname(steps_dir))
  return robust, record


def _attack_key(seed: int, attack_config: ml_collections.ConfigDict) -> jax.Array:
  """The key of one attack configuration: the same attack draws the same random starts whatever its
  name and whichever model it attacks (paired comparisons)."""
  digest = zlib.crc32(json.dumps(attack_config.to_dict(), sort_keys=True).encode())
  return jax.random.fold_in(jax.random.key(seed), digest & 0x7FFFFFFF)


class _Evaluations:
  """Clean and attacked results of named models (TrainState or logits_fn) on one split through the
  one evaluator, each (model, attack) computed once: an attack is identified by its config, so a
  name in config.infinite.attacks and one in robust_data.eval_attacks with equal configs are one
  evaluation, and one number wherever it is reported."""

  def __init__(self, split: Split, batch_size: int, mesh, num_classes: int, seed: int,
               kept: KeptResults | None = None):
    """`kept`: where each result is also kept, so a rerun of the job takes it from there."""
    self.split, self.batch_size, self.mesh, self.num_classes, self.seed = (
        split, batch_size, mesh, num_classes, seed)
    self._done: dict[tuple[str, str], dict[str, Any]] = {}
    self._kept = kept

  def rows(self, model_name: str, model, named_configs: ml_collections.ConfigDict,
           keep_examples: bool = False) -> dict[str, dict[str, Any]]:
    """{"clean": ..., <attack name>: ...} of the model; attacked examples kept on request."""
    attacks = build_attacks(named_configs, "config.infinite")
    rows = {"clean": self._evaluate(model_name, model, None, None, False)}
    for name, attack in attacks.items():
      rows[name] = self._evaluate(model_name, model, named_configs[name], attack, keep_examples)
    return rows

  def _evaluate(self, model_name, model, attack_config, attack, keep_examples):
    identity = (model_name, "clean" if attack is None else
                json.dumps(attack_config.to_dict(), sort_keys=True))
    done = self._done.get(identity)
    if done is None or (keep_examples and "examples" not in done):
      keep = keep_examples and attack is not None
      on_disk = {"model": identity[0], "attack": identity[1], "examples": keep}
      attack_name = "clean" if attack is None else attack_config.name
      done = (self._kept.get(on_disk, f"{model_name}, {attack_name}") if self._kept is not None
              else None)
      if done is None:
        key = None if attack is None else _attack_key(self.seed, attack_config)
        batches = (self._kept.batches(on_disk, f"{model_name}.{attack_name}")
                   if self._kept is not None else None)
        done = evaluate(model, self.split, self.batch_size, self.mesh, self.num_classes,
                        attack=attack, key=key, keep_examples=keep, batches=batches)
        if self._kept is not None:
          self._kept.put(on_disk, done)
      self._done[identity] = done
    return done


def transferred(network: Model, examples: dict[str, dict[str, np.ndarray]], labels: np.ndarray,
                batch_size: int, mesh: Mesh, num_classes: int,
                matmul_precision: str) -> dict[str, dict[str, float]]:
  """A network's accuracy on each attack's kernel-made test examples, and its transfer rate: the
  share of the examples the attack made fool the kernel that fool the network too
  (evaluate.transfer_rate). `examples`: per attack, the kernel's "images", "predictions" and
  "clean_predictions". At config.eval_matmul_precision, as every evaluation of a network."""
  row = {}
  with default_precision(matmul_precision):
    for name, made in examples.items():
      r = evaluate(network, Split(made["images"].astype(np.float32), labels), batch_size, mesh,
                   num_classes, keep_examples=True)
      row[name] = {"accuracy": r["accuracy"],
                   **transfer_rate(r["examples"]["predictions"], labels, made["predictions"],
                                   made["clean_predictions"])}
  return row


def _accuracies(rows: dict[str, Any]) -> dict[str, float]:
  return {name: r["accuracy"] for name, r in rows.items()}


def _table(comparison: dict[str, dict[str, dict[str, float]]]) -> str:
  """The robust-dataset comparison, {model: {training set: {evaluation: accuracy}}}, as aligned
  text rows."""
  lines = []
  for model, by_data in comparison.items():
    for data_name, accuracies in by_data.items():
      cells = "  ".join(f"{k} {100 * v:5.1f}%" for k, v in accuracies.items())
      lines.append(f"  {model:<22} {data_name:<15} {cells}")
  return "\n".join(lines)


def infinite_job(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Kernel regression, training-free attacks, transfer, robust dataset; results.json. The config is
  recorded in `workdir` (or checked against its record) once every field has been checked."""
  from ntk_scale.workdir import prepare_workdir

  require_infinite_section(config)  # before the data, which may be a download
  s = config.infinite
  dataset = load_dataset(config.data)
  check_infinite_config(config, dataset.train.labels, dataset.num_classes, dataset.test.labels,
                        jax.device_count())
  prepare_workdir(config, workdir)
  # A finished run's results, read back: its kept evaluations are gone once results.json is written,
  # and the attacks on kernel regression are most of the job (76 h of CIFAR-10's on one device).
  saved = files.read_result(os.path.join(workdir, RESULTS_FILE), _results_settings(config))
  if saved is not None:
    discard(os.path.join(workdir, EVALUATIONS_DIR))  # left by a kill between the results and its removal
    _say(f"{os.path.join(workdir, RESULTS_FILE)} holds this run's results: read back")
    return saved
  indices = (class_balanced_subset(dataset.train.labels, s.num_train, config.seed) if s.num_train
             else np.arange(len(dataset.train)))
  x, y = dataset.train.images[indices], dataset.train.labels[indices]
  if s.num_test:  # every model, kernel or network, is scored on these same test images
    test_rows = class_balanced_subset(dataset.test.labels, s.num_test, config.seed)
    dataset = Dataset(dataset.name, dataset.train, Split(dataset.test.images[test_rows],
                                                         dataset.test.labels[test_rows]),
                      dataset.num_classes)
  xt, yt = dataset.test.images, dataset.test.labels
  c = dataset.num_classes
  mesh = parallel.make_mesh()
  batch_size = config.eval_batch_size
  attacks = build_attacks(s.attacks, "config.infinite.attacks")
  eval_attacks = s.robust_data.eval_attacks
  optimised_rows, target_rows = split_targets(s.robust_data.target_holdout, len(x), config.seed)
  held_out = len(optimised_rows) < len(x)
  results: dict[str, Any] = {"settings": _results_settings(config), "num_train": len(x),
                             "num_test": len(xt)}
  started = time.time()
  with jax.enable_x64(s.dtype == "float64"), preemption_notices() as noticed:
    x, test = x.astype(s.dtype), Split(xt.astype(s.dtype), yt)
    kept = KeptResults(os.path.join(workdir, EVALUATIONS_DIR), _evaluation_settings(config),
                       noticed)
    evaluations = _Evaluations(test, batch_size, mesh, c, config.seed, kept)
    kernel_fn = infinite.kernel_function(s, c)
    fit = lambda images, labels, k_train: KernelRegression.fit(
        k_train, labels, c, regularizer=s.regression.regularizer,
        solver=s.regression.solver).logits_fn(kernel_fn, images, block_size=s.batch_size)
    # Training kernels stream to <workdir>/kernels/ tile by tile: a rerun reads them back.
    train_kernel = lambda images, labels: infinite.kernel_matrix(
        s, c, images, store=infinite.kernel_store(s, os.path.join(workdir, KERNELS_DIR), images, labels))
    k_original = train_kernel(x, y)
    logits_fn = fit(x, y, k_original)
    rows = evaluations.rows("original", logits_fn, s.attacks, keep_examples=True)
    results["kernel_regression"] = _accuracies(rows)
    for name in attacks:
      examples = rows[name]["examples"]
      if jax.process_index() == 0:
        save_adversarial_set(os.path.join(workdir, "adversarial", name),
                             {"images": examples["images"].astype(np.float32), "labels": yt,
                              "predictions": examples["predictions"].astype(np.int32),
                              "clean_predictions": examples["clean_predictions"].astype(np.int32)},
                             {"source": "kernel_regression", "kernel": s.to_dict(), "dataset": dataset.name,
                              "split": "test", "accuracy": rows[name]["accuracy"],
                              "clean_accuracy": rows["clean"]["accuracy"]})
    _say(f"kernel regression: {results['kernel_regression']} ({time.time() - started:.0f} s)")

    robust, record = _robust_dataset(s, os.path.join(workdir, ROBUST_DATASET_FILE), kernel_fn, x, y,
                                     (optimised_rows, target_rows), c, config.seed, batch_size, mesh,
                                     split_rows=indices)
    objective = record["objective"]
    y_optimised = y[optimised_rows]
    # The same test images, the same attacks with the same keys, for every training set.
    kernel = {"original": _accuracies(evaluations.rows("original", logits_fn, eval_attacks))}
    if held_out:  # the images that were optimised, before optimisation
      kernel["original_subset"] = _accuracies(evaluations.rows(
          "original_subset", fit(x[optimised_rows], y_optimised,
                                 k_original[np.ix_(optimised_rows, optimised_rows)]), eval_attacks))
    robust = robust.astype(s.dtype)
    kernel["optimised"] = _accuracies(evaluations.rows(
        "optimised", fit(robust, y_optimised, train_kernel(robust, y_optimised)),
        eval_attacks))
    _say(f"robust dataset: {len(objective)} steps in {record['seconds']:.0f} s, "
         f"{len(optimised_rows)} images optimised against "
         f"{'the other ' + str(len(target_rows)) if held_out else 'their originals as'} targets, objective "
         f"{objective[0] if objective else float('nan'):.3f} -> "
         f"{objective[-1] if objective else float('nan'):.3f}, largest pixel change "
         f"{record['max_pixel_change']:.3f}; kernel regression {kernel}")

  transfer = {}
  network_width = _network_width(config)
  network = {}
  for width, network_attacks in _networks(config):
    trained = _train_finite(config, workdir, width, dataset=dataset, eval_attacks=network_attacks)
    if network_attacks is not None:  # the comparison's network, on the whole split
      network["original"] = _accuracies(trained["results"])
    if width not in s.transfer.widths:
      continue
    row = {"clean": trained["test"]["accuracy"], **transferred(
        trained["state"], {n: rows[n]["examples"] for n in attacks}, yt, batch_size, mesh, c,
        eval_matmul_precision(config))}
    transfer[f"width{width}"] = row
    _say(f"transfer to width {width}: {row}")
  results["transfer"] = transfer
  comparison = {"kernel_regression": kernel}
  if network_width:
    subset = lambda images, labels: Dataset(dataset.name, Split(images.astype(np.float32), labels),
                                            dataset.test, c)
    if _subset_network(config):  # the num_train subset kernel regression is fitted on
      trained = _train_finite(config, workdir, network_width, "original", subset(x, y),
                              eval_attacks)
      network["original"] = _accuracies(trained["results"])
    if held_out:
      trained = _train_finite(config, workdir, network_width, "original_subset",
                              subset(x[optimised_rows], y_optimised), eval_attacks)
      network["original_subset"] = _accuracies(trained["results"])
    trained = _train_finite(config, workdir, network_width, "robust_dataset",
                            subset(robust, y_optimised), eval_attacks)
    network["optimised"] = _accuracies(trained["results"])
    comparison[f"network_width{network_width}"] = network
  results["robust_dataset"] = {
      "optimisation": {"steps": len(objective), "objective_first": objective[0] if objective else None,
                       "objective_last": objective[-1] if objective else None,
                       "num_optimised": len(optimised_rows),
                       "num_targets": len(target_rows), "targets_held_out": held_out,
                       "max_pixel_change": record["max_pixel_change"], "seconds": record["seconds"]},
      **comparison}
  _say("robust dataset, accuracy on the same test images:\n" + _table(comparison))
  results["seconds"] = time.time() - started
  _write_json(os.path.join(workdir, RESULTS_FILE), results)
  kept.discard()
  return results
