"""One job at a time writes an experiment: a second copy of a train job (a retried launch, a scheduler
that starts two) is refused, not run alongside the first.

Two train jobs on one workdir shared Orbax's temporary directory of a step, so one deleted the
other's half-written checkpoint (a step without its metadata: every later job failed), and both
appended to metrics.jsonl and TensorBoard's files; two experiments started together could both pass
the config record's check, and one trained under the other's config.json. The jobs that write an
experiment take an exclusive lock, `<workdir>/.writer.lock` for phase 1 and
`<workdir>/.writer.phase2.<name>.lock` for a phase-2 experiment (workdir.prepare_workdir, before the
config record is checked), until the job ends (jobs.run), process 0 for every process: the train,
phase2 and infinite jobs. The operating system releases it when its holder exits,
a kill included: a killed job's lock never blocks its rerun. Jobs that read an experiment
(evaluate, kernel, spectrum, eigen_features, ...) take none, so they may run while it trains.

A result that reader jobs make in place, the spectrum of a stored kernel (kernels/<name>/spectrum/,
made by the spectrum, evolution and eigen_* jobs), is locked while a job reads or makes it
(`holding`, `<kernel>/.writer.spectrum.lock`): two solves of other settings wrote one's arrays beside
the other's record.

Readers that update a record they share take a short lock of that record instead (`updating`):
two evaluations of one checkpoint (the train job's last and an evaluate job, or two evaluate jobs)
read, merge and write one record, and the later writer dropped the other's results.

The lock is the file system's (flock; NFS v4 forwards it to the server; with `nolock` mounts it is
per host). In a gs:// bucket nothing is locked: objects have no locks, and a lease would need clocks
the hosts share; a launcher must not start a job twice there.
"""

import contextlib
import fcntl
import os
import socket
import time
from typing import Iterator

import jax

from ntk_scale import files, parallel

LOCK_FILE = ".writer.lock"

_HELD: dict[str, int] = {}  # lock file -> its open descriptor, held by this process


def lock_path(workdir: str, phase2_name: str | None = None) -> str:
  """The lock of phase 1's experiment, or of the phase-2 experiment `phase2_name`: both in the
  workdir, so a phase-2 job refused before it starts leaves no phase2/ directory behind."""
  name = LOCK_FILE if phase2_name is None else f".writer.phase2.{phase2_name}.lock"
  return os.path.join(workdir, name)


class WorkdirBusyError(RuntimeError):
  """Another job is writing the experiment this one would write."""


def _open(path: str) -> int:
  """The lock file `path`, made if absent: read-write for its holder's line; as the workdir's other
  files, umask decides its mode; read-only where it is another user's (flock needs no write)."""
  files.make_dirs(os.path.dirname(path))
  try:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  except PermissionError as error:
    if not os.path.exists(path):
      raise PermissionError(error.errno, f"{os.path.dirname(path) or '.'} is not writable by this "
                            f"user, so no job can write there (its lock {os.path.basename(path)} "
                            f"cannot be made); use a --workdir it can write", path) from error
    return os.open(path, os.O_RDONLY)


@contextlib.contextmanager
def updating(record: str) -> Iterator[None]:
  """While the block runs, no other process updates the JSON `record` the same way: for a
  read-merge-write of a record two jobs share (the evaluation of one checkpoint by the train job
  and an evaluate job, or two evaluate jobs), whose later writer would otherwise drop the other's
  results. Waits for the other; in a bucket, or on a file system without locks, it locks nothing."""
  if files.is_cloud(record):
    yield
    return
  descriptor = _open(os.path.join(os.path.dirname(record), f".{os.path.basename(record)}.lock"))
  try:
    with contextlib.suppress(OSError):  # no locks on this file system: as in a bucket
      fcntl.flock(descriptor, fcntl.LOCK_EX)
    yield
  finally:
    os.close(descriptor)  # closing releases the flock


def _take(path: str, job: str) -> tuple[int | None, str]:
  """(the open lock file, "") when taken, or (None, what the file says of its holder). A file
  system that does not lock files (Lustre without flock, NFS v3 without lockd) locks nothing: the
  job goes on, with a warning."""
  descriptor = _open(path)
  try:
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.read(descriptor, 1024).decode("utf-8", errors="replace").strip()
    os.close(descriptor)
    return None, holder
  except OSError as error:
    print(f"warning: {path}: this file system does not lock files ({error}); a second copy of "
          f"this job would not be kept out", flush=True)
    return descriptor, ""
  line = (f"job {job}, host {socket.gethostname()}, process id {os.getpid()}, since "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}").encode()
  try:
    os.ftruncate(descriptor, 0)
    os.write(descriptor, line)
    os.fsync(descriptor)  # for a refused job on another host of a network file system
  except OSError:  # opened read-only: the lock holds, its holder goes unnamed
    pass
  return descriptor, ""


def hold(path: str, job: str, what: str,
         mixing: str = "two would mix their records and checkpoints",
         elsewhere: str = "use another --workdir") -> None:
  """Takes the writer lock `path` (`lock_path`; its directory made if absent) for `job` until
  `release_all`, or raises WorkdirBusyError on every process when another job holds it; `what`
  names the experiment, `mixing` what two writers would do, `elsewhere` the other way out. Every
  process calls it; process 0 takes the lock. A lock this process holds already is held (a job
  inside a job)."""
  taken, holder = True, ""
  if jax.process_index() == 0 and not files.is_cloud(path) and path not in _HELD:
    descriptor, holder = _take(path, job)
    taken = descriptor is not None
    if taken:
      _HELD[path] = descriptor
  if not parallel.agree(taken):
    raise WorkdirBusyError(
        f"{what} is being written by another job ({holder or 'see process 0'}; {path}); {mixing}. "
        f"Let it finish or stop it (a stopped job releases its lock; rerunning then resumes), or "
        f"{elsewhere}.")


@contextlib.contextmanager
def holding(path: str, job: str, what: str, mixing: str, elsewhere: str) -> Iterator[None]:
  """`hold` for the block only, for a result a reader job makes in place (a kernel's spectrum),
  released as the block ends unless this process held it already (an enclosing block's)."""
  held_before = path in _HELD
  hold(path, job, what, mixing, elsewhere)
  try:
    yield
  finally:
    if not held_before and path in _HELD:
      os.close(_HELD.pop(path))


def release_all() -> None:
  """Releases every writer lock this process holds (a job's end)."""
  while _HELD:
    os.close(_HELD.popitem()[1])  # closing the file releases its flock
