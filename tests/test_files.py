"""Files are written whole or not at all: a failed write leaves the previous file and no temporary."""

import json
import os
import socket

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ntk_scale import files  # noqa: E402
from ntk_scale.files import save_figure, temporary_name, write_atomic, write_json  # noqa: E402


class _Interrupted(Exception):
  pass


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
  path = str(tmp_path / "record.json")
  write_json(path, {"step": 1}, indent=2)

  def dies_half_way(f):
    f.write(b'{"step": ')
    raise _Interrupted()

  with pytest.raises(_Interrupted):
    write_atomic(path, dies_half_way)
  with open(path) as f:
    assert json.load(f) == {"step": 1}
  assert os.listdir(tmp_path) == ["record.json"]


def test_the_data_reaches_the_disk_before_the_name(tmp_path, monkeypatch):
  """A power loss after the rename must not leave the new name on lost data: the temporary is
  fsynced, whole, before it is renamed. An empty marker has nothing to sync."""
  events = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    events.append(("fsync", os.fstat(fd).st_size))
    real_fsync(fd)

  def replace(source, destination):
    events.append(("replace", os.path.basename(destination)))
    real_replace(source, destination)

  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(os, "replace", replace)
  write_json(str(tmp_path / "config.json"), {"seed": 0})
  write_atomic(str(tmp_path / "tile_0_1.done"), lambda f: None)
  assert events == [("fsync", len('{"seed": 0}')), ("replace", "config.json"),
                    ("replace", "tile_0_1.done")]


def test_temporaries_of_two_hosts_with_one_process_id_differ(monkeypatch):
  """Hosts sharing a directory (NFS) may run writers of one process id (containers): a temporary
  name of the id alone would let one host's write land in the other's file; so may two processes
  whose host name and PID namespace agree (two pid-1 containers of one name): the token differs."""
  names = set()
  for host in ("host-a", "host-b"):
    monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
    names.add(temporary_name("/shared/record.json"))
  monkeypatch.setattr(files, "_TOKEN", "another")
  names.add(temporary_name("/shared/record.json"))
  assert len(names) == 3 and all(".tmp" in name for name in names)  # list_dir skips ".tmp"


def test_a_killed_writers_temporary_goes_with_the_next_write_there(tmp_path):
  """A SIGKILL mid-write leaves `<name>.tmp<host>@<namespace>-<pid>-<token>`, which nothing removed
  (the kill audit found one after a killed eigen_images job). The next write into that directory
  removes those of this host's processes that are gone (named the old way, `.tmp<host>-<pid>`,
  too) and any an hour old; a live writer's, and a recent one of another host or PID namespace
  stay (a writer there with that process id once had its temporary removed: its write was lost)."""
  import subprocess
  import sys
  import time

  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                        text=True, check=True).stdout.strip()
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  here = files._writer()  # pylint: disable=protected-access
  host = socket.gethostname()
  names = {"dead": f"a.png.tmp{here}-{gone}-0a1b2c3d", "live": f"b.json.tmp{here}-{live.pid}-2c3d4e5f",
           "elsewhere": f"c.json.tmpanother-host@{files._PID_NAMESPACE}-{gone}-4e5f6a7b",
           "another_namespace": f"e.json.tmp{host}@1-{gone}-6a7b8c9d",
           "old_style": f"f.npy.tmp{host}-{gone}",
           "stale": f"g.npy.tmpanother-host@1-{gone}-8c9d0e1f"}
  try:
    for name in names.values():
      (tmp_path / name).write_bytes(b"")
    two_hours_ago = time.time() - 7200
    os.utime(tmp_path / names["stale"], (two_hours_ago, two_hours_ago))
    write_json(str(tmp_path / "d.json"), {"x": 1})
    assert sorted(os.listdir(tmp_path)) == sorted(["d.json", names["live"], names["elsewhere"],
                                                   names["another_namespace"]])
  finally:
    live.kill()
    live.wait()


def test_figures_take_the_format_of_their_extension(tmp_path):
  for name, magic in (("plot.png", b"\x89PNG"), ("plot.pdf", b"%PDF")):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, str(tmp_path / name), dpi=50)
    with open(path, "rb") as f:
      assert f.read(4) == magic
    assert not plt.fignum_exists(fig.number)
  assert sorted(os.listdir(tmp_path)) == ["plot.pdf", "plot.png"]


def test_a_full_disk_and_a_cut_short_array_name_their_file(tmp_path):
  """ENOSPC from write or fsync names no file, and numpy's "EOF: reading array data" neither: a job
  on a full disk, or over an array cut short, ended with no path to look at."""
  import errno
  path = str(tmp_path / "images.npy")

  def full_disk(f):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  with pytest.raises(OSError, match=rf"No space left on device: '{path}'") as raised:
    write_atomic(path, full_disk)
  assert raised.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []
  files.save_array(path, np.arange(1000.0))
  with open(path, "r+b") as f:
    f.truncate(500)
  for memory_map in (False, True):
    with pytest.raises(files.UnreadableRecordError, match=rf"{path} is not a readable .npy array "
                                                          rf"\(.*\); records are written whole"):
      files.load_array(path, memory_map=memory_map)


def test_an_array_is_whole_when_its_length_is_its_headers(tmp_path):
  path = str(tmp_path / "images.npy")
  for array in (np.zeros((3, 8, 8, 1), np.float32), np.arange(7, dtype=np.int32), np.float64(2.0)):
    files.save_array(path, array)
    assert files.is_whole_array(path)
  files.save_array(path, np.zeros((3, 8, 8, 1), np.float32))
  whole = os.path.getsize(path)
  for length in (whole - 4, 100, 5, 0):  # cut in the data, in the header, in the magic
    with open(path, "r+b") as f:
      f.truncate(length)
    assert not files.is_whole_array(path), length
  with open(path, "wb") as f:
    f.write(b"not an array" * 100)
  assert not files.is_whole_array(path)
  assert not files.is_whole_array(str(tmp_path / "absent.npy"))


def test_listings_skip_temporaries_pickles_are_refused_and_removing_nothing_is_no_error(tmp_path):
  (tmp_path / "a.json").write_text("{}")
  (tmp_path / f"b.json.tmp{socket.gethostname()}-1").write_text("{")
  assert files.list_dir(str(tmp_path)) == ["a.json"]
  np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  with pytest.raises(files.UnreadableRecordError, match="objects.npy is not a readable .npy array"):
    files.load_array(str(tmp_path / "objects.npy"))
  files.remove_tree(str(tmp_path / "absent"))


def test_a_result_is_reused_when_its_settings_equal_the_wanted_ones_as_json(tmp_path, capsys):
  """Settings hold tuples (epochs, attacks), which the saved file has as lists: the same settings
  reuse the result; other ones recompute, naming what changed."""
  path = str(tmp_path / "result.json")
  settings = {"epochs": (0.5, 1.0), "attack": {"eps": 0.1, "steps": 2}, "top_k": 4}
  write_json(path, {"settings": settings, "accuracy": 0.75})
  assert files.read_result(path, settings) == {
      "settings": {"epochs": [0.5, 1.0], "attack": {"eps": 0.1, "steps": 2}, "top_k": 4}, "accuracy": 0.75}
  assert capsys.readouterr().out == ""
  assert files.read_result(path, {**settings, "epochs": (0.5, 2.0)}) is None
  assert "computed with other settings (epochs); recomputing it" in capsys.readouterr().out
