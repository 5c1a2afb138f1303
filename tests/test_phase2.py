"""Phase 2: the linearized model trained from a phase-1 checkpoint, resumable, in its own named
directory of the workdir; its checkpoints read back for evaluation."""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ntk_scale import data, evaluation_records, jobs, restore
from ntk_scale.base_config import base_config, pgd_linf
from ntk_scale.checkpoint import CheckpointNotFoundError, Checkpoints
from ntk_scale.data import load_digits
from ntk_scale.linearize import LinearizedModel
from ntk_scale.models import build_model
from ntk_scale.restore import restore_for_inference
from ntk_scale.train.phase2 import apply_loaders, build_phase2, check_phase2_config
from ntk_scale.train.metrics_jsonl import read_metrics
from ntk_scale.workdir import WorkdirConfigMismatchError, phase2_name, phase2_record, prepare_workdir

from test_train import load_config

EPS = 0.1
NAME = "centered_C_from0.5"  # the name derived from phase2_config()'s phase-2 fields


def phase2_config() -> ml_collections.ConfigDict:
  """Digits smoke: 1 benign epoch, then 2 epochs of the centered model from epoch 0.5."""
  c = load_config("digits", "smoke")
  c.num_epochs = 1.0
  c.log_every_steps = 5
  c.eval_batch_size = 100  # the 360 test images in 4 batches, the last one padded
  c.eval_attacks = ml_collections.ConfigDict({"pgd": pgd_linf(EPS, num_steps=2)})
  c.phase2.num_epochs = 2.0
  c.phase2.from_epoch = 0.5
  c.phase2.attack = pgd_linf(EPS, num_steps=2)
  return c


