"""Analytic infinite-width kernels (ntk_scale/infinite.py) against finite random networks.

The analytic NTK is the limit of the empirical NTK of the NTK-parameterised network as its width
grows, so the Monte-Carlo average of our engine's empirical kernels over random networks must
approach it, and more closely at larger width.
"""

import json

import jax
import ml_collections
import numpy as np
import pytest

from ntk_scale import infinite

from conftest import neural_tangents_or_skip


@pytest.fixture(scope="module")
def nt():
  """The neural_tangents module; skips only when the optional `nt` extra is not installed."""
  return neural_tangents_or_skip(infinite.FEATURE)


def _section(**overrides) -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict(dict(architecture="fc", depth=2, w_std=1.5, b_std=0.1,
                                           kernel="ntk", dtype="float64", batch_size=4))
  section.update(overrides)
  return section


def _images(n: int, shape=(4, 4, 1), seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(size=(n, *shape))


def _relative_gap(estimate: np.ndarray, exact: np.ndarray) -> float:
  return float(np.linalg.norm(estimate - exact) / np.linalg.norm(exact))


@pytest.mark.parametrize("architecture,depth,widths", [("fc", 2, (16, 512)), ("conv", 1, (8, 256))])
def test_monte_carlo_empirical_ntk_approaches_analytic_ntk(nt, architecture, depth, widths):
  section = _section(architecture=architecture, depth=depth)
  x1, x2 = _images(3, seed=1), _images(2, seed=2)
  exact = infinite.kernel_matrix(section, 2, x1, x2)
  gaps = [_relative_gap(infinite.empirical_kernel_average(section, 2, w, x1, x2, num_networks=6),
                        exact) for w in widths]
  assert gaps[1] < 0.5 * gaps[0], gaps
  assert gaps[1] < 0.1, gaps


@pytest.mark.parametrize("architecture,depth", [("fc", 3), ("conv", 2)])
def test_batched_kernel_matches_one_call_in_float64(nt, architecture, depth):
  section = _section(architecture=architecture, depth=depth, batch_size=3)
  x1, x2 = _images(5), _images(4, seed=3)
  kernel_fn = infinite.kernel_function(section, 10)
  batched = infinite.kernel_matrix(section, 10, x1, x2)
  assert batched.dtype == np.float64 and batched.shape == (5, 4)
  np.testing.assert_allclose(batched, np.asarray(kernel_fn(x1, x2)), rtol=1e-6)
  square = infinite.kernel_matrix(section, 10, x1)
  np.testing.assert_allclose(square, square.T, rtol=1e-12)
  assert np.all(np.linalg.eigvalsh(square) > 0)


def test_myrtle_kernel_is_the_papers_network_written_out(nt):
  """Myrtle-5 (Shankar et al. 2020; neural-tangents' example): two 3x3 convolutions, a 2x2 average
  pool, one, a pool, one, then pools down to 1x1 and a dense head. Written out here layer by layer
  for 8x8 images (the last pool a plain 2x2 one, which the code's global average pool must equal),
  its analytic NTK must be the code's; a missing or extra stage changes it."""
  stax = nt.stax
  conv = lambda: stax.Conv(1, (3, 3), padding="SAME", W_std=1.5, b_std=0.1)
  pool = lambda: stax.AvgPool((2, 2), strides=(2, 2))
  _, _, reference = stax.serial(conv(), stax.Relu(), conv(), stax.Relu(), pool(),  # 8x8 -> 4x4
                                conv(), stax.Relu(), pool(),  # 4x4 -> 2x2
                                conv(), stax.Relu(), pool(),  # 2x2 -> 1x1
                                stax.Flatten(), stax.Dense(10, W_std=1.5, b_std=0.1))
  x = _images(3, shape=(8, 8, 1))
  kernel = infinite.kernel_matrix(_section(architecture="myrtle", depth=5, batch_size=3), 10, x)
  with jax.enable_x64(True):  # one compiled program (op by op, its many small ones took 25 s)
    expected = np.asarray(jax.jit(reference, static_argnums=2)(x, None, "ntk"))
  np.testing.assert_allclose(kernel, expected, rtol=1e-8)  # the diagonal: 1e-9 apart, x2=None or not
  np.testing.assert_allclose(kernel, kernel.T, rtol=1e-12)
  assert np.all(np.linalg.eigvalsh(kernel) > 0)


def test_nngp_differs_from_ntk(nt):
  x = _images(3)
  ntk = infinite.kernel_matrix(_section(kernel="ntk"), 2, x)
  nngp = infinite.kernel_matrix(_section(kernel="nngp"), 2, x)
  assert np.all(np.diag(ntk) > np.diag(nngp))  # the NTK adds the gradient terms of every layer


def test_stored_kernel_is_read_back_and_shared_by_equal_kernels_only(nt, tmp_path, monkeypatch):
  """kernel_store's directory is named by the kernel's fields and images: a second store of the
  same kernel is the same directory, whose finished tiles are read, not computed (also under another
  config.infinite.batch_size); another depth or other images is another directory."""
  from ntk_scale.ntk.store import KernelStore

  section, x, labels = _section(batch_size=3), _images(7), np.arange(7) % 2
  store = infinite.kernel_store(section, str(tmp_path), x, labels)
  stored = infinite.kernel_matrix(section, 2, x, store=store)
  np.testing.assert_allclose(stored, infinite.kernel_matrix(section, 2, x), rtol=1e-12)
  again = infinite.kernel_store(section, str(tmp_path), x, labels)
  assert again.directory == store.directory and len(again.done_tiles()) == 6

  def computed(*args):
    raise AssertionError("a finished tile was computed again")

  monkeypatch.setattr(KernelStore, "write_tile", computed)
  np.testing.assert_array_equal(infinite.kernel_matrix(section, 2, x, store=again), stored)
  wider = _section(batch_size=4)  # another batch size: the same kernel, read in its own tiles
  np.testing.assert_array_equal(
      infinite.kernel_matrix(wider, 2, x, store=infinite.kernel_store(wider, str(tmp_path), x, labels)),
      stored)
  other_images = infinite.kernel_store(section, str(tmp_path), _images(7, seed=5), labels)
  assert other_images.directory != store.directory
  # Each field of the kernel names it: a kernel differing in one alone is stored apart (named
  # without computing it).
  others = [dict(architecture="conv"), dict(depth=3), dict(w_std=1.0), dict(b_std=1.0),
            dict(kernel="nngp"), dict(dtype="float32")]
  names = {infinite.kernel_store_name(_section(batch_size=3, **field), x) for field in others}
  assert len(names | {infinite.kernel_store_name(section, x)}) == len(others) + 1


@pytest.mark.parametrize("field,value", [("architecture", "resnet"), ("depth", 0),
                                         ("w_std", 0.0), ("w_std", float("inf")),
                                         ("b_std", -1.0), ("b_std", float("nan")), ("kernel", "rbf"),
                                         ("dtype", "float16"), ("batch_size", 0)])
def test_bad_architecture_field_is_named(field, value):
  with pytest.raises(ValueError, match=f"config.infinite.{field}="):
    infinite.check_architecture_config(_section(**{field: value}))


def test_a_network_without_biases_is_a_valid_kernel():
  """b_std = 0 (no bias terms) is allowed, w_std = 0 is not: a zero weight scale makes every kernel
  entry the bias variance alone."""
  infinite.check_architecture_config(_section(b_std=0.0))
  with pytest.raises(ValueError, match=r"config.infinite.w_std=0.0 must be a positive finite number"):
    infinite.check_architecture_config(_section(w_std=0.0))


def test_float64_is_refused_on_tpus(monkeypatch):
  infinite.check_architecture_config(_section(dtype="float64"))
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  infinite.check_architecture_config(_section(dtype="float32"))
  with pytest.raises(ValueError, match="config.infinite.dtype='float64' cannot run on TPUs"):
    infinite.check_architecture_config(_section(dtype="float64"))


def test_myrtle_depth_must_be_a_myrtle_depth():
  with pytest.raises(ValueError, match="config.infinite.depth=4 is not a Myrtle depth"):
    infinite.check_architecture_config(_section(architecture="myrtle", depth=4))


def _linear_evaluations(num_examples: int, seed: int):
  """A 3-class linear model on 4 x 4 images and the job's evaluations of `num_examples` of them."""
  import jax.numpy as jnp

  from ntk_scale import infinite_job, parallel
  from ntk_scale.data import Split

  rng = np.random.default_rng(seed)
  weights = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  logits_fn = lambda images: images.reshape(len(images), -1) @ weights
  split = Split(rng.uniform(size=(num_examples, 4, 4, 1)).astype(np.float32),
                np.arange(num_examples) % 3)
  return logits_fn, infinite_job._Evaluations(split, 8, parallel.make_mesh(), 3, seed=0)


def test_infinite_job_evaluates_each_model_and_attack_once(monkeypatch):
  """PGD listed under two names (config.infinite.attacks and robust_data.eval_attacks) is one
  evaluation with one key; clean accuracy is computed once per model."""
  from ntk_scale import infinite_job
  from ntk_scale.base_config import apgd_linf, pgd_linf

  calls = []
  real_evaluate = infinite_job.evaluate

  def counting_evaluate(model, split, *args, attack=None, **kwargs):
    calls.append(attack)
    return real_evaluate(model, split, *args, attack=attack, **kwargs)

  monkeypatch.setattr(infinite_job, "evaluate", counting_evaluate)
  logits_fn, evaluations = _linear_evaluations(12, seed=0)
  attacks = ml_collections.ConfigDict({"pgd": pgd_linf(0.1, 3)})
  eval_attacks = ml_collections.ConfigDict({"pgd20": pgd_linf(0.1, 3), "apgd": apgd_linf(0.1, 3)})
  first = evaluations.rows("original", logits_fn, attacks, keep_examples=True)
  second = evaluations.rows("original", logits_fn, eval_attacks)
  assert len(calls) == 3  # clean, pgd, apgd
  assert second["pgd20"] is first["pgd"] and second["clean"] is first["clean"]
  assert "examples" in first["pgd"]
  evaluations.rows("optimised", logits_fn, eval_attacks)
  assert len(calls) == 6  # a different model is evaluated afresh
  key = lambda c: jax.random.key_data(infinite_job._attack_key(0, c))
  np.testing.assert_array_equal(key(attacks.pgd), key(eval_attacks.pgd20))
  assert not np.array_equal(key(attacks.pgd), key(eval_attacks.apgd))


def test_transfer_rows_count_the_kernel_fooled_examples_at_the_evaluation_precision(monkeypatch):
  """A network's row: its accuracy on each attack's examples and the share of the examples that
  fooled the kernel which fool it too (here by hand from a linear network), evaluated at
  config.eval_matmul_precision as every evaluation of a network."""
  import jax
  import jax.numpy as jnp

  from ntk_scale import infinite_job, parallel

  precisions = []
  real_evaluate = infinite_job.evaluate

  def spying_evaluate(*args, **kwargs):
    precisions.append(jax.config.jax_default_matmul_precision)
    return real_evaluate(*args, **kwargs)

  monkeypatch.setattr(infinite_job, "evaluate", spying_evaluate)
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(16, 3)).astype(np.float32)
  network = lambda images: images.reshape(len(images), -1) @ jnp.asarray(weights)
  labels = np.arange(12) % 3
  wrong = lambda: np.where(rng.uniform(size=12) < 0.5, (labels + 1) % 3, labels)
  examples = {name: {"images": rng.uniform(size=(12, 4, 4, 1)), "predictions": wrong(),
                     "clean_predictions": wrong()} for name in ("pgd", "apgd")}
  row = infinite_job.transferred(network, examples, labels, 8, parallel.make_mesh(), 3, "highest")
  assert precisions == ["highest", "highest"]
  for name, made in examples.items():
    predictions = (made["images"].reshape(12, -1).astype(np.float32) @ weights).argmax(1)
    assert row[name]["accuracy"] == pytest.approx(np.mean(predictions == labels))
    # the attack's successes: right clean, wrong after (a clean mistake keeps its clean image)
    fooled = (made["clean_predictions"] == labels) & (made["predictions"] != labels)
    assert 0 < fooled.sum() < np.sum(made["predictions"] != labels)
    assert row[name]["transfer_rate"] == pytest.approx(np.mean(predictions[fooled] != labels[fooled]))
    assert row[name]["source_fooled"] == fooled.sum()


