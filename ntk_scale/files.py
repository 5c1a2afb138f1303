"""Workdir files on a local disk or in cloud storage (`gs://bucket/...`, as TPU VMs and multi-host
jobs need: every host sees the same bucket). Every file the project reads or writes back goes
through here, on etils.epath (TensorFlow's GFile for cloud URIs, as Orbax and tfds use it).

Writes are whole or nothing. Locally: into a temporary beside the target, then renamed over it
(`os.replace` is atomic within a file system); a killed job leaves the old file or the new one,
plus at most a stray temporary whose name holds ".tmp" so that readers listing a directory skip
it (removed by the next write into that directory on the same host, once its writer is gone). In
cloud storage an object appears only when its upload completes, so writes go straight to the
target (a rename there is a copy and a delete).
"""

import csv
import io
import json
import os
import re
import secrets
import socket
import time
from typing import IO, Any, Callable, Iterator

import numpy as np
from etils import epath

PathLike = str | os.PathLike


def is_cloud(path: PathLike) -> bool:
  """Whether `path` is a cloud URI (gs://, s3://, ...) rather than a local path."""
  return "://" in os.fspath(path)


def exists(path: PathLike) -> bool:
  return epath.Path(path).exists()


def is_dir(path: PathLike) -> bool:
  return epath.Path(path).is_dir()


def make_dirs(path: PathLike) -> None:
  """`path` and its parents (in cloud storage, at most a marker object: objects need no parents)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def list_dir(path: PathLike) -> list[str]:
  """The names in directory `path`, temporaries (".tmp") left out; [] if it does not exist."""
  directory = epath.Path(path)
  if not directory.is_dir():
    return []
  return sorted(p.name for p in directory.iterdir() if ".tmp" not in p.name)


def walk(top: PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
  """os.walk, top-down, for local and cloud directories alike (epath's walk drops a cloud root's
  scheme): (directory, subdirectory names, file names); prune by editing the names in place."""
  directory = os.fspath(top)
  names = list_dir(directory)
  subdirectories = [n for n in names if is_dir(os.path.join(directory, n))]
  yield directory, subdirectories, [n for n in names if n not in subdirectories]
  for name in subdirectories:
    yield from walk(os.path.join(directory, name))


def glob(directory: PathLike, pattern: str) -> list[str]:
  """Paths in `directory` matching `pattern` (e.g. "*/*.xplane.pb"), sorted."""
  return sorted(os.fspath(p) for p in epath.Path(directory).glob(pattern))


def size(path: PathLike) -> int:
  return epath.Path(path).stat().length


def remove(path: PathLike) -> None:
  epath.Path(path).unlink()


def remove_tree(path: PathLike) -> None:
  """`path` and everything under it, if it exists."""
  if exists(path):
    epath.Path(path).rmtree()


def remove_if_empty(directory: PathLike) -> None:
  """`directory` if it holds nothing (what another job wrote there keeps it)."""
  try:
    epath.Path(directory).rmdir()
  except (OSError, ValueError):  # not empty, or gone
    pass


def read_bytes(path: PathLike) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path: PathLike) -> str:
  return epath.Path(path).read_text()


class UnreadableRecordError(ValueError):
  """A JSON record or .npy array in the workdir that does not parse."""


def read_json(path: PathLike) -> Any:
  """A JSON record; one that does not parse is refused naming its file: records are written whole
  or not at all, so it was changed by hand or its disk failed."""
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise UnreadableRecordError(f"{path} is not a readable JSON record ({e}); {_REWRITE}") from e


# What an unreadable file of the workdir (written whole or not at all, by write_atomic) means.
_REWRITE = ("records are written whole or not at all, so it was changed by hand or its disk failed. "
            "Restore it, or delete it (and what it describes) for the job that writes it to make it "
            "again.")


def read_result(path: PathLike, settings: dict[str, Any]) -> dict[str, Any] | None:
  """A job's saved JSON result if it was computed with `settings` (its "settings" entry), else None,
  saying why when one exists: a rerun with other settings (another attack, say) recomputes instead
  of returning the old numbers as if they were the new ones."""
  if not exists(path):
    return None
  saved = read_json(path)
  wanted = json.loads(json.dumps(settings))  # tuples as lists, as the file has them
  if saved.get("settings") == wanted:
    return saved
  changed = changed_settings(saved.get("settings") or {}, wanted)
  print(f"{path} was computed with other settings ({', '.join(changed)}); recomputing it", flush=True)
  return None


def changed_settings(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
  """The names of the settings a record was made with that differ from `wanted` (absent in either
  included), for the line that says why a result is made again."""
  return sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))


def load_array(path: PathLike, memory_map: bool = False) -> np.ndarray:
  """An .npy array; pickled objects are refused (a file from elsewhere must not run code).
  `memory_map`: read lazily where the file is local (a cloud object is read whole)."""
  try:
    if memory_map and not is_cloud(path):
      return np.load(path, mmap_mode="r", allow_pickle=False)
    return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)
  except (ValueError, EOFError) as e:  # cut short: "EOF: reading array data", naming no file
    raise UnreadableRecordError(f"{path} is not a readable .npy array ({e}); {_REWRITE}") from e


def is_whole_array(path: PathLike) -> bool:
  """Whether `path` is an .npy file as long as its header says, read from its header alone: an
  array cut short after it was written (a disk fault, a partial copy) is not, though it exists."""
  try:
    with epath.Path(path).open("rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read_header(f)
      data_offset = f.tell()
  except (OSError, ValueError, EOFError):
    return False
  return size(path) == data_offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _pid_namespace() -> str:
  """This process's PID namespace: containers of one host name sharing a directory (Kubernetes pods
  on the host's network) each count process ids from 1."""
  try:
    return str(os.stat("/proc/self/ns/pid").st_ino)
  except OSError:  # no procfs (macOS)
    return "0"


