"""Bad input fails with a message naming the field or file, before any data is loaded or compiled;
main.py's own flag checks and the lines it prints, run in this process."""

import json
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from absl import app

from ntk_scale import data, files, infinite, jobs, parallel, restore
from ntk_scale.attacks import build_attack
from ntk_scale.base_config import base_config, parse_variants, pgd_linf
from ntk_scale.checkpoint import CheckpointNotFoundError, Checkpoints
from ntk_scale.infinite_job import check_infinite_config
from ntk_scale.preemption import PREEMPTED_EXIT_CODE, Preempted
from ntk_scale.train import experiment, phase2
from ntk_scale.train.experiment import catalog_steps_per_epoch
from ntk_scale.workdir import WorkdirConfigMismatchError, prepare_workdir

from main_py_flags import main_py_in_process
from test_train import load_config


@pytest.fixture
def no_compute(monkeypatch):
  """Fails the test if a job gets as far as loading data."""
  def load_dataset(_):
    pytest.fail("the job loaded data before rejecting its config")
  monkeypatch.setattr(data, "load_dataset", load_dataset)


@pytest.mark.parametrize("field, value, message", [
    ("model.name", "resnet1000", "config.model.name='resnet1000' is not a known model"),
    ("model.width", 0, "config.model.width=0 must be an integer >= 1"),
    ("data.name", "imagenet42", "config.data.name='imagenet42' is not a known dataset"),
    ("batch_size", 66, r"config.batch_size=66 must be a positive multiple of the device count \(4"),
    ("eval_batch_size", 0, "config.eval_batch_size=0 must be a positive multiple"),
    ("optimizer.schedule", "warp", "config.optimizer.schedule='warp'"),
    ("data.augment", "mixup", "config.data.augment='mixup'"),
    ("job", "dance", "config.job='dance' is not a known job"),
    ("train.matmul_precision", "fastest", "config.train.matmul_precision='fastest' is not a matmul "
                                          "precision; expected one of highest, high, default"),
    ("eval_matmul_precision", "low", "config.eval_matmul_precision='low' is not a matmul precision"),
    ("profile_steps", -1, r"config.profile_steps=-1 must be an integer >= 0"),
    ("train.compute_dtype", "float16", "config.train.compute_dtype='float16'; expected one of "
                                       "float32, bfloat16"),
    # NaN and -1 failed `> 0` and skipped phase 2 silently; inf overflowed counting its steps.
    *[("phase2.num_epochs", v, rf"config\.phase2\.num_epochs={v!r} must be a finite number >= 0 \(0: no "
       rf"phase 2\)") for v in (float("nan"), float("inf"), -1.0)],
    ("log_every_steps", True, r"config\.log_every_steps=True must be an integer >= 1"),  # not 1 step
    # Each of these was accepted and ignored in mode C (the digits smoke config's).
    ("train.flip_epoch", 2.0, r"config\.train\.flip_epoch=2\.0 is read in mode F only; "
                              r"config\.train\.mode='C' would ignore it"),
    ("train.benign_step_first", True, r"config\.train\.benign_step_first=True adds a benign update "
                                      r"before each adversarial one; config\.train\.mode='C' has none"),
    # inf overflowed in the save schedule once the model was initialised and the config recorded.
    ("checkpoint.fractional_epochs", (float("inf"),),
     r"config\.checkpoint\.fractional_epochs=\(inf,\) must be positive finite epochs; \[inf\] are not"),
    ("checkpoint.fractional_epochs", (0.5, 0.0),
     r"config\.checkpoint\.fractional_epochs=\(0\.5, 0\.0\) must be positive finite epochs; \[0\.0\] are not"),
    # An interval of less than a step listed 10^12 checkpoint epochs per epoch.
    ("checkpoint.every_epochs", 1e-12, r"config\.checkpoint\.every_epochs=1e-12 is 2\.2e-11 of a step at "
                                       r"22 steps per epoch, which rounds to 0 steps"),
])
def test_bad_config_fields_are_named(tmp_path, no_compute, field, value, message):
  config = load_config("digits", "smoke")
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message):
    jobs.run(config, str(tmp_path))
  # Nothing recorded: the rerun with the field corrected is the same experiment, not another.
  assert not os.path.exists(tmp_path / "checkpoints") and not os.path.exists(tmp_path / "config.json")


@pytest.fixture
def no_training(monkeypatch):
  """Fails the test if a job gets as far as initialising a train state or restoring phase 2's
  theta0 (the steps of a phase are known only once the data is loaded)."""
  def fail(*args, **kwargs):
    pytest.fail("the job initialised or restored a model before rejecting its config")
  for module, name in ((experiment, "create_train_state"), (phase2, "create_train_state"),
                       (phase2, "linearized_model")):
    monkeypatch.setattr(module, name, fail)


def test_a_config_without_a_job_field_is_checked_as_the_train_job():
  """A config that predates config.job (or a hand-built one without it) is a train job, and gets the
  train job's checks: a batch of 66 on 4 devices is refused, not waved through unchecked."""
  config = load_config("digits", "smoke")
  config.batch_size = 66
  del config["job"]
  with pytest.raises(ValueError, match=r"config\.batch_size=66 must be a positive multiple of the device"):
    jobs.check_config(config, 4)


def test_the_job_runs_and_records_the_config_with_its_loaders_applied(tmp_path, monkeypatch):
  """config.loaders="AC" (Loo et al.'s two letters) means phase-1 mode A and phase-2 mode C: the job
  receives, and the workdir records, the config with them applied, while the caller's config is
  left as it was (train.mode C here)."""
  received = []
  monkeypatch.setitem(jobs.JOBS, "train", lambda config, workdir: received.append(config))
  config = load_config("digits", "smoke")
  config.loaders, config.train.mode, config.phase2.mode = "AC", "C", "A"
  jobs.run(config, str(tmp_path))
  [ran] = received
  assert (ran.train.mode, ran.phase2.mode) == ("A", "C")
  recorded = json.loads((tmp_path / "config.json").read_text())
  assert (recorded["train"]["mode"], recorded["phase2"]["mode"]) == ("A", "C")
  assert (config.train.mode, config.phase2.mode) == ("C", "A")


