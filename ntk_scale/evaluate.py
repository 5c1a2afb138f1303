"""Evaluators shared by the training loop and the command line: clean and robust accuracy on a split."""

import dataclasses
import functools
import json
import os
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ntk_scale import data, evaluation_progress, evaluation_records, files, parallel
from ntk_scale.adversarial_sets import (is_whole_set, load_adversarial_set, read_set_meta,
                                        save_adversarial_set)
from ntk_scale.attacks import Attack, WorstOf, build_attacks
from ntk_scale.data import Dataset, Split, eval_batches
from ntk_scale.evaluation_progress import BatchProgress, KeptResults, MemberProgress
from ntk_scale.linearize import LinearizedModel, output_components
from ntk_scale.matmul_precision import default_precision
from ntk_scale.preemption import preemption_notices
from ntk_scale.restore import restore_for_inference
from ntk_scale.train.experiment import check_common_config, eval_matmul_precision
from ntk_scale.train.state import TrainState, logits_fn


@dataclasses.dataclass(frozen=True)
class Parameterized:
  """A model whose logits are `apply(variables, images)`, `variables` a pytree of arrays: one
  compilation serves every model of one `apply` (the same function object) and variable shapes,
  such as the predictor of each eigen-feature group. Multi-host: `variables` replicated over the
  mesh (parallel.replicate)."""
  apply: Callable[[Any, jax.Array], jax.Array]
  variables: Any


Model = TrainState | Parameterized | Callable[[jax.Array], jax.Array]


def _apply_state(state: TrainState, images: jax.Array) -> jax.Array:
  return logits_fn(state)(images)


def _as_apply(model: Model) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
  """(apply, variables) with logits = apply(variables, images): a TrainState or Parameterized
  passes its variables as traced arguments (one compilation per shape for all of them); a bare
  `logits_fn` (kernel regression, say) closes over its own arrays and is compiled once per
  `evaluate` call."""
  if isinstance(model, TrainState):
    return _apply_state, model
  if isinstance(model, Parameterized):
    return model.apply, model.variables
  return (lambda _, images: model(images)), None