def raw_checkpoint(directory, step) -> dict:
  """A checkpoint's state as saved, with no target structure."""
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta"))
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def train_records(directory) -> list[dict]:
  return [r for r in read_metrics(directory) if any(k.startswith(("train/", "test/")) for k in r)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Phase 1 then phase 2 in one train job."""
  workdir = str(tmp_path_factory.mktemp("phase2"))
  config = phase2_config()
  return config, workdir, jobs.run(config, workdir)


def test_phase2_follows_phase1_from_theta0_and_learns(run):
  config, workdir, result = run
  assert result["steps"] == 22 and result["phase2"]["steps"] == 44
  p2dir = os.path.join(workdir, "phase2", NAME)
  assert sorted(Checkpoints(os.path.join(p2dir, "checkpoints")).epochs()) == [1.0, 2.0]
  losses = [r["train/loss"] for r in read_metrics(p2dir) if "train/loss" in r]
  assert len(losses) == 10 and losses[-1] < 0.5 * losses[0]
  # The phase-2 state starts at theta0, the phase-1 checkpoint of epoch 0.5 (step 11) ...
  p2 = build_phase2(config, workdir)
  assert p2.from_step == 11 and int(p2.state.step) == 0
  theta0 = raw_checkpoint(os.path.join(workdir, "checkpoints"), 11)
  for a, b in zip(leaves(p2.state.params), leaves(theta0["params"]), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(leaves(p2.state.batch_stats), leaves(theta0["batch_stats"]), strict=True):
    np.testing.assert_array_equal(a, b)
  # ... where the centered model's outputs are zero.
  images = jnp.asarray(load_digits().test.images[:8])
  logits = p2.state.apply_fn({"params": p2.state.params, "batch_stats": p2.state.batch_stats},
                             images, train=False)
  np.testing.assert_allclose(np.asarray(logits), 0.0, atol=1e-5)
  assert result["phase2"]["test"]["accuracy"] > 0.8


def test_phase2_draws_its_own_batch_order(run):
  """Phase 2 shuffles the training set with seed + 1, epoch by epoch (numpy's permutation of
  default_rng([seed + 1, epoch]) here): with phase 1's seed it would replay, batch for batch, the
  order phase 1 was trained in."""
  config, workdir, _ = run
  batches = build_phase2(config, workdir).phase.batches
  n, size = len(load_digits().train), config.batch_size
  steps = n // size
  for epoch in (0, 1):
    rows = np.concatenate([batches.rows(epoch * steps + i) for i in range(steps)])
    np.testing.assert_array_equal(
        rows, np.random.default_rng([config.seed + 1, epoch]).permutation(n)[:steps * size])
  phase1_first = np.random.default_rng([config.seed, 0]).permutation(n)[:size]
  assert not np.array_equal(batches.rows(0), phase1_first)


def test_phase2_evaluation_records_output_components(run):
  _, workdir, result = run
  record = evaluation_records.read_record(os.path.join(workdir, "phase2", NAME), 44)
  assert record["epoch"] == 2.0
  for name in ("clean", "pgd"):
    parts = record["results"][name]["output_components"]
    assert set(parts) == {"f0_mean_abs", "f0_mean_norm", "jvp_mean_abs", "jvp_mean_norm"}
    assert all(np.isfinite(v) and v > 0 for v in parts.values())
  # Each is the mean over the test split (clean, or its saved PGD examples) of an independent
  # recomputation with the plain network: f0 = f(x; theta0), jvp = J(x; theta0)(theta - theta0).
  config = phase2_config()
  network = build_model(config.model, data.num_classes(config.data))
  theta0 = raw_checkpoint(os.path.join(workdir, "checkpoints"), 11)
  theta = raw_checkpoint(os.path.join(workdir, "phase2", NAME, "checkpoints"), 44)["params"]
  params0, stats0 = theta0["params"], theta0["batch_stats"]  # BatchNorm frozen at theta0
  delta = jax.tree.map(lambda p, p0: p - p0, theta, params0)
  f = lambda p, x: network.apply({"params": p, "batch_stats": stats0}, x, train=False)
  images = {"clean": load_digits().test.images,
            "pgd": np.load(os.path.join(workdir, "phase2", NAME, "adversarial", "pgd", "images.npy"))}
  for name, x in images.items():
    assert len(x) == 360 and len(x) % config.eval_batch_size  # a padded last batch
    f0, jvp = jax.jvp(lambda p: f(p, jnp.asarray(x)), (params0,), (delta,))
    parts = record["results"][name]["output_components"]
    for part, logits in (("f0", np.asarray(f0, np.float64)), ("jvp", np.asarray(jvp, np.float64))):
      assert logits.shape == (360, 10)
      assert parts[f"{part}_mean_abs"] == pytest.approx(np.abs(logits).mean(), rel=1e-5), (name, part)
      assert parts[f"{part}_mean_norm"] == pytest.approx(
          np.linalg.norm(logits, axis=1).mean(), rel=1e-5), (name, part)
  assert record["results"]["pgd"]["accuracy"] <= record["results"]["clean"]["accuracy"]
  assert os.path.isdir(os.path.join(workdir, "phase2", NAME, "adversarial", "pgd"))
  # Phase 1's evaluation is where it always was, without components.
  assert "output_components" not in evaluation_records.read_record(workdir, 22)["results"]["clean"]


def test_phase2_alone_adversarial_from_loaders(run, tmp_path):
  config, workdir, _ = run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("phase2"))
  config = ml_collections.ConfigDict(config.to_dict())
  config.job, config.num_epochs, config.loaders = "phase2", 0.0, "CA"
  config.phase2.num_epochs = 1.0
  result = jobs.run(config, copy)
  assert result["steps"] == 22
  p2dir = os.path.join(copy, "phase2", "centered_A_from0.5")
  flags = [r["train/adversarial"] for r in read_metrics(p2dir) if "train/adversarial" in r]
  assert flags and all(f == 1.0 for f in flags)
  # A different phase-2 experiment under the same name is refused.
  config.phase2.num_epochs = 3.0
  with pytest.raises(WorkdirConfigMismatchError, match="(?s)phase2.num_epochs.*config.phase2.name"):
    jobs.run(config, copy)
  # loaders' phase-1 mode must be the workdir's.
  config.phase2.num_epochs, config.loaders = 1.0, "AA"
  with pytest.raises(WorkdirConfigMismatchError, match="train.mode"):
    jobs.run(config, copy)


def test_loaders_map_onto_the_phase_modes():
  config = phase2_config()
  for loaders, modes in (("CA", ("C", "A")), ("AC", ("A", "C")), ("FC", ("F", "C")), ("AA", ("A", "A"))):
    config.loaders = loaders
    mapped = apply_loaders(config)
    assert (mapped.train.mode, mapped.phase2.mode) == modes
  config.loaders = ""
  assert apply_loaders(config) is config
  for bad in ("CF", "X", "CAA", "ca", "AF"):
    config.loaders = bad
    with pytest.raises(ValueError, match="config.loaders"):
      apply_loaders(config)


def test_invalid_loaders_fail_before_the_workdir_is_touched(tmp_path):
  config = phase2_config()
  config.loaders = "CF"
  with pytest.raises(ValueError, match="config.loaders='CF'"):
    jobs.run(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_missing_from_epoch_fails_before_compute(run, tmp_path):
  config, workdir, _ = run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("phase2"))
  config = ml_collections.ConfigDict(config.to_dict())
  config.job, config.phase2.from_epoch = "phase2", 0.625
  with pytest.raises(CheckpointNotFoundError,
                     match=r"config.phase2.from_epoch=0.625 .*available epochs: \[0.0, 0.125, 0.25"):
    jobs.run(config, copy)
  assert not os.path.exists(os.path.join(copy, "phase2"))
  # The phase2 job needs a trained phase 1.
  with pytest.raises(CheckpointNotFoundError, match="no phase-1 run"):
    jobs.run(config, str(tmp_path / "empty"))
  # The train job refuses a from_epoch phase 1 will not save, before training phase 1.
  config.job = "train"
  with pytest.raises(CheckpointNotFoundError, match="not an epoch phase 1 saves"):
    jobs.run(config, str(tmp_path / "fresh"))
  assert not os.path.exists(tmp_path / "fresh" / "checkpoints")


def test_bad_phase2_fields_are_named():
  for field, value, message in (("linearization", "quadratic", "config.phase2.linearization"),
                                ("mode", "F", "config.phase2.mode"),
                                ("batch_norm", "train", "config.phase2.batch_norm"),
                                ("compute_dtype", "float16", "config.phase2.compute_dtype='float16'"),
                                ("matmul_precision", "low", "config.phase2.matmul_precision='low'")):
    config = phase2_config()
    config.phase2[field] = value
    with pytest.raises(ValueError, match=message):
      check_phase2_config(config)
  config = phase2_config()
  config.phase2.optimizer.learning_rate = -1.0
  with pytest.raises(ValueError, match="config.phase2.optimizer.learning_rate"):
    check_phase2_config(config)
  config = phase2_config()
  config.phase2.compute_dtype, config.phase2.linearization = "bfloat16", "centered"
  check_phase2_config(config)
  config.phase2.linearization = "centered_nonlinear"
  with pytest.raises(ValueError, match="config.phase2.compute_dtype='bfloat16' with linearization "
                                       "'centered_nonlinear'.*use float32"):
    check_phase2_config(config)


def test_a_negative_from_epoch_and_a_zero_checkpoint_interval_are_named():
  """Neither is left to a later step: a negative theta0 epoch, and an interval of 0 epochs (a save
  schedule of no step between checkpoints)."""
  for field, value, message in (
      ("from_epoch", -0.5, r"config\.phase2\.from_epoch=-0\.5 must be a phase-1 epoch >= 0"),
      ("checkpoint_every_epochs", 0.0, r"config\.phase2\.checkpoint_every_epochs=0\.0 must be positive")):
    config = phase2_config()
    config.phase2[field] = value
    with pytest.raises(ValueError, match=message):
      check_phase2_config(config)


def test_evaluate_job_on_a_phase2_checkpoint_matches_phase2s_own_evaluation(run, tmp_path):
  config, workdir, result = run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  config = ml_collections.ConfigDict(config.to_dict())
  config.job, config.evaluate.phase, config.evaluate.epoch = "evaluate", 2, 2.0
  record = jobs.run(config, copy)
  assert record["step"] == 44 and record["epoch"] == 2.0
  final = result["phase2"]["results"]
  for name in ("clean", "pgd"):
    got, want = record["results"][name], final[name]
    assert got["accuracy"] == want["accuracy"]
    assert got["per_class_accuracy"] == want["per_class_accuracy"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    for k, v in want["output_components"].items():
      assert got["output_components"][k] == pytest.approx(v, rel=1e-5)
  # Recorded in the phase-2 experiment's directory, examples named by the phase-2 epoch.
  p2dir = os.path.join(copy, "phase2", NAME)
  assert (evaluation_records.read_record(p2dir, 44)["results"]["clean"]["accuracy"]
          == final["clean"]["accuracy"])
  assert os.path.isdir(os.path.join(p2dir, "adversarial", "pgd_epoch2"))


def test_restore_for_inference_by_phase_and_epoch(run):
  config, workdir, result = run
  phase1 = restore_for_inference(config, workdir, phase=1, epoch=0.5)
  assert (phase1.step, phase1.epoch) == (11, 0.5) and not isinstance(phase1.model, LinearizedModel)
  theta0 = raw_checkpoint(os.path.join(workdir, "checkpoints"), 11)
  for part in ("params", "batch_stats"):
    for a, b in zip(leaves(phase1.variables[part]), leaves(theta0[part]), strict=True):
      np.testing.assert_array_equal(a, b)
  newest = restore_for_inference(config, workdir, phase=2, epoch=None)  # the newest: epoch 2
  assert (newest.step, newest.epoch) == (44, 2.0)
  assert newest.checkpoint_dir == os.path.join(os.path.abspath(workdir), "phase2", NAME, "checkpoints", "44")
  assert newest.model.kind == "centered" and newest.model.batch_norm == "frozen"
  for a, b in zip(leaves(newest.variables["params"]), leaves(result["phase2"]["state"].params), strict=True):
    np.testing.assert_array_equal(a, b)
  # Its logits are those of phase 2's own model.
  images = jnp.asarray(load_digits().test.images[:8])
  state = result["phase2"]["state"]
  np.testing.assert_allclose(
      np.asarray(newest.model.apply(newest.variables, images, train=False)),
      np.asarray(state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images,
                                train=False)), rtol=1e-5, atol=1e-6)


def test_restore_errors_name_the_field_and_list_what_exists(run, tmp_path, monkeypatch):
  config, workdir, _ = run
  config = ml_collections.ConfigDict(config.to_dict())
  config.job = "kernel"  # errors name the section of the job that asked: config.kernel.*
  with pytest.raises(CheckpointNotFoundError,
                     match=r"config.kernel.epoch=0.625 .*available epochs: \[0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0\]"):
    restore_for_inference(config, workdir, phase=1, epoch=0.625)
  with pytest.raises(CheckpointNotFoundError, match=r"config.kernel.epoch=1.5 .*available epochs: \[1.0, 2.0\]"):
    restore_for_inference(config, workdir, phase=2, epoch=1.5)
  with pytest.raises(ValueError, match=r"config.kernel.phase=3; expected 1 .* or 2"):
    restore_for_inference(config, workdir, phase=3, epoch=None)
  with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint in .*config.job='train'"):
    restore_for_inference(config, str(tmp_path / "empty"), phase=1, epoch=None)
  other = ml_collections.ConfigDict(config.to_dict())
  other.phase2.linearization = "linear"
  with pytest.raises(CheckpointNotFoundError,
                     match=rf"no phase-2 experiment 'linear_C_from0.5' .*config.phase2.name.*\['{NAME}'\]"):
    restore_for_inference(other, workdir, phase=2, epoch=None, fields="config.evaluate")
  other.phase2.name = NAME  # the right directory, but another model than it holds
  with pytest.raises(ValueError, match="config.phase2.linearization: 'centered' there, 'linear' here"):
    restore_for_inference(other, workdir, phase=2, epoch=None)
  # The evaluate job fails the same way, before it loads any data.
  monkeypatch.setattr(data, "load_dataset", lambda _: pytest.fail("loaded data before the error"))
  config.job, config.evaluate.phase, config.evaluate.epoch = "evaluate", 2, 3.0
  with pytest.raises(CheckpointNotFoundError, match=r"config.evaluate.epoch=3 .*\[1.0, 2.0\]"):
    jobs.run(config, workdir)


def test_a_restored_checkpoint_carries_its_saved_epoch_and_a_nan_epoch_is_refused(tmp_path):
  """An epoch asked for matches a saved one to 1e-9: the checkpoint read back is named by the epoch
  it was saved as (results are filed under it), not the one asked for. NaN matches no epoch: it is
  refused as a bad field value, not reported as a missing checkpoint."""
  config = load_config("digits", "smoke")
  checkpoints = Checkpoints(str(tmp_path / "checkpoints"))
  for step, epoch in ((0, 0.0), (3, 0.125), (6, 0.25)):
    checkpoints.save(step, {"params": {"w": jnp.full((2,), float(step))}}, epoch)
  checkpoints.close()
  restored = restore_for_inference(config, str(tmp_path), phase=1, epoch=0.125 + 1e-12)
  assert (restored.step, restored.epoch) == (3, 0.125)
  np.testing.assert_array_equal(np.asarray(restored.variables["params"]["w"]), [3.0, 3.0])
  with pytest.raises(ValueError, match=r"config.kernel.epoch=nan; expected an epoch number"):
    restore_for_inference(config, str(tmp_path), phase=1, epoch=float("nan"), fields="config.kernel")


def test_the_phase2_job_may_differ_from_phase_1_in_its_length_and_saves(tmp_path):
  """The phase2 job reads phase 1's checkpoints and trains no phase 1: another num_epochs or
  checkpoint.* (the phase-1 schedule) is no other experiment; another seed is."""
  config = phase2_config()
  prepare_workdir(config, str(tmp_path))
  config.job, config.num_epochs = "phase2", 2.0
  config.checkpoint.every_epochs, config.checkpoint.fractional_epochs = 0.5, (0.25,)
  prepare_workdir(config, str(tmp_path))
  config.seed = 1
  with pytest.raises(WorkdirConfigMismatchError, match=r"seed: 0 -> 1"):
    prepare_workdir(config, str(tmp_path))


def test_two_phase2_experiments_coexist_and_each_resumes(run, tmp_path, caplog):
  """Each killed before its last save: the run's own experiment resumed by the train job (phase 1
  finished), the other by the phase2 job; each equals its uninterrupted run, bit for bit."""
  config, workdir, _ = run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  first = ml_collections.ConfigDict(config.to_dict())
  first.job = "phase2"
  second = ml_collections.ConfigDict(first.to_dict())
  # Another optimizer, under its own name (README), with the first's model: its evaluation programs
  # are the first's (another linearization compiled its own attack and evaluation).
  second.phase2.name, second.phase2.optimizer.learning_rate = "centered_lr0.02_short", 0.02
  second.phase2.num_epochs, second.phase2.checkpoint_every_epochs = 1.0, 0.5
  assert jobs.run(second, copy)["steps"] == 22
  dirs = {NAME: (config, 44), "centered_lr0.02_short": (second, 22)}
  assert sorted(os.listdir(os.path.join(copy, "phase2"))) == sorted(dirs)
  finals, records = {}, {}
  for name, (_, last) in dirs.items():
    directory = os.path.join(copy, "phase2", name)
    finals[name] = leaves(raw_checkpoint(os.path.join(directory, "checkpoints"), last))
    records[name] = train_records(directory)
    shutil.rmtree(os.path.join(directory, "checkpoints", str(last)))  # killed before the last save
    shutil.rmtree(os.path.join(directory, "evaluations"))
  caplog.set_level(logging.INFO)
  for name, (cfg, last) in dirs.items():
    directory = os.path.join(copy, "phase2", name)
    caplog.clear()
    jobs.run(cfg, copy)
    assert f"Resumed {directory} from step {last // 2}" in caplog.text
    resumed = leaves(raw_checkpoint(os.path.join(directory, "checkpoints"), last))
    assert len(finals[name]) == len(resumed) > 0
    for a, b in zip(finals[name], resumed, strict=True):
      np.testing.assert_array_equal(a, b)
    assert train_records(directory) == records[name]


def test_a_phase2_name_is_one_directory_below_phase2():
  """'..' would put phase 2's checkpoints in the workdir itself, '.' in phase2/, and '-x' reads as a
  flag in shell commands: refused, naming the field."""
  config = base_config()
  for name in ("centered_C_from3", "lr0.02-short", "A"):
    config.phase2.name = name
    assert phase2_name(config) == name
  for name in ("..", ".", "-x", "a/b", "_x"):
    config.phase2.name = name
    with pytest.raises(ValueError, match="config.phase2.name=.* must be a directory name"):
      phase2_name(config)


@pytest.mark.parametrize("field, recorded", [("from_epoch", 1.0), ("linearization", "linear"),
                                             ("batch_norm", "loose")])
def test_a_named_experiment_of_another_linearized_model_is_not_restored(tmp_path, field, recorded):
  """A phase-2 directory holds the parameters of one linearized model (theta0's epoch, the
  linearization, the BatchNorm mode): restored under a config naming it but differing in one, its
  parameters would be applied around another theta0 or to another model."""
  config = base_config()
  config.phase2.update(name="exp", from_epoch=2.0, linearization="centered", batch_norm="frozen")
  record = phase2_record(config)
  record["phase2"][field] = recorded
  os.makedirs(tmp_path / "phase2" / "exp")
  with open(tmp_path / "phase2" / "exp" / "config.json", "w") as f:
    json.dump(record, f)
  with pytest.raises(ValueError, match=rf"trained as another linearized model(?s:.*)config.phase2.{field}: "):
    restore._phase2_checkpoints(config, str(tmp_path))
  record["phase2"][field] = config.phase2[field]
  with open(tmp_path / "phase2" / "exp" / "config.json", "w") as f:
    json.dump(record, f)
  restore._phase2_checkpoints(config, str(tmp_path)).close()


def test_phase2s_two_updates_a_batch_take_the_learning_rate_of_their_batch_step(run):
  """Phase 2 in mode A with benign_step_first: a benign then an adversarial update per batch, so
  the schedule must be read at update count // 2 (its batch step). A decay after batch step 2 of
  the 22 an epoch: updates 1-4 at 0.1, 5-6 at 0.01; read at the update count, it decayed after
  update 2, halfway through the epochs the config names."""
  config, workdir, _ = run
  config = ml_collections.ConfigDict(config.to_dict())
  config.job, config.phase2.mode, config.phase2.benign_step_first = "phase2", "A", True
  opt = config.phase2.optimizer
  opt.learning_rate, opt.momentum, opt.schedule = 0.1, 0.0, "piecewise"
  opt.decay_epochs, opt.decay_factor = (2 / 22,), 0.1
  p2 = build_phase2(config, workdir)
  assert p2.phase.steps_per_epoch == 22
  tx, w, rates = p2.state.tx, jnp.asarray(2.0, jnp.float32), []
  state = tx.init(w)
  for _ in range(6):
    update, state = tx.update(jnp.asarray(1.0, jnp.float32), state, w)  # gradient 1: update = -lr
    rates.append(-float(update))
  np.testing.assert_allclose(rates, [0.1, 0.1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