# digits smoke: 1437 training images in batches of 64, 22 steps per epoch; 0.02 epochs is 0.44 steps.
@pytest.mark.parametrize("field", ["num_epochs", "phase2.num_epochs"])
def test_epochs_of_zero_steps_are_refused_before_compute(tmp_path, no_training, field):
  """A phase whose epochs round to zero steps trained nothing (phase 2 saved no checkpoint) and
  exited 0; the train job refuses phase 2's too before phase 1 trains."""
  config = load_config("digits", "smoke")
  config.phase2.num_epochs = 1.0
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = 0.02
  with pytest.raises(ValueError, match=rf"config\.{field}=0\.02 is 0\.44 of a step at 22 steps per "
                                       rf"epoch, .*expected at least one step: config\.{field} >= 0\.0455"):
    jobs.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")
  assert not os.path.exists(tmp_path / "phase2")
  assert not os.path.exists(tmp_path / "config.json")


@pytest.mark.parametrize("job, fields, message", [
    ("eigen_images", {"kernel.num_examples": 0, "kernel.classes": (0,), "eigen_images.num_eigenvectors": 1000},
     r"config.eigen_images.num_eigenvectors=1000 exceeds the 142 examples"),
    ("eigen_features", {"kernel.num_examples": 100, "eigen_features.num_test": 100_000},
     r"config.eigen_features.num_test=100000 exceeds the 360 test images"),
])
def test_the_dry_run_refuses_the_counts_the_eigen_jobs_refuse(job, fields, message):
  config = load_config("digits", "smoke")
  config.job = job
  for field, value in fields.items():
    section, _, name = field.rpartition(".")
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    jobs.dry_run(config)


# 1e308 epochs passed every check and overflowed converting to steps, naming no field.
@pytest.mark.parametrize("field, message", [
    ("num_epochs", r"config\.num_epochs=1e\+308 is inf steps at 22 steps per epoch"),
    ("checkpoint.every_epochs", r"config\.checkpoint\.every_epochs=1e\+308 is inf steps"),
    ("phase2.num_epochs", r"config\.phase2\.num_epochs=1e\+308 is inf steps"),
    ("optimizer.warmup_epochs", r"config\.optimizer\.warmup_epochs=1e\+308 is inf steps, not fewer"),
])
def test_epochs_past_any_run_are_named_before_compute(tmp_path, no_training, field, message):
  config = load_config("digits", "smoke")
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = 1e308
  with pytest.raises(ValueError, match=message):
    jobs.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "config.json")


def test_an_empty_workdir_or_a_file_is_refused_before_anything_is_written(tmp_path, no_compute,
                                                                         monkeypatch):
  """An empty --workdir trained into the current directory; a file as one failed in etils."""
  monkeypatch.chdir(tmp_path)
  config = load_config("digits", "smoke")
  with pytest.raises(ValueError, match="--workdir is empty"):
    jobs.run(config, "")
  assert os.listdir(tmp_path) == []
  (tmp_path / "afile").write_text("x")
  with pytest.raises(ValueError, match=r"--workdir=.*afile is a file; a workdir is a directory"):
    jobs.run(config, str(tmp_path / "afile"))


# Each was refused once the data had loaded, after the train job had recorded its config: the rerun
# with the field corrected was then refused as another experiment. digits: 1437 training images;
# cifar10: 32x32 images, 1023 non-constant DCT frequencies.
@pytest.mark.parametrize("config_name, fields, message", [
    ("digits", {"num_epochs": 0.01}, r"config\.num_epochs=0\.01 is 0\.22 of a step .*rounds to 0 steps"),
    ("digits", {"batch_size": 2048}, r"config\.batch_size=2048 exceeds the 1437 training examples"),
    ("cifar10_resnet18", {"data.transform.name": "inject", "data.transform.num_frequencies": 1024},
     r"config\.data\.transform\.num_frequencies=1024 exceeds the 1023 non-constant DCT frequencies"),
])
def test_train_job_refuses_what_the_data_would_before_recording_its_config(tmp_path, no_compute,
                                                                            config_name, fields, message):
  config = load_config(config_name, "smoke")
  for field, value in fields.items():
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message):
    jobs.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []
  prepare_workdir(load_config(config_name, "smoke"), str(tmp_path))  # the corrected rerun's record


# digits smoke: 3 epochs of 22 steps, 66 steps. The flip is at round(flip_epoch * 22).
@pytest.mark.parametrize("flip_epoch, flip_step, trains", [(0.01, 0, "adversarially"),
                                                           (2.99, 66, "benignly")])
def test_flip_epoch_at_the_first_or_past_the_last_step_is_refused(tmp_path, no_compute, flip_epoch,
                                                                   flip_step, trains):
  """Mode F that flips at step 0 or at the end trained all adversarially or all benignly."""
  config = load_config("digits", "smoke")
  config.train.mode, config.train.flip_epoch = "F", flip_epoch
  with pytest.raises(ValueError, match=rf"config\.train\.flip_epoch={flip_epoch} is step {flip_step} "
                                       rf"of the 66 steps .*all {trains}; expected a flip step in "
                                       rf"\[1, 65\]: config\.train\.flip_epoch from 0\.04545"):
    jobs.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("section", ["", "phase2."])
def test_cosine_warmup_as_long_as_its_phase_is_refused(tmp_path, no_compute, section):
  """Its learning rate never reached the peak nor decayed; phase 2's is checked before phase 1."""
  config = load_config("digits", "smoke")
  config.phase2.num_epochs = 1.0
  opt = config.phase2.optimizer if section else config.optimizer
  opt.schedule, opt.warmup_epochs = "cosine", 3.0 if section else 5.0
  with pytest.raises(ValueError, match=rf"config\.{section}optimizer\.warmup_epochs={opt.warmup_epochs} "
                                       rf"is \d+ steps, not fewer than the {22 if section else 66} steps"):
    jobs.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