def test_a_transfer_rate_with_no_fooled_source_example_is_null_in_strict_json():
  """No example fooled the source: the rate is undefined, written as JSON null (NaN, as before,
  is not JSON and strict readers such as jq refuse the whole record)."""
  from ntk_scale.evaluate import transfer_rate
  labels = np.array([0, 1, 2, 0])
  # the source misclassifies example 3 clean and after: no adversarial example, left out
  none = transfer_rate(np.array([1, 1, 2, 0]), labels, np.array([0, 1, 2, 1]), np.array([0, 1, 2, 1]))
  assert none == {"transfer_rate": None, "source_fooled": 0}
  assert json.loads(json.dumps(none, allow_nan=False)) == none
  assert transfer_rate(np.array([1, 1, 2, 1]), labels, np.array([1, 2, 2, 1]),
                       np.array([0, 1, 2, 1])) == {"transfer_rate": 0.5, "source_fooled": 2}


def test_a_rerun_takes_kept_evaluations_and_a_preemption_stops_after_one(monkeypatch, tmp_path):
  """Each (model, attack) result, its examples too, is kept on disk, and each batch of it as it
  goes: a new run with the same settings evaluates nothing again and gets equal results; other
  settings evaluate afresh; a run preempted after a batch resumes to the same results."""
  import jax.numpy as jnp

  from ntk_scale import infinite_job, parallel
  from ntk_scale.base_config import pgd_linf
  from ntk_scale.data import Split
  from ntk_scale.evaluation_progress import KeptResults
  from ntk_scale.preemption import Preempted

  calls = []
  real_evaluate = infinite_job.evaluate
  monkeypatch.setattr(infinite_job, "evaluate",
                      lambda *args, **kwargs: calls.append(1) or real_evaluate(*args, **kwargs))
  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  logits_fn = lambda images: images.reshape(len(images), -1) @ weights
  split = Split(rng.uniform(size=(12, 4, 4, 1)).astype(np.float32), np.arange(12) % 3)
  attacks = ml_collections.ConfigDict({"pgd": pgd_linf(0.1, 3)})
  directory = str(tmp_path / "kept")
  run = lambda settings, noticed=lambda: False: infinite_job._Evaluations(
      split, 8, parallel.make_mesh(), 3, seed=0,
      kept=KeptResults(directory, settings, noticed)).rows("original", logits_fn, attacks,
                                                             keep_examples=True)
  first = run({"config": "a"})
  assert len(calls) == 2  # clean, pgd
  again = run({"config": "a"})
  assert len(calls) == 2
  assert again["clean"] == first["clean"]
  assert {k: v for k, v in again["pgd"].items() if k != "examples"} == {
      k: v for k, v in first["pgd"].items() if k != "examples"}
  for name, values in first["pgd"]["examples"].items():
    np.testing.assert_array_equal(again["pgd"]["examples"][name], values)
  run({"config": "b"})
  assert len(calls) == 4
  # A notice at once: the first batch (of 2) of the first evaluation is kept, then it stops.
  with pytest.raises(Preempted, match="1 of 2 batches of attack original.clean are kept") as stopped:
    run({"config": "c"}, noticed=lambda: True)
  assert stopped.value.step == 1 and len(calls) == 5
  resumed = run({"config": "c"})
  assert resumed["clean"] == first["clean"]
  for name, values in first["pgd"]["examples"].items():
    np.testing.assert_array_equal(resumed["pgd"]["examples"][name], values)
  KeptResults(directory, {}, lambda: False).discard()
  assert not (tmp_path / "kept").exists()


