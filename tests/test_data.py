"""Datasets, batch order and subsets, checked against scikit-learn and hand-built arrays."""

import collections

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh
from sklearn.datasets import load_digits as sklearn_digits
from sklearn.model_selection import train_test_split

from ntk_scale import data as ntk_data
from ntk_scale import parallel
from ntk_scale.base_config import base_config
from ntk_scale.data import (DATASET_NAMES, Dataset, DatasetUnavailableError, Split, TrainBatches,
                            check_data_config, check_seed, check_subset_size, class_balanced_subset,
                            epoch_order, eval_batches, load_dataset, load_digits, load_tfds,
                            num_classes, tfds_source)


@pytest.fixture(scope="module")
def digits():
  return load_digits()


@pytest.fixture(scope="module", params=["all_devices", "one_device"])
def mesh(request):
  """`make_mesh()` over every device (however many the session has), and a 1-device mesh."""
  if request.param == "all_devices":
    return parallel.make_mesh()
  return Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))


def _indexed_split(n, num_classes=5):
  """Images whose every pixel holds the row index, so a batch reveals which rows it read."""
  images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 2, 3, 1)).copy()
  return Split(images, (np.arange(n) % num_classes).astype(np.int32))


# --------------------------------------------------------------------------- digits

def test_digits_sizes_shapes_and_range(digits):
  assert digits.name == "digits" and digits.num_classes == 10
  assert digits.train.images.shape == (1437, 8, 8, 1)
  assert digits.test.images.shape == (360, 8, 8, 1)
  assert digits.train.labels.shape == (1437,) and digits.test.labels.shape == (360,)
  for split in (digits.train, digits.test):
    assert split.images.dtype == np.float32
    assert split.images.min() >= 0.0 and split.images.max() <= 1.0
    assert split.labels.dtype == np.int32  # as tfds_source's: one label dtype whatever the dataset
  # The full range is used: sklearn's pixels run 0..16.
  assert digits.train.images.min() == 0.0 and digits.train.images.max() == 1.0


def test_digits_splits_partition_sklearn_data(digits):
  ref = sklearn_digits()
  rows = lambda pixels16, labels: collections.Counter(
      tuple(r) for r in np.concatenate([pixels16.reshape(len(labels), -1), labels[:, None]], axis=1)
      .astype(np.int64))
  ours = np.concatenate([digits.train.images, digits.test.images]) * 16.0
  # Exact multiples of 1/16 in float32, so rounding recovers sklearn's integer pixels exactly.
  np.testing.assert_array_equal(ours, np.round(ours))
  labels = np.concatenate([digits.train.labels, digits.test.labels])
  assert rows(np.round(ours), labels) == rows(ref.data, ref.target)


def test_digits_test_split_is_stratified_and_fixed(digits):
  counts = np.bincount(digits.test.labels, minlength=10)
  assert counts.sum() == 360
  assert counts.min() >= 35 and counts.max() <= 37, counts
  # The split is fixed: a second load gives the same arrays.
  again = load_digits()
  np.testing.assert_array_equal(again.test.images, digits.test.images)
  np.testing.assert_array_equal(again.train.labels, digits.train.labels)


def test_digits_split_is_sklearns_stratified_split_with_random_state_0(digits):
  """The documented split: scikit-learn's train_test_split of its 1,797 digits, 360 held out,
  stratified by label, random_state 0 (reproducible outside this code base)."""
  ref = sklearn_digits()
  x_train, x_test, y_train, y_test = train_test_split(
      ref.images, ref.target, test_size=360, stratify=ref.target, random_state=0)
  np.testing.assert_array_equal(digits.test.labels, y_test)
  np.testing.assert_array_equal(digits.train.labels, y_train)
  np.testing.assert_array_equal(digits.test.images[..., 0] * 16.0, x_test)
  np.testing.assert_array_equal(digits.train.images[..., 0] * 16.0, x_train)