# The train job's phase 2: its optimizer's fields are named before its warm-up is counted in steps
# (NaN and inf failed converting to an integer), its checkpoint interval in steps.
@pytest.mark.parametrize("fields, message", [
    ({"optimizer.schedule": "cosine", "optimizer.warmup_epochs": float("nan")},
     r"config\.phase2\.optimizer\.warmup_epochs=nan must be a finite number >= 0"),
    ({"optimizer.schedule": "cosine", "optimizer.warmup_epochs": float("inf")},
     r"config\.phase2\.optimizer\.warmup_epochs=inf must be a finite number >= 0"),
    ({"checkpoint_every_epochs": 1e-12},
     r"config\.phase2\.checkpoint_every_epochs=1e-12 is 2\.2e-11 of a step .*rounds to 0 steps"),
    ({"benign_step_first": True}, r"config\.phase2\.benign_step_first=True adds a benign update .* "
                                  r"config\.phase2\.mode='C' has none"),  # was accepted, ignored
])
def test_train_job_names_bad_phase2_fields_before_compute(tmp_path, no_compute, fields, message):
  config = load_config("digits", "smoke")
  config.phase2.num_epochs = 1.0
  for field, value in fields.items():
    section, _, name = field.rpartition(".")
    (config.phase2[section] if section else config.phase2)[name] = value
  with pytest.raises(ValueError, match=message):
    jobs.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fields, message", [
    ({"num_epochs": 0.02}, r"config\.phase2\.num_epochs=0\.02 is 0\.44 of a step"),
    ({"num_epochs": float("inf")}, r"config\.phase2\.num_epochs=inf must be a finite number >= 0"),
    ({"num_epochs": 1.0, "checkpoint_every_epochs": 1e-12},
     r"config\.phase2\.checkpoint_every_epochs=1e-12 is 2\.2e-11 of a step"),
    ({"num_epochs": 1.0, "optimizer.schedule": "cosine", "optimizer.warmup_epochs": 1.0},
     r"config\.phase2\.optimizer\.warmup_epochs=1\.0 is 22 steps, not fewer than the 22 steps"),
])
def test_phase2_job_of_zero_steps_is_refused_before_compute(tmp_path, monkeypatch, no_training, fields,
                                                            message):
  """The phase2 job on a trained phase 1 (its theta0 checkpoint taken as found) writes nothing; nor
  with a cosine warm-up as long as phase 2."""
  monkeypatch.setattr(phase2, "theta0_step", lambda config, workdir: 11)
  config = load_config("digits", "smoke")
  prepare_workdir(config, str(tmp_path))  # phase 1's record
  config.job = "phase2"
  for field, value in fields.items():
    section, _, name = field.rpartition(".")
    (config.phase2[section] if section else config.phase2)[name] = value
  with pytest.raises(ValueError, match=message):
    jobs.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "phase2")


def test_dry_run_refuses_epochs_of_zero_steps():
  config = load_config("digits", "smoke")
  config.num_epochs = 0.02
  with pytest.raises(ValueError, match=r"config\.num_epochs=0\.02 is 0\.44 of a step at 22 steps"):
    jobs.dry_run(config)


def test_workdir_of_another_experiment_is_refused(tmp_path, no_compute):
  config = load_config("digits", "smoke")
  with open(tmp_path / "config.json", "w") as f:
    json.dump(json.loads(config.to_json()) | {"seed": 7}, f)
  with pytest.raises(WorkdirConfigMismatchError, match=r"seed: 7 -> 0"):
    jobs.run(config, str(tmp_path))


def test_workdir_recorded_before_a_new_field_resumes_while_it_holds_its_default(tmp_path):
  config = load_config("digits", "smoke")
  recorded = json.loads(config.to_json())
  del recorded["train"]["grad_align"]  # as written before the field existed
  with open(tmp_path / "config.json", "w") as f:
    json.dump(recorded, f)
  prepare_workdir(config, str(tmp_path))  # the default keeps the old behaviour: no error
  config.train.grad_align = 0.5
  with pytest.raises(WorkdirConfigMismatchError, match=r"train.grad_align: '<absent>' -> 0.5"):
    prepare_workdir(config, str(tmp_path))


def test_runtime_fields_may_change_on_resume(tmp_path):
  """A rerun may change how the run is carried out (logging, eval batch size) but not the
  experiment: it is accepted and the record keeps the first run's values."""
  config = load_config("digits", "smoke")
  prepare_workdir(config, str(tmp_path))
  recorded = (tmp_path / "config.json").read_text()
  config.log_every_steps = config.log_every_steps + 2
  config.eval_batch_size = 64
  prepare_workdir(config, str(tmp_path))
  assert (tmp_path / "config.json").read_text() == recorded
  config.optimizer.learning_rate = 2 * config.optimizer.learning_rate  # not a runtime field
  with pytest.raises(WorkdirConfigMismatchError, match="optimizer.learning_rate"):
    prepare_workdir(config, str(tmp_path))