def test_robust_dataset_table_lists_every_model_and_training_set():
  from ntk_scale.infinite_job import _table

  table = _table({"kernel_regression": {"original": {"clean": 0.5, "pgd": 0.25},
                                        "optimised": {"clean": 0.75, "pgd": 0.5}},
                  "network_width8": {"original": {"clean": 1.0}}})
  lines = table.splitlines()
  assert len(lines) == 3
  assert "kernel_regression" in lines[0] and "original" in lines[0] and "pgd  25.0%" in lines[0]
  assert "network_width8" in lines[2] and "clean 100.0%" in lines[2]


def test_infinite_job_sets_record_dataset_and_clean_accuracy_shown_in_report(nt, tmp_path, monkeypatch):
  """A tiny infinite run: each saved kernel-regression set's meta.json has the dataset and the clean
  accuracy of the attacked model (the job's own number), and the report's set table shows it.
  The finite networks are stubbed: their training is tested elsewhere."""
  import html

  from ntk_scale import infinite_job, jobs
  from ntk_scale.adversarial_sets import load_adversarial_set
  from ntk_scale.base_config import pgd_linf
  from ntk_scale.report import fmt, write_report

  from test_train import load_config

  config = load_config("infinite_width", "smoke")
  s = config.infinite
  s.update(num_train=30, num_test=50, depth=1, batch_size=64)
  config.batch_size = 8  # the robust set's network trains on its 30 images, over 4 devices
  s.attacks = ml_collections.ConfigDict({"pgd": pgd_linf(0.1, num_steps=2)})
  s.transfer.widths = ()
  s.robust_data.update(num_steps=0, target_batch_size=10, network_width=8)
  s.robust_data.eval_attacks = ml_collections.ConfigDict({"pgd": pgd_linf(0.1, num_steps=2)})
  monkeypatch.setattr(infinite_job, "_train_finite",
                      lambda *args, **kwargs: {"results": {"clean": {"accuracy": 0.5}}})
  workdir = str(tmp_path)
  jobs.prepare_workdir(config, workdir)
  results = infinite_job.infinite_job(config, workdir)
  arrays, meta = load_adversarial_set(str(tmp_path / "adversarial" / "pgd"))
  assert results["num_test"] == 50 and len(arrays["labels"]) == 50  # a class-balanced test subset
  assert np.bincount(arrays["labels"], minlength=10).tolist() == [5] * 10
  assert meta["dataset"] == "digits"
  assert meta["clean_accuracy"] == results["kernel_regression"]["clean"]
  assert meta["clean_accuracy"] == pytest.approx(np.mean(arrays["clean_predictions"] == arrays["labels"]))
  assert meta["accuracy"] == results["kernel_regression"]["pgd"]
  # The training kernel went to kernels/ tile by tile (of 64: one tile), finished.
  (kernel_dir,) = (tmp_path / "kernels").iterdir()
  assert kernel_dir.name.startswith("infinite_fc1_ntk_30_")
  assert (kernel_dir / "tiles" / "0-0").exists()
  assert not (tmp_path / infinite_job.ROBUST_DATASET_STEPS_DIR).exists()  # no steps, no state
  assert not (tmp_path / infinite_job.EVALUATIONS_DIR).exists()  # results.json is written
  # A rerun of the finished job reads results.json back: its kept evaluations are gone, and
  # attacking kernel regression again was most of the job.
  monkeypatch.setattr(infinite_job, "evaluate", lambda *args, **kwargs: pytest.fail("evaluated again"))
  (tmp_path / infinite_job.EVALUATIONS_DIR).mkdir()  # as a kill before its removal leaves it
  assert infinite_job.infinite_job(config, workdir) == json.loads(json.dumps(results))
  assert not (tmp_path / infinite_job.EVALUATIONS_DIR).exists()
  config.eval_matmul_precision = "highest"  # the networks' rows are evaluated at it
  with pytest.raises(pytest.fail.Exception, match="evaluated again"):
    infinite_job.infinite_job(config, workdir)
  config.eval_matmul_precision = "default"
  config.eval_batch_size = 40  # each batch draws its own random start: other results
  with pytest.raises(pytest.fail.Exception, match="evaluated again"):
    infinite_job.infinite_job(config, workdir)
  with open(write_report(workdir), encoding="utf-8") as f:
    page = f.read()
  row = next(r for r in page.split("<tr>") if r.startswith('<td class="k">pgd</td>'))
  cells = [html.unescape(c.split("</td>")[0]) for c in row.split("<td>")[1:]]
  assert cells[-2:] == [fmt(meta["clean_accuracy"]), fmt(meta["accuracy"])]


