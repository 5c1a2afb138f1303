"""What a jax program costs: FLOPs, loops counted as often as they run, and memory per device.

XLA's cost analysis counts the body of a loop once, whatever its trip count: a PGD-20 evaluation
reads as two forward passes. Loops with a static trip count (`lax.scan`, and `lax.fori_loop` with
Python-int bounds, which jax lowers to a scan) are corrected here from the jaxpr: for each scan
(at any depth, outside other scans) the program's count gains `length` times its body's count,
the body itself counted the same way, less the copies of the body XLA already counted (one, or
with `unroll` the unrolled copies and the leftover iterations). `while_loop`s with a traced trip
count stay counted once and are reported as `unbounded_loops`. Counts are made for the host's
CPU whatever the devices (`_xla_flops`: jax's GPU and TPU plugins count no lowered program).
"""

import dataclasses
import functools
import logging
from typing import Any, Callable, Iterator

import jax
from jax.extend import core as jex_core


@dataclasses.dataclass(frozen=True)
class ProgramFlops:
  flops: float
  unbounded_loops: int  # while loops whose trip count is not static, counted once


def _unplaced(a: Any) -> Any:
  """An array argument as its shape and dtype alone, so that it can be lowered for any device."""
  if hasattr(a, "shape") and hasattr(a, "dtype"):
    return jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
  return a


def _analysis_flops(analysis: Any) -> float | None:
  if isinstance(analysis, list):  # older jax: one dict per program
    analysis = analysis[0]
  return None if analysis is None else float(analysis.get("flops", 0.0))


def _on_host_cpu(closed: jex_core.ClosedJaxpr) -> float | None:
  """The count of a traced program lowered for the host's CPU, the arrays it closes over (on
  whatever devices they are) passed as abstract arguments."""
  run = lambda consts, *args: jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(closed.jaxpr, consts))(*args)
  try:
    with jax.default_device("cpu"):
      lowered = jax.jit(run).lower([_unplaced(c) for c in closed.consts],
                                   *map(_abstract, closed.jaxpr.invars))
      return _analysis_flops(lowered.cost_analysis())
  except Exception:  # noqa: BLE001 -- no CPU backend, or a program over a mesh of other devices
    return None


def _lowered(jitted: Callable, args: tuple) -> float | None:
  return _analysis_flops(jitted.lower(*args).cost_analysis())


def _compiled(jitted: Callable, args: tuple) -> float | None:
  return _analysis_flops(jitted.lower(*args).compile().cost_analysis())


def _xla_flops(closed: jex_core.ClosedJaxpr, fn: Callable | None = None, args: tuple = ()) -> float:
  """XLA's FLOP count of the traced program `closed` (`fn(*args)`, where given) as lowered, before
  a backend optimises it: after GPU compilation, convolutions are cuDNN library calls that count
  0 FLOPs. Counted for the host's CPU, because a backend reached through the PJRT C API (jax's
  CUDA and TPU plugins) analyses no lowered program (jax answers None). Where the program cannot
  be lowered for the CPU (a shard_map over a mesh of GPUs, say), counted for its own devices, as
  lowered, else as compiled (with a warning: library calls count 0); 0, with a warning, where
  neither answers."""
  if fn is None:
    fn, args = jex_core.jaxpr_as_fun(closed), tuple(map(_abstract, closed.jaxpr.invars))
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)  # a jitted program keeps its compilation
  flops = _on_host_cpu(closed)
  if flops is None:
    flops = _lowered(jitted, args)
  if flops is None:
    flops = _compiled(jitted, args)
    if flops is not None:
      _warn_once(f"FLOPs of a program over {jax.default_backend()} devices counted after "
                 f"compilation: convolutions run as library calls (cuDNN) count 0.")
  if flops is None:
    _warn_once(f"No cost analysis of programs on the {jax.default_backend()} backend: FLOPs count "
               f"as 0 (cost models fall back to their floors).")
  return flops or 0.0


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  logging.warning(message)


def _abstract(var) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(var.aval.shape, var.aval.dtype)


@functools.lru_cache(maxsize=256)
def _closed_flops(closed: jex_core.ClosedJaxpr) -> ProgramFlops:
  extra, unbounded = _loop_corrections(closed.jaxpr)
  return ProgramFlops(_xla_flops(closed) + extra, unbounded)


def sub_jaxprs(eqn) -> list:
  """The programs nested in one equation of a traced program (scan and loop bodies, jit and
  checkpoint calls, custom derivatives)."""
  found = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(item, jex_core.ClosedJaxpr):
        found.append(item.jaxpr)
      elif isinstance(item, jex_core.Jaxpr):
        found.append(item)
  return found


def all_equations(jaxpr) -> Iterator:
  """Every equation of a traced program, those of its nested programs included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in sub_jaxprs(eqn):
      yield from all_equations(sub)


def _body_copies(length: int, unroll: int | bool) -> int:
  """How many copies of a scan's body its lowering holds, each counted once by XLA: `unroll` of
  them in the loop (none when it runs no full trip) and one per leftover iteration, as jax's
  _scan_impl lowers it (unroll 0 or True: all `length` unrolled)."""
  if isinstance(unroll, bool):  # as lax.scan reads it; its equations hold the int
    unroll = max(length, 1) if unroll else 1
  if unroll == 0:
    return length
  trips, leftover = divmod(length, unroll)
  return (unroll if trips else 0) + leftover


def _loop_corrections(jaxpr) -> tuple[float, int]:
  """FLOPs to add to XLA's count of `jaxpr` for its scans, and its number of unbounded loops."""
  extra, unbounded = 0.0, 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      body = eqn.params["jaxpr"]
      inner = _closed_flops(body)
      once = _xla_flops(body)
      length = eqn.params["length"]
      extra += length * inner.flops - _body_copies(length, eqn.params.get("unroll", 1)) * once
      unbounded += inner.unbounded_loops
      continue
    if eqn.primitive.name == "while":
      unbounded += 1
    for sub in sub_jaxprs(eqn):
      more, loops = _loop_corrections(sub)
      extra, unbounded = extra + more, unbounded + loops
  return extra, unbounded


def program_flops(fn: Callable, *args: Any, **static: Any) -> ProgramFlops:
  """FLOPs of `fn(*args, **static)` (args: arrays or jax.ShapeDtypeStruct; `static`: keyword
  arguments that are not traced), with static-length loops counted `length` times."""
  bound = functools.partial(fn, **static) if static else fn
  closed = jax.make_jaxpr(bound)(*args)
  extra, unbounded = _loop_corrections(closed.jaxpr)
  return ProgramFlops(_xla_flops(closed, bound, args) + extra, unbounded)


def memory_per_device(compiled: jax.stages.Compiled) -> float | None:
  """Bytes one device holds while a compiled program runs, by XLA's analysis: arguments, outputs
  and temporaries, less the outputs that reuse donated arguments (None where the backend gives no
  analysis)."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