def test_read_only_job_on_an_empty_workdir_leaves_it_empty_for_a_train_job(tmp_path):
  """An evaluate job on a workdir never trained fails naming the missing checkpoints and records
  nothing (no config.json, no checkpoints/): a train job with another config then runs there."""
  config = load_config("digits", "smoke")
  config.job, config.eval_attacks = "evaluate", ml_collections.ConfigDict()
  with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint in .*checkpoints; train this workdir"):
    jobs.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []
  config = load_config("digits", "smoke")
  config.optimizer.learning_rate = 0.05  # not the evaluate job's 0.1
  config.num_epochs, config.eval_attacks = 0.05, ml_collections.ConfigDict()  # one step
  jobs.run(config, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["learning_rate"] == 0.05
  assert Checkpoints(str(tmp_path / "checkpoints")).epochs() == {0.0: 0, 0.05: 1}


def test_a_from_epoch_phase_1_does_not_save_is_refused_before_the_config_is_recorded(tmp_path,
                                                                                      no_compute):
  """Checked after prepare_workdir, the refused config.json made its corrected rerun (another
  num_epochs) "a different experiment"; the dry run refuses it as the job does."""
  config = load_config("digits", "smoke")
  config.phase2.num_epochs, config.phase2.from_epoch = 1.0, 0.3  # step 6.6 of 22: no save there
  message = r"config\.phase2\.from_epoch=0\.3 is not an epoch phase 1 saves; it saves epochs \[0\.0, 0\.125"
  with pytest.raises(CheckpointNotFoundError, match=message):
    jobs.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []
  with pytest.raises(CheckpointNotFoundError, match=message):
    jobs.dry_run(config)
  config.phase2.num_epochs, config.phase2.from_epoch = 2.0, 0.25
  prepare_workdir(jobs.check_config(config, 4), str(tmp_path))  # the corrected run's record


@pytest.mark.parametrize("job, message", [
    ("kernel", r"no checkpoint in .*checkpoints; train this workdir"),
    ("report", r"holds no experiment \(.*config.json is missing\), so nothing to report"),
])
def test_other_read_only_jobs_on_an_empty_workdir_write_nothing(tmp_path, job, message):
  config = load_config("digits", "smoke")
  config.job = job
  with pytest.raises(CheckpointNotFoundError, match=message):
    jobs.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_read_only_job_checks_the_recorded_experiment(tmp_path, no_compute):
  prepare_workdir(load_config("digits", "smoke"), str(tmp_path))
  config = load_config("digits", "smoke")
  config.job, config.optimizer.learning_rate = "evaluate", 0.05
  with pytest.raises(WorkdirConfigMismatchError, match=r"optimizer.learning_rate: 0.1 -> 0.05"):
    jobs.run(config, str(tmp_path))


def test_a_checkpoint_trained_at_a_batch_these_devices_do_not_divide_is_still_evaluated(tmp_path):
  """Trained on one device at batch 30, a workdir was refused by the evaluate job on 4 devices
  (config.batch_size must be a multiple of 4), and a corrected batch size is another experiment:
  its checkpoints could never be evaluated there. Evaluation does not read config.batch_size."""
  config = load_config("digits", "smoke")
  config.batch_size = 30
  prepare_workdir(config, str(tmp_path))  # as the one-device train job recorded it
  config.job = "evaluate"
  with pytest.raises(CheckpointNotFoundError):  # past every config check (this one trained nothing)
    jobs.run(config, str(tmp_path))
  config.job = "train"  # which does read it, on these 4 devices
  with pytest.raises(ValueError, match=r"config\.batch_size=30 must be a positive multiple of the "
                                       r"device count \(4 devices\)"):
    jobs.run(config, str(tmp_path))


# Each seed reaches np.random.default_rng, which takes no negative one, or jax.random.key, which
# takes none of 2**63 or more: refused naming the field, the job's config unrecorded where no other
# field has been checked yet (a seed recorded, then failing, would refuse the corrected rerun).
@pytest.mark.parametrize("job, fields, message", [
    ("train", {"seed": -1}, r"config\.seed=-1 must be an integer in \[0, 2\*\*32\)"),
    ("train", {"seed": 2**64}, r"config\.seed=18446744073709551616 must be an integer in \[0, 2\*\*32\)"),
    ("evaluate", {"seed": -1}, r"config\.seed=-1 must be an integer in \[0, 2\*\*32\)"),
    ("train", {"data.transform.name": "inject", "data.transform.seed": -2},
     r"config\.data\.transform\.seed=-2 must be an integer in \[0, 2\*\*32\)"),
    ("kernel", {"kernel.subset_seed": -3},
     r"config\.kernel\.subset_seed=-3 must be an integer in \[0, 2\*\*32\)"),
    ("spectrum", {"spectrum.seed": -4}, r"config\.spectrum\.seed=-4 must be an integer in \[0, 2\*\*32\)"),
])
def test_seeds_out_of_range_are_named_before_compute(tmp_path, no_training, no_kernel_compute, job, fields,
                                                 message):
  config = load_config("digits", "smoke")
  config.job = job
  for field, value in fields.items():
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message):
    jobs.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")
  if "seed" in fields:  # checked before the train job records its config
    assert os.listdir(tmp_path) == []


def test_missing_checkpoint_lists_what_exists(tmp_path):
  checkpoints = Checkpoints(str(tmp_path / "checkpoints"))
  with pytest.raises(CheckpointNotFoundError, match="no checkpoint for epoch 3 .*available epochs: none"):
    checkpoints.restore_epoch(3, target={})
  with pytest.raises(CheckpointNotFoundError, match="no checkpoint at step 5"):
    checkpoints.restore(5, target={})


def test_missing_tfds_dataset_says_how_to_provide_it(tmp_path):
  config = load_config("mnist_cnn", "smoke")
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.download = False
  with pytest.raises(data.DatasetUnavailableError, match="(?s)'mnist' is not prepared.*download_and_prepare"):
    jobs.run(config, str(tmp_path / "work"))


@pytest.mark.parametrize("name, arg, unknown", [("digits", "smoke,adversarail", "adversarail"),
                                               ("cifar10_resnet18", "phase3", "phase3"),
                                               ("mnist_cnn", "smoke,tiny", "tiny")])
def test_unknown_config_variants_name_the_file(name, arg, unknown):
  with pytest.raises(ValueError, match=rf"configs/{name}\.py: unknown variant\(s\) \['{unknown}'\]"):
    load_config(name, arg)


def test_parse_variants_accepts_subsets_in_any_order():
  assert parse_variants("smoke,adversarial", ("adversarial", "smoke"), "f.py") == {"adversarial", "smoke"}
  assert parse_variants("", ("smoke",), "f.py") == set()
  with pytest.raises(ValueError, match=r"f\.py: unknown variant\(s\) \['big'\].*\('smoke',\)"):
    parse_variants("big,smoke", ("smoke",), "f.py")