def test_the_square_variant_adds_square_attack_to_the_robust_set_evaluation():
  from ntk_scale.attacks import build_attacks

  from test_train import load_config

  assert "square" not in load_config("infinite_width", "digits").infinite.robust_data.eval_attacks
  for variant, queries in (("digits,square", 1000), ("digits,square,smoke", 20)):
    attacks = load_config("infinite_width", variant).infinite.robust_data.eval_attacks
    assert set(build_attacks(attacks, "config.infinite.robust_data.eval_attacks")) == {
        "pgd", "apgd", "apgd_t", "square"}
    assert attacks.square.num_queries == queries and attacks.square.eps == 0.1


def test_a_subset_run_trains_its_comparison_on_the_subset_and_keeps_evaluations(nt, tmp_path,
                                                                                monkeypatch):
  """With config.infinite.num_train the comparison's CNN on the original set trains on the subset
  kernel regression is fitted on (the transfer network on the whole split); robust_dataset.npz's
  rows index the training split; a rerun that changes only runtime fields takes every kept
  kernel-regression evaluation back, one that changes eval_batch_size (its attacks' batches and
  keys) evaluates again. Networks are stubbed: their training is tested elsewhere."""
  import copy

  import jax.numpy as jnp

  from ntk_scale import infinite_job, jobs
  from ntk_scale.base_config import pgd_linf
  from ntk_scale.data import load_dataset

  from test_train import load_config

  class Stop(Exception):
    """Ends a run at its first network, with its kernel-regression evaluations kept."""

  config = load_config("infinite_width", "smoke")
  s = config.infinite
  s.update(num_train=30, num_test=20, depth=1, batch_size=64)
  config.batch_size, config.eval_batch_size = 8, 8
  s.attacks = ml_collections.ConfigDict({"pgd": pgd_linf(0.1, num_steps=2)})
  s.transfer.widths = (4,)
  s.robust_data.update(num_steps=1, target_batch_size=10, network_width=8)
  s.robust_data.eval_attacks = ml_collections.ConfigDict({"pgd": pgd_linf(0.1, num_steps=2)})
  trained, evaluated = [], []
  real_evaluate = infinite_job.evaluate
  monkeypatch.setattr(infinite_job, "evaluate",
                      lambda *args, **kwargs: evaluated.append(1) or real_evaluate(*args, **kwargs))

  def stop(*args, **kwargs):
    raise Stop

  def fake_training(config, workdir, width, name="", dataset=None, eval_attacks=None):
    trained.append((width, name, len(dataset.train)))
    return {"results": {"clean": {"accuracy": 0.5}}, "test": {"accuracy": 0.5},
            "state": lambda images: jnp.zeros((len(images), 10))}

  def run(config, train_finite):
    monkeypatch.setattr(infinite_job, "_train_finite", train_finite)
    evaluated.clear()
    jobs.prepare_workdir(config, str(tmp_path))
    return infinite_job.infinite_job(config, str(tmp_path))

  with pytest.raises(Stop):
    run(config, stop)
  assert len(evaluated) == 4  # clean and PGD of kernel regression on each set
  train = load_dataset(config.data).train
  with np.load(tmp_path / infinite_job.ROBUST_DATASET_FILE, allow_pickle=False) as stored:
    rows, images = stored["rows"], stored["images"]
    np.testing.assert_array_equal(stored["target_rows"], rows)  # no holdout: their originals
    change = json.loads(str(stored["record"]))["max_pixel_change"]
  assert 0 < change < 0.05 and len(rows) == 30
  np.testing.assert_allclose(images, train.images[rows], rtol=0, atol=change + 1e-6)
  # A set written while its rows indexed the subset is read back and given the split's rows.
  path = tmp_path / infinite_job.ROBUST_DATASET_FILE
  with np.load(path, allow_pickle=False) as stored:
    written = {k: stored[k] for k in stored.files}
  np.savez(path, **{**written, "rows": np.arange(30), "target_rows": np.arange(30)})
  runtime = copy.deepcopy(config)
  runtime.log_every_steps, runtime.data.download = 7, False
  runtime.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(Stop):
    run(runtime, stop)
  assert not evaluated  # all four kept
  with np.load(path, allow_pickle=False) as stored:
    for name, array in written.items():
      np.testing.assert_array_equal(stored[name], array)
  batches = copy.deepcopy(runtime)
  batches.eval_batch_size = 12
  with pytest.raises(Stop):
    run(batches, stop)
  assert len(evaluated) == 4
  results = run(batches, fake_training)
  assert trained == [(4, "", len(train)), (8, "original", 30), (8, "robust_dataset", 30)]
  assert list(results["robust_dataset"]["network_width8"]) == ["original", "optimised"]