def _attacked(variables: Any, batch: dict[str, jax.Array], key: jax.Array, attack: Attack | None,
              apply: Callable[[Any, jax.Array], jax.Array], clean_logits: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
  """The batch's images under `attack` (None: as they are) and the model's logits on them;
  `clean_logits`: the model's on the clean images, when the caller has them already.

  An example the model misclassifies clean keeps its clean image, as in AutoAttack (which attacks
  only the correctly classified): an attack's random start may land where the model is right, and
  robust accuracy would count an example the model already gets wrong."""
  model = lambda x: apply(variables, x)
  images = batch["images"]
  if attack is not None:
    adversarial = attack(model, images, batch["labels"], key)
    clean_logits = model(images) if clean_logits is None else clean_logits
    wrong = jnp.argmax(clean_logits, -1) != batch["labels"]
    images = jnp.where(wrong.reshape(-1, *[1] * (images.ndim - 1)), images, adversarial)
  return images, model(images)


@functools.partial(jax.jit, static_argnames=("apply", "num_classes", "attack"))
def evaluate_batch(variables: Any, batch: dict[str, jax.Array], key: jax.Array, num_classes: int,
                   attack: Attack | None, apply: Callable[[Any, jax.Array], jax.Array] = _apply_state
                   ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  labels, mask = batch["labels"], batch["mask"]
  clean_logits = apply(variables, batch["images"])
  clean_predictions = jnp.argmax(clean_logits, -1)
  # One clean forward pass for both, written once (XLA merged a second copy; the dry run counted both).
  images, logits = ((batch["images"], clean_logits) if attack is None
                    else _attacked(variables, batch, key, attack, apply, clean_logits))
  predictions = jnp.argmax(logits, -1)
  correct = (predictions == labels) * mask
  one_hot = jax.nn.one_hot(labels, num_classes) * mask[:, None]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  sums = {"correct": correct.sum(), "loss": (losses * mask).sum(), "count": mask.sum(),
          "class_correct": (one_hot * correct[:, None]).sum(0), "class_count": one_hot.sum(0)}
  examples = {"images": images, "predictions": predictions, "clean_predictions": clean_predictions}
  return sums, examples


@functools.partial(jax.jit, static_argnames=("apply", "attack", "keep_images"))
def _example_results(variables: Any, batch: dict[str, jax.Array], key: jax.Array, attack: Attack | None,
                     apply: Callable[[Any, jax.Array], jax.Array], keep_images: bool
                     ) -> dict[str, jax.Array]:
  """Per example of the batch: the prediction and cross-entropy on the (attacked) image, and the
  image itself with `keep_images`."""
  images, logits = _attacked(variables, batch, key, attack, apply)
  out = {"predictions": jnp.argmax(logits, -1),
         "loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])}
  if keep_images:
    out["images"] = images
  return out


def _to_host(x: jax.Array | np.ndarray) -> np.ndarray:
  """A global array as one numpy array on every process."""
  if isinstance(x, np.ndarray) or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(model: Model, split: Split, batch_size: int, mesh: Mesh, num_classes: int, *,
             attack: Attack | None = None, key: jax.Array | None = None,
             keep_examples: bool = False, members: MemberProgress | None = None,
             batches: BatchProgress | None = None) -> dict[str, Any]:
  """Accuracy, mean loss and per-class accuracy of the model, on clean inputs or, with `attack`, on
  the attack's examples (crafted batch by batch with keys folded from `key`).

  `model` is a TrainState (the network in inference mode), a Parameterized model or any
  `logits_fn(images) -> logits`, e.g. KernelRegression.logits_fn: networks and kernel machines go
  through this one loop.

  With `keep_examples`, also returns the (adversarial) images and predictions of every example
  under "examples", in split order. A worst_of attack (AutoAttack) runs member by member on the
  examples still robust (`_evaluate_in_turn`), kept after each member with `members`; any other
  keeps each batch's results with `batches` (a rerun takes them back).
  """
  key = jax.random.key(0) if key is None else key
  apply, variables = _as_apply(model)
  if isinstance(attack, WorstOf):
    return _evaluate_in_turn(apply, variables, split, batch_size, mesh, num_classes, attack, key,
                             keep_examples, members)
  totals, kept = None, []
  num_batches = -(-len(split) // batch_size)
  for i, batch in enumerate(eval_batches(split, batch_size, mesh)):
    found = batches.get(i) if batches is not None else None
    if found is None:
      sums, examples = evaluate_batch(variables, batch, jax.random.fold_in(key, i), num_classes,
                                       attack, apply)
      if batches is not None:  # on the host, as a batch taken back is
        sums = jax.tree.map(_to_host, sums)
        examples = jax.tree.map(_to_host, examples) if keep_examples else {}
        batches.put(i, {**{f"sum_{k}": v for k, v in sums.items()}, **examples}, num_batches)
    else:
      sums = {k[len("sum_"):]: v for k, v in found.items() if k.startswith("sum_")}
      examples = {k: v for k, v in found.items() if not k.startswith("sum_")}
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if keep_examples:
      kept.append(jax.tree.map(_to_host, examples))
  totals = jax.tree.map(lambda x: _to_host(x).astype(np.float64), totals)
  result = {"accuracy": float(totals["correct"] / totals["count"]),
            "loss": float(totals["loss"] / totals["count"]),
            "per_class_accuracy": (totals["class_correct"] / np.maximum(totals["class_count"], 1)).tolist()}
  if keep_examples:
    result["examples"] = {k: np.concatenate([e[k] for e in kept])[:len(split)] for k in kept[0]}
    result["examples"]["labels"] = split.labels
  return result


def _evaluate_in_turn(apply: Callable[[Any, jax.Array], jax.Array], variables: Any, split: Split,
                      batch_size: int, mesh: Mesh, num_classes: int, attack: WorstOf,
                      key: jax.Array, keep_examples: bool,
                      members: MemberProgress | None) -> dict[str, Any]:
  """`evaluate` under a worst_of attack the way AutoAttack spends its work: the clean images
  first, then each member in turn on only the examples every earlier one left correctly
  classified, re-batched (member i's batch b gets key fold_in(fold_in(key, i), b)). Robust
  accuracy counts, as worst_of inside jit does, an example broken by any member; an example keeps
  its clean image if the model already misclassifies it, else its first breaking image, else the
  member result of highest cross-entropy. On a model about half robust, the later (costlier)
  members attack about half the examples worst_of inside jit would.

  Adds "accuracy_after": {member name: robust accuracy once it and the members before it ran}.
  With `members`, every example's state is kept after each member, and the batches of the member
  under way as they go, and a rerun resumes from them."""

  def run(rows: np.ndarray, member: Attack | None, member_key: jax.Array,
          kept: BatchProgress | None = None) -> dict[str, np.ndarray]:
    part = Split(split.images[rows], split.labels[rows])
    num_batches, results = -(-len(rows) // batch_size), []
    for b, batch in enumerate(eval_batches(part, batch_size, mesh)):
      found = kept.get(b) if kept is not None else None
      if found is None:
        found = jax.tree.map(_to_host, _example_results(
            variables, batch, jax.random.fold_in(member_key, b), member, apply, keep_examples))
        if kept is not None:
          kept.put(b, found, num_batches)
      results.append(found)
    return {k: np.concatenate([r[k] for r in results])[:len(rows)] for k in results[0]}

  labels = split.labels
  restored = members.restore() if members is not None else None
  if restored is None:
    done, best, accuracy_after = 0, run(np.arange(len(split)), None, key), {}
    clean_predictions = best["predictions"].copy()
  else:
    done, best, accuracy_after = restored
    clean_predictions = best.pop("clean_predictions")
  for i, (name, member) in enumerate(zip(attack.names, attack.members)):
    if i < done:
      continue
    rows = np.flatnonzero(best["predictions"] == labels)
    if rows.size:
      found = run(rows, member, jax.random.fold_in(key, i),
                  None if members is None else members.batches(i))
      # Every row attacked is still classified correctly: a fooled result or a higher loss wins.
      stronger = (found["predictions"] != labels[rows]) | (found["loss"] > best["loss"][rows])
      for k, values in best.items():
        values[rows[stronger]] = found[k][stronger]
    accuracy_after[name] = float(np.mean(best["predictions"] == labels))
    if members is not None:
      members.member_done(i + 1, {**best, "clean_predictions": clean_predictions}, accuracy_after,
                          len(attack.members))

  correct = (best["predictions"] == labels).astype(np.float64)
  class_count = np.bincount(labels, minlength=num_classes)
  result = {"accuracy": float(correct.mean()), "loss": float(best["loss"].astype(np.float64).mean()),
            "per_class_accuracy": (np.bincount(labels, correct, num_classes)
                                   / np.maximum(class_count, 1)).tolist(),
            "accuracy_after": accuracy_after}
  if keep_examples:
    result["examples"] = {"images": best["images"], "predictions": best["predictions"],
                          "clean_predictions": clean_predictions, "labels": labels}
  return result


@functools.partial(jax.jit, static_argnames=("model",))
def _component_sums(model: LinearizedModel, state: TrainState,
                    batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  parts = output_components(model, state.params, batch["images"], state.batch_stats)
  mask = batch["mask"]
  sums = {"count": mask.sum()}
  for name, logits in parts.items():
    sums[f"{name}_mean_abs"] = (jnp.abs(logits).mean(-1) * mask).sum()
    sums[f"{name}_mean_norm"] = (jnp.linalg.norm(logits, axis=-1) * mask).sum()
  return sums


def output_component_means(model: LinearizedModel, state: TrainState, split: Split, batch_size: int,
                           mesh: Mesh) -> dict[str, float]:
  """How much of a linearized model's output is the frozen network f0(x) and how much the learned
  kernel term J(x)(theta - theta0): the mean over examples of each one's mean absolute logit
  ("*_mean_abs") and of its L2 norm over logits ("*_mean_norm")."""
  totals = None
  for batch in eval_batches(split, batch_size, mesh):
    sums = _component_sums(model, state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(lambda x: _to_host(x).astype(np.float64), totals)
  count = totals.pop("count")
  return {k: float(v / count) for k, v in totals.items()}


def evaluate_and_save(config: ml_collections.ConfigDict, state: TrainState, dataset: Dataset,
                      mesh: Mesh, workdir: str, step: int,
                      set_suffix: str = "",
                      linearized: LinearizedModel | None = None) -> dict[str, dict[str, Any]]:
  """Clean accuracy and, for each of `config.eval_attacks`, robust accuracy on the test split.

  With `config.save_adversarial` the examples of each attack go to
  `<workdir>/adversarial/<name><set_suffix>/` (see adversarial_sets.py), written by process 0.
  For a `linearized` model (the state's model), each result also has "output_components": the
  sizes of f0(x) and J(x)(theta - theta0) on its (clean or adversarial) inputs.

  Each attack's result records the settings that made it ("settings": the attack's config, the
  checkpoint step, seed, batch size, dataset, ...). An attack that the checkpoint's evaluation record
  already holds with these settings (and its set, when one is saved, in this job's place) is taken
  from there, so a rerun of a finished job evaluates only the attacks added or changed since. Where
  the set goes is not a setting: the train job's final evaluation and an evaluate job of that
  checkpoint (`set_suffix` "_epoch<epoch>") take each other's results once each has its own set.
  Each finished attack (each member of a worst_of one, and every minute the batches of the attack
  or member under way) is kept in the workdir (evaluation_progress.py): a killed or preempted
  evaluation, rerun, resumes there; `write_evaluation` drops what was kept. Everything runs at
  config.eval_matmul_precision, which the settings name when it is not the default.
  """
  precision = eval_matmul_precision(config)
  with default_precision(precision):
    return _evaluate_and_save(config, state, dataset, mesh, workdir, step, set_suffix, linearized,
                              precision)


def _evaluate_and_save(config: ml_collections.ConfigDict, state: TrainState, dataset: Dataset,
                       mesh: Mesh, workdir: str, step: int, set_suffix: str,
                       linearized: LinearizedModel | None, precision: str) -> dict[str, dict[str, Any]]:
  batch_size, num_classes = config.eval_batch_size, dataset.num_classes
  results = {"clean": evaluate(state, dataset.test, batch_size, mesh, num_classes)}
  if precision != "default":  # as every attack's settings name it
    results["clean"]["matmul_precision"] = precision
  components = lambda split: output_component_means(linearized, state, split, batch_size, mesh)
  if linearized is not None:
    results["clean"]["output_components"] = components(dataset.test)
  attack_key = jax.random.key(config.seed + 1)
  attacks = build_attacks(config.eval_attacks, "config.eval_attacks")
  # Whether the examples are saved is no setting of the result: a rerun that turns saving off reads
  # the record back, one that turns it on recomputes only where the set is missing.
  settings = {"step": int(step), "seed": config.seed, "eval_batch_size": batch_size,
              "dataset": dataset.name, "num_test": len(dataset.test),
              "linearized": linearized is not None}
  if precision != "default":  # records made before the field existed hold the default
    settings["matmul_precision"] = precision
  shared = _Evaluation(config, state, dataset, mesh, int(step), linearized,
                       results["clean"]["accuracy"])
  recorded = _recorded_results(workdir, step)
  with preemption_notices() as noticed:
    kept = KeptResults(_kept_directory(workdir, step), settings, noticed)
    for name, attack in attacks.items():
      identity = {"name": name, "attack": config.eval_attacks[name].to_dict()}
      made_with = json.loads(json.dumps({**settings, **identity}))  # as the record holds it
      set_directory = (os.path.join(workdir, "adversarial", name + set_suffix)
                       if config.save_adversarial else None)
      result = (_recorded_result(recorded.get(name), made_with, set_directory, workdir, step)
                or kept.get(identity, f"attack {name}"))
      if result is None:
        result = _attack_result(shared, name, attack, attack_key_of(attack_key, name), made_with,
                                set_directory, kept.members(identity, name),
                                kept.batches(identity, name))
        kept.put(identity, result)
      results[name] = {**result, "settings": made_with}
  return results


def attack_key_of(attack_key: jax.Array, name: str) -> jax.Array:
  """An evaluation attack's key, from its name: its place in the sorted `config.eval_attacks` would
  change its numbers (and re-run it) whenever an attack before it is added or removed."""
  return jax.random.fold_in(attack_key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _recorded_results(phase_dir: str, step: int) -> dict[str, dict[str, Any]]:
  """The results in checkpoint `step`'s evaluation record, {} when it has none, as process 0 reads
  them, on every process (another job may be adding to the record meanwhile)."""
  record = parallel.from_process_0(lambda: evaluation_records.read_record(phase_dir, step))
  return {} if record is None else record["results"]


def _recorded_result(result: dict[str, Any] | None, made_with: dict[str, Any],
                     set_directory: str | None, phase_dir: str, step: int) -> dict[str, Any] | None:
  """An attack's recorded `result` if `made_with` these settings and, when its set is saved, the
  set in `set_directory` is still this attack's on this checkpoint; else None. Process 0 decides,
  for every process."""
  if result is None:
    return None
  recorded = _result_settings(result.get("settings")) or {}
  if recorded != made_with:  # the same on every process: they read one record
    if jax.process_index() == 0:  # say why its numbers may change (another key, an added field)
      changed = files.changed_settings(recorded, made_with)
      print(f"attack {made_with['name']}: recorded with other settings ({', '.join(changed)}) in "
            f"{evaluation_records.record_directory(phase_dir, step)}/; evaluating it again", flush=True)
    return None
  if set_directory is not None and not parallel.agree(
      jax.process_index() == 0 and _is_set_of(set_directory, made_with)):
    if jax.process_index() == 0:
      print(f"attack {made_with['name']}: recorded, but its set in {set_directory} is missing, cut "
            f"short or another's; evaluating it again", flush=True)
    return None
  if jax.process_index() == 0:
    print(f"attack {made_with['name']}: recorded with these settings in "
          f"{evaluation_records.record_directory(phase_dir, step)}/", flush=True)
  return result


def _is_set_of(set_directory: str, made_with: dict[str, Any]) -> bool:
  """Whether the set was made with all of `made_with` (the attack, the checkpoint, and the batch
  size, seed, precision... that the record holds): a run killed after writing a set under other
  settings leaves a set that the older record does not describe. Its arrays must be whole too."""
  meta = read_set_meta(set_directory)
  return (meta is not None and _result_settings(meta.get("settings")) == made_with
          and is_whole_set(set_directory))


def _result_settings(settings: dict[str, Any] | None) -> dict[str, Any] | None:
  """Recorded settings less "save_adversarial", which records and sets made before 2026-12-02 hold
  (it does not change a result), so that they still match."""
  return None if settings is None else {k: v for k, v in settings.items() if k != "save_adversarial"}


def _kept_directory(phase_dir: str, step: int) -> str:
  """Where `evaluate_and_save` keeps the finished attacks of checkpoint `step`'s evaluation."""
  return os.path.join(phase_dir, "evaluations", f"step_{step}.partial")


@dataclasses.dataclass(frozen=True)
class _Evaluation:
  """What every attack of one `evaluate_and_save` call shares."""
  config: ml_collections.ConfigDict
  state: TrainState
  dataset: Dataset
  mesh: Mesh
  step: int
  linearized: LinearizedModel | None
  clean_accuracy: float


def _attack_result(shared: _Evaluation, name: str, attack: Attack, key: jax.Array,
                   made_with: dict[str, Any], set_directory: str | None, members: MemberProgress,
                   batches: BatchProgress) -> dict[str, Any]:
  """One attack of `evaluate_and_save`: its result, its examples saved as a set in
  `set_directory` when one is given."""
  config, dataset, batch_size = shared.config, shared.dataset, shared.config.eval_batch_size
  result = evaluate(shared.state, dataset.test, batch_size, shared.mesh, dataset.num_classes,
                    attack=attack, key=key,
                    keep_examples=set_directory is not None or shared.linearized is not None,
                    members=members, batches=batches)
  examples = result.pop("examples", None)
  if shared.linearized is not None:
    result["output_components"] = output_component_means(
        shared.linearized, shared.state, Split(examples["images"], examples["labels"]), batch_size,
        shared.mesh)
  if set_directory is not None and jax.process_index() == 0:
    meta = {"attack": config.eval_attacks[name].to_dict(), "dataset": dataset.name, "split": "test",
            "checkpoint_step": shared.step, "accuracy": result["accuracy"],
            "clean_accuracy": shared.clean_accuracy, "settings": made_with}
    save_adversarial_set(set_directory, examples, meta)
  return result


def evaluate_transfer(state: TrainState, set_directory: str, batch_size: int, mesh: Mesh,
                      num_classes: int) -> dict[str, Any]:
  """Accuracy of this model on a saved adversarial set, and the share of the attack's successes on
  their source model that also fool this one (`transfer_rate`)."""
  arrays, meta = load_adversarial_set(set_directory)
  split = Split(arrays["images"], arrays["labels"])
  result = evaluate(state, split, batch_size, mesh, num_classes, keep_examples=True)
  predictions = result.pop("examples")["predictions"]
  result.update(transfer_rate(predictions, arrays["labels"], arrays["predictions"],
                              arrays["clean_predictions"]))
  result["source"] = {"directory": set_directory if files.is_cloud(set_directory)
                      else os.path.abspath(set_directory), **meta}
  return result


def transfer_rate(predictions: np.ndarray, labels: np.ndarray, source_predictions: np.ndarray,
                  source_clean_predictions: np.ndarray) -> dict[str, Any]:
  """Of the examples the attack made fool their source model (right on the clean image, wrong on
  the adversarial one; "source_fooled" counts them), the share that fool this model too. An
  example the source misclassifies clean keeps its clean image in a set (AutoAttack's rule): it is
  no adversarial example, and is left out. None (JSON null, not NaN, which strict JSON readers
  refuse) when the attack fooled the source on no example."""
  source_fooled = (source_clean_predictions == labels) & (source_predictions != labels)
  count = int(np.count_nonzero(source_fooled))
  rate = float(np.mean(predictions[source_fooled] != labels[source_fooled])) if count else None
  return {"transfer_rate": rate, "source_fooled": count}


def _path_parts(path: str) -> list[str]:
  """A set's path as its components, local paths made absolute: the same set written two ways
  is one set, and the suffixes of two sets' paths compare component by component."""
  path = path.rstrip("/") if files.is_cloud(path) else os.path.abspath(path)
  return path.split("/")


def transfer_keys(paths: Sequence[str]) -> list[str]:
  """Each set's key in the evaluation's results: "transfer:" and the shortest end of its path that
  no other listed set's path ends with. Sets of several workdirs or phases share a basename
  (".../adversarial/pgd"), which alone would keep one result of them; a set whose basename is
  unique keeps "transfer:<basename>". A set listed twice, or an entry that is no path (a number
  the flag parser read as one), is refused, naming the field."""
  for path in paths:
    if not isinstance(path, str) or not path.strip("/"):
      raise ValueError(f"config.evaluate.transfer_sets holds {path!r}; expected the directories of "
                       f"saved sets (<workdir>/adversarial/<name>), e.g. "
                       f"--config.evaluate.transfer_sets=\"('workdirs/a/adversarial/pgd',)\".")
  parts = [_path_parts(p) for p in paths]
  keys = []
  for i, own in enumerate(parts):
    others = [p for j, p in enumerate(parts) if j != i]
    if own in others:
      same = ", ".join(repr(q) for q, p in zip(paths, parts) if p == own)
      raise ValueError(f"config.evaluate.transfer_sets lists one set more than once ({same}); list "
                       f"each set once.")
    n = next((n for n in range(1, len(own)) if all(p[-n:] != own[-n:] for p in others)), len(own))
    keys.append("transfer:" + "/".join(own[-n:]))
  return keys


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The `evaluate` job: one checkpoint (config.evaluate.phase and epoch, default the newest) under
  clean inputs, each of config.eval_attacks, and each saved set in config.evaluate.transfer_sets.

  Phase 1 is the network in `workdir`; phase 2 the linearized model of the experiment
  config.phase2.name, whose results also record the output components f0(x) and J(theta-theta0).
  Results go to `<phase dir>/evaluations/step_<step>/` and adversarial examples to
  `<phase dir>/adversarial/<attack>_epoch<epoch>/`, the phase dir being the workdir or
  `<workdir>/phase2/<name>/`. Each transfer set's result is under its `transfer_keys` key.
  """
  keys = transfer_keys(config.evaluate.transfer_sets)  # fail before any compute
  for path in config.evaluate.transfer_sets:
    _, meta = load_adversarial_set(path)
    if meta.get("dataset", config.data.name) != config.data.name:  # (a set that names none: taken)
      raise ValueError(f"config.evaluate.transfer_sets: {path} holds test images of "
                       f"{meta.get('dataset')!r}, not of config.data.name={config.data.name!r}, "
                       f"the dataset this model was trained on.")
  mesh = parallel.make_mesh()
  check_common_config(config, mesh.devices.size, training=False)
  restored = restore_for_inference(config, workdir, phase=config.evaluate.phase,
                                   epoch=config.evaluate.epoch, mesh=mesh, fields="config.evaluate")
  dataset = data.load_dataset(config.data)
  state = TrainState.create(apply_fn=restored.model.apply, tx=optax.identity(), **restored.variables)
  linearized = restored.model if isinstance(restored.model, LinearizedModel) else None
  results = evaluate_and_save(config, state, dataset, mesh, restored.phase_dir, restored.step,
                              set_suffix=f"_epoch{restored.epoch:g}", linearized=linearized)
  for key, path in zip(keys, config.evaluate.transfer_sets):
    with default_precision(eval_matmul_precision(config)):
      results[key] = evaluate_transfer(state, path, config.eval_batch_size, mesh, dataset.num_classes)
  return write_evaluation(restored.phase_dir, restored.step, restored.epoch, results)


def write_evaluation(workdir: str, step: int, epoch: float, results: dict[str, Any]) -> dict[str, Any]:
  """Records results (per-class accuracies included) in checkpoint `step`'s evaluation record
  (`<workdir>/evaluations/step_<step>/`, evaluation_records.py), then drops the parts
  `evaluate_and_save` kept for them; returns this evaluation's record.

  The record keeps the results it already holds under other names: the train job's final
  evaluation and an `evaluate` job of the same checkpoint (AutoAttack, transfer sets) share it,
  and a rerun of either, or both at once, must not erase the other's. Each result names its own
  settings."""
  record = {"step": int(step), "epoch": float(epoch), "results": results}
  if jax.process_index() == 0:
    evaluation_records.write_results(workdir, step, epoch, results)
  evaluation_progress.discard_named(_kept_directory(workdir, step), set(results))
  return record
