"""Real datasets from tensorflow-datasets, read once into host memory.

The datasets of this field (CIFAR, MNIST, SVHN) fit in host memory, which makes every epoch's
order an exact function of (seed, epoch) and a resumed run bitwise equal to an uninterrupted one.
"""

import socket
import urllib.request

import jax
import numpy as np

from ntk_scale import parallel
from ntk_scale.data.dataset import Dataset, Split

# name -> (train split, test split, number of classes)
TFDS_DATASETS = {
    "cifar10": ("train", "test", 10),
    "cifar100": ("train", "test", 100),
    "mnist": ("train", "test", 10),
    "fashion_mnist": ("train", "test", 10),
    "svhn_cropped": ("train", "test", 10),
}
_READ_BATCH = 4096
# Where tfds fetches each dataset from: its GCS mirror of prepared datasets, else the source's host
# (the URLs of the tfds builders). Reaching either is enough.
_GCS = ("storage.googleapis.com", 443)
_SOURCES = {
    "cifar10": ("www.cs.toronto.edu", 443),
    "cifar100": ("www.cs.toronto.edu", 443),
    "mnist": ("storage.googleapis.com", 443),
    "fashion_mnist": ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
    "svhn_cropped": ("ufldl.stanford.edu", 80),
}


class DatasetUnavailableError(RuntimeError):
  """A tfds dataset is neither prepared on disk nor downloadable here."""


def _how_to_provide(name: str, data_dir: str | None) -> str:
  target = data_dir or "~/tensorflow_datasets"
  return (f"Prepare it on a machine with network access with\n"
          f"  python -m tensorflow_datasets.scripts.download_and_prepare --datasets={name} "
          f"--data_dir={target}\n"
          f"and copy {target}/{name} to this machine, or point config.data.data_dir at a directory "
          f"that holds it.")


def _reachable(address: tuple[str, int], timeout_s: float = 5.0) -> bool:
  """Whether a connection to (host, port) opens; fails fast where tfds would retry for minutes."""
  try:
    socket.create_connection(address, timeout=timeout_s).close()
    return True
  except OSError:
    return False


def _download_hosts(name: str) -> tuple[tuple[str, int], ...] | None:
  """The (host, port) pairs to probe before downloading `name`; None where a probe cannot tell:
  behind a proxy (tfds goes through it, a direct connection need not open)."""
  if any(urllib.request.getproxies().get(scheme) for scheme in ("https", "http", "all")):
    return None
  return tuple(dict.fromkeys((_GCS, _SOURCES.get(name, _GCS))))


def _downloads_for_real(builder) -> bool:
  """False under `tfds.testing.mock_data`, whose stand-in download needs no network."""
  module = getattr(type(builder).download_and_prepare, "__module__", "")
  return module.startswith("tensorflow_datasets.core")


def _prepared_builder(name: str, data_dir: str | None, download: bool):
  """The dataset's builder, prepared (downloaded if allowed and missing).

  With several processes, process 0 alone prepares a missing dataset while the others wait for it
  (parallel.agree), then they open it with a fresh builder: hosts sharing data_dir (NFS, a bucket)
  must not download into it at once. A host whose data_dir still lacks it after the wait (one of
  its own, e.g. each host's ~/tensorflow_datasets) prepares its own copy, as a single process
  does; if process 0 failed, every process fails. Every process calls this: jobs load their data
  on every process.
  """
  import tensorflow_datasets as tfds

  if jax.process_count() == 1:
    return _prepare(tfds.builder(name, data_dir=data_dir), name, data_dir, download)
  if jax.process_index() == 0:
    try:
      builder = _prepare(tfds.builder(name, data_dir=data_dir), name, data_dir, download)
    except Exception:
      parallel.agree(False)  # the others are waiting: release them with the news
      raise
    parallel.agree(True)
    return builder
  if not parallel.agree(False):  # the flag that counts is process 0's
    raise DatasetUnavailableError(
        f"Dataset {name!r}: process 0 could not prepare it in {data_dir or '~/tensorflow_datasets'} "
        f"(its log says why). " + _how_to_provide(name, data_dir))
  # Built after the wait: a builder made before it would not see what process 0 wrote.
  return _prepare(tfds.builder(name, data_dir=data_dir), name, data_dir, download)


def _prepare(builder, name: str, data_dir: str | None, download: bool):
  """`builder` once its dataset is on disk: as it is, or after download_and_prepare."""
  if builder.is_prepared():
    return builder
  hosts = _download_hosts(name) if download and _downloads_for_real(builder) else None
  if hosts and not any(_reachable(host) for host in hosts):
    raise DatasetUnavailableError(
        f"Dataset {name!r} is not prepared in {builder.data_dir} and neither "
        f"{' nor '.join(host for host, _ in hosts)} can be reached to download it. "
        + _how_to_provide(name, data_dir))
  if not download:
    raise DatasetUnavailableError(
        f"Dataset {name!r} is not prepared in {builder.data_dir} and config.data.download is False. "
        + _how_to_provide(name, data_dir))
  try:
    builder.download_and_prepare()
  except Exception as e:  # tfds raises many types for a missing network
    raise DatasetUnavailableError(
        f"Dataset {name!r} is not prepared in {builder.data_dir} and downloading it failed "
        f"({type(e).__name__}: {e}). " + _how_to_provide(name, data_dir)) from e
  return builder


def _read_split(builder, split: str) -> Split:
  import tensorflow_datasets as tfds

  # A positive batch size: batch_size=-1 aborts under tfds.testing.mock_data.
  ds = builder.as_dataset(split=split, as_supervised=True, batch_size=_READ_BATCH, shuffle_files=False)
  images, labels = [], []
  for x, y in tfds.as_numpy(ds):
    images.append(x)
    labels.append(y)
  images = np.concatenate(images).astype(np.float32)
  images /= 255.0  # in place: a second float32 copy of CIFAR-10's train split is 600 MB more
  return Split(images, np.concatenate(labels).astype(np.int32))


def load_tfds(name: str, data_dir: str | None = None, download: bool = True) -> Dataset:
  """Train and test splits of a tfds image classification dataset, pixels scaled to [0, 1]."""
  train_split, test_split, num_classes = TFDS_DATASETS[name]
  builder = _prepared_builder(name, data_dir, download)
  return Dataset(name, _read_split(builder, train_split), _read_split(builder, test_split), num_classes)
