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

The lock is the file system's (flock; NFS v4 forwards it to the server; with `nolock` mounts it is
per host). In a gs:// bucket nothing can be locked: objects have no locks, and a lease would need
clocks the hosts share. There the lock file is a claim instead: each job that would take the lock
writes it anew with a token of its own (naming the job a claim it replaces, which was stopped or
still runs), and before each save (`check_claims`: a train or phase-2 checkpoint, a robust set's
step, a spectrum's round) a job whose claim was replaced stops with WorkdirTakenError, and from
then on appends no metrics (`claims_kept`). So of two copies of a job the later one goes on, from
the last save, and the earlier one stops before it writes again.
"""

import contextlib
import fcntl
import os
import socket
import time
import uuid
from typing import Any, Iterator

import jax

from ntk_scale import files, parallel

LOCK_FILE = ".writer.lock"

_HELD: dict[str, int] = {}  # lock file -> its open descriptor, held by this process
# claim in a bucket -> (this job's token, on process 0; what it names), on every process
_CLAIMED: dict[str, tuple[str, str]] = {}


def lock_path(workdir: str, phase2_name: str | None = None) -> str:
  """The lock of phase 1's experiment, or of the phase-2 experiment `phase2_name`: both in the
  workdir, so a phase-2 job refused before it starts leaves no phase2/ directory behind."""
  name = LOCK_FILE if phase2_name is None else f".writer.phase2.{phase2_name}.lock"
  return os.path.join(workdir, name)


class WorkdirBusyError(RuntimeError):
  """Another job is writing the experiment this one would write."""


class WorkdirTakenError(WorkdirBusyError):
  """In a bucket, another job claimed the experiment this one writes (see `check_claims`)."""


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
  try:
    os.ftruncate(descriptor, 0)
    os.write(descriptor, _holder(job).encode())
    os.fsync(descriptor)  # for a refused job on another host of a network file system
  except OSError:  # opened read-only: the lock holds, its holder goes unnamed
    pass
  return descriptor, ""


def _holder(job: str) -> str:
  return (f"job {job}, host {socket.gethostname()}, process id {os.getpid()}, since "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


def _read_claim(path: str) -> dict[str, Any] | None:
  """The claim object `path` ({"token", "holder"}), None where there is none."""
  try:
    claim = files.read_json(path)
  except FileNotFoundError:
    return None
  except ValueError:  # not JSON: someone else's file, or a claim cut short
    claim = None
  return claim if isinstance(claim, dict) else {"token": None, "holder": "an unreadable claim"}


def _claim(path: str, job: str, what: str) -> None:
  """Writes the claim `path` in a bucket for this job (process 0), noting a claim it replaces."""
  token = ""
  if jax.process_index() == 0:
    previous = _read_claim(path)
    token = uuid.uuid4().hex
    files.write_json(path, {"token": token, "holder": _holder(job)})
    if previous is not None:
      print(f"note: {path}: {what} was claimed by another job ({previous.get('holder')}), which did "
            f"not release it: it was stopped, or it still runs, and then it stops before its next "
            f"save (in a bucket nothing is locked, so this job takes the claim over).", flush=True)
  _CLAIMED[path] = (token, what)


def check_claims(before: str) -> None:
  """Raises WorkdirTakenError on every process when another job has replaced (or removed) a
  claim this job holds in a bucket; `before` says what this job was about to do ("saving step
  120"). Every process calls it, in the same order as the other collectives; without claims (a
  local workdir, or a job that writes no experiment) it does nothing."""
  if not _CLAIMED:
    return
  taken = _lost_claim() if jax.process_index() == 0 else ""
  if not parallel.agree(not taken):
    raise WorkdirTakenError(
        f"{taken or 'this job lost a claim in its bucket (see process 0)'} while this job ran; it "
        f"stops before {before}, so that two jobs do not write one experiment. The other goes on "
        f"from the last save; rerunning this command after it ends resumes there.")


def claims_kept() -> bool:
  """Whether no claim of this job has been taken over, as far as this process knows (process 0
  reads them; the others know nothing and say True): for writes of process 0 alone, such as the
  metrics it appends, which a job that lost its claim leaves to the job that took it."""
  return not (_CLAIMED and jax.process_index() == 0 and _lost_claim())


def _lost_claim() -> str:
  """What became of a claim of this job that another job replaced or someone removed; "" when
  none did. Process 0."""
  for path, (token, what) in _CLAIMED.items():
    claim = _read_claim(path)
    if claim is None or claim.get("token") != token:
      by = "removed" if claim is None else f"replaced by another job's ({claim.get('holder')})"
      return f"{what}: this job's claim {path} was {by}"
  return ""


def _release(path: str) -> None:
  """Ends this process's hold of `path`: closes a lock, or removes a claim still this job's."""
  if path in _HELD:
    os.close(_HELD.pop(path))  # closing the file releases its flock
    return
  token, _ = _CLAIMED.pop(path)
  if token:  # process 0
    with contextlib.suppress(OSError):  # a claim left behind is noted and replaced by the next job
      if (_read_claim(path) or {}).get("token") == token:
        files.remove(path)


def hold(path: str, job: str, what: str,
         mixing: str = "two would mix their records and checkpoints",
         elsewhere: str = "use another --workdir") -> None:
  """Takes the writer lock `path` (`lock_path`; its directory made if absent) for `job` until
  `release_all`, or raises WorkdirBusyError on every process when another job holds it; `what`
  names the experiment, `mixing` what two writers would do, `elsewhere` the other way out. Every
  process calls it; process 0 takes the lock. A lock this process holds already is held (a job
  inside a job). In a bucket the lock is a claim: taken over, never refused (see above)."""
  if files.is_cloud(path):
    if path not in _CLAIMED:
      _claim(path, job, what)
    return
  taken, holder = True, ""
  if jax.process_index() == 0 and path not in _HELD:
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
  held_before = path in _HELD or path in _CLAIMED
  hold(path, job, what, mixing, elsewhere)
  try:
    yield
  finally:
    if not held_before and (path in _HELD or path in _CLAIMED):
      _release(path)


def release_all() -> None:
  """Releases every writer lock and claim this process holds (a job's end)."""
  for path in [*_HELD, *_CLAIMED]:
    _release(path)
