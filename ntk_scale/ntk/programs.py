"""The per-device programs of the tile loop, one jitted `shard_map` per kind of step (schedule.py).

Every program takes (params, model_state, first logit, ...) but rotate, which only moves and
contracts rows already formed. Compiled once per model, shapes and mesh: the tile loop
(engine.py) and the memory check (compiled_memory.py) share them.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from ntk_scale import parallel
from ntk_scale.matmul_precision import lax_precision
from ntk_scale.ntk.plan import KernelPlan, symmetric_pieces
from ntk_scale.ntk.schedule import (Step, Tile, in_logit_chunks, jacobian_schedule, ring_schedule,
                                    tile_schedule)
from ntk_scale.ntk.tile_math import (ApplyFn, LogitSpec, contract, contract_symmetric, jacobian_rows,
                                     ntvp_tile, symmetric_tile_by_logit_chunks)

def bind_state(apply_fn: Callable, stateful: bool, state) -> ApplyFn:
  """The model as `f(params, x)`: with `stateful`, `apply_fn(params, x, state)`."""
  return (lambda params, x: apply_fn(params, x, state)) if stateful else apply_fn


@functools.lru_cache(maxsize=32)
def step_programs(apply_fn: Callable, stateful: bool, spec: LogitSpec, precision: str, mesh: Mesh,
                  logit_chunk: int, factoring: str = "none") -> dict[str, Callable]:
  """The jitted per-device programs of each step kind (see schedule.py), one shard_map each.
  When `logit_chunk` is fewer than all logits (a trace kernel, plan.py), programs that form
  Jacobian rows form those of logits first .. first + logit_chunk - 1 (`first`, a traced argument),
  and the diagonal program sums all chunks itself. `factoring`: which layers' rows are kept as
  factors (tile_math.factored_layers_of; the plan's `factoring`).

  Every program takes (params, model_state, ...): the state (BatchNorm averages) is an argument,
  not a constant, so the kernels of many checkpoints of one model share one compilation.
  Branch-free on purpose: a `lax.cond` choosing per device between them ran 10x slower on CPU.
  """
  matmul_precision = lax_precision(precision)
  chunked = logit_chunk < spec.rows_per_example

  def jacobian(params, state, first, x):
    return jacobian_rows(bind_state(apply_fn, stateful, state), params, x, spec, first,
                         logit_chunk if chunked else None, factoring)

  def row(params, state, first, x_rows):  # -> (resident Jacobian rows, their diagonal block)
    resident = jacobian(params, state, first, x_rows)
    return resident, contract_symmetric(resident, spec, matmul_precision,
                                        symmetric_pieces(x_rows.shape[0]))

  def diagonal(params, state, first, x_rows):  # the diagonal block alone: no rows outlive the step
    if chunked:
      return symmetric_tile_by_logit_chunks(bind_state(apply_fn, stateful, state), params, x_rows, spec,
                                            matmul_precision, symmetric_pieces(x_rows.shape[0]),
                                            logit_chunk, factoring)
    return row(params, state, first, x_rows)[1]

  def column(params, state, first, resident, x_cols):
    return contract(resident, jacobian(params, state, first, x_cols), spec, matmul_precision)

  def tile(params, state, first, x_rows, x_cols):  # all logits: never chunked
    return ntvp_tile(bind_state(apply_fn, stateful, state), params, x_rows, x_cols, spec)

  def form_symmetric(params, state, first, x_rows):  # -> (resident rows, a copy to travel, diagonal)
    resident, diagonal_tile = row(params, state, first, x_rows)
    return resident, jax.tree.map(jnp.copy, resident), diagonal_tile

  def form_cross(params, state, first, x_rows, x_cols):
    resident = jacobian(params, state, first, x_rows)
    travelling = jacobian(params, state, first, x_cols)
    return resident, travelling, contract(resident, travelling, spec, matmul_precision)

  def rotate(resident, travelling):  # device d receives the column rows of device d + 1
    ring = [(d, (d - 1) % mesh.size) for d in range(mesh.size)]
    travelling = lax.ppermute(travelling, parallel.DATA_AXIS, ring)
    return travelling, contract(resident, travelling, spec, matmul_precision)

  data = P(parallel.DATA_AXIS)
  sharded = lambda f, n, out: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(),) * 3 + (data,) * n,
                                                    out_specs=out, check_vma=False))
  return {"row": sharded(row, 1, (data, data)), "resident": sharded(jacobian, 1, data),
          "diagonal": sharded(diagonal, 1, data), "column": sharded(column, 2, data),
          "tile": sharded(tile, 2, data), "form_symmetric": sharded(form_symmetric, 1, (data,) * 3),
          "form_cross": sharded(form_cross, 2, (data,) * 3),
          "rotate": jax.jit(jax.shard_map(rotate, mesh=mesh, in_specs=(data, data),
                                          out_specs=(data, data), check_vma=False),
                            donate_argnums=1)}


def plan_steps(plan: KernelPlan, todo: list[Tile]) -> list[Step]:
  """The lockstep steps that compute the tiles `todo` of `plan` (schedule.py)."""
  if plan.rotate:
    steps = ring_schedule(todo, plan.symmetric, plan.num_devices)
  elif plan.method == "jacobian":
    steps = jacobian_schedule(todo, plan.symmetric, plan.num_devices, plan.band, plan.row_step_weight)
  else:
    steps = tile_schedule(todo, plan.num_devices)
  return in_logit_chunks(steps, plan.logits.rows_per_example // plan.logit_chunk)


def program_of(step: Step, symmetric: bool) -> str:
  """The name, in `step_programs`, of the program that runs `step`."""
  if step.kind == "row":
    return "row" if any(step.tiles) else "resident"  # no diagonal tile wanted: the rows only
  if step.kind == "form":
    return "form_symmetric" if symmetric else "form_cross"
  return step.kind