def test_config_flags_set_the_robust_sets_optional_fields():
  """data_eps and network_width default to None; main.py's --config.<field>=<value> flags must
  still set them (a plain None field refuses every override) and refuse a value of another type."""
  import warnings

  from absl import flags
  from ml_collections import config_flags

  from test_train import REPO

  def parse(*overrides):
    argv = ["main.py", f"--config={REPO}/configs/infinite_width.py:smoke", *overrides]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                             lock_config=True, sys_argv=argv)
    with warnings.catch_warnings():  # config_flags loads the file with the deprecated load_module()
      warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
      values(argv)
    return holder.value.infinite.robust_data

  section = parse()
  assert section.network_width is None and section.data_eps is None
  section = parse("--config.infinite.robust_data.network_width=0",
                  "--config.infinite.robust_data.data_eps=0.05")
  assert section.network_width == 0 and section.data_eps == 0.05
  with pytest.raises(flags.IllegalFlagValueError, match="network_width"):
    parse("--config.infinite.robust_data.network_width=wide")


def test_the_finite_networks_train_no_phase_2_so_its_fields_are_not_checked(tmp_path):
  """train_and_evaluate runs phase 1 only: config.phase2 (here unsaved from_epoch and an unknown
  linearization) must neither fail the up-front checks nor reach the networks' training, where a
  phase 2 of their config is checked against their saves after the kernels. A phase 2 asked for
  (num_epochs > 0) is refused: it would not run."""
  from ntk_scale import infinite_job
  from ntk_scale.train.loop import _check_phase2_start

  from test_train import load_config

  config = load_config("infinite_width", "smoke")
  config.phase2.update(num_epochs=1.0, from_epoch=2.0, linearization="bogus")
  with pytest.raises(ValueError, match=r"config\.phase2\.num_epochs=1\.0 is not read by the infinite job"):
    infinite_job.check_infinite_config(config, np.arange(1437) % 10, 10, num_devices=4)
  config.phase2.num_epochs = 0.0
  infinite_job.check_infinite_config(config, np.arange(1437) % 10, 10, num_devices=4)
  config.lock()  # as main.py gives it: its empty eval_attacks is not equal to the default's
  infinite_job.check_infinite_config(config, np.arange(1437) % 10, 10, num_devices=4)
  config.unlock()
  config.phase2.num_epochs = 1.0
  network = infinite_job._finite_config(config, 8, None)
  assert network.phase2.num_epochs == 0 and network.num_epochs == 1.0
  _check_phase2_start(network, {0: 0.0, 22: 1.0}, str(tmp_path))  # phase 1 saves epochs 0 and 1


