"""Phase-1 modes C/A/F, Loo et al.'s benign-then-adversarial updates, robust evaluation, saved sets;
the digits smoke run learns and its checkpoints are found by epoch."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ntk_scale import evaluate as evaluate_module
from ntk_scale import evaluation_records, jobs, parallel
from ntk_scale.adversarial_sets import load_adversarial_set, save_adversarial_set
from ntk_scale.attacks import build_attack
from ntk_scale.base_config import autoattack, base_config, pgd_linf
from ntk_scale.checkpoint import Checkpoints
from ntk_scale.data import load_digits
from ntk_scale.data.augment import crop_flip
from ntk_scale.evaluation_progress import MemberProgress
from ntk_scale.models import build_model
from ntk_scale.preemption import Preempted
from ntk_scale.train.experiment import batch_step_of_update
from ntk_scale.train.state import create_train_state
from ntk_scale.train.steps import make_train_step
from ntk_scale.train.metrics_jsonl import read_metrics

from conftest import Killed, notices_from
from test_train import load_config

EPS = 0.1
FGSM = ml_collections.ConfigDict(dict(name="fgsm", eps=EPS))


@pytest.fixture(scope="module")
def tiny():
  """A width-8 MLP, plain SGD, and one digits batch on the 4-device mesh."""
  c = base_config()
  c.model.name, c.model.width, c.model.depth = "mlp", 8, 1
  model = build_model(c.model, 10)
  mesh = parallel.make_mesh()
  tx = optax.sgd(0.5)
  digits = load_digits()
  batch = parallel.global_batch(mesh, {"images": digits.train.images, "labels": digits.train.labels},
                                np.arange(64))
  make_state = lambda: create_train_state(model, tx, (8, 8, 1), seed=0, mesh=mesh)
  return model, tx, batch, make_state


def _reference_update(model, params, images, labels, lr=0.5):
  """Plain SGD on the cross-entropy of (images, labels), written out."""
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, images, train=True), labels).mean()
  return jax.tree.map(lambda w, g: w - lr * g, params, jax.grad(loss)(params))


def _reference_fgsm(model, params, images, labels):
  loss = lambda x: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": params}, x, train=False), labels).sum()
  return jnp.clip(images + EPS * jnp.sign(jax.grad(loss)(images)), 0, 1)


def _assert_trees_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_adversarial_step_is_an_update_on_the_attack_examples(tiny):
  model, _, batch, make_state = tiny
  params0 = jax.device_get(make_state().params)
  images, labels = np.asarray(batch["images"]), np.asarray(batch["labels"])
  step = make_train_step("none", seed=0, attack=build_attack(FGSM))
  state, _ = step(make_state(), batch)
  expected = _reference_update(model, params0, _reference_fgsm(model, params0, images, labels), labels)
  _assert_trees_close(state.params, expected)


def test_benign_step_first_takes_a_benign_then_an_adversarial_update(tiny):
  model, _, batch, make_state = tiny
  params0 = jax.device_get(make_state().params)
  images, labels = np.asarray(batch["images"]), np.asarray(batch["labels"])
  step = make_train_step("none", seed=0, attack=build_attack(FGSM), benign_step_first=True)
  state, _ = step(make_state(), batch)
  assert int(state.step) == 2
  params1 = _reference_update(model, params0, images, labels)
  expected = _reference_update(model, params1, _reference_fgsm(model, params1, images, labels), labels)
  _assert_trees_close(state.params, expected)


def test_benign_step_first_trains_both_updates_on_the_augmented_batch(tiny):
  """With crop_flip, Loo et al.'s benign update takes the same cropped and flipped batch (the step's
  augmentation key, split(fold_in(key(seed), step))[0]) that the attack then perturbs: a benign
  update on the raw images would train on data the run's augmentation was meant to replace."""
  model, _, batch, make_state = tiny
  params0 = jax.device_get(make_state().params)
  images, labels = np.asarray(batch["images"]), np.asarray(batch["labels"])
  step = make_train_step("crop_flip", seed=0, attack=build_attack(FGSM), benign_step_first=True)
  state, _ = step(make_state(), batch)
  augment_key, _ = jax.random.split(jax.random.fold_in(jax.random.key(0), 0))
  augmented = crop_flip(augment_key, jnp.asarray(images))
  assert not np.array_equal(np.asarray(augmented), images)
  params1 = _reference_update(model, params0, augmented, labels)
  expected = _reference_update(model, params1, _reference_fgsm(model, params1, augmented, labels), labels)
  _assert_trees_close(state.params, expected)