def test_base_config_holds_the_papers_settings():
  """The defaults base_config takes from Loo et al. 2022, written out from the paper: kernels on
  500 class-balanced images, checkpoints at the early fractional epochs 1/8, 1/4, 3/8, 1/2, 3/4,
  3/2 and 5/2, and the linearized (phase-2) training by SGD at learning rate 0.01, momentum 0.9."""
  c = base_config()
  assert c.kernel.num_examples == 500
  assert tuple(c.checkpoint.fractional_epochs) == (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 3 / 2, 5 / 2)
  opt = c.phase2.optimizer
  assert (opt.name, opt.learning_rate, opt.momentum) == ("sgd", 0.01, 0.9)


@pytest.fixture
def no_kernel_compute(monkeypatch):
  """Fails the test if a kernel job gets as far as restoring a checkpoint or computing a kernel."""
  def fail(*args, **kwargs):
    pytest.fail("the job restored or computed before rejecting its config")
  for module, name in ((restore, "restore_for_inference"), (restore, "saved_epochs"),
                       (infinite, "kernel_matrix"), (infinite, "kernel_function")):
    monkeypatch.setattr(module, name, fail)


# digits (the embedded split): 139-146 training images per class, 35-37 test images.
@pytest.mark.parametrize("config_name, job, fields, message", [
    ("digits", "kernel", {"kernel.num_examples": 500, "kernel.classes": (0,)},
     r"config.kernel.num_examples=500 with config.kernel.classes=\(0,\).*class 0 has 142 train"),
    ("digits", "evolution", {"kernel.num_examples": 500, "kernel.classes": (0,)},
     r"config.kernel.num_examples=500 with config.kernel.classes=\(0,\).*class 0 has 142 train"),
    ("digits", "kernel", {"kernel.num_examples": 360, "kernel.split": "test"},
     r"config.kernel.num_examples=360 with config.kernel.classes=\(\) \(all 10\).*class 2 has 35 test"),
    ("digits", "kernel", {"kernel.num_examples": 20, "kernel.classes": (1, 1)},
     r"config.kernel.classes=\(1, 1\) lists class\(es\) \[1\] more than once"),
    ("infinite_width", "eigen_features", {"eigen_features.source": "infinite", "kernel.num_examples": 150,
                                          "kernel.classes": (8,)},
     r"config.kernel.num_examples=150 with config.kernel.classes=\(8,\).*class 8 has 139 train"),
    ("infinite_width", "infinite", {"infinite.num_train": 1400},
     r"config.infinite.num_train=1400 .*class 8 has 139"),
    # These three ran: the eigen-images of the 142 eigenvectors a whole class has, recorded as 1000;
    # eigen-features scored on the 360 test images, recorded as 100000; a spectrum refused only
    # once its kernel was computed.
    ("digits", "eigen_images", {"kernel.num_examples": 0, "kernel.classes": (0,),
                                "eigen_images.num_eigenvectors": 1000},
     r"config.eigen_images.num_eigenvectors=1000 exceeds the 142 examples of the class kernel"),
    ("digits", "eigen_features", {"kernel.num_examples": 100, "eigen_features.num_test": 100_000},
     r"config.eigen_features.num_test=100000 exceeds the 360 test images"),
    ("digits", "spectrum", {"kernel.num_examples": 20, "spectrum.num_eigenpairs": 2,
                            "spectrum.method": "sharded"},
     r"config.spectrum.method='sharded' needs a block .* under a fifth of the 20 rows"),
])
def test_class_balanced_subset_that_cannot_be_drawn_is_named_before_compute(
    tmp_path, no_kernel_compute, config_name, job, fields, message):
  config = load_config(config_name, "smoke")
  config.job = job
  for field, value in fields.items():
    section, _, name = field.rpartition(".")
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    jobs.run(config, str(tmp_path))
  # The infinite jobs record their experiment only once it passed: the corrected rerun is not
  # refused as another experiment.
  assert not (tmp_path / "config.json").exists()


# digits smoke: 200 training images, the networks train 1 epoch of the whole split (1437 images in
# batches of 64: 22 steps) and of the robust set (200 images: 3 steps). Each was refused only when
# the first network was built, after the kernels, the attacks and the robust set, with the config
# recorded; eval_batch_size 0 divided by zero after the training kernel.
@pytest.mark.parametrize("fields, message", [
    ({"infinite.transfer.num_epochs": float("nan")},
     r"config\.infinite\.transfer\.num_epochs=nan must be a positive finite number"),
    ({"infinite.transfer.num_epochs": float("inf")},
     r"config\.infinite\.transfer\.num_epochs=inf must be a positive finite number"),
    ({"infinite.transfer.num_epochs": 0.1},  # 2.2 steps of the split, 0.3 of one of the robust set
     r"config\.infinite\.transfer\.num_epochs=0\.1 is 0\.3 of a step at 3 steps per epoch"),
    ({"eval_batch_size": 0}, r"config\.eval_batch_size=0 must be a positive multiple of the device count"),
    ({"batch_size": 6}, r"config\.batch_size=6 must be a positive multiple of the device count"),
    ({"optimizer.learning_rate": float("nan")}, r"config\.optimizer\.learning_rate=nan must be a positive"),
    ({"optimizer.warmup_epochs": 1.0}, r"config\.optimizer\.warmup_epochs=1\.0 is 22 steps, not fewer than"),
    ({"log_every_steps": 0}, r"config\.log_every_steps=0 must be an integer >= 1"),
    ({"checkpoint.every_epochs": 0.0}, r"config\.checkpoint\.every_epochs=0\.0 must be positive"),
    # Mode F's flip, named against the networks' epochs (it was named config.num_epochs).
    ({"train.mode": "F", "train.flip_epoch": 1.0},
     r"config\.train\.flip_epoch=1\.0 must lie inside \(0, config\.infinite\.transfer\.num_epochs=1\.0\)"),
    ({"train.mode": "F", "train.flip_epoch": 0.9},  # step 20 of the split's 22, 3 of the robust set's 3
     r"flip_epoch=0\.9 is step 3 of the 3 steps of config\.infinite\.transfer\.num_epochs=1\.0 at 3 "),
    # The train job's fields the networks' config replaces were accepted and ignored.
    ({"num_epochs": 50.0}, r"config\.num_epochs=50\.0 is not read by the infinite job, whose networks it "
                           r"would leave as they are; it reads config\.infinite\.transfer\.num_epochs\."),
    ({"phase2.num_epochs": 2.0}, r"config\.phase2\.num_epochs=2\.0 is not read by the infinite job"),
    ({"checkpoint.fractional_epochs": (0.5,)}, r"config\.checkpoint\.fractional_epochs=\(0\.5,\) is not read"),
    ({"eval_attacks": ml_collections.ConfigDict({"pgd": pgd_linf(0.1, num_steps=2)})},
     r"config\.eval_attacks=<attacks pgd> is not read by the infinite job.* config\.infinite\.attacks"),
])
def test_infinite_job_checks_its_networks_training_before_compute(tmp_path, no_kernel_compute, fields,
                                                                   message):
  config = load_config("infinite_width", "smoke")
  for field, value in fields.items():
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message):
    jobs.run(config, str(tmp_path))
  assert not (tmp_path / "config.json").exists()


