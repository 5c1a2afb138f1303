"""Phase 1's epoch-0 checkpoint (its initialisation, step 0): what it holds, phase 2 linearized
around it, its kernel; and the errors on workdirs trained before it existed. (Resumed after the
step-0 save: tests/test_resume.py; evolution through epoch 0: tests/test_evolution.py.)"""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ntk_scale import jobs
from ntk_scale.checkpoint import CheckpointNotFoundError, Checkpoints, missing_initial_note
from ntk_scale.data import load_digits
from ntk_scale.models import build_model
from ntk_scale.ntk import empirical_ntk
from ntk_scale.ntk.store import KernelStore
from ntk_scale.train.phase2 import build_phase2, check_phase2_config
from ntk_scale.train.metrics_jsonl import read_metrics

from test_train import load_config

PHASE2 = "centered_C_from0"  # the name derived from the config's phase-2 fields


def initial_config() -> ml_collections.ConfigDict:
  """Digits smoke, width 4: a quarter epoch of phase 1 (6 steps, saved at 0, 3 and 6), then a
  quarter epoch of the centered model linearized around the initialisation."""
  c = load_config("digits", "smoke")
  c.num_epochs = 0.25
  c.model.width = 4
  c.eval_attacks = ml_collections.ConfigDict()  # not needed here: spare the time
  c.save_adversarial = False
  c.phase2.num_epochs, c.phase2.from_epoch = 0.25, 0.0
  c.kernel.num_examples, c.kernel.tile_size = 20, 20
  return c


@pytest.fixture(scope="module")
def init() -> dict:
  """The model's initialisation for config.seed, from flax directly (not through the train state)."""
  config = initial_config()
  model = build_model(config.model, 10)
  image_shape = load_digits().train.images.shape[1:]
  return jax.jit(lambda: model.init(jax.random.key(config.seed), jnp.zeros((1, *image_shape), jnp.float32),
                                    train=False))()


