"""A kernel plan's memory per device by XLA's own analysis of the programs it runs.

The plan's memory model (plan.py) is an estimate, conservative on CPU and short of what XLA:GPU
allocated in three H100 runs. Compiling the plan's step programs with its shapes, before any
compute, gives XLA's count for one device of each program's arguments, outputs and temporaries
(less the outputs that reuse donated arguments). The tile loop then runs these very executables:
jit finds them in its cache, so the check costs tracing, not a second compilation.
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from ntk_scale import parallel
from ntk_scale.cost_analysis import memory_per_device
from ntk_scale.matmul_precision import default_precision
from ntk_scale.ntk.plan import KernelPlan
from ntk_scale.ntk.programs import plan_steps, program_of, step_programs


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  bytes_per_device: float  # the most that one step needs on one device
  program: str  # the step program that needs it (programs.step_programs)


def abstract_tree(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """`tree`'s shapes and dtypes placed with `sharding`: what a program is lowered for, no buffers."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def compiled_memory(plan: KernelPlan, apply_fn: Callable, params: Any,
                    example: jax.ShapeDtypeStruct, *, mesh: Mesh, precision: str,
                    model_state: Any = None) -> CompiledMemory | None:
  """The peak per device over the programs that `plan`'s steps run, compiled for `mesh`, plus the
  previous step's tiles (still on the device while they are handed over); None where the backend
  gives no memory analysis. `params`, `model_state`: arrays or jax.ShapeDtypeStruct."""
  programs = step_programs(apply_fn, model_state is not None, plan.logits, precision, mesh,
                           plan.logit_chunk, plan.factoring)
  replicated, data = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
  model = (abstract_tree(params, replicated),
           abstract_tree({} if model_state is None else model_state, replicated),
           jax.ShapeDtypeStruct((), np.int32))  # params, model state, first logit
  examples = lambda n: jax.ShapeDtypeStruct((mesh.size * n, *example.shape), example.dtype,
                                            sharding=data)
  band, block = examples(plan.band * plan.tile), examples(plan.tile)
  names = sorted({program_of(step, plan.symmetric) for step in plan_steps(plan, plan.tiles())})
  with default_precision(precision):  # as the tile loop traces them
    rows = None
    if {"column", "rotate"} & set(names):  # the resident (or travelling) Jacobian rows
      rows = abstract_tree(jax.eval_shape(programs["resident"], *model, band), data)
    arguments = {"resident": model + (band,), "row": model + (band,), "diagonal": model + (band,),
                 "form_symmetric": model + (band,), "form_cross": model + (band, block),
                 "column": model + (rows, block), "rotate": (rows, rows),
                 "tile": model + (block, block)}
    peak = None
    for name in names:
      need = memory_per_device(programs[name].lower(*arguments[name]).compile())
      if need is None:
        return None
      peak = max(peak or (need, name), (need, name))
  entry = math.prod(plan.logits.tile_suffix)
  previous_tiles = (plan.band * plan.tile) ** 2 * entry * plan.cost.itemsize
  return CompiledMemory(float(peak[0] + previous_tiles), peak[1])
