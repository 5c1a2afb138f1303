"""Device mesh and batch placement: the one place that knows how arrays map onto devices.

All jobs use a 1-D mesh with axis `data` over every device of every host. Parameters are
replicated, batches are split along their first axis. Each host materialises only the rows
of a global batch that its own devices hold, so a batch never passes through one host.
"""

import contextlib
import contextvars
import json
import os
import sys
import threading
from typing import Any, Callable, Iterator, Mapping, NoReturn

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """A mesh with one `data` axis over all devices of all processes.

  The axis is `Auto`: shardings of intermediates are left to the compiler (GSPMD), so model and
  attack code need no sharding annotations.
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) axis over the `data` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, num_devices: int, field: str) -> None:
  """Raises ValueError naming `field` unless `batch_size` splits evenly over `num_devices`."""
  if batch_size <= 0 or batch_size % num_devices:
    raise ValueError(f"{field}={batch_size} must be a positive multiple of the device count "
                     f"({num_devices} devices).")


PLATFORMS = ("cpu", "gpu", "tpu")
_PLANNED_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("planned", default=None)


@contextlib.contextmanager
def planned_for(platform: str | None) -> Iterator[None]:
  """The platform checks inside (float64 on TPUs) are those of `platform`, not of this machine:
  a dry run from a laptop of a TPU job refuses what the job would refuse there (None: these)."""
  if platform is not None and platform not in PLATFORMS:
    raise ValueError(f"platform {platform!r}; expected one of {', '.join(PLATFORMS)}.")
  token = _PLANNED_PLATFORM.set(platform)
  try:
    yield
  finally:
    _PLANNED_PLATFORM.reset(token)


def devices_compute(dtype: str) -> bool:
  """Whether the devices compute in `dtype`: float64 not on TPUs, which have no float64 arithmetic
  (XLA:TPU rejects many float64 operations and emulates the others in float32 pieces)."""
  return dtype != "float64" or (_PLANNED_PLATFORM.get() or jax.default_backend()) != "tpu"


def float64_device() -> jax.Device:
  """Where a small float64 computation (a dense solve, say) runs: this process's first device, or
  its CPU where the devices have no float64 arithmetic."""
  return jax.local_devices()[0] if devices_compute("float64") else jax.local_devices(backend="cpu")[0]


def check_float64_devices(dtype: str, field: str, instead: str) -> None:
  """Refuses float64 work on devices without float64 arithmetic, before any compute. `instead`:
  what the user can set in its place."""
  if not devices_compute(dtype):
    raise ValueError(f"{field}='float64' cannot run on TPUs, which have no float64 arithmetic; "
                     f"{instead}, or run this job on CPUs or GPUs.")


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree of host arrays (identical on every host) on all devices. In one process a
  jax array is moved device to device (not through the host); one already placed so is taken as it
  is, without a call into device_put (16 us a leaf: a quarter of a small kernel's host time)."""
  sharding = replicated_sharding(mesh)
  leaves, treedef = jax.tree.flatten(tree)
  placed = [isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim) for x in leaves]
  on_devices = [not p and isinstance(x, jax.Array) and jax.process_count() == 1
                for x, p in zip(leaves, placed)]
  moved = iter(jax.device_put([x for x, d in zip(leaves, on_devices) if d], sharding))

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.unflatten(treedef, [x if p else next(moved) if d else put(x)
                                      for x, p, d in zip(leaves, placed, on_devices)])


def global_batch(mesh: Mesh, arrays: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, jax.Array]:
  """The global batch `{k: arrays[k][rows]}` sharded over `mesh`, built from this host's rows only.

  `arrays` live in host memory on every process; `rows` is the global list of row indices
  (identical on every process). Each process reads the rows its addressable devices hold.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for key, array in arrays.items():
    shape = (len(rows),) + array.shape[1:]
    index_map = sharding.addressable_devices_indices_map(shape)
    shards = [jax.device_put(array[rows[index[0]]], device) for device, index in index_map.items()]
    out[key] = jax.make_array_from_single_device_arrays(shape, sharding, shards)
  return out


def local_copy(array: jax.Array) -> np.ndarray:
  """A replicated array as numpy from this process's own copy: no transfer between hosts."""
  return np.asarray(array.addressable_data(0))


