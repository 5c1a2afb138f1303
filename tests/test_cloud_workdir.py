"""Workdirs in cloud storage (gs://, as on TPU VMs and multi-host jobs): the kernel store, run
records, adversarial sets, evaluations, Orbax's checkpoints, a train job, its compiled programs and
the report work in a bucket (an emulator on 127.0.0.1, see fake_gcs.py) as they do on a local disk, and nothing lands on
the local disk instead. TensorBoard's event files are left out (fake_gcs.no_event_files)."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fake_gcs import fake_bucket, no_event_files
from ntk_scale import compilation_cache, evaluation_records, files, jobs
from ntk_scale.base_config import base_config
from ntk_scale.checkpoint import Checkpoints
from ntk_scale.adversarial_sets import load_adversarial_set, save_adversarial_set
from ntk_scale.evaluate import write_evaluation
from ntk_scale.ntk.store import KernelStore, KernelStoreMismatchError, TileWriter
from ntk_scale.report import write_report
from ntk_scale.profile import StepProfile
from ntk_scale.train.metrics_jsonl import read_metrics
from ntk_scale.train.writers import JsonlWriter
from ntk_scale.workdir import WorkdirConfigMismatchError, record_or_check

TILE, BLOCKS = 4, 3


@pytest.fixture
def bucket():
  with fake_bucket() as uri:
    yield uri


@pytest.fixture(autouse=True)
def _no_local_writes(tmp_path, monkeypatch):
  """Tests run in an empty directory: a gs:// path mistaken for a local one would appear there."""
  monkeypatch.chdir(tmp_path)
  yield
  assert not os.path.exists(tmp_path / "gs:"), "a gs:// path was written to the local disk"


def _store(directory: str, shape_field: int = TILE * BLOCKS) -> KernelStore:
  n = TILE * BLOCKS
  meta = {"shape": [shape_field, shape_field], "tile": TILE, "dtype": "float32"}
  return KernelStore.create_or_resume(directory, meta, ("shape",), np.arange(n), np.arange(n) % 3)


def test_a_kernel_in_a_bucket_resumes_and_reads_back(bucket):
  directory = f"{bucket}/run/kernels/class0"
  a = np.random.RandomState(0).randn(TILE * BLOCKS, 5).astype(np.float32)
  kernel = a @ a.T
  tiles = [(i, j) for i in range(BLOCKS) for j in range(i, BLOCKS)]
  block = lambda i, j: kernel[i * TILE:(i + 1) * TILE, j * TILE:(j + 1) * TILE]

  with TileWriter(_store(directory), mirror=True) as write:
    for i, j in tiles[:3]:  # a job killed after three tiles
      write(i, j, block(i, j))
  resumed = _store(directory)
  assert resumed.done_tiles() == set(tiles[:3])
  for i, j in sorted(set(tiles) - resumed.done_tiles()):
    resumed.write_tile(i, j, block(i, j), mirror=True)

  stored = KernelStore.open(directory)
  np.testing.assert_array_equal(stored.read(), kernel)
  np.testing.assert_array_equal(stored.indices(), np.arange(TILE * BLOCKS))
  np.testing.assert_array_equal(stored.labels(), np.arange(TILE * BLOCKS) % 3)
  assert stored.done_tiles() == set(tiles)
  assert stored.stored_chunks() == {(i, j) for i in range(BLOCKS) for j in range(BLOCKS)}
  assert stored.drop_tiles_without_chunks(mirror=True) == []  # the bucket's listing finds them all
  assert sorted(files.list_dir(directory)) == ["indices.npy", "kernel.json", "kernel.zarr", "labels.npy",
                                               "tiles"]
  with pytest.raises(KernelStoreMismatchError, match="shape"):
    _store(directory, shape_field=TILE * BLOCKS + 1)