def test_each_kernel_machine_of_the_infinite_job_is_fitted_on_its_own_images_kernel(nt, tmp_path,
                                                                                    monkeypatch):
  """With held-out targets, three kernel machines: on all training images, on the images to
  optimise before optimisation (a block of the first's kernel, rows and columns of those images),
  and on the optimised images. Each is fitted on the kernel of the very images it predicts with
  (computed here afresh) and config.infinite.regression's regularizer."""
  from ntk_scale import infinite_job, jobs
  from ntk_scale.base_config import pgd_linf
  from ntk_scale.kernel_regression import KernelRegression

  from test_train import load_config

  config = load_config("infinite_width", "smoke")
  s = config.infinite
  s.update(num_train=30, num_test=20, depth=1, batch_size=64)
  s.regression.regularizer = 0.5
  s.attacks = ml_collections.ConfigDict({"pgd": pgd_linf(0.1, num_steps=1)})
  s.transfer.widths = ()
  s.robust_data.update(num_steps=0, target_batch_size=10, network_width=0, target_holdout=10)
  s.robust_data.eval_attacks = ml_collections.ConfigDict()
  fits, predictions = [], []  # fit(...).logits_fn(kernel_fn, images): one after the other
  fit, logits_fn = KernelRegression.fit.__func__, KernelRegression.logits_fn

  def spying_fit(cls, k_train, labels, num_classes, **kwargs):
    fits.append((np.asarray(k_train), kwargs["regularizer"]))
    return fit(cls, k_train, labels, num_classes, **kwargs)

  def spying_logits_fn(self, kernel_fn, images, **kwargs):
    predictions.append(np.asarray(images))
    return logits_fn(self, kernel_fn, images, **kwargs)

  monkeypatch.setattr(KernelRegression, "logits_fn", spying_logits_fn)
  monkeypatch.setattr(KernelRegression, "fit", classmethod(spying_fit))
  jobs.prepare_workdir(config, str(tmp_path))
  infinite_job.infinite_job(config, str(tmp_path))
  assert len(fits) == len(predictions) and [len(images) for images in predictions] == [30, 20, 20]
  for (k_train, regularizer), images in zip(fits, predictions):
    assert regularizer == 0.5
    np.testing.assert_allclose(k_train, infinite.kernel_matrix(s, 10, images), rtol=1e-10, atol=1e-12)


