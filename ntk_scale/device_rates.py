"""What this machine's devices do per second, measured on the spot: matmul FLOP/s and the
bytes per second a device sends to its neighbour on the ring of devices. The dry run bounds a job's
time with the first; the kernel planner weighs rows sent round the ring against rows recomputed
with the second (engine.fit_plan). Every process gets process 0's measurement.
"""

import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ntk_scale import parallel


def timed(step: Callable[[Any], Any], state: Any, seconds: float, collective: bool = False
          ) -> tuple[int, float]:
  """(calls, elapsed seconds) of `state = step(state)` repeated for about `seconds` (at least 3
  calls), after one warm-up; each call waited for (several collectives in flight deadlock XLA:CPU's
  emulated devices).

  `collective`: a step that every process runs together (a ppermute across hosts). Then every
  process makes process 0's number of calls, sized from one timed call: a process that stopped on
  its own clock while another started one more call would leave both waiting for ever.
  """
  jax.block_until_ready(state := step(state))
  if collective:
    started = time.perf_counter()
    jax.block_until_ready(state := step(state))
    first = time.perf_counter() - started
    calls = int(agreed(max(3, math.ceil(seconds / max(first, 1e-6)))))
    started = time.perf_counter()
    for _ in range(calls - 1):
      jax.block_until_ready(state := step(state))
    return calls, first + time.perf_counter() - started
  calls, started = 0, time.perf_counter()
  while time.perf_counter() - started < seconds or calls < 3:
    jax.block_until_ready(state := step(state))
    calls += 1
  return calls, time.perf_counter() - started


def agreed(value: float) -> float:
  """Process 0's measurement on every process: plans made from it must be the same everywhere."""
  if jax.process_count() == 1:
    return value
  return float(parallel.gather_from_processes(np.float64(value))[0])


@functools.lru_cache(maxsize=8)
def matmul_rate(precision: str = "highest", size: int = 1024, seconds: float = 0.2,
                dtype: str = "float32") -> float:
  """FLOP/s of a `dtype` matmul at `precision` on one device of this process, timed for about
  `seconds` (float32 at DEFAULT is TF32 on GPUs and one bfloat16 pass on TPUs). Random entries:
  a GPU multiplies constant ones faster (less switching power): an H200 by 13% in bfloat16."""
  a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), dtype), jax.local_devices()[0])
  matmul = jax.jit(lambda a: jnp.matmul(a, a, precision=precision))
  calls, elapsed = timed(lambda out: matmul(a), a, seconds)
  return agreed(2 * size**3 * calls / elapsed)


@functools.lru_cache(maxsize=4)
def ring_bandwidth(mesh: Mesh, megabytes: int = 32, seconds: float = 0.2) -> float:
  """Bytes per second each device sends to the next on `mesh`'s data axis while receiving from the
  previous (`lax.ppermute`, as the kernel's rotation does), timed for about `seconds`."""
  size = megabytes * 2**20 // 4
  ring = [(d, (d + 1) % mesh.size) for d in range(mesh.size)]
  sharding = NamedSharding(mesh, P(parallel.DATA_AXIS))
  blocks = jax.jit(lambda: jnp.zeros((mesh.size * size,), jnp.float32), out_shardings=sharding)()
  send = jax.jit(jax.shard_map(lambda x: lax.ppermute(x, parallel.DATA_AXIS, ring), mesh=mesh,
                               in_specs=P(parallel.DATA_AXIS), out_specs=P(parallel.DATA_AXIS),
                               check_vma=False), donate_argnums=0)
  calls, elapsed = timed(send, blocks, seconds, collective=True)
  return agreed(4 * size * calls / elapsed)