def test_a_failed_write_leaves_the_previous_object(bucket):
  path = f"{bucket}/records/step.json"
  files.write_json(path, {"step": 1})

  def dies_half_way(f):
    f.write(b'{"step": ')
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError, match="killed"):
    files.write_atomic(path, dies_half_way)
  assert files.read_json(path) == {"step": 1}
  assert files.list_dir(f"{bucket}/records") == ["step.json"]


def _fill_workdir(workdir: str) -> None:
  """A run's records, written by the functions the jobs use."""
  record_or_check(os.path.join(workdir, "config.json"), {"job": "train", "seed": 3, "model": {"name": "cnn"}})
  metrics = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
  for step in (1, 2, 3):
    metrics.write_scalars(step, {"train/loss": 1.0 / step, "train/accuracy": 0.3 * step})
  metrics.truncate(lambda r: r["step"] < 3)  # as on resuming from step 3
  metrics.write_scalars(3, {"train/loss": 0.25, "train/accuracy": 0.95})
  rng = np.random.RandomState(1)
  arrays = {"images": rng.uniform(size=(4, 8, 8, 1)).astype(np.float32),
            "labels": np.array([0, 1, 2, 3], np.int32), "predictions": np.array([0, 2, 2, 1], np.int32),
            "clean_predictions": np.array([0, 1, 2, 3], np.int32)}
  meta = {"attack": {"name": "pgd", "norm": "linf", "eps": 0.1, "num_steps": 10}, "checkpoint_step": 3,
          "split": "test", "clean_accuracy": 1.0, "accuracy": 0.5}
  save_adversarial_set(os.path.join(workdir, "adversarial", "pgd"), arrays, meta)
  save_adversarial_set(os.path.join(workdir, "adversarial", "pgd"), arrays, meta)  # replaced whole
  write_evaluation(workdir, 3, 1.0, {"clean": {"accuracy": 1.0, "loss": 0.1},
                                     "pgd": {"accuracy": 0.5, "loss": 1.2}})


def _page(index: str) -> str:
  """index.html without what names the workdir and the time."""
  page = files.read_text(index)
  page = re.sub(r"ntk_scale report: [^<]*", "", page)
  return re.sub(r"Workdir [^;]*; generated [^.]*\.", "", page)


def test_run_records_and_the_report_in_a_bucket_equal_those_on_disk(bucket, tmp_path):
  local, cloud = str(tmp_path / "run"), f"{bucket}/run_records"
  for workdir in (local, cloud):
    _fill_workdir(workdir)

  assert read_metrics(cloud) == read_metrics(local) == [
      {"step": 1, "train/loss": 1.0, "train/accuracy": 0.3},
      {"step": 2, "train/loss": 0.5, "train/accuracy": 0.6},
      {"step": 3, "train/loss": 0.25, "train/accuracy": 0.95}]
  arrays, meta = load_adversarial_set(os.path.join(cloud, "adversarial", "pgd"))
  local_arrays, local_meta = load_adversarial_set(os.path.join(local, "adversarial", "pgd"))
  assert meta == local_meta
  for name, array in local_arrays.items():
    np.testing.assert_array_equal(arrays[name], array)
  assert evaluation_records.read_records(cloud) == evaluation_records.read_records(local) != []
  with pytest.raises(WorkdirConfigMismatchError, match="seed: 3 -> 4"):
    record_or_check(f"{cloud}/config.json", {"job": "train", "seed": 4, "model": {"name": "cnn"}})

  index = write_report(cloud)
  assert index == f"{cloud}/report/index.html"
  assert _page(index) == _page(write_report(local))
  assert "gs://bucket/run_records" in files.read_text(index)
  report_files = lambda top: sorted(os.path.relpath(os.path.join(root, n), top)
                                    for root, _, names in files.walk(top) for n in names)
  written = report_files(f"{cloud}/report")
  assert written == report_files(f"{local}/report")
  assert {"index.html", "config.json", "training.png", "adversarial_pgd.png"} <= set(written), written