def test_infinite_job_without_networks_does_not_check_their_training():
  config = load_config("infinite_width", "smoke")
  config.infinite.transfer.widths, config.infinite.robust_data.network_width = (), 0
  config.infinite.transfer.num_epochs = config.optimizer.learning_rate = float("nan")
  check_infinite_config(config, np.arange(1437) % 10, 10, num_devices=4)
  config.infinite.transfer.widths = (8,)
  with pytest.raises(ValueError, match=r"config\.infinite\.transfer\.num_epochs=nan"):
    check_infinite_config(config, np.arange(1437) % 10, 10, num_devices=4)


# True passed `True in (1, 2)` as phase 1.
@pytest.mark.parametrize("job, message", [
    ("evaluate", r"config\.evaluate\.phase=True; expected 1 \(the network's checkpoints\) or 2"),
    ("evolution", r"config\.evolution\.phase=True; expected 1 \(the network\) or 2"),
])
def test_phase_true_is_not_phase_1(tmp_path, no_kernel_compute, job, message):
  config = load_config("digits", "smoke")
  config.job, config[job].phase = job, True
  with pytest.raises(ValueError, match=message):
    jobs.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_pgd_step_size_follows_its_fields_and_a_bad_num_steps_is_named_where_used(tmp_path):
  """pgd_linf's step size is computed from eps and num_steps when read: num_steps 0 divided by zero
  while the config was serialised (for an evaluate job, or phase 2 of mode A), even in a section
  not in use, before the attack could name the field."""
  attack = pgd_linf(0.1, num_steps=20)
  assert attack.step_size == 2.5 * 0.1 / 20
  attack.eps, attack.num_steps = 0.2, 8
  assert attack.step_size == 2.5 * 0.2 / 8
  assert pgd_linf(0.1, 20, step_size=0.03).step_size == 0.03
  attack.num_steps = 0
  assert attack.step_size is None
  attack.to_json()  # serialises
  with pytest.raises(ValueError, match=r"config\.train\.attack\.num_steps=0 must be an integer >= 1"):
    build_attack(attack, prefix="config.train.attack")
  config = load_config("digits", "smoke")
  config.job, config.eval_attacks.pgd.num_steps = "evaluate", 0
  with pytest.raises(ValueError, match=r"config\.eval_attacks\.pgd\.num_steps=0 must be an integer >= 1"):
    jobs.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("method, field, value, message", [
    *[(m, "restarts", 2, rf"config\.train\.attack\.restarts=2: {name} is a single-step attack and "
                         rf"runs once; set config\.train\.attack\.restarts=1")
      for m, name in (("fgsm", "fgsm"), ("rs_fgsm", "rs_fgsm"), ("n_fgsm", "n_fgsm"),
                      ("grad_align", "fgsm"))],
    *[(m, "random_start", False, rf"config\.train\.attack\.random_start=False: {m} always starts "
                                 rf"from noise") for m in ("rs_fgsm", "n_fgsm")],
])
def test_overrides_of_the_co_configs_single_step_attack_get_the_attack_checks_message(
    tmp_path, no_compute, method, field, value, message):
  """configs/catastrophic_overfitting.py's single-step attack lacked restarts (and random_start):
  --config.train.attack.restarts=2 on the locked config failed with a bare AttributeError, where
  the digits config's attack (pgd_linf, renamed) gets the attack check's message."""
  config = load_config("catastrophic_overfitting", f"method={method},beta=0.15,smoke").lock()
  setattr(config.train.attack, field, value)  # as main.py's --config.train.attack.<field> sets it
  with pytest.raises(ValueError, match=message):
    jobs.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_the_infinite_job_without_its_section_is_refused_before_recording(tmp_path):
  config = load_config("digits", "smoke")
  config.job = "infinite"
  with pytest.raises(ValueError, match=r"config.job='infinite' needs a config.infinite section"):
    jobs.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match=r"config.job='infinite' needs a config.infinite section"):
    jobs.dry_run(config)  # in the job's words, not a bare AttributeError: "'infinite'"


def test_the_report_reads_any_recorded_experiment_and_an_unreadable_record_is_named(tmp_path):
  """The report reads results, not the config: it takes a workdir whatever config it is given.
  A config.json that is not JSON is refused naming the file, not with a bare decoding error."""
  adversarial = load_config("digits", "adversarial,smoke")
  prepare_workdir(adversarial, str(tmp_path))
  config = load_config("digits", "smoke")  # mode C, not the recorded A
  config.job = "report"
  jobs.run(config, str(tmp_path))
  assert (tmp_path / "report" / "index.html").exists()
  # A truncated record the report reads is named, not a bare decoding error.
  evaluations = tmp_path / "evaluations" / "step_1"
  evaluations.mkdir(parents=True)
  (evaluations / "clean.json").write_text('{"results": {"clean": {"accura')
  with pytest.raises(files.UnreadableRecordError, match=r"step_1/clean.json is not a readable JSON "
                                                        r"record"):
    jobs.run(config, str(tmp_path))
  (evaluations / "clean.json").unlink()
  (tmp_path / "config.json").write_text("")
  with pytest.raises(files.UnreadableRecordError, match=r"config.json is not a readable JSON record"):
    jobs.run(config, str(tmp_path))
  config.job = "evaluate"
  with pytest.raises(WorkdirConfigMismatchError, match=r"config.json is not a readable config record"):
    jobs.run(config, str(tmp_path))