_PID_NAMESPACE = _pid_namespace()
_TOKEN = secrets.token_hex(4)  # hosts of one name whose namespaces have one inode (the initial one)


def _writer() -> str:
  """The host and PID namespace whose process ids a temporary's id is one of."""
  return f"{socket.gethostname()}@{_PID_NAMESPACE}"


def temporary_name(path: PathLike) -> str:
  """A temporary beside `path`, one per process (`<path>.tmp<host>@<pid namespace>-<pid>-<token>`):
  hosts sharing a directory (NFS) may run processes of one id, as containers do, and a random
  token tells apart processes whose host name and namespace agree."""
  return f"{os.fspath(path)}.tmp{_writer()}-{os.getpid()}-{_TOKEN}"


_SWEPT: set[str] = set()  # directories this process has rid of dead writers' temporaries
# <name>.tmp<host>@<namespace>-<pid>-<token>, or <name>.tmp<host>-<pid> as named before 2026-12-02
_TEMPORARY = re.compile(r"\.tmp(?P<writer>.+)-(?P<pid>\d+)(?:-[0-9a-f]{8})?$")
STALE_TEMPORARY_S = 3600.0  # no write takes this long: its writer is gone, whoever it was


def _remove_dead_temporaries(directory: str) -> None:
  """Removes the temporaries in `directory` that dead writers left (a SIGKILL mid-write leaves
  one), once per directory and process: a listing per write would cost a kernel's tiles quadratic
  time. Dead: of a process of this host and PID namespace that is gone, or an hour old (another
  host's, or a restarted container's: whether their writer lives is unknown here, but no write
  lasts that long)."""
  if directory in _SWEPT:
    return
  _SWEPT.add(directory)
  here, old_style = _writer(), socket.gethostname()
  stale_before = time.time() - STALE_TEMPORARY_S
  for entry in os.scandir(directory):
    found = _TEMPORARY.search(entry.name)
    if found is None or not entry.is_file(follow_symlinks=False):
      continue
    pid = int(found["pid"])
    mine = found["writer"] in (here, old_style) and pid != os.getpid() and not _alive(pid)
    try:
      if mine or entry.stat(follow_symlinks=False).st_mtime < stale_before:
        os.remove(entry.path)
    except FileNotFoundError:  # another process swept it first
      pass


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def write_atomic(path: PathLike, write: Callable[[IO[bytes]], Any]) -> None:
  """`write(f)` into a binary file that appears at `path` whole or not at all, after a killed
  process and after a power loss: the bytes reach the disk before the name does (without the
  fsync, a file system may keep the rename and lose the data, leaving an empty config.json or
  tile record behind). An empty file, such as a tile's marker, has no data to lose."""
  if is_cloud(path):
    buffer = io.BytesIO()  # a failed `write` uploads nothing
    write(buffer)
    epath.Path(path).write_bytes(buffer.getvalue())
    return
  tmp = temporary_name(path)
  _remove_dead_temporaries(os.path.dirname(os.path.abspath(tmp)))
  try:
    with open(tmp, "wb") as f:
      write(f)
      if f.tell():
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as error:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(error, OSError) and error.errno is not None and error.filename is None:
      # A full disk fails in write or fsync, whose OSError names no file.
      raise OSError(error.errno, error.strerror, os.fspath(path)) from error
    raise


def write_text(path: PathLike, text: str) -> None:
  write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: PathLike, value: Any, **dump_options: Any) -> None:
  """`value` as JSON (json.dumps' `dump_options`, e.g. indent=2, sort_keys=True)."""
  write_text(path, json.dumps(value, **dump_options))


def write_csv(path: PathLike, rows: list[dict[str, Any]]) -> None:
  """`rows` (dicts with the first row's keys) as a CSV table with a header; None as empty cells."""
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
  write_text(path, table.getvalue())


def save_array(path: PathLike, array: np.ndarray) -> None:
  """`array` as .npy (no pickled objects)."""
  write_atomic(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def append_text(path: PathLike, text: str) -> None:
  """Adds `text` at the end of `path` (created if absent). Cloud objects cannot grow: there the
  whole object is rewritten, fine for the small logs this is used for (metrics.jsonl)."""
  if is_cloud(path):
    write_text(path, (read_text(path) if exists(path) else "") + text)
    return
  with open(path, "a") as f:
    f.write(text)


def copy_file(source: PathLike, target: PathLike) -> None:
  write_atomic(target, lambda out: out.write(read_bytes(source)))


def save_figure(fig, path: PathLike, dpi: int) -> str:
  """A matplotlib figure laid out tightly, saved in the format of `path`'s extension and closed."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel  (plots only)

  fig.tight_layout()
  path = os.fspath(path)
  write_atomic(path, lambda f: fig.savefig(f, format=os.path.splitext(path)[1][1:], dpi=dpi))
  plt.close(fig)
  return path


def tensorstore_kvstore(path: PathLike) -> dict:
  """Tensorstore's key-value store for directory `path`: the local file system or a bucket."""
  path = os.fspath(path)
  if path.startswith("gs://"):
    bucket, _, key = path[len("gs://"):].partition("/")
    return {"driver": "gcs", "bucket": bucket, "path": key.rstrip("/") + "/"}
  if is_cloud(path):
    raise ValueError(f"{path}: kernels are stored on a local disk or in gs:// buckets only.")
  return {"driver": "file", "path": path}