def test_tensorstore_reaches_buckets_and_local_directories():
  assert files.tensorstore_kvstore("gs://b/runs/x/kernel.zarr") == {
      "driver": "gcs", "bucket": "b", "path": "runs/x/kernel.zarr/"}
  assert files.tensorstore_kvstore("/data/x/kernel.zarr") == {"driver": "file", "path": "/data/x/kernel.zarr"}
  with pytest.raises(ValueError, match="s3://b/x: kernels are stored on a local disk or in gs://"):
    files.tensorstore_kvstore("s3://b/x")


def test_a_workdir_in_another_store_is_refused_before_anything_runs():
  from test_train import load_config  # pylint: disable=import-outside-toplevel
  from ntk_scale.workdir import prepare_workdir  # pylint: disable=import-outside-toplevel

  with pytest.raises(ValueError, match="--workdir=s3://b/run: a workdir is a local directory or a gs://"):
    prepare_workdir(load_config("digits", "smoke"), "s3://b/run")


def test_a_profile_of_train_steps_lands_in_the_bucket(bucket):
  """config.profile_steps on a gs:// workdir: jax.profiler traces locally, the trace is copied
  into the phase directory in the bucket (and nothing stays behind on the local disk)."""
  step = jax.jit(lambda x: x @ x / len(x))
  x = jnp.eye(64)
  with StepProfile(f"{bucket}/run", start=0, end=6, num_steps=2) as profile:
    for i in range(6):
      profile.before(i)
      x = step(x)
      profile.after(i, x)
  (trace,) = files.glob(f"{bucket}/run/plugins/profile", "*/*.xplane.pb")
  assert len(files.read_bytes(trace)) > 0


def test_a_new_kernel_store_deletes_nothing_else_in_the_bucket(bucket):
  """A new store clears its own key range (tensorstore's delete_existing); the emulator once ignored
  the range and the kernel job emptied the bucket: checkpoints, records, other workdirs."""
  files.write_json(f"{bucket}/run/config.json", {"seed": 0})
  files.write_json(f"{bucket}/run/kernels/a.json", {"x": 1})  # sorts after kernels/a/
  files.write_json(f"{bucket}/another_run/config.json", {"seed": 1})
  _store(f"{bucket}/run/kernels/a")
  assert files.read_json(f"{bucket}/run/config.json") == {"seed": 0}
  assert files.read_json(f"{bucket}/run/kernels/a.json") == {"x": 1}
  assert files.read_json(f"{bucket}/another_run/config.json") == {"seed": 1}


def test_checkpoints_in_a_bucket_save_restore_and_delete(bucket):
  """Orbax's OCDBT checkpoints in gs://: a preemption's is deleted by removing its commit marker
  first (Orbax lists only committed steps in a bucket), and a reader no longer lists it."""
  directory = f"{bucket}/run/checkpoints"
  state = {"w": jnp.arange(3.0), "b": jnp.ones((2, 2))}
  writer = Checkpoints(directory)
  writer.save(0, state, 0.0)
  writer.save(7, jax.tree.map(lambda x: 2 * x, state), 7 / 11, pending_metrics=[(6, {"loss": 0.5})])
  writer.save(11, jax.tree.map(lambda x: 3 * x, state), 1.0)
  writer.wait_until_finished()
  reader = Checkpoints(directory, create=False)
  assert reader.epochs() == {0.0: 0, 7 / 11: 7, 1.0: 11} and reader.preempted_steps() == [7]
  assert reader.pending_metrics(7) == [(6, {"loss": 0.5})]
  np.testing.assert_array_equal(reader.restore(11, state)["w"], 3 * np.arange(3.0))
  writer.delete(7)
  assert Checkpoints(directory, create=False).epochs() == {0.0: 0, 1.0: 11}
  assert reader.scheduled_epochs() == {0.0: 0, 1.0: 11}
  writer.close()
  reader.close()