def test_infinite_subset_must_be_a_multiple_of_the_number_of_classes():
  config = load_config("infinite_width", "smoke")
  labels = np.repeat(np.arange(4), [50, 50, 50, 5])  # 4 classes, the last one rare
  config.batch_size = 8  # the network trained on the robust set of 20 images, over 4 devices
  config.infinite.num_train = 30
  with pytest.raises(ValueError, match=r"config.infinite.num_train=30 must be 0 \(all\) or a multiple of 4"):
    check_infinite_config(config, labels, 4)
  config.infinite.num_train = 40
  with pytest.raises(ValueError, match="config.infinite.num_train=40 .*class 3 has 5"):
    check_infinite_config(config, labels, 4)
  config.infinite.num_train = 20  # 5 of each class
  config.infinite.robust_data.target_batch_size = 10
  with pytest.raises(ValueError, match=r"config.infinite.attacks.apgd_t.num_targets=9 must be at most 3"):
    check_infinite_config(config, labels, 4)  # APGD-T's 9 targets: a 4-class dataset has 3
  for attacks in (config.infinite.attacks, config.infinite.robust_data.eval_attacks):
    attacks.apgd_t.num_targets = 3
  check_infinite_config(config, labels, 4)
  test_labels = np.repeat(np.arange(4), [5, 5, 5, 3])
  config.infinite.num_test = 6
  with pytest.raises(ValueError, match=r"config.infinite.num_test=6 must be 0 \(all\) or a multiple of 4"):
    check_infinite_config(config, labels, 4, test_labels)
  config.infinite.num_test = 16
  with pytest.raises(ValueError, match="config.infinite.num_test=16 takes 4 test examples of each class, "
                                       "but class 3 has 3"):
    check_infinite_config(config, labels, 4, test_labels)
  config.infinite.num_test = 12
  check_infinite_config(config, labels, 4, test_labels)


def test_main_refuses_an_override_of_an_absent_field_naming_it(tmp_path):
  """End to end through absl's app.run: status 1, the field named, no traceback, nothing written.
  Each way a field can be absent is checked in-process below
  (test_main_names_an_absent_field_whichever_way_it_is_given)."""
  # single-step attacks have no num_steps (base_config.single_step_attack): ml_collections said
  # only AttributeError: "'num_steps'"
  flag = "--config.train.attack.num_steps=5"
  message = (r"config.train.attack.num_steps does not exist, so --config.train.attack.num_steps "
             r"cannot be set \(config.train.attack has: eps, name, restarts\)")
  out = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/catastrophic_overfitting.py:method=fgsm,smoke",
       flag, "--workdir", str(tmp_path / "never")], cwd=os.path.dirname(os.path.dirname(__file__)),
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert re.search(message, out.stderr), out.stderr[-2000:]
  assert "Traceback" not in out.stderr and not (tmp_path / "never").exists()


# Its train.attack has eps, name and restarts only.
CO_FGSM = "configs/catastrophic_overfitting.py:method=fgsm,smoke"


@pytest.mark.parametrize("config_flag", [("--config", CO_FGSM), (f"--config={CO_FGSM}",)])
@pytest.mark.parametrize("overrides, field, absent, parent, known", [
    # ml_collections raises a KeyError for an absent section, an AttributeError for an absent field
    # of one and a TypeError for a part below a string; the last, and a boolean's --no form of any,
    # ended in a bare traceback
    (["--config.seed=1", "--config.trian.lr=0.1"], "trian.lr", "trian", "",
     "batch_size, .*, train"),
    (["--config.train.attack.eps=0.1", "--config.train.attack.num_steps=5"],
     "train.attack.num_steps", "train.attack.num_steps", ".train.attack", "eps, name, restarts"),
    (["--config.data.name.g=1"], "data.name.g", "data.name.g", ".data.name", "none"),
    (["--noconfig.data.downlaod"], "data.downlaod", "data.downlaod", ".data",
     "augment, .*, transform"),
], ids=["section", "field_of_a_section", "below_a_string", "no_form"])
def test_main_names_an_absent_field_whichever_way_it_is_given(config_flag, overrides, field, absent,
                                                              parent, known):
  """The field of the override that does not exist is named, with absl's own prefix for a flag error
  and no traceback (SystemExit), whichever of absl's two ways --config is given."""
  with main_py_in_process(*config_flag, *overrides, "--workdir=/never") as (main, argv):
    with pytest.raises(SystemExit) as refused:
      main.parse_flags(argv)
  absent, field, parent = map(re.escape, (absent, field, parent))
  assert re.fullmatch(rf"FATAL Flags parsing error: config\.{absent} does not exist, so --config\."
                      rf"{field} cannot be set \(config{parent} has: {known}\)\.",
                      str(refused.value.code)), refused.value.code


def test_main_takes_its_overrides_and_no_positional_argument(monkeypatch):
  """A stray word (a value after a space, `--config.seed 3`) is refused before any job runs,
  rather than ignored."""
  monkeypatch.setattr(jobs, "run", lambda config, workdir: pytest.fail("the job ran"))
  with main_py_in_process(f"--config={CO_FGSM}", "--config.train.attack.eps=0.1",
                          "--workdir=/never", "stray") as (main, argv):
    rest = main.parse_flags(argv)
    assert rest == ["main.py", "stray"] and main._CONFIG.value.train.attack.eps == 0.1
    with pytest.raises(app.UsageError, match=r"unexpected arguments: \['stray'\]"):
      main.main(rest)


@pytest.mark.parametrize("target", ["--dry_run_device_memory_gb=80", "--dry_run_tflops=50",
                                    "--dry_run_platform=tpu"])