# --------------------------------------------------------------------------- epoch order

def test_epoch_order_is_a_deterministic_permutation():
  n = 101
  order = epoch_order(n, seed=3, epoch=0)
  assert sorted(order.tolist()) == list(range(n))
  np.testing.assert_array_equal(order, epoch_order(n, seed=3, epoch=0))
  assert not np.array_equal(order, epoch_order(n, seed=3, epoch=1))
  assert not np.array_equal(order, epoch_order(n, seed=4, epoch=0))
  # (seed, epoch) is not collapsed into one number: (0, 1) and (1, 0) differ.
  assert not np.array_equal(epoch_order(n, 0, 1), epoch_order(n, 1, 0))
  assert not np.array_equal(order, np.arange(n))


# --------------------------------------------------------------------------- TrainBatches

def test_train_batches_epoch_rows_are_disjoint_and_cover(mesh):
  n, batch, seed = 50, 8, 7
  tb = TrainBatches(_indexed_split(n), batch, seed, mesh)
  assert tb.steps_per_epoch == 6  # 48 rows; the last 2 (partial batch) are dropped
  rows = [tb.rows(s) for s in range(tb.steps_per_epoch)]
  assert all(len(r) == batch for r in rows)
  flat = np.concatenate(rows)
  assert len(set(flat.tolist())) == tb.steps_per_epoch * batch  # disjoint
  assert set(flat.tolist()) <= set(range(n))
  # Epoch 0 reads the first 48 entries of its permutation; step 6 starts epoch 1.
  np.testing.assert_array_equal(flat, epoch_order(n, seed, 0)[:48])
  np.testing.assert_array_equal(tb.rows(6), epoch_order(n, seed, 1)[:batch])
  np.testing.assert_array_equal(tb.rows(13), epoch_order(n, seed, 2)[8:16])


def test_train_batches_call_returns_the_rows(mesh):
  split = _indexed_split(50)
  tb = TrainBatches(split, 8, 7, mesh)
  for step in (0, 5, 6, 17):
    batch = tb(step)
    rows = tb.rows(step)
    assert set(batch) == {"images", "labels"}
    np.testing.assert_array_equal(np.asarray(batch["images"]), split.images[rows])
    np.testing.assert_array_equal(np.asarray(batch["labels"]), split.labels[rows])
    assert batch["images"].sharding.is_equivalent_to(parallel.batch_sharding(mesh), 4)
    # Each device holds its contiguous slice of the global batch.
    shards = batch["images"].addressable_shards
    assert len(shards) == mesh.devices.size
    for shard in shards:
      np.testing.assert_array_equal(np.asarray(shard.data), split.images[rows[shard.index[0]]])


def test_train_batches_resume_reads_the_same_rows(mesh):
  split = _indexed_split(50)
  uninterrupted = TrainBatches(split, 8, 7, mesh)
  seen = {s: np.asarray(uninterrupted(s)["images"]) for s in range(20)}
  for step in (13, 6, 19, 0):  # fresh instances, out of order, as after a restart
    resumed = TrainBatches(split, 8, 7, mesh)
    np.testing.assert_array_equal(np.asarray(resumed(step)["images"]), seen[step])


def test_train_batches_rejects_batch_larger_than_split(mesh):
  with pytest.raises(ValueError, match="batch_size"):
    TrainBatches(_indexed_split(5), 8, 0, mesh)


# --------------------------------------------------------------------------- eval_batches

def test_eval_batches_cover_every_example_once_with_padding_masked(digits, mesh):
  test = digits.test  # 360 examples; 64 does not divide 360
  batches = list(eval_batches(test, 64, mesh))
  assert len(batches) == 6  # ceil(360 / 64)
  for b in batches:
    assert b["images"].shape == (64, 8, 8, 1) and b["mask"].shape == (64,)
  images = np.concatenate([np.asarray(b["images"]) for b in batches])
  labels = np.concatenate([np.asarray(b["labels"]) for b in batches])
  mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
  assert mask.sum() == len(test) == 360
  np.testing.assert_array_equal(mask, (np.arange(384) < 360).astype(np.float32))
  # In order, each example exactly once under mask 1.
  np.testing.assert_array_equal(images[mask == 1], test.images)
  np.testing.assert_array_equal(labels[mask == 1], test.labels)


