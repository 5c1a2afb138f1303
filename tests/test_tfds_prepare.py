"""Preparing a tfds dataset on several processes: process 0 alone downloads and prepares it while
the others wait for it, then every process opens it; on one process nothing changes. Exercised
with a fake builder that records its calls and jax's process index and the wait patched, and once
with two real processes (about 20 s, mostly imports; test_multihost.py's pairs run main.py)."""

import os

import jax
import pytest

from ntk_scale import parallel
from ntk_scale.data import DatasetUnavailableError, tfds_source

from conftest import xla_flags

tfds = pytest.importorskip("tensorflow_datasets")


class Disk:
  """The shared data_dir: whether the dataset is prepared, and every builder call in order."""

  def __init__(self, prepared: bool = False, fails: bool = False):
    self.prepared, self.fails, self.calls = prepared, fails, []


def fake_tfds(monkeypatch, disk: Disk, process: int, num_processes: int = 2) -> list:
  """Patches tfds.builder, the process index/count and the wait; returns the list of waits, each
  (process 0's flag as this process saw it)."""

  class Builder:
    data_dir = "/shared/tfds/mnist/3.0.1"

    def __init__(self):
      self._prepared = disk.prepared  # a builder resolves its files once, as tfds' does
      disk.calls.append((process, "builder"))

    def is_prepared(self):
      return self._prepared

    def download_and_prepare(self):
      disk.calls.append((process, "download_and_prepare"))
      if disk.fails:
        raise ConnectionError("no route to host")
      disk.prepared = self._prepared = True

  waits = []

  def agree(flag: bool) -> bool:  # process 0's flag on every process; process 0 already finished
    seen = flag if process == 0 else not disk.fails
    waits.append(seen)
    if process != 0 and not disk.fails:
      disk.prepared = True  # what process 0 wrote while this one waited
    return seen

  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Builder())
  monkeypatch.setattr(jax, "process_index", lambda: process)
  monkeypatch.setattr(jax, "process_count", lambda: num_processes)
  monkeypatch.setattr(parallel, "agree", agree, raising=False)
  return waits


def test_one_process_prepares_without_waiting(monkeypatch):
  disk = Disk()
  waits = fake_tfds(monkeypatch, disk, process=0, num_processes=1)
  assert tfds_source._prepared_builder("mnist", None, download=True).is_prepared()
  assert disk.calls == [(0, "builder"), (0, "download_and_prepare")] and waits == []


def test_process_zero_prepares_then_releases_the_others(monkeypatch):
  disk = Disk()
  waits = fake_tfds(monkeypatch, disk, process=0)
  assert tfds_source._prepared_builder("mnist", None, download=True).is_prepared()
  assert disk.calls == [(0, "builder"), (0, "download_and_prepare")] and waits == [True]


def test_other_process_waits_and_opens_what_process_zero_prepared(monkeypatch):
  disk = Disk()
  waits = fake_tfds(monkeypatch, disk, process=1)
  assert tfds_source._prepared_builder("mnist", None, download=True).is_prepared()
  assert waits == [True]
  assert (1, "download_and_prepare") not in disk.calls
  assert disk.calls[-1] == (1, "builder")  # a fresh builder after the wait sees the prepared files


def test_other_process_with_its_own_data_dir_prepares_its_copy(monkeypatch):
  """A data_dir that is not shared (each host's ~/tensorflow_datasets): process 0's copy is not
  visible here after the wait, so this host prepares its own, as a single process would."""
  disk = Disk()
  waits = fake_tfds(monkeypatch, disk, process=1)
  monkeypatch.setattr(parallel, "agree", lambda flag: waits.append(True) or True)  # prepared elsewhere
  assert tfds_source._prepared_builder("mnist", None, download=True).is_prepared()
  assert waits == [True] and disk.calls[-1] == (1, "download_and_prepare")


def test_failure_on_process_zero_releases_and_fails_every_process(monkeypatch):
  for process in (0, 1):
    disk = Disk(fails=True)
    waits = fake_tfds(monkeypatch, disk, process=process)
    message = "downloading it failed" if process == 0 else "process 0 could not prepare it"
    with pytest.raises(DatasetUnavailableError, match=message):
      tfds_source._prepared_builder("mnist", None, download=True)
    assert waits == [False]
    assert [c for c in disk.calls if c[1] == "download_and_prepare"] == ([(0, "download_and_prepare")]
                                                                       if process == 0 else [])


def test_prepared_dataset_is_opened_after_the_wait_without_downloading(monkeypatch):
  for process in (0, 1):
    disk = Disk(prepared=True)
    waits = fake_tfds(monkeypatch, disk, process=process)
    assert tfds_source._prepared_builder("mnist", None, download=True).is_prepared()
    assert waits == [True] and all(c[1] == "builder" for c in disk.calls)