def test_schedule_counts_batches_when_a_batch_takes_two_updates():
  to_batch = batch_step_of_update(flip_step=10, two_updates=True)
  counts = jnp.arange(16)
  np.testing.assert_array_equal(to_batch(counts), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 11, 11, 12, 12])
  assert batch_step_of_update(None, True) is None and batch_step_of_update(10, False) is None


def test_flip_mode_is_benign_until_flip_epoch_then_adversarial(tmp_path):
  config = load_config("digits", "smoke")  # its 3 epochs: the benign step is the `trained` runs' program
  config.log_every_steps = 1
  config.train.mode, config.train.flip_epoch, config.train.attack = "F", 1.0, FGSM
  config.eval_attacks = ml_collections.ConfigDict()
  jobs.run(config, str(tmp_path))
  flags = {r["step"]: r["train/adversarial"] for r in read_metrics(tmp_path) if "train/adversarial" in r}
  assert [s for s, f in sorted(flags.items()) if f == 1.0] == list(range(23, 67))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Benign and adversarial (PGD-3, not 7) digits smoke runs, each evaluated under PGD-2 and
  APGD-3 in batches of 128 (the evaluate job tests' PGD program): under PGD-2 the adversarial
  model stays 0.37 above the benign one (0.46 trained with PGD-7, under PGD-20).
  (config, workdir, the train job's result)."""
  out = {}
  for mode in ("benign", "adversarial"):
    config = load_config("digits", "smoke" if mode == "benign" else "adversarial,smoke")
    if mode == "adversarial":
      config.train.attack.num_steps = config.train.attack.unroll = 3
    config.eval_attacks.pgd.num_steps, config.eval_attacks.apgd.num_steps = 2, 3
    config.eval_batch_size = 128
    workdir = str(tmp_path_factory.mktemp(mode))
    out[mode] = (config, workdir, jobs.run(config, workdir))
  return out


def test_digits_smoke_learns_and_checkpoints_are_addressable_by_epoch(trained):
  _, workdir, result = trained["benign"]  # configs/digits.py:smoke, its training as it is
  assert result["test"]["accuracy"] > 0.9
  checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
  epochs = checkpoints.epochs()
  # 22 steps per epoch: the initialisation, fractional epochs 0.125 ... 2.5 and every whole epoch of 3.
  assert sorted(epochs) == [0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0]
  assert epochs[0.0] == 0 and epochs[0.5] == 11 and epochs[2.5] == 55
  state = checkpoints.restore_epoch(0.5, result["state"])
  assert int(state.step) == 11


def test_adversarial_training_is_far_more_robust(trained):
  benign, adversarial = trained["benign"][2]["results"], trained["adversarial"][2]["results"]
  for results in (benign, adversarial):
    assert results["clean"]["accuracy"] > 0.9
    for attack in ("pgd", "apgd"):
      assert results[attack]["accuracy"] <= results["clean"]["accuracy"]
  assert adversarial["pgd"]["accuracy"] > benign["pgd"]["accuracy"] + 0.2
  record = evaluation_records.read_record(trained["benign"][1], 66)
  assert record["epoch"] == 3.0 and len(record["results"]["pgd"]["per_class_accuracy"]) == 10
  assert record["results"]["pgd"]["accuracy"] == benign["pgd"]["accuracy"]


def test_saved_adversarial_set_is_consistent(trained):
  config, workdir, result = trained["benign"]
  results = result["results"]
  arrays, meta = load_adversarial_set(os.path.join(workdir, "adversarial", "pgd"))
  test = load_digits().test
  np.testing.assert_array_equal(arrays["labels"], test.labels)
  assert np.max(np.abs(arrays["images"] - test.images)) <= EPS + 1e-6
  assert arrays["images"].min() >= 0 and arrays["images"].max() <= 1
  assert meta["accuracy"] == pytest.approx(results["pgd"]["accuracy"])
  assert np.mean(arrays["predictions"] == arrays["labels"]) == pytest.approx(meta["accuracy"])
  assert np.mean(arrays["clean_predictions"] == arrays["labels"]) == pytest.approx(meta["clean_accuracy"])
  assert meta["attack"]["name"] == "pgd" and meta["attack"]["eps"] == EPS


def test_evaluate_job_scores_a_checkpoint_and_transfer_from_another_model(trained):
  config, workdir, _ = trained["benign"]
  source = os.path.join(trained["adversarial"][1], "adversarial", "pgd")
  config = ml_collections.ConfigDict(config.to_dict())
  # One attack shows the job's attacks: PGD-2 in batches of 128, the `trained` runs' program.
  del config.eval_attacks["apgd"]
  config.eval_attacks.pgd.num_steps, config.eval_batch_size = 2, 128
  config.job = "evaluate"
  config.evaluate.epoch = 1.0
  config.evaluate.transfer_sets = (source,)
  record = jobs.run(config, workdir)
  assert record["step"] == 22
  transfer = record["results"]["transfer:pgd"]
  assert 0.0 <= transfer["transfer_rate"] <= 1.0
  assert (evaluation_records.read_record(workdir, 22)["results"]["clean"]["accuracy"]
          == record["results"]["clean"]["accuracy"])
  assert os.path.isdir(os.path.join(workdir, "adversarial", "pgd_epoch1"))


def test_an_added_attack_neither_reruns_nor_changes_the_others(trained, capsys):
  """An attack's key comes from its name, not its place in the sorted config.eval_attacks: FGSM
  added before PGD left PGD's result in the record, and computed again PGD gives the same numbers
  (keyed by place, it moved from 0 to 1 and changed). A set that another evaluation's settings
  made (a run killed after writing it) is not taken for the record's."""
  config, workdir, _ = trained["benign"]
  config = ml_collections.ConfigDict(config.to_dict())
  del config.eval_attacks["apgd"]  # PGD-2 in batches of 128, as the evaluate job's test above
  config.eval_attacks.pgd.num_steps, config.eval_batch_size = 2, 128
  config.job, config.evaluate.epoch = "evaluate", 1.0
  alone = jobs.run(config, workdir)["results"]["pgd"]
  capsys.readouterr()
  config.eval_attacks.fgsm = ml_collections.ConfigDict(FGSM.to_dict())
  both = jobs.run(config, workdir)["results"]
  assert "attack pgd: recorded with these settings" in capsys.readouterr().out
  assert both["pgd"] == alone
  shutil.rmtree(evaluation_records.record_directory(workdir, 22))
  again = jobs.run(config, workdir)["results"]["pgd"]
  assert "attack pgd: recorded" not in capsys.readouterr().out
  assert again == alone
  meta_path = os.path.join(workdir, "adversarial", "pgd_epoch1", "meta.json")
  with open(meta_path) as f:
    meta = json.load(f)
  meta["settings"]["eval_batch_size"] = 64
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  jobs.run(config, workdir)
  out = capsys.readouterr().out
  assert "attack pgd: recorded with these" not in out
  assert "attack pgd: recorded, but its set in" in out and "is missing, cut short or another's" in out
  with open(meta_path) as f:
    assert json.load(f)["settings"]["eval_batch_size"] == 128  # made again, as recorded
  images_path = os.path.join(workdir, "adversarial", "pgd_epoch1", "images.npy")
  images = np.load(images_path)
  with open(images_path, "r+b") as f:  # cut short after it was written: its record still matches
    f.truncate(os.path.getsize(images_path) - 4096)
  jobs.run(config, workdir)
  assert "attack pgd: recorded, but its set in" in capsys.readouterr().out
  np.testing.assert_array_equal(np.load(images_path), images)  # made again, whole
  config.eval_attacks.pgd.num_steps = 3  # evaluated again, saying why its numbers move
  jobs.run(config, workdir)
  assert "attack pgd: recorded with other settings (attack) in" in capsys.readouterr().out


def test_train_and_evaluate_jobs_of_one_checkpoint_take_each_others_results(trained, tmp_path, capsys):
  """The train job's final evaluation saves its sets in adversarial/<attack>/, an evaluate job of
  that checkpoint in adversarial/<attack>_epoch3/. The evaluate job makes its own sets once; after
  that a rerun of either takes every attack from the record. (Where the set goes was a setting:
  each job's rerun evaluated again what the other had last recorded, every time.)"""
  config, source, _ = trained["benign"]
  workdir = str(tmp_path / "benign")
  shutil.copytree(source, workdir)
  evaluate = ml_collections.ConfigDict(config.to_dict())
  evaluate.job, evaluate.evaluate.epoch = "evaluate", 3.0
  jobs.run(evaluate, workdir)  # its sets: made once
  assert os.path.isdir(os.path.join(workdir, "adversarial", "pgd_epoch3"))
  for job in (config, evaluate, config):
    capsys.readouterr()
    jobs.run(job, workdir)
    out = capsys.readouterr().out
    for name in ("pgd", "apgd"):
      assert f"attack {name}: recorded with these settings" in out, (job.job, out)


def test_an_evaluation_record_keeps_the_results_other_jobs_wrote(tmp_path):
  """The train job's final evaluation and an evaluate job of that checkpoint write one record: a
  rerun of either replaces its own results and keeps the other's."""
  result = lambda accuracy: {"accuracy": accuracy, "settings": {"step": 66}}
  read = lambda: evaluation_records.read_record(str(tmp_path), 66)["results"]
  evaluate_module.write_evaluation(str(tmp_path), 66, 3.0, {"clean": result(0.9), "pgd": result(0.5)})
  evaluate_module.write_evaluation(str(tmp_path), 66, 3.0, {
      "clean": result(0.9), "autoattack": result(0.4), "transfer:pgd": result(0.7)})
  assert read() == {"clean": result(0.9), "autoattack": result(0.4), "transfer:pgd": result(0.7),
                    "pgd": result(0.5)}
  rerun = evaluate_module.write_evaluation(str(tmp_path), 66, 3.0, {"clean": result(0.9),
                                                                    "pgd": result(0.45)})
  assert rerun == {"step": 66, "epoch": 3.0, "results": {"clean": result(0.9), "pgd": result(0.45)}}
  assert read() == {"clean": result(0.9), "pgd": result(0.45), "autoattack": result(0.4),
                    "transfer:pgd": result(0.7)}


def test_transfer_keys_tell_apart_sets_of_one_basename(tmp_path):
  keys = evaluate_module.transfer_keys
  assert keys(["w/adversarial/pgd"]) == ["transfer:pgd"]  # one set: the key of older records
  assert keys(["w/adversarial/pgd", "w/adversarial/apgd/"]) == ["transfer:pgd", "transfer:apgd"]
  assert keys(["a/adversarial/pgd", "b/adversarial/pgd", "a/adversarial/apgd"]) == [
      "transfer:a/adversarial/pgd", "transfer:b/adversarial/pgd", "transfer:apgd"]
  assert keys(["gs://x/a/pgd", "gs://x/b/pgd"]) == ["transfer:a/pgd", "transfer:b/pgd"]
  with pytest.raises(ValueError, match=r"config.evaluate.transfer_sets lists one set more than once"):
    keys([str(tmp_path / "pgd"), str(tmp_path / "." / "pgd")])
  for entry in (2024, "", "/"):  # a number the flag parser read, no directory at all
    with pytest.raises(ValueError, match=r"config.evaluate.transfer_sets holds .*; expected the dir"):
      keys(["w/adversarial/pgd", entry])


def test_evaluate_job_keeps_every_transfer_set_of_one_basename(trained, tmp_path):
  """Sets of two workdirs share their basename ("adversarial/pgd"): each gets its own result, the
  one it gets when evaluated alone (epoch 0.5, clean and transfer only)."""
  config, workdir, _ = trained["benign"]
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval_attacks = ml_collections.ConfigDict()
  config.evaluate.epoch = 0.5
  test = load_digits().test
  rng = np.random.default_rng(0)
  sets = []
  for i, source in enumerate(("a", "b")):  # different examples, different source predictions
    n = 24 + 8 * i
    images = np.clip(test.images[:n] + rng.uniform(-0.3, 0.3, test.images[:n].shape), 0, 1)
    predictions = np.where(rng.random(n) < 0.5, test.labels[:n], (test.labels[:n] + 1) % 10)
    arrays = {"images": images.astype(np.float32), "labels": test.labels[:n].astype(np.int32),
              "predictions": predictions.astype(np.int32),
              "clean_predictions": test.labels[:n].astype(np.int32)}
    sets.append(str(tmp_path / source / "adversarial" / "pgd"))
    save_adversarial_set(sets[-1], arrays, {"attack": {"name": "pgd"}, "dataset": "digits",
                                            "split": "test", "checkpoint_step": 0})
  config.job = "evaluate"
  config.evaluate.transfer_sets = tuple(sets)
  both = jobs.run(config, workdir)["results"]
  assert sorted(k for k in both if k.startswith("transfer")) == [
      "transfer:a/adversarial/pgd", "transfer:b/adversarial/pgd"]
  for source, path in zip(("a", "b"), sets):
    config.evaluate.transfer_sets = (path,)
    alone = jobs.run(config, workdir)["results"]["transfer:pgd"]
    assert both[f"transfer:{source}/adversarial/pgd"] == alone
  assert both["transfer:a/adversarial/pgd"] != both["transfer:b/adversarial/pgd"]


def test_a_preempted_then_killed_evaluation_resumes_from_its_finished_attacks_and_members(
    trained, monkeypatch):
  """AutoAttack's members (APGD-CE, APGD-T) in turn, then PGD (the config's order), batches of 128
  of the 360 test images: preempted in AutoAttack's first batch, then killed in PGD, the evaluation
  ends with the record and adversarial sets of an uninterrupted one, and no finished attack, member
  or kept batch runs again, though another evaluation of the checkpoint finished in between."""
  config, workdir, _ = trained["benign"]
  config = ml_collections.ConfigDict(config.to_dict())
  config.job, config.evaluate.epoch, config.eval_batch_size = "evaluate", 1.0, 128
  config.eval_attacks = ml_collections.ConfigDict(dict(
      pgd=pgd_linf(EPS, num_steps=3), autoattack=autoattack(EPS, num_steps=3, num_targets=2,
                                                             fab_steps=0, square_queries=0)))
  assert list(config.eval_attacks) == ["autoattack", "pgd"]
  sets = lambda: {name: load_adversarial_set(os.path.join(workdir, "adversarial", f"{name}_epoch1"))[0]
                  for name in config.eval_attacks}
  uninterrupted, uninterrupted_sets = jobs.run(config, workdir), sets()
  partial = os.path.join(workdir, "evaluations", "step_22.partial")
  assert not os.path.exists(partial)
  shutil.rmtree(evaluation_records.record_directory(workdir, 22))  # as if never finished

  attacked, members_done, batches_run = [], [], []
  attack_result, member_done = evaluate_module._attack_result, MemberProgress.member_done
  example_results = evaluate_module._example_results

  def attack_killed_in_pgd(*args):
    attacked.append(args[1])  # the attack's name
    if args[1] == "pgd" and kill_in_pgd:
      raise Killed()
    return attack_result(*args)

  def recorded_member_done(self, done, *args):
    members_done.append(done)
    member_done(self, done, *args)

  monkeypatch.setattr(evaluate_module, "_attack_result", attack_killed_in_pgd)
  monkeypatch.setattr(evaluate_module, "_example_results",
                      lambda *args: batches_run.append(args[3] is not None) or example_results(*args))
  monkeypatch.setattr(MemberProgress, "member_done", recorded_member_done)
  kill_in_pgd = True
  with monkeypatch.context() as patch:  # the notice during AutoAttack's first batch
    patch.setattr(evaluate_module, "preemption_notices", notices_from(1))
    with pytest.raises(Preempted, match=r"1 of \d batches of attack autoattack \(member 1\)") as stopped:
      jobs.run(config, workdir)
  first_member_batches = int(re.search(r"1 of (\d) batches", str(stopped.value))[1])
  assert stopped.value.step == 1 and first_member_batches > 1 and attacked == ["autoattack"]
  assert members_done == [] and batches_run.count(True) == 1
  del attacked[:], members_done[:], batches_run[:]
  with pytest.raises(Killed):
    jobs.run(config, workdir)
  assert attacked == ["autoattack", "pgd"] and members_done == [1, 2]
  # The first member's first batch was taken back: its other batches ran, then the second member's.
  assert batches_run.count(True) >= first_member_batches
  # Another evaluation of this checkpoint (FGSM) finishing meanwhile leaves AutoAttack's kept result.
  other = ml_collections.ConfigDict(config.to_dict())
  other.eval_attacks = ml_collections.ConfigDict(dict(fgsm=FGSM.to_dict()))
  jobs.run(other, workdir)
  del attacked[:], members_done[:], batches_run[:]
  kill_in_pgd = False
  resumed = jobs.run(config, workdir)
  assert attacked == ["pgd"] and members_done == [] and batches_run.count(True) == 0
  assert resumed == uninterrupted and not os.path.exists(partial)
  for name, arrays in sets().items():
    for key, values in arrays.items():
      np.testing.assert_array_equal(values, uninterrupted_sets[name][key])

  # Finished, rerun: every attack is taken from the record; one changed (or whose set is gone)
  # is evaluated again, alone.
  del attacked[:], members_done[:], batches_run[:]
  assert jobs.run(config, workdir) == uninterrupted and attacked == [] and batches_run == []
  config.eval_attacks.pgd.num_steps = 2
  changed = jobs.run(config, workdir)
  assert attacked == ["pgd"] and changed["results"]["pgd"]["settings"]["attack"]["num_steps"] == 2
  assert changed["results"]["autoattack"] == uninterrupted["results"]["autoattack"]
  shutil.rmtree(os.path.join(workdir, "adversarial", "pgd_epoch1"))
  del attacked[:]
  assert jobs.run(config, workdir) == changed and attacked == ["pgd"]
  # Saving the examples is no setting of a result: off, then on again with the sets in place, every
  # attack is read back (each was evaluated again, AutoAttack included).
  del attacked[:]
  config.save_adversarial = False
  assert jobs.run(config, workdir) == changed and attacked == []
  config.save_adversarial = True
  assert jobs.run(config, workdir) == changed and attacked == []


def test_evaluate_job_rejects_a_missing_set_or_another_datasets_before_compute(trained, tmp_path):
  config, workdir, _ = trained["benign"]
  config = ml_collections.ConfigDict(config.to_dict())
  config.job = "evaluate"
  config.evaluate.transfer_sets = (str(tmp_path / "nothing"),)
  with pytest.raises(FileNotFoundError, match="not a complete adversarial set"):
    jobs.run(config, workdir)
  # A set of another dataset's images (an MNIST set for a digits model) was scored silently.
  test = load_digits().test
  other = str(tmp_path / "mnist" / "adversarial" / "pgd")
  save_adversarial_set(other, {"images": test.images[:4], "labels": test.labels[:4],
                               "predictions": test.labels[:4], "clean_predictions": test.labels[:4]},
                       {"attack": {"name": "pgd"}, "dataset": "mnist", "split": "test"})
  config.evaluate.transfer_sets = (other,)
  with pytest.raises(ValueError, match=r"config.evaluate.transfer_sets: .* holds test images of "
                                       r"'mnist', not of config.data.name='digits'"):
    jobs.run(config, workdir)


def test_evaluations_run_at_config_eval_matmul_precision_and_record_it(trained, monkeypatch):
  """On TPUs the default precision rounds every matmul input to bfloat16, attacks' gradients
  included: config.eval_matmul_precision (a runtime field) sets the evaluation's, the record names
  it, and a result made at another precision is not taken from the record."""
  config, workdir, _ = trained["benign"]
  config = ml_collections.ConfigDict(config.to_dict())
  config.job, config.evaluate.epoch, config.save_adversarial = "evaluate", 2.0, False
  del config.eval_attacks["apgd"]
  config.eval_attacks.pgd.num_steps, config.eval_batch_size = 2, 128  # as the tests above: compiled
  in_effect = []
  evaluate_batch = evaluate_module.evaluate_batch
  monkeypatch.setattr(evaluate_module, "evaluate_batch", lambda *args: in_effect.append(
      jax.config.jax_default_matmul_precision) or evaluate_batch(*args))
  config.eval_matmul_precision = "high"
  high = jobs.run(config, workdir)
  assert set(in_effect) == {"high"} and high["results"]["pgd"]["settings"]["matmul_precision"] == "high"
  assert high["results"]["clean"]["matmul_precision"] == "high"
  in_effect.clear()
  config.eval_matmul_precision = "default"
  default = jobs.run(config, workdir)  # evaluated again: the record's result was made at "high"
  assert in_effect and set(in_effect) == {None} and "matmul_precision" not in default["results"]["pgd"]["settings"]
  assert "matmul_precision" not in default["results"]["clean"]
  assert default["results"]["pgd"]["accuracy"] == high["results"]["pgd"]["accuracy"]  # a CPU: alike


def test_a_set_rewritten_in_part_has_no_record_and_one_without_its_record_is_incomplete(tmp_path,
                                                                                         monkeypatch):
  """meta.json goes first and comes last: a rewrite that fails half way leaves no record of the
  set it was replacing (its arrays are no longer that set's), and loading says the set is incomplete."""
  from ntk_scale import adversarial_sets, files
  directory = str(tmp_path / "pgd")
  arrays = {"images": np.zeros((2, 4, 4, 1), np.float32), "labels": np.arange(2, dtype=np.int32),
            "predictions": np.arange(2, dtype=np.int32), "clean_predictions": np.arange(2, dtype=np.int32)}
  adversarial_sets.save_adversarial_set(directory, arrays, {"accuracy": 0.5})
  assert adversarial_sets.read_set_meta(directory) == {"accuracy": 0.5}
  save_array = files.save_array

  def failing_predictions(path, array):
    if path.endswith("predictions.npy") and not path.endswith("clean_predictions.npy"):
      raise OSError(28, "No space left on device")
    save_array(path, array)

  monkeypatch.setattr(files, "save_array", failing_predictions)
  with pytest.raises(OSError):
    adversarial_sets.save_adversarial_set(directory, {**arrays, "images": arrays["images"] + 1}, {})
  assert adversarial_sets.read_set_meta(directory) is None
  with pytest.raises(FileNotFoundError, match=r"not a complete adversarial set; missing \[.*meta.json"):
    adversarial_sets.load_adversarial_set(directory)