def test_the_robust_sets_network_is_the_widest_transfer_network_and_its_batch_fits_the_set():
  from ntk_scale import infinite_job

  from test_train import load_config

  config = load_config("infinite_width", "smoke")
  s = config.infinite
  s.transfer.widths, s.robust_data.network_width = (8, 128, 32), None
  assert infinite_job._network_width(config) == 128
  s.robust_data.network_width = 16
  assert infinite_job._network_width(config) == 16
  # 100 training images, 40 held out as targets: the network trains on the 60 optimised ones.
  s.update(num_train=100, num_test=None)
  s.robust_data.update(target_holdout=40, target_batch_size=10)
  config.batch_size = 64
  labels = np.arange(400) % 10
  with pytest.raises(ValueError, match=r"config.batch_size=64 exceeds the 60 images of the robust set"):
    infinite_job.check_infinite_config(config, labels, 10, num_devices=1)


def test_a_batch_of_exactly_the_robust_sets_size_fits_it():
  """The robust set's network trains on its 60 images (100, 40 held out): a batch of 60 is one
  whole batch an epoch, allowed; 61 would be refused (the widest-network test above refuses 64)."""
  from ntk_scale import infinite_job

  from test_train import load_config

  config = load_config("infinite_width", "smoke")
  s = config.infinite
  s.transfer.widths, s.robust_data.network_width = (8,), 16
  s.update(num_train=100, num_test=None)
  s.robust_data.update(target_holdout=40, target_batch_size=10)
  config.batch_size = 60
  infinite_job.check_infinite_config(config, np.arange(400) % 10, 10, num_devices=1)