def test_eval_batches_exact_multiple_has_no_padding(mesh):
  split = _indexed_split(24)
  batches = list(eval_batches(split, 8, mesh))
  assert len(batches) == 3
  assert all(np.asarray(b["mask"]).min() == 1.0 for b in batches)
  np.testing.assert_array_equal(np.concatenate([np.asarray(b["images"]) for b in batches]),
                                split.images)


# --------------------------------------------------------------------------- class_balanced_subset

def test_class_balanced_subset_counts_order_and_determinism():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=400)
  idx = class_balanced_subset(labels, 40, seed=1)
  assert len(idx) == 40 and len(np.unique(idx)) == 40
  np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), [10, 10, 10, 10])
  # Grouped by class in increasing class order, increasing index order within a class.
  np.testing.assert_array_equal(labels[idx], np.repeat([0, 1, 2, 3], 10))
  for c in range(4):
    block = idx[10 * c:10 * (c + 1)]
    assert np.all(np.diff(block) > 0)
  np.testing.assert_array_equal(idx, class_balanced_subset(labels, 40, seed=1))
  assert not np.array_equal(idx, class_balanced_subset(labels, 40, seed=2))


def test_class_balanced_subset_draws_every_class_from_one_generator():
  """One default_rng(seed) draws the classes in turn (numpy reference below): a fresh generator
  per class took the same positions in every class of equal size (rows 4p of class 0, 4p + 1 of
  class 1, ...), a subset as correlated as its label layout."""
  labels = np.arange(200) % 4  # every class the same rows, shifted
  idx = class_balanced_subset(labels, 20, seed=3)
  rng = np.random.default_rng(3)
  expected = np.concatenate([np.sort(rng.choice(np.flatnonzero(labels == c), 5, replace=False))
                             for c in range(4)])
  np.testing.assert_array_equal(idx, expected)
  positions = [tuple(block // 4) for block in idx.reshape(4, 5)]  # within-class positions
  assert len(set(positions)) == 4


def test_class_balanced_subset_given_classes_in_given_order(digits):
  idx = class_balanced_subset(digits.train.labels, 9, seed=0, classes=[7, 2, 5])
  np.testing.assert_array_equal(digits.train.labels[idx], [7, 7, 7, 2, 2, 2, 5, 5, 5])
  # One class only (Loo et al.'s single-class kernels).
  one = class_balanced_subset(digits.train.labels, 20, seed=0, classes=[3])
  assert np.all(digits.train.labels[one] == 3) and len(np.unique(one)) == 20


def test_class_balanced_subset_errors():
  labels = np.array([0] * 5 + [1] * 5 + [2] * 2)
  with pytest.raises(ValueError, match="multiple"):
    class_balanced_subset(labels, 7, seed=0)  # 7 is not a multiple of 3 classes
  with pytest.raises(ValueError, match="multiple"):
    class_balanced_subset(labels, 0, seed=0)
  with pytest.raises(ValueError, match="class 2"):
    class_balanced_subset(labels, 9, seed=0)  # 3 per class, class 2 has 2
  assert len(class_balanced_subset(labels, 6, seed=0)) == 6
  # A class listed twice drew two independent samples of its 5 examples: 4 + 4 rows, at least 3 repeated.
  with pytest.raises(ValueError, match=r"class\(es\) \[1\] more than once"):
    class_balanced_subset(labels, 8, seed=0, classes=[1, 1])


def test_subset_size_checks_refuse_floats_and_bools(digits):
  """A size of 20.0 or True passes the range and multiple checks (20.0 % 10 == 0, True % 1 == 0)
  but is no count of examples: refused, naming the field; numpy integers are counts."""
  labels = digits.train.labels
  for size, classes in ((20.0, range(10)), (True, [3])):
    message = rf"config\.kernel\.num_examples={size!r} must be 0 \(all\)"
    with pytest.raises(ValueError, match=message):
      check_subset_size("config.kernel.num_examples", size, labels, classes, "training")
  check_subset_size("config.kernel.num_examples", np.int64(20), labels, range(10), "training")
  check_subset_size("config.kernel.num_examples", 1, labels, [3], "training")


def test_a_subset_may_take_the_whole_split_and_is_limited_by_its_own_scarcest_class():
  """check_subset_size's boundaries: a size equal to the split's (every example of balanced classes)
  is a subset; the class count that limits it is that of the classes chosen (here class 3, rare),
  not of the classes 0, 1, ... numbered as many."""
  field = "config.kernel.num_examples"
  check_subset_size(field, 4, np.array([0, 0, 1, 1]), [0, 1], "training")
  with pytest.raises(ValueError, match=rf"{field}=6 must be 0 \(all\) or a multiple of 2 \(the number "
                                       rf"of classes in the subset\) in \[2, 4\]"):
    check_subset_size(field, 6, np.array([0, 0, 1, 1]), [0, 1], "training")
  labels = np.array([0] * 10 + [3] * 2)
  check_subset_size(field, 2, labels, [3], "training")
  with pytest.raises(ValueError, match=rf"{field}=3 takes 3 training examples of each class, but class 3 "
                                       rf"has 2 training examples: use at most 2"):
    check_subset_size(field, 3, labels, [3], "training")


def test_class_balanced_subset_against_a_brute_force_count():
  # Every (labels, size, seed, classes) below: distinct valid rows, exactly size / len(classes) of
  # each class, grouped in the order of `classes`, and the same rows again for the same seed.
  rng = np.random.default_rng(5)
  for trial in range(20):
    num_classes = int(rng.integers(1, 6))
    labels = rng.integers(0, num_classes, size=int(rng.integers(30, 80)))
    present = sorted(set(labels.tolist()))
    classes = list(rng.permutation(present)[:int(rng.integers(1, len(present) + 1))])
    per_class = int(rng.integers(1, min(np.count_nonzero(labels == c) for c in classes) + 1))
    idx = class_balanced_subset(labels, per_class * len(classes), seed=trial, classes=classes)
    assert len(idx) == len(set(idx.tolist())) == per_class * len(classes)
    assert all(0 <= i < len(labels) for i in idx)
    expected = [c for c in classes for _ in range(per_class)]
    assert labels[idx].tolist() == expected
    np.testing.assert_array_equal(idx, class_balanced_subset(labels, len(idx), trial, classes))


# --------------------------------------------------------------------------- load_dataset

def test_load_dataset_unknown_name_raises():
  c = base_config()
  c.data.name = "imagenet"
  with pytest.raises(ValueError, match=r"config\.data\.name") as info:
    load_dataset(c.data)
  assert "imagenet" in str(info.value)


def test_load_dataset_hands_tfds_its_data_dir_and_download_flag(monkeypatch):
  """--config.data.data_dir and --config.data.download reach the tfds loader (tfds itself is
  stood in for: no dataset is on this machine); a data section without them takes base_config's
  defaults, as one without `augment` does in the injection check."""
  calls = []

  def fake_load_tfds(name, data_dir, download):
    calls.append((name, data_dir, download))
    split = Split(np.zeros((2, 28, 28, 1), np.float32), np.zeros(2, np.int32))
    return Dataset(name, split, split, 10)

  monkeypatch.setattr(ntk_data, "load_tfds", fake_load_tfds)
  c = base_config()
  c.data.name, c.data.data_dir, c.data.download = "mnist", "/data/tfds", False
  assert load_dataset(c.data).name == "mnist"
  load_dataset(ml_collections.ConfigDict(dict(name="fashion_mnist")))
  default = base_config().data.download
  assert calls == [("mnist", "/data/tfds", False), ("fashion_mnist", None, default)]
  check_data_config(ml_collections.ConfigDict(dict(name="digits", transform=dict(
      name="inject", beta=0.1, num_frequencies=10, remove_projection=False, seed=0))))


def test_each_datasets_class_count_and_the_transform_check_use_its_own_classes(digits):
  """num_classes(config.data) sizes a model before any data is loaded: the digits' labels, the
  tfds metadata's for the others (read offline); the injection check counts the same classes (100
  for cifar100, whose 10 default feature frequencies cannot tell them apart)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  c = base_config()
  for name in DATASET_NAMES:
    c.data.name = name
    expected = (len(np.unique(digits.train.labels)) if name == "digits"
                else tfds.builder(name, data_dir="/nonexistent").info.features["label"].num_classes)
    assert num_classes(c.data) == expected, name
  c.data.name = "imagenet"
  with pytest.raises(ValueError, match=r"config\.data\.name='imagenet' is not a known dataset"):
    num_classes(c.data)
  c.data.name, c.data.transform.name, c.data.transform.beta = "cifar100", "inject", 0.1
  with pytest.raises(ValueError, match=r"num_frequencies=10 must be an integer >= the 100 classes"):
    check_data_config(c.data)
  c.data.name = "cifar10"
  check_data_config(c.data)


def test_load_dataset_digits_is_load_digits(digits):
  c = base_config()
  c.data.name = "digits"
  d = load_dataset(c.data)
  np.testing.assert_array_equal(d.train.images, digits.train.images)
  np.testing.assert_array_equal(d.test.labels, digits.test.labels)


# --------------------------------------------------------------------------- tfds

def test_load_tfds_cifar10_under_mock_data(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  # No network here: under mock_data load_tfds must not probe it (the stand-in download needs none).
  monkeypatch.setattr(tfds_source, "_reachable", lambda *a, **k: pytest.fail("probed the network"))
  # Several read batches per split, to check their concatenation.
  monkeypatch.setattr(tfds_source, "_READ_BATCH", 3)
  n = 7
  with tfds.testing.mock_data(num_examples=n):
    d = load_tfds("cifar10")
    # Independent read of the same (deterministic) mock data, straight from tfds.
    builder = tfds.builder("cifar10")
    raw_x, raw_y = tfds.as_numpy(builder.as_dataset(split="train", as_supervised=True, batch_size=n,
                                                    shuffle_files=False)).__iter__().__next__()
  assert d.name == "cifar10" and d.num_classes == 10
  for split in (d.train, d.test):
    assert split.images.shape == (n, 32, 32, 3)
    assert split.images.dtype == np.float32
    assert split.images.min() >= 0.0 and split.images.max() <= 1.0
    assert split.labels.dtype == np.int32 and split.labels.shape == (n,)
    assert split.labels.min() >= 0 and split.labels.max() < 10
  assert raw_x.dtype == np.uint8
  np.testing.assert_allclose(d.train.images, raw_x.astype(np.float32) / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(d.train.labels, raw_y)


def test_load_tfds_not_prepared_without_download_raises(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(DatasetUnavailableError) as info:
    load_tfds("mnist", data_dir=str(tmp_path), download=False)
  message = str(info.value)
  assert "mnist" in message
  assert "download_and_prepare" in message
  assert str(tmp_path) in message
  assert f"--data_dir={tmp_path}" in message  # the instructions prepare it where this job looks


def test_without_download_nothing_is_downloaded_and_each_split_is_read_from_its_own(monkeypatch):
  """download=False refuses before any download is tried (the test above passes either way offline,
  once a download attempt has failed); the train split is read from tfds' train split and the test
  split from its test split (mock_data's two splits are identical, so no loading test can tell)."""

  class Unprepared:
    data_dir = "/nowhere"

    def is_prepared(self):
      return False

    def download_and_prepare(self):
      pytest.fail("downloaded with config.data.download=False")

  with pytest.raises(DatasetUnavailableError, match="config.data.download is False"):
    tfds_source._prepare(Unprepared(), "mnist", None, download=False)
  read = []
  monkeypatch.setattr(tfds_source, "_prepared_builder", lambda *args: "builder")
  monkeypatch.setattr(tfds_source, "_read_split", lambda builder, split: read.append(split) or Split(
      np.zeros((2, 28, 28, 1), np.float32), np.full(2, len(read), np.int32)))
  for name in ("mnist", "cifar10", "cifar100", "svhn_cropped"):
    del read[:]
    dataset = tfds_source.load_tfds(name)
    assert read == ["train", "test"] and dataset.train.labels[0] == 1 and dataset.test.labels[0] == 2


def test_each_datasets_number_of_classes_is_that_of_its_tfds_labels():
  """The class count each dataset is loaded with (the models' logits, balanced subsets, APGD-T's
  targets) is the one tfds' own metadata gives its labels (read offline, from the builders' code)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  for name, (_, _, num_classes) in tfds_source.TFDS_DATASETS.items():
    assert num_classes == tfds.builder(name).info.features["label"].num_classes, name


# --------------------------------------------------------------------------- boundaries

def test_one_example_past_a_batch_is_a_second_batch_and_a_split_of_one_batch_trains():
  """Boundaries the sizes above miss: 9 examples in batches of 8 are two batches (the ninth padded
  with seven masked rows), 8 examples in batches of 8 one training step per epoch."""
  mesh = Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
  batches = list(eval_batches(_indexed_split(9), 8, mesh))
  assert len(batches) == 2
  masks = np.concatenate([np.asarray(b["mask"]) for b in batches])
  rows = np.concatenate([np.asarray(b["images"])[:, 0, 0, 0] for b in batches])
  assert masks.sum() == 9 and sorted(rows[masks == 1].tolist()) == list(range(9))
  assert TrainBatches(_indexed_split(8), 8, 0, mesh).steps_per_epoch == 1
  # One row of padding: 7 examples in a batch of 8 (the padding row's index is the split's length).
  (batch,) = eval_batches(_indexed_split(7), 8, mesh)
  np.testing.assert_array_equal(np.asarray(batch["mask"]), [1, 1, 1, 1, 1, 1, 1, 0])
  with pytest.raises(ValueError, match="expected images"):
    Split(np.zeros((3, 2, 2, 1), np.float32), np.zeros(2, np.int32))


def test_a_split_refuses_images_without_their_channel_axis():
  """[N, H, W] grey images (as sklearn's digits come) would reach the models without a channel."""
  message = r"expected images \[N, H, W, C\] and labels \[N\]; got \(3, 8, 8\)"
  with pytest.raises(ValueError, match=message):
    Split(np.zeros((3, 8, 8), np.float32), np.zeros(3, np.int32))
  assert len(Split(np.zeros((3, 8, 8, 1), np.float32), np.zeros(3, np.int32))) == 3


def test_seeds_stop_below_2_to_the_32_and_numpy_integers_count():
  check_seed(2**32 - 1, "config.seed")
  check_seed(np.int64(3), "config.seed")
  with pytest.raises(ValueError, match=r"config.seed=4294967296 must be an integer in \[0, 2\*\*32\)"):
    check_seed(2**32, "config.seed")
  check_seed(0, "config.seed")
  with pytest.raises(ValueError, match=r"config.seed=-1 must be an integer in \[0, 2\*\*32\)"):
    check_seed(-1, "config.seed")  # numpy's generators take no negative seed