def raw_checkpoint(directory, step) -> dict:
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta"))
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def assert_trees_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Phase 1, then phase 2 from epoch 0, in one train job."""
  path = str(tmp_path_factory.mktemp("initial"))
  config = initial_config()
  config.job = "train"
  jobs.run(config, path)
  return path


@pytest.fixture
def old_workdir(workdir, tmp_path):
  """The workdir as a phase 1 trained before initial checkpoints would have left it: no step 0."""
  copy = str(tmp_path / "old")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("phase2", "kernels"))
  shutil.rmtree(os.path.join(copy, "checkpoints", "0"))
  return copy


def test_epoch0_checkpoint_is_the_initialisation(workdir, init):
  assert Checkpoints(os.path.join(workdir, "checkpoints")).epochs() == {0.0: 0, 0.125: 3, 0.25: 6}
  saved = raw_checkpoint(os.path.join(workdir, "checkpoints"), 0)
  assert int(saved["step"]) == 0
  assert_trees_equal(saved["params"], init["params"])
  assert_trees_equal(saved["batch_stats"], init["batch_stats"])
  # The first update moved it: step 3 is not the initialisation.
  later = raw_checkpoint(os.path.join(workdir, "checkpoints"), 3)
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(later["params"]),
                                                       jax.tree.leaves(init["params"])))


def test_phase2_from_epoch0_trains_around_the_initialisation(workdir, init):
  config = initial_config()
  p2dir = os.path.join(workdir, "phase2", PHASE2)
  # Phase 2 saves no step 0 of its own (its start is phase 1's checkpoint 0): only its end, step 6.
  assert Checkpoints(os.path.join(p2dir, "checkpoints")).epochs() == {0.25: 6}
  losses = [r["train/loss"] for r in read_metrics(p2dir) if "train/loss" in r]
  assert losses and np.all(np.isfinite(losses))
  p2 = build_phase2(config, workdir)
  assert p2.from_step == 0 and int(p2.state.step) == 0
  assert_trees_equal(p2.state.params, init["params"])  # theta = theta0 = the initialisation
  assert_trees_equal(p2.model.params0, init["params"])
  images = jnp.asarray(load_digits().test.images[:8])
  logits = p2.state.apply_fn({"params": p2.state.params, "batch_stats": p2.state.batch_stats},
                             images, train=False)
  np.testing.assert_allclose(np.asarray(logits), 0.0, atol=1e-6)  # centered: zero at theta0
  trained = raw_checkpoint(os.path.join(p2dir, "checkpoints"), 6)["params"]
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(trained),
                                                       jax.tree.leaves(init["params"])))


def test_kernel_job_at_epoch0_is_the_initial_kernel(workdir, init):
  config = initial_config()
  config.job, config.kernel.epoch = "kernel", 0.0
  result = jobs.run(config, workdir)
  assert result["kernel"].endswith(os.path.join("kernels", "phase1_epoch0_train20_class0"))
  store = KernelStore.open(result["kernel"])
  assert store.meta["source"]["epoch"] == 0.0 and store.meta["source"]["step"] == 0
  apply_fn = lambda p, x: build_model(config.model, 10).apply(
      {"params": p, "batch_stats": init["batch_stats"]}, x, train=False)
  expected = empirical_ntk(apply_fn, init["params"], load_digits().train.images[store.indices()],
                           logits=0)
  np.testing.assert_allclose(store.read(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_negative_from_epoch_is_refused():
  config = initial_config()
  config.phase2.from_epoch = -1.0
  with pytest.raises(ValueError, match=r"config.phase2.from_epoch=-1.0 must be a phase-1 epoch >= 0"):
    check_phase2_config(config)


def test_epoch0_of_a_workdir_that_predates_it_names_the_field(old_workdir):
  config = initial_config()
  config.job = "phase2"
  with pytest.raises(CheckpointNotFoundError,
                     match=r"config.phase2.from_epoch=0 .*predates initial checkpoints.*\[0.125, 0.25\]"):
    jobs.run(config, old_workdir)
  assert not os.path.exists(os.path.join(old_workdir, "phase2"))
  # The train job resuming such a run refuses before it re-evaluates phase 1.
  config.job = "train"
  shutil.rmtree(os.path.join(old_workdir, "evaluations"))
  with pytest.raises(CheckpointNotFoundError, match=r"config.phase2.from_epoch=0 .*predates initial"):
    jobs.run(config, old_workdir)
  assert not os.path.exists(os.path.join(old_workdir, "evaluations"))
  config.job, config.kernel.epoch = "kernel", 0.0
  with pytest.raises(CheckpointNotFoundError, match=r"config.kernel.epoch=0 .*predates initial checkpoints"):
    jobs.run(config, old_workdir)
  config.job, config.evolution.epochs = "evolution", (0.0, 0.25)
  with pytest.raises(ValueError, match=r"config.evolution.epochs includes 0, .*predates initial checkpoints"):
    jobs.run(config, old_workdir)
  assert not os.path.exists(os.path.join(old_workdir, "kernels"))


def test_epoch0_of_a_workdir_never_trained_names_no_initial_note(tmp_path):
  """Where there are no checkpoints at all, epoch 0 is missing because nothing was trained, not
  because the run predates initial checkpoints: the note is left out."""
  checkpoints = Checkpoints(str(tmp_path / "checkpoints"), create=False)
  with pytest.raises(CheckpointNotFoundError, match=r"config.kernel.epoch=0 in .*checkpoints; "
                     r"available epochs: none \(has this workdir been trained\?\)") as raised:
    checkpoints.step_for_epoch(0.0, "config.kernel.epoch", missing_initial_note(1))
  assert "predates" not in str(raised.value)
  checkpoints.close()


def test_phase2_epoch0_points_to_theta0(workdir):
  config = initial_config()
  config.job, config.kernel.phase, config.kernel.epoch = "kernel", 2, 0.0
  with pytest.raises(CheckpointNotFoundError,
                     match=r"config.kernel.epoch=0 .*phase 2 saves no initial checkpoint.*"
                           r"config.phase2.from_epoch=0.*available epochs: \[0.25\]"):
    jobs.run(config, workdir)