def test_main_refuses_each_dry_run_target_without_dry_run(monkeypatch, target):
  """Each plans a job for other devices: without --dry_run the job would run here, ignoring it."""
  monkeypatch.setattr(jobs, "run", lambda config, workdir: pytest.fail("the job ran"))
  with main_py_in_process(f"--config={CO_FGSM}", "--workdir=/never", target) as (main, argv):
    with pytest.raises(app.UsageError, match=r"--dry_run_platform plan a job; they need --dry_run"):
      main.main(main.parse_flags(argv))


@pytest.mark.parametrize("given, joined", [
    (("--distributed", "--heartbeat_timeout_s=7"), ((None, None, None), True, 7)),
    (("--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1"),
     (("10.0.0.1:1234", 2, 1), False, 60)),
])
def test_main_joins_the_job_its_multi_process_flags_name_before_the_job_runs(monkeypatch, given,
                                                                             joined):
  """--distributed asks JAX's cluster detection; the explicit coordinator, process count and id
  are passed as given; either way with --heartbeat_timeout_s (60 s unless given)."""
  calls = []
  monkeypatch.setattr(parallel, "initialize_distributed", lambda *args, auto, heartbeat_timeout_s:
                      calls.append((args, auto, heartbeat_timeout_s)))
  monkeypatch.setattr(jobs, "run", lambda config, workdir: calls.append("run") or {})
  with main_py_in_process(f"--config={CO_FGSM}", "--workdir=/w", *given) as (main, argv):
    main.main(main.parse_flags(argv))
  assert calls == [joined, "run"]


def test_main_leaves_a_multi_process_job_together_on_an_error_or_a_preemption(monkeypatch):
  """One process of several stopped by an error exits with 1 after at most ERROR_EXIT_WAIT_S (the
  others may be blocked in a collective); one preempted leaves with all, with the status a shell
  gives SIGTERM. A single process raises the error itself, for its traceback."""
  def exit_together(code, wait_s=None):
    raise SystemExit((code, wait_s))

  def stopped_by(error):
    def run(config, workdir):
      raise error
    return run

  monkeypatch.setattr(parallel, "exit_together", exit_together)
  with main_py_in_process(f"--config={CO_FGSM}", "--workdir=/w") as (main, argv):
    rest = main.parse_flags(argv)
    monkeypatch.setattr(jobs, "run", stopped_by(ValueError("a bad field")))
    with pytest.raises(ValueError, match="a bad field"):
      main.main(rest)
    monkeypatch.setattr(main.jax, "process_count", lambda: 2)
    with pytest.raises(SystemExit) as stopped:
      main.main(rest)
    assert stopped.value.code == (1, main.ERROR_EXIT_WAIT_S)
    monkeypatch.setattr(jobs, "run", stopped_by(Preempted("saved step 3", 3)))
    with pytest.raises(SystemExit) as stopped:
      main.main(rest)
    assert stopped.value.code == (PREEMPTED_EXIT_CODE, None)


_ACCURACY = {"accuracy": 0.91234, "loss": 0.3}
_SCORE_LINE = "test accuracy 0.9123  (loss 0.3000)"


@pytest.mark.parametrize("job, result, printed", [
    ("train", {"results": {"clean": _ACCURACY, "pgd": _ACCURACY}},
     [f"{'clean':>24s} {_SCORE_LINE}", f"{'pgd':>24s} {_SCORE_LINE}", "results in /w"]),
    ("train", {"results": {"clean": _ACCURACY}, "phase2": {"results": {"pgd": _ACCURACY}}},
     [f"{'clean':>24s} {_SCORE_LINE}", f"{'phase 2 pgd':>24s} {_SCORE_LINE}", "results in /w"]),
    # digits smoke's phase 2 is named after linearization, mode and from_epoch (workdir.py)
    ("phase2", {"results": {"clean": _ACCURACY}},
     [f"{'phase 2 clean':>24s} {_SCORE_LINE}", "results in /w/phase2/centered_C_from1"]),
    ("kernel", {"kernel": "/w/kernels/k", "shape": (20, 20), "tiles_computed": 3, "tiles": 4,
                "seconds": 2.04, "tflop_per_s": 0.01234, "method": "ntvp", "tile": 8,
                "complete": False},
     ["kernel 20 x 20: 3 of 4 tiles computed in 2.0 s (12.3 GFLOP/s, method ntvp, tile 8), "
      "complete: False", "kernel in /w/kernels/k"]),
    ("report", {"report": "/w/report"}, ["report in /w/report"]),
    ("spectrum", {"spectrum": "/w/kernels/k/spectrum"}, ["spectrum in /w/kernels/k/spectrum"]),
    ("eigen_features", {"eigen_features": "/w/eigen_features/k"},
     ["eigen-features in /w/eigen_features/k"]),
])
def test_main_prints_one_summary_of_each_jobs_result_from_process_0(monkeypatch, capsys, job,
                                                                      result, printed):
  """What main.py prints once a job returns: each evaluation's line (phase 2's named so), then where
  the results lie, once per job (process 1 of a multi-process job prints nothing)."""
  monkeypatch.setattr(jobs, "run", lambda config, workdir: result)
  with main_py_in_process("--config=configs/digits.py:smoke", f"--config.job={job}",
                          "--workdir=/w") as (main, argv):
    main.main(main.parse_flags(argv))
    assert capsys.readouterr().out.splitlines() == printed
    monkeypatch.setattr(main.jax, "process_index", lambda: 1)
    main.main(["main.py"])
    assert capsys.readouterr().out == ""


def test_a_batch_one_larger_than_the_train_split_is_refused_as_too_large():
  """1,437 training digits: a batch of 1,438 has no whole step per epoch."""
  config = load_config("digits", "smoke")
  config.batch_size = 1437
  assert catalog_steps_per_epoch(config) == 1
  config.batch_size = 1438
  with pytest.raises(ValueError, match=r"config\.batch_size=1438 exceeds the 1437 training examples"):
    catalog_steps_per_epoch(config)