def test_the_kernels_store_name_covers_every_image():
  """Two image sets that share their first image are two kernels: the store name's digest is of
  all the images (in the kernel's dtype), so neither reads back the other's kernel."""
  import hashlib

  section = _section()
  images = _images(5)
  other = images.copy()
  other[-1] = 1.0 - other[-1]
  assert infinite.kernel_store_name(section, images) != infinite.kernel_store_name(section, other)
  identity = infinite.kernel_identity(section, images)
  assert identity["images"] == hashlib.sha256(images.astype(np.float64).tobytes()).hexdigest()
  assert identity["shape"] == [5, 5]


def test_examples_asked_after_a_plain_evaluation_are_computed_and_clean_keeps_none(monkeypatch):
  """An attack first evaluated without its examples is evaluated again when they are asked for
  (else a row without "examples" came back); the clean row never keeps examples (it made none).
  Two PGD configs differing in eps draw different random starts (the key is of the config)."""
  from ntk_scale import infinite_job
  from ntk_scale.base_config import pgd_linf

  kept = []
  real_evaluate = infinite_job.evaluate

  def recording_evaluate(model, split, *args, attack=None, keep_examples=False, **kwargs):
    kept.append((attack is None, keep_examples))
    return real_evaluate(model, split, *args, attack=attack, keep_examples=keep_examples, **kwargs)

  monkeypatch.setattr(infinite_job, "evaluate", recording_evaluate)
  logits_fn, evaluations = _linear_evaluations(8, seed=1)
  attacks = ml_collections.ConfigDict({"pgd": pgd_linf(0.1, 2)})
  assert "examples" not in evaluations.rows("m", logits_fn, attacks)["pgd"]
  again = evaluations.rows("m", logits_fn, attacks, keep_examples=True)
  assert "examples" in again["pgd"] and "examples" not in again["clean"]
  assert kept == [(True, False), (False, False), (False, True)]
  key = lambda c: jax.random.key_data(infinite_job._attack_key(0, c))
  assert not np.array_equal(key(pgd_linf(0.1, 2)), key(pgd_linf(0.2, 2)))
  np.testing.assert_array_equal(key(pgd_linf(0.1, 2)), key(pgd_linf(0.1, 2)))


def test_the_robust_set_is_read_back_whatever_its_checkpoint_interval(tmp_path, monkeypatch):
  """robust_data.checkpoint_every says only how often the optimisation saves its state: a rerun with
  another interval reads the written set back (the other fields would optimise it again). And the
  finite networks the job trains save neither adversarial sets of their own nor fractional-epoch
  checkpoints."""
  from ntk_scale import infinite_job, parallel

  from test_train import load_config

  calls = []

  def optimise(robust_data, kernel_fn, x, y, *args, **kwargs):
    calls.append(robust_data.checkpoint_every)
    return x + 0.25, {"objective": [1.0, 0.5], "max_pixel_change": 0.25}

  monkeypatch.setattr(infinite_job, "optimise_dataset", optimise)
  config = load_config("infinite_width", "smoke")
  s = config.infinite
  x, y = _images(6).astype(np.float32), np.arange(6) % 3
  rows = (np.arange(6), np.arange(6))
  path = str(tmp_path / "robust_dataset.npz")
  run = lambda: infinite_job._robust_dataset(s, path, None, x, y, rows, 3, 0, 4, parallel.make_mesh())
  first, _ = run()
  s.robust_data.checkpoint_every += 7
  again, _ = run()
  np.testing.assert_array_equal(again, x + 0.25)
  assert len(calls) == 1 and np.array_equal(first, again)
  s.robust_data.num_steps += 1
  run()
  assert len(calls) == 2
  config.save_adversarial = True
  finite = infinite_job._finite_config(config, 8, None)
  assert finite.save_adversarial is False  # and only whole epochs (the default has 7 fractions)
  assert config.checkpoint.fractional_epochs and tuple(finite.checkpoint.fractional_epochs) == ()