def gather_from_processes(array: np.ndarray) -> np.ndarray:
  """Every process's `array` (one shape and dtype on all), stacked [processes, ...], bit for bit:
  64-bit numbers travel as pairs of 32-bit words, as every device holds those (TPUs have no
  float64) and no jax_enable_x64 is needed."""
  array = np.asarray(array)
  if jax.process_count() == 1:
    return array[None]
  if array.dtype.itemsize != 8:
    return np.asarray(multihost_utils.process_allgather(array))
  words = np.ascontiguousarray(array.reshape(-1)).view(np.uint32)
  gathered = np.asarray(multihost_utils.process_allgather(words))
  return np.ascontiguousarray(gathered).view(array.dtype).reshape((-1,) + array.shape)


def sum_over_processes(array: np.ndarray) -> np.ndarray:
  """The elementwise sum of every process's `array` (each holding its own part, zeros elsewhere),
  on every process, in the array's dtype (float64 stays float64)."""
  if jax.process_count() == 1:
    return array
  return gather_from_processes(np.asarray(array)).sum(0)


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
  """Process 0's `flag`, on every process: each waits here until process 0 arrives, so this is a
  barrier that carries one bit (say, whether what process 0 alone did worked). `flag` itself on
  one process. Every process must call it, in the same order as the other collectives."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def from_process_0(read: Callable[[], Any]) -> Any:
  """`read()` of process 0, a JSON value, on every process (the others do not call it): what
  process 0 reads of a shared file that another job may be changing, so that every process
  decides from the same contents. Where `read` raises, process 0 raises that error and the others
  a RuntimeError that names it, instead of waiting for a value. Every process must call it, in
  the same order as the other collectives."""
  if jax.process_count() == 1:
    return read()
  failure, text = None, b""
  if jax.process_index() == 0:
    try:
      sent = {"value": read()}
    except Exception as error:  # pylint: disable=broad-except  # raised below, after sending it
      failure, sent = error, {"error": f"{type(error).__name__}: {error}"}
    text = json.dumps(sent).encode()
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(text))))
  data = np.frombuffer(text, np.uint8) if jax.process_index() == 0 else np.zeros(size, np.uint8)
  received = json.loads(np.asarray(multihost_utils.broadcast_one_to_all(data)).tobytes())
  if failure is not None:
    raise failure
  if "error" in received:
    raise RuntimeError(f"process 0 could not read what every process needs: {received['error']}")
  return received["value"]


def exit_together(code: int, wait_s: float | None = None) -> NoReturn:
  """Ends this process with `code`, leaving the job together with the other processes that call
  this too; one process simply exits.

  Process 0 hosts JAX's coordination service: exiting while a peer is still connected makes that
  peer abort (SIGABRT, a C++ stack dump after its own message) instead of exiting with its code.
  JAX's shutdown waits for every process at a barrier, disconnects each and then stops the
  service. Without `wait_s` this waits for all (every process reached the same point, as on a
  preemption); with it, at most that long, then exits alone: after an error the others may be
  blocked in a collective and never come, and they stop when this one is gone. The interpreter's
  own exit is skipped (its atexit hooks would wait on the job again)."""
  if jax.process_count() == 1:
    sys.exit(code)
  left = threading.Event()

  def leave() -> None:
    try:
      jax.distributed.shutdown()
    except Exception as e:  # a peer already gone: exit all the same, with this process's code
      print(f"process {jax.process_index()}: leaving the job: {e}", file=sys.stderr)
    left.set()

  threading.Thread(target=leave, daemon=True).start()
  left.wait(wait_s)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False,
                           heartbeat_timeout_s: int = 60) -> None:
  """Joins this process to a multi-process job before any device is used; nothing for one process.

  `auto`: JAX's own cluster detection (TPU pods, SLURM, Open MPI, Kubernetes) finds the
  coordinator, the process count and this process's id. Otherwise all three are given (the
  address is host:port of process 0). A process that stops sending heartbeats for
  `heartbeat_timeout_s` is declared dead and the coordination service then terminates every other
  process with an error naming the failure, so a lost host never leaves the job hanging; rerun the
  job and it resumes from its last checkpoint.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if not auto and all(v is None for v in explicit):
    return
  if not auto and any(v is None for v in explicit):
    raise ValueError("multi-process start-up needs --coordinator_address, --num_processes and "
                     "--process_id together (or --distributed to detect them on a TPU pod or SLURM); "
                     f"got {coordinator_address=}, {num_processes=}, {process_id=}.")
  if not auto and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes}).")
  if heartbeat_timeout_s <= 0:
    raise ValueError(f"--heartbeat_timeout_s={heartbeat_timeout_s} must be positive.")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)
  except ValueError as e:
    if not auto:
      raise
    raise ValueError(f"--distributed: JAX's cluster detection found no TPU pod, SLURM, Open MPI or "
                     f"Kubernetes job here ({e}); elsewhere give --coordinator_address, "
                     "--num_processes and --process_id.") from e
