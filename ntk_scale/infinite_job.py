"""The `infinite` job: kernel regression with an analytic infinite-width kernel, training-free
adversarial examples (Tsilivis and Kempe 2022) and their transfer to finite networks, and a robust
training set optimised by PGD through kernel regression (Tsilivis, Su and Kempe, arXiv 2207.11727).

    python main.py --config configs/infinite_width.py:digits --workdir workdirs/infinite_digits

Writes to the workdir: results.json (every accuracy), adversarial/<attack>/ (the kernel's
adversarial test sets, ntk_scale/adversarial_sets.py), transfer/width<W>/ (each finite network's
train workdir; transfer/robust_dataset/ the network trained on the optimised set) and robust_dataset.npz (images, labels; np.load(..., allow_pickle=False)).
"""

import copy
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ntk_scale import infinite
from ntk_scale.adversarial_sets import save_adversarial_set
from ntk_scale.attacks import build_attack, build_attacks
from ntk_scale.data import Dataset, Split, class_balanced_subset, load_dataset
from ntk_scale.kernel_regression import KernelRegression, check_regression_config, predictor

RESULTS_FILE = "results.json"
ROBUST_DATASET_FILE = "robust_dataset.npz"


def check_infinite_config(config: ml_collections.ConfigDict, num_train: int) -> None:
  """Every config.infinite field, before any kernel is computed."""
  s = config.infinite
  infinite.check_architecture_config(s)
  check_regression_config(s.regression, "config.infinite.regression")
  if not 0 <= s.num_train <= num_train or (s.num_train and s.num_train % 10):
    raise ValueError(f"config.infinite.num_train={s.num_train} must be 0 (all) or a multiple of 10 "
                     f"in [10, {num_train}] (a class-balanced subset).")
  build_attacks(s.attacks, "config.infinite.attacks")
  if any(not isinstance(w, int) or w < 1 for w in s.transfer.widths):
    raise ValueError(f"config.infinite.transfer.widths={tuple(s.transfer.widths)} must be integers >= 1.")
  r = s.robust_data
  if not isinstance(r.num_steps, int) or r.num_steps < 0:
    raise ValueError(f"config.infinite.robust_data.num_steps={r.num_steps!r} must be an integer >= 0.")
  for field in ("step_size", "data_eps"):
    if not r[field] > 0:
      raise ValueError(f"config.infinite.robust_data.{field}={r[field]!r} must be positive.")
  build_attack(r.attack, prefix="config.infinite.robust_data.attack")


def _write_json(path: str, record: dict) -> None:
  if jax.process_index() != 0:  # one writer per file
    return
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)


def _accuracy(logits_fn, images, labels) -> float:
  return float(jnp.mean(jnp.argmax(logits_fn(images), -1) == labels))


def _attack_all(attacks, logits_fn, images, labels, seed: int) -> dict[str, np.ndarray]:
  return {name: np.asarray(jax.jit(lambda x, y, k, a=attack: a(logits_fn, x, y, k))(
      images, labels, jax.random.key(seed + i))) for i, (name, attack) in enumerate(attacks.items())}


def _train_finite(config: ml_collections.ConfigDict, workdir: str, width: int, name: str = "",
                  dataset=None, eval_attacks: ml_collections.ConfigDict | None = None):
  """A finite network (config.model at `width`) trained on `dataset` (default config.data's) in
  <workdir>/transfer/<name or width<W>>/, evaluated clean and under `eval_attacks`."""
  from ntk_scale.train.loop import train_and_evaluate
  from ntk_scale.workdir import prepare_workdir

  c = copy.deepcopy(config)
  c.job = "train"
  c.model.width = width
  c.num_epochs = config.infinite.transfer.num_epochs
  c.eval_attacks = eval_attacks or ml_collections.ConfigDict()
  c.save_adversarial = False
  c.checkpoint.fractional_epochs = ()
  directory = os.path.join(workdir, "transfer", name or f"width{width}")
  prepare_workdir(c, directory)
  return train_and_evaluate(c, directory, dataset)


def _optimise_dataset(section, kernel_fn, images, labels, num_classes) -> np.ndarray:
  """Signed-gradient descent on the training images: each step attacks the training points with
  PGD against kernel regression fitted on the current images, then moves the images to lower
  the cross-entropy of those adversarial points, within data_eps of the originals and [0, 1]."""
  r, reg = section.robust_data, section.regression
  attack = build_attack(r.attack, prefix="config.infinite.robust_data.attack")
  fit = lambda support: predictor(kernel_fn, support, labels, num_classes,
                                  regularizer=reg.regularizer, solver=reg.solver)

  @jax.jit
  def step(support, key):
    x_adv = attack(fit(jax.lax.stop_gradient(support)), images, labels, key)
    loss = lambda s: optax.softmax_cross_entropy_with_integer_labels(fit(s)(x_adv), labels).mean()
    grad = jax.grad(loss)(support)
    moved = support - r.step_size * jnp.sign(grad)
    return jnp.clip(jnp.clip(moved, images - r.data_eps, images + r.data_eps), 0.0, 1.0)

  support = images
  for i in range(r.num_steps):
    support = step(support, jax.random.key(1000 + i))
  return np.asarray(support)