_PROCESS = r"""
import os, sys, time
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import tensorflow_datasets as tfds
from ntk_scale.data import tfds_source

shared = sys.argv[3]
marker = os.path.join(shared, "prepared")

class Builder:  # prepared iff process 0's marker file is on the shared disk
  data_dir = shared
  def __init__(self):
    self._prepared = os.path.exists(marker)
  def is_prepared(self):
    return self._prepared
  def download_and_prepare(self):
    with open(os.path.join(shared, "downloads"), "a") as f:
      f.write(f"{jax.process_index()}\n")
    time.sleep(2)  # a slow download: the other process must still be waiting
    open(marker, "w").close()
    self._prepared = True

tfds.builder = lambda name, data_dir=None: Builder()
assert tfds_source._prepared_builder("mnist", shared, download=True).is_prepared()
print("opened", jax.process_index(), os.path.exists(marker), flush=True)
"""


def test_two_processes_prepare_once_on_a_shared_data_dir(tmp_path):
  """Two real processes (jax.distributed on 127.0.0.1) and a slow fake download into one directory:
  process 0 downloads once, process 1 opens the dataset only after it is there."""
  import socket
  import subprocess
  import sys

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, f"127.0.0.1:{port}", str(i), str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
  assert (tmp_path / "downloads").read_text() == "0\n"
  for i, out in enumerate(outputs):
    assert f"opened {i} True" in out


class _Unprepared:
  """A builder whose dataset is not on disk; records whether a download was tried."""
  data_dir = "/nowhere"

  def __init__(self):
    self.downloaded = False

  def is_prepared(self):
    return False

  def download_and_prepare(self):
    self.downloaded = True


def _without_proxies(monkeypatch) -> None:
  """No proxy in the environment, whatever the machine running the tests has set."""
  for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
    monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("reachable, proxy, refused", [
    ((), None, True),  # nothing reachable: refused at once, naming both hosts
    (("www.cs.toronto.edu",), None, False),  # GCS blocked, CIFAR's own host open: tfds downloads
    ((), ("HTTPS_PROXY", "http://proxy.example:3128"), False),  # behind a proxy a probe says nothing
    ((), ("HTTP_PROXY", "http://proxy.example:3128"), False),  # an http proxy alone, too
])
def test_the_network_probe_tries_the_datasets_own_host_and_trusts_a_proxy(monkeypatch, reachable,
                                                                          proxy, refused):
  probed = []
  monkeypatch.setattr(tfds_source, "_reachable",
                      lambda address: probed.append(address) or address[0] in reachable)
  monkeypatch.setattr(tfds_source, "_downloads_for_real", lambda builder: True)
  _without_proxies(monkeypatch)
  if proxy:
    monkeypatch.setenv(*proxy)
  builder = _Unprepared()
  if refused:
    with pytest.raises(DatasetUnavailableError,
                       match="neither storage.googleapis.com nor www.cs.toronto.edu can be reached"):
      tfds_source._prepare(builder, "cifar10", None, download=True)
  else:
    assert tfds_source._prepare(builder, "cifar10", None, download=True) is builder
  assert builder.downloaded == (not refused)
  assert probed == ([] if proxy else [("storage.googleapis.com", 443), ("www.cs.toronto.edu", 443)])


def test_a_dataset_served_from_cloud_storage_probes_it_once_and_without_download_nothing(monkeypatch):
  """MNIST's source is tfds' GCS mirror itself: one host, probed once. config.data.download=False
  refuses as such, without probing the network (a probe of an unreachable host waits seconds, and
  would give the wrong reason)."""
  probed = []
  monkeypatch.setattr(tfds_source, "_reachable", lambda address: probed.append(address) and False)
  monkeypatch.setattr(tfds_source, "_downloads_for_real", lambda builder: True)
  _without_proxies(monkeypatch)
  with pytest.raises(DatasetUnavailableError, match="config.data.download is False"):
    tfds_source._prepare(_Unprepared(), "cifar10", None, download=False)
  assert probed == []
  with pytest.raises(DatasetUnavailableError, match="neither storage.googleapis.com can be reached"):
    tfds_source._prepare(_Unprepared(), "mnist", None, download=True)
  assert probed == [("storage.googleapis.com", 443)]


def test_the_probe_tells_an_open_port_from_a_closed_one():
  """_reachable itself (the tests above replace it): a listening local socket is reachable, the same
  port once closed is not (refused at once, no timeout)."""
  import socket

  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    address = server.getsockname()
    assert tfds_source._reachable(address, timeout_s=2.0)
  assert not tfds_source._reachable(address, timeout_s=2.0)