def test_a_deletion_in_a_bucket_cut_short_leaves_no_listed_step(bucket, monkeypatch):
  """A bucket has no rename: Orbax deletes a step object by object. Its commit marker removed
  first, a kill part-way (here after meta/ went) leaves a step Orbax no longer lists, not one it
  lists and cannot read."""
  from orbax.checkpoint._src.path import deleter  # pylint: disable=import-outside-toplevel

  directory = f"{bucket}/cut/checkpoints"  # another test's run/ may be listed from a cache
  state = {"w": jnp.arange(3.0)}
  writer = Checkpoints(directory)
  for step, epoch in ((0, 0.0), (7, 7 / 11), (11, 1.0)):
    writer.save(step, state, epoch)
  writer.wait_until_finished()

  class Killed(BaseException):
    pass

  def killed(self, path, *, destination=None, overwrite=False):
    path.joinpath("meta").rmtree()
    raise Killed

  monkeypatch.setattr(deleter.PathDeleter, "delete", killed)
  with pytest.raises(Killed):
    writer.delete(7)
  monkeypatch.undo()
  reader = Checkpoints(directory, create=False)
  assert reader.epochs() == {0.0: 0, 1.0: 11} and reader.latest_step() == 11
  assert not files.exists(f"{directory}/7/commit_success.txt")
  reader.close()
  writer.close()


def test_a_train_job_in_a_bucket_equals_one_on_disk(bucket, tmp_path):
  """Phase 1 of the digits CNN (two steps, checkpoints at both) in a bucket and on the local disk:
  the same checkpoints and metrics; the rerun finds training complete."""
  from test_train import load_config  # pylint: disable=import-outside-toplevel

  config = load_config("digits", "smoke")
  config.num_epochs, config.eval_attacks = 2 / 22, {}
  config.checkpoint.fractional_epochs = (1 / 22,)
  local, cloud = str(tmp_path / "run"), f"{bucket}/train"
  with no_event_files():
    for workdir in (local, cloud):
      jobs.run(config, workdir)
    jobs.run(config, cloud)  # a rerun: complete, read back
  untimed = lambda workdir: [{k: v for k, v in r.items() if k not in ("steps_per_sec", "uptime")}
                             for r in read_metrics(workdir)]
  assert untimed(cloud) == untimed(local) and any("train/loss" in r for r in untimed(local))
  on_disk, in_bucket = Checkpoints(f"{local}/checkpoints", create=False), Checkpoints(f"{cloud}/checkpoints",
                                                                                     create=False)
  assert in_bucket.epochs() == on_disk.epochs() and len(on_disk.epochs()) == 3
  last = max(on_disk.epochs().values())
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  jax.tree.map(np.testing.assert_array_equal, in_bucket.restore_variables(last, one_device),
               on_disk.restore_variables(last, one_device))
  assert evaluation_records.read_record(cloud, last)["results"] == \
      evaluation_records.read_record(local, last)["results"]


def test_compiled_programs_are_kept_in_a_bucket_workdir_and_loaded_back(bucket, jax_cache_settings):
  """config.compilation_cache with a gs:// workdir, the usual place on TPU VMs: JAX writes the
  programs into <workdir>/compilation_cache/ through epath (TensorFlow's GFile in production,
  gcsfs here), and a process that has not compiled them loads them from there."""
  directory = compilation_cache.use_workdir_cache(base_config(), f"{bucket}/cached", environ={})
  assert directory == f"{bucket}/cached/compilation_cache"
  program = jax.jit(lambda x: jnp.tanh(x) * 0.5 + 0.125)
  expected = program(jnp.arange(5.0))
  assert any(name.startswith("jit__lambda-") for name in files.list_dir(directory))
  jax.clear_caches()  # as a resumed job's new process: nothing compiled in its memory
  events = []
  record = lambda event, **kwargs: events.append(event)
  jax.monitoring.register_event_listener(record)
  try:
    again = program(jnp.arange(5.0))
  finally:
    jax.monitoring.unregister_event_listener(record)
  assert "/jax/compilation_cache/cache_hits" in events
  np.testing.assert_array_equal(again, expected)