def infinite_job(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Kernel regression, training-free attacks, transfer, robust dataset; results.json."""
  s = config.infinite
  dataset = load_dataset(config.data)
  check_infinite_config(config, len(dataset.train))
  indices = (class_balanced_subset(dataset.train.labels, s.num_train, config.seed) if s.num_train
             else np.arange(len(dataset.train)))
  x, y = dataset.train.images[indices], dataset.train.labels[indices]
  xt, yt = dataset.test.images, dataset.test.labels
  c = dataset.num_classes
  results: dict[str, Any] = {"num_train": len(x), "num_test": len(xt)}
  started = time.time()
  with jax.enable_x64(s.dtype == "float64"):
    x, xt = x.astype(s.dtype), xt.astype(s.dtype)
    kernel_fn = infinite.kernel_function(s, c)
    model = KernelRegression.fit(infinite.kernel_matrix(s, c, x), y, c,
                                 regularizer=s.regression.regularizer, solver=s.regression.solver)
    logits_fn = model.logits_fn(kernel_fn, x)
    clean_predictions = np.argmax(model.predict(infinite.kernel_matrix(s, c, xt, x)), -1)
    results["kernel_regression"] = {"clean": float(np.mean(clean_predictions == yt))}
    adversarial = _attack_all(build_attacks(s.attacks, "config.infinite.attacks"), logits_fn,
                              jnp.asarray(xt), jnp.asarray(yt), config.seed)
    kernel_fooled = {}
    for name, x_adv in adversarial.items():
      predictions = np.asarray(jnp.argmax(logits_fn(x_adv), -1))
      kernel_fooled[name] = predictions != yt
      results["kernel_regression"][name] = float(np.mean(predictions == yt))
      if jax.process_index() == 0:
        save_adversarial_set(os.path.join(workdir, "adversarial", name),
                             {"images": x_adv.astype(np.float32), "labels": yt,
                              "predictions": predictions.astype(np.int32),
                              "clean_predictions": clean_predictions.astype(np.int32)},
                             {"source": "kernel_regression", "kernel": s.to_dict(), "split": "test",
                              "accuracy": results["kernel_regression"][name]})
    print(f"kernel regression: {results['kernel_regression']} ({time.time() - started:.0f} s)", flush=True)

    robust = _optimise_dataset(s, kernel_fn, jnp.asarray(x), jnp.asarray(y), c)
    if jax.process_index() == 0:
      np.savez(os.path.join(workdir, ROBUST_DATASET_FILE), images=robust.astype(np.float32), labels=y)
    robust_model = KernelRegression.fit(infinite.kernel_matrix(s, c, robust), y, c,
                                        regularizer=s.regression.regularizer, solver=s.regression.solver)
    robust_fn = robust_model.logits_fn(kernel_fn, robust)
    robust_attacks = build_attacks(s.robust_data.eval_attacks, "config.infinite.robust_data.eval_attacks")
    record = {"clean": _accuracy(robust_fn, jnp.asarray(xt), yt),
              "max_pixel_change": float(np.max(np.abs(robust - x)))}
    for name, x_adv in _attack_all(robust_attacks, robust_fn, jnp.asarray(xt), jnp.asarray(yt),
                                   config.seed + 100).items():
      record[name] = _accuracy(robust_fn, x_adv, yt)
    results["robust_dataset_kernel_regression"] = record
    print(f"robust dataset, kernel regression: {record} ({time.time() - started:.0f} s)", flush=True)

  from ntk_scale.evaluate import evaluate
  from ntk_scale import parallel
  transfer = {}
  for width in s.transfer.widths:
    trained = _train_finite(config, workdir, width)
    mesh = parallel.make_mesh()
    row = {"clean": trained["test"]["accuracy"]}
    for name, x_adv in adversarial.items():
      r = evaluate(trained["state"], Split(x_adv.astype(np.float32), yt), config.eval_batch_size, mesh,
                   c, keep_examples=True)
      predictions = r["examples"]["predictions"]
      source = kernel_fooled[name]
      row[name] = {"accuracy": r["accuracy"],
                   "transfer_rate": float(np.mean(predictions[source] != yt[source]))}
    transfer[f"width{width}"] = row
    print(f"transfer to width {width}: {row}", flush=True)
  results["transfer"] = transfer
  width = max(s.transfer.widths, default=config.model.width)
  robust_data = Dataset(dataset.name, Split(robust.astype(np.float32), y), dataset.test, c)
  trained = _train_finite(config, workdir, width, "robust_dataset", robust_data,
                          s.robust_data.eval_attacks)
  results["robust_dataset_network"] = {"width": width, **{
      name: r["accuracy"] for name, r in trained["results"].items()}}
  print(f"robust dataset, network: {results['robust_dataset_network']}", flush=True)
  results["seconds"] = time.time() - started
  _write_json(os.path.join(workdir, RESULTS_FILE), results)
  return results
