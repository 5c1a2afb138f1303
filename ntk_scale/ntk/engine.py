"""The tile loop: every device of every host computes its own kernel tiles, in lockstep steps.

Each step is one `shard_map` program in which every device works on its own row and column
blocks (schedule.py says which), with no communication except when column rows rotate along the
ring of devices (lax.ppermute) instead of being recomputed. With the Jacobian method a device keeps
the Jacobian rows of a band of row tiles resident through a run of column blocks and uses them for
the band's diagonal tiles too, so a block's Jacobian is formed once per run of tiles it enters
instead of once per tile. A trace kernel may be formed a chunk of logits at a time: every round
runs once per chunk and the host sums each tile's partial tiles before handing it over. Tiles
leave the devices while the next step runs; each host hands the tiles of its own devices to
`on_tile`; finished tiles (`done`) are never recomputed.
"""

import contextlib
import dataclasses
import functools
import logging
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ntk_scale import parallel
from ntk_scale.device_rates import agreed, ring_bandwidth, timed
from ntk_scale.matmul_precision import check_precision, default_precision
from ntk_scale.ntk.compiled_memory import CompiledMemory, compiled_memory
from ntk_scale.ntk.plan import (KernelPlan, KernelPlanError, ModelCost, make_plan, rows_flops,
                                setting_names)
from ntk_scale.ntk.programs import bind_state, plan_steps, program_of, step_programs
from ntk_scale.ntk.tile_math import LogitSpec, jacobian_rows, mirror_tile, parse_logits
from ntk_scale.profile import StepProfile

TileCallback = Callable[[int, int, np.ndarray], None]  # (row block, column block, tile)


def padded_blocks(x: np.ndarray, num_blocks: int, tile: int) -> np.ndarray:
  """x padded (with copies of its first row) to num_blocks * tile rows."""
  missing = num_blocks * tile - len(x)
  return np.concatenate([x, np.repeat(x[:1], missing, 0)]) if missing else x


class StepProgress:
  """Logs, at most every `every_s` seconds, which lockstep step a tile loop has reached and about
  how long the rest will take (a kernel of CIFAR-10 runs for hours)."""

  def __init__(self, num_steps: int, num_tiles: int, num_devices: int, every_s: float = 30.0,
               clock: Callable[[], float] = time.time):
    self.num_steps, self.num_tiles, self.num_devices, self.every_s = (num_steps, num_tiles,
                                                                      num_devices, every_s)
    self._clock = clock
    self.started = self._last = clock()

  def step_done(self, number: int) -> None:
    """Step `number` (0-based) has been dispatched."""
    now = self._clock()
    if now - self._last <= self.every_s:
      return
    self._last, elapsed = now, now - self.started
    logging.info("kernel step %d/%d (%d tiles on %d devices), %.1f s, about %.0f s to go",
                 number + 1, self.num_steps, self.num_tiles, self.num_devices, elapsed,
                 elapsed * (self.num_steps - number - 1) / (number + 1))


def blocks_on_devices(source: np.ndarray, blocks: Iterable[int], size: int, mesh: Mesh) -> jax.Array:
  """One array over `mesh`'s devices in which device d holds source[blocks[d] * size:][:size]
  (`source`: a host array present on every process)."""
  per_device = [source[b * size:(b + 1) * size] for b in blocks]
  shape = (mesh.size * size,) + source.shape[1:]
  return jax.make_array_from_callback(shape, NamedSharding(mesh, P(parallel.DATA_AXIS)),
                                      lambda index: per_device[(index[0].start or 0) // size])


def run_tiles(apply_fn: Callable, params, x1: np.ndarray, x2: np.ndarray | None, plan: KernelPlan,
              on_tile: TileCallback, *, precision: str = "highest",
              done: Iterable[tuple[int, int]] = (), mesh: Mesh | None = None,
              model_state=None, stop: Callable[[int], bool] | None = None,
              profile: StepProfile | None = None) -> int:
  """Computes every tile of `plan` not in `done`; returns how many this process handed over.

  `x1`, `x2` are host arrays present on every process; `on_tile` receives the tiles of this
  process's devices, cropped to the kernel's edge, in the dtype of `params`. With `model_state`
  the model is `apply_fn(params, x, model_state)` (see `empirical_ntk`). `stop(step)`, asked
  after every lockstep step (ntk_scale/preemption.py), ends the loop there: the tiles finished
  so far are handed over, the rest left for a rerun. `profile` traces some of the lockstep steps
  (ntk_scale/profile.py; they count from 0 here).
  """
  profile = profile or StepProfile.off()
  mesh = mesh or parallel.make_mesh()
  if mesh.size != plan.num_devices:
    raise ValueError(f"the plan is for {plan.num_devices} devices, the mesh has {mesh.size}.")
  tile, band = plan.tile, plan.band
  padded = mesh.size if plan.rotate else 0  # every device holds a block, real or padding
  rows = padded_blocks(np.asarray(x1), max(plan.row_bands * band, padded), tile)
  cols = rows if x2 is None else padded_blocks(np.asarray(x2), max(plan.col_blocks, padded), tile)
  done = set(done)
  todo = [t for t in plan.tiles() if t not in done]
  steps = plan_steps(plan, todo)
  chunks = plan.logits.rows_per_example // plan.logit_chunk

  programs = step_programs(apply_fn, model_state is not None, plan.logits, precision, mesh,
                           plan.logit_chunk, plan.factoring)
  device_array = functools.partial(blocks_on_devices, mesh=mesh)
  params = parallel.replicate(params, mesh)
  state = parallel.replicate({} if model_state is None else model_state, mesh)

  handed, progress = 0, StepProgress(len(steps), len(todo), mesh.size)
  partial: dict[tuple[int, int], np.ndarray] = {}  # tiles summed over the logit chunks so far

  def hand_over(placed: tuple, tiles: jax.Array, chunk: int | None) -> None:
    nonlocal handed
    per_device = tiles.shape[0] // mesh.size
    for shard in tiles.addressable_shards:
      device = (shard.index[0].start or 0) // per_device
      if not placed[device]:
        continue
      block = np.asarray(shard.data)
      for (i, j), (r, c), mirrored in placed[device]:
        part = block[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
        part = mirror_tile(part) if mirrored else part
        part = part[:min(tile, plan.num_rows - i * tile), :min(tile, plan.num_cols - j * tile)]
        if chunk is not None:
          part = partial.pop((i, j)) + part if chunk else part
          if chunk < chunks - 1:
            partial[i, j] = np.array(part)
            continue
        on_tile(i, j, part)
        handed += 1

  pending, resident, travelling = None, None, None
  with profile:
    for number, step in enumerate(steps):
      if step.kind in ("row", "diagonal", "form"):
        resident = travelling = None  # the previous rows are freed before the next are formed
        x_band = device_array(rows, step.blocks, band * tile)
      first = np.int32((step.chunk or 0) * plan.logit_chunk)
      name = program_of(step, plan.symmetric)
      program = programs[name]
      profile.before(number)
      with default_precision(precision):
        if name == "resident":
          resident, tiles = program(params, state, first, x_band), None
        elif name == "row":
          resident, tiles = program(params, state, first, x_band)
        elif name == "diagonal":
          tiles = program(params, state, first, x_band)
        elif name == "form_symmetric":
          resident, travelling, tiles = program(params, state, first, x_band)
        elif name == "form_cross":
          resident, travelling, tiles = program(params, state, first, x_band,
                                                device_array(cols, step.blocks, tile))
        elif name == "rotate":
          travelling, tiles = program(resident, travelling)
        elif name == "column":
          tiles = program(params, state, first, resident, device_array(cols, step.blocks, tile))
        else:
          tiles = program(params, state, first, device_array(rows, [i for i, _ in step.blocks], tile),
                          device_array(cols, [j for _, j in step.blocks], tile))
      profile.after(number, (resident, travelling, tiles))
      if pending is not None:
        hand_over(*pending)  # the previous step's tiles leave the devices while this one runs
      pending = (step.tiles, tiles, step.chunk) if tiles is not None else None
      progress.step_done(number)
      if stop is not None and stop(number):
        break
  if pending is not None:
    hand_over(*pending)
  return handed


def tile_slices(plan: KernelPlan, i: int, j: int) -> tuple[slice, slice]:
  t = plan.tile
  return slice(i * t, min((i + 1) * t, plan.num_rows)), slice(j * t, min((j + 1) * t, plan.num_cols))


def _abstract(tree) -> tuple:
  """A hashable description of a pytree's structure, shapes and dtypes."""
  leaves, treedef = jax.tree.flatten(tree)
  dtype = lambda a: np.dtype(a.dtype) if hasattr(a, "dtype") else np.result_type(a)
  return treedef, tuple((np.shape(a), dtype(a).name) for a in leaves)


def _shapes(abstract: tuple | None):
  if abstract is None:
    return None
  treedef, leaves = abstract
  return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves])


def _model_signature(apply_fn: Callable, params, x: np.ndarray, model_state) -> tuple:
  """(apply_fn, params, example, state) as the model caches below key it: shapes, not values."""
  return (apply_fn, _abstract(params), jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype),
          None if model_state is None else _abstract(model_state))


@functools.lru_cache(maxsize=32)
def _measure(apply_fn: Callable, abstract_params: tuple, example: jax.ShapeDtypeStruct,
             abstract_state: tuple | None) -> ModelCost:
  """ModelCost of a model, measured (one small compile) once per function and shapes."""
  return ModelCost.measure(apply_fn, _shapes(abstract_params), example, _shapes(abstract_state))


@functools.lru_cache(maxsize=32)
def _num_classes(apply_fn: Callable, abstract_params: tuple, example: jax.ShapeDtypeStruct,
                 abstract_state: tuple | None) -> int:
  """The model's logits per example, traced once per function and shapes (a trace per call was
  most of a small kernel's fixed cost)."""
  x = jax.ShapeDtypeStruct((1,) + example.shape, example.dtype)
  state = () if abstract_state is None else (_shapes(abstract_state),)
  out = jax.eval_shape(apply_fn, _shapes(abstract_params), x, *state)
  if not isinstance(out, jax.ShapeDtypeStruct):  # (logits, aux), a dict of outputs, ...
    raise ValueError(f"apply_fn returns a {type(out).__name__}, not one array; the kernel engine "
                     f"needs logits [N, C]: return only the logits (select that output in apply_fn).")
  if len(out.shape) != 2:
    raise ValueError(f"apply_fn returns shape {out.shape} for a batch of one example; the kernel "
                     f"engine needs logits [N, C] (a model of one output: return it as [N, 1]).")
  return out.shape[1]


PROBE_EXAMPLES = 8


@functools.lru_cache(maxsize=32)
def _formation_rate(apply_fn: Callable, abstract_params: tuple, example: jax.ShapeDtypeStruct,
                    abstract_state: tuple | None, spec: LogitSpec, precision: str,
                    factoring: str) -> float:
  """FLOP/s (the cost model's count) at which one device forms Jacobian rows: a probe block of
  PROBE_EXAMPLES examples timed, once per function and shapes. Rows recomputed cost this rate,
  far below the matmul peak, so rows sent instead are weighed against it."""
  # The dtypes as jit sees the arrays (int64 tokens are int32 without x64): jnp.zeros would warn.
  zeros = lambda shape, dtype: jnp.zeros(shape, jax.dtypes.canonicalize_dtype(dtype))
  tree_zeros = lambda abstract: jax.tree.map(lambda s: zeros(s.shape, s.dtype), _shapes(abstract))
  params = tree_zeros(abstract_params)
  model = bind_state(apply_fn, abstract_state is not None,
                     None if abstract_state is None else tree_zeros(abstract_state))
  x = zeros((PROBE_EXAMPLES,) + example.shape, example.dtype)
  with default_precision(precision):
    form = jax.jit(lambda params, x: jacobian_rows(model, params, x, spec, factoring=factoring))
    calls, seconds = timed(lambda rows: form(params, x), None, 0.1)
  cost = dataclasses.replace(_measure(apply_fn, abstract_params, example, abstract_state),
                             factoring=factoring)
  return agreed(calls * PROBE_EXAMPLES * rows_flops(spec, cost) / seconds)


def plan_for(apply_fn: Callable, params, x1: np.ndarray, x2: np.ndarray | None, logits: str | int, *,
             method: str = "auto", tile_size: int | None = None, band: int | None = None,
             logit_chunk: int | None = None, rotate: bool | None = None,
             memory_budget_bytes: float | None = None, num_devices: int | None = None,
             flops_per_transfer_byte: float = 0.0, factored_layers: str = "auto",
             fields: dict[str, str] | None = None, model_state=None) -> KernelPlan:
  """Measures the model on one example and makes the plan (see `ntk_scale.ntk.plan`)."""
  x1 = np.asarray(x1)
  fields = fields or {}
  model = _model_signature(apply_fn, params, x1, model_state)
  spec = parse_logits(logits, _num_classes(*model), fields.get("logits", "logits"))
  cost = _measure(*model)
  num_cols = len(x1) if x2 is None else len(x2)
  return make_plan(cost, len(x1), num_cols, x2 is None, spec,
                   num_devices=num_devices or jax.device_count(), method=method, tile=tile_size,
                   band=band, logit_chunk=logit_chunk, rotate=rotate,
                   budget_bytes=memory_budget_bytes, flops_per_transfer_byte=flops_per_transfer_byte,
                   factored_layers=factored_layers, fields=fields)


# Plans made again for a smaller budget when XLA counts more than the model did.
MAX_PLAN_ATTEMPTS = 4


def fit_plan(apply_fn: Callable, params, x1: np.ndarray, x2: np.ndarray | None, logits: str | int, *,
             mesh: Mesh | None = None, precision: str = "highest",
             memory_budget_bytes: float | None = None, fields: dict[str, str] | None = None,
             model_state=None, **settings) -> KernelPlan:
  """`plan_for`'s plan held to its budget by XLA's analysis of its compiled programs
  (compiled_memory.py), its memory XLA's count. When they need more than the budget, planned
  again within the model's estimate for it scaled by budget / XLA's count (smaller tiles); when
  they need less, one plan made so for more memory is tried and kept if it fits and needs fewer
  FLOPs (the model is conservative on CPU). KernelPlanError when no plan within the settings
  fits. `settings`: plan_for's method, tile_size, band, logit_chunk, rotate, factored_layers.
  On several devices, when the planner would rotate, its transfers are weighed by the rate at
  which a device forms Jacobian rows over the bandwidth of the ring of devices, both measured
  here."""
  mesh = mesh or parallel.make_mesh()
  transfer = 0.0
  plan_with = lambda budget: plan_for(apply_fn, params, x1, x2, logits, memory_budget_bytes=budget,
                                      num_devices=mesh.size, flops_per_transfer_byte=transfer,
                                      fields=fields, model_state=model_state, **settings)
  plan = plan_with(memory_budget_bytes)
  if plan.rotate and settings.get("rotate") is None:  # chosen with free transfers: weigh them
    model = _model_signature(apply_fn, params, x1, model_state)
    transfer = (_formation_rate(*model, plan.logits, precision, plan.factoring)
                / ring_bandwidth(mesh))
    plan = plan_with(memory_budget_bytes)
  budget = plan.budget_bytes
  example = jax.ShapeDtypeStruct(np.shape(x1)[1:], x1.dtype)
  measure = lambda plan: compiled_memory(plan, apply_fn, params, example, mesh=mesh,
                                         precision=precision, model_state=model_state)
  compiled = lambda plan, measured: dataclasses.replace(
      plan, bytes_per_device=measured.bytes_per_device, budget_bytes=budget, memory_compiled=True)

  def rescaled(plan: KernelPlan, measured: CompiledMemory) -> KernelPlan | None:
    """The plan for the model's estimate of `plan` scaled by budget / XLA's count (a margin of 5%)."""
    try:
      other = plan_with(0.95 * plan.bytes_per_device * budget / measured.bytes_per_device)
    except KernelPlanError:
      return None
    return None if other.layout() == plan.layout() else other

  for _ in range(MAX_PLAN_ATTEMPTS):
    measured = measure(plan)
    if measured is None:  # no memory analysis on this backend: the model's estimate stands
      return plan
    if measured.bytes_per_device <= budget:
      larger = rescaled(plan, measured)
      if larger is not None and larger.device_flops < plan.device_flops:
        grown = measure(larger)
        if grown is not None and grown.bytes_per_device <= budget:
          return compiled(larger, grown)
      return compiled(plan, measured)
    smaller = rescaled(plan, measured)
    if smaller is None:
      break
    plan = smaller
  names = setting_names(fields)
  raise KernelPlanError(
      f"the kernel does not fit: its compiled programs need {measured.bytes_per_device / 2**30:.3g} "
      f"GiB per device (the {measured.program} program, by XLA's memory analysis; {plan.layout()}) "
      f"but {names['memory_budget']} allows {budget / 2**30:.3g} GiB; lower {names['tile_size']}, "
      f"{names['band']} or {names['logit_chunk']}, or unset them, or raise {names['memory_budget']}.")


# empirical_ntk's plans by model, shapes and settings: a plan depends on nothing else, and fitting
# one (tracing the step programs for XLA's memory analysis) was a third of a small kernel's time.
_PLANS: dict[tuple, KernelPlan] = {}
MAX_CACHED_PLANS = 32


def _as_dtype(a, dtype: str):
  """`a` in `dtype` if it holds floating-point numbers; integer and boolean leaves (a model state's
  counters or indices) stay as they are, and so does a jax array already in `dtype` (no copy
  through the host)."""
  if not jnp.issubdtype(a.dtype if hasattr(a, "dtype") else np.result_type(a), jnp.floating):
    return a  # (jnp.result_type of each leaf was a tenth of a small kernel's host time)
  if isinstance(a, jax.Array) and a.dtype == np.dtype(dtype):
    return a
  return np.asarray(a, dtype)


def _inputs_as_dtype(x, dtype: str) -> np.ndarray:
  """Float inputs in the kernel's dtype; integer ones (token ids for an embedding) in the integer
  dtype jit gives them (numpy's int64 is int32 unless x64 is on), so the shapes the engine traces
  hold it too (jax from 0.12 warns at an int64 it would truncate)."""
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.floating):
    return x.astype(dtype)
  return x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)


def empirical_ntk(apply_fn: Callable, params, x1: np.ndarray, x2: np.ndarray | None = None, *,
                  logits: str | int = "trace", method: str = "auto", dtype: str = "float32",
                  precision: str = "highest", memory_budget_bytes: float | None = None,
                  tile_size: int | None = None, band: int | None = None,
                  logit_chunk: int | None = None, rotate: bool | None = None,
                  factored_layers: str = "auto", model_state=None) -> np.ndarray:
  """The empirical NTK J(x1) J(x2)^T of `apply_fn(params, x) -> logits [N, C]` as a numpy array.

  logits: "trace" (sum over logits, [N1, N2]), a class index ([N1, N2]) or "full" ([N1, N2, C, C]).
  With x2 None the kernel of x1 with itself is computed from the tiles on and above the diagonal.
  method: "jacobian", "ntvp" (NTK-vector products, no Jacobian block stored) or "auto" (the cost
  model's choice within the per-device memory budget; default: 80% of XLA's device memory, on CPU half
  of host memory shared by its devices). dtype "float64" runs the whole computation in float64 (x64
  enabled for the call; refused on TPUs, which have no float64 arithmetic).
  Works for any flax model in inference mode and for `ntk_scale.linearize.LinearizedModel`.
  Runs on all devices of all processes; every process gets the whole kernel.
  model_state: what the model needs besides `params` and is not differentiated (BatchNorm
  averages); given, the model is `apply_fn(params, x, model_state)`, and kernels of several
  checkpoints of one model (one `apply_fn`) reuse one compilation.
  tile_size, band, logit_chunk, rotate: the tile, the row tiles per resident band, the logits whose
  Jacobian rows a trace kernel forms at a time (a divisor of C: the kernel is summed over chunks),
  and whether column rows rotate over the devices (see plan.py); unset, from the budget and the
  cost model. factored_layers: "auto" (the default: layers whose kernel is cheaper from the Grams
  of their inputs and output cotangents, such as dense layers and convolutions on small maps, are
  formed so; see ntk_scale/ntk/factored_layers.py), "all" (every layer that can be) or "none".
  """
  check_precision(precision)
  if dtype not in ("float32", "float64"):
    raise ValueError(f"dtype={dtype!r} is not supported; expected 'float32' or 'float64'.")
  parallel.check_float64_devices(dtype, "dtype", "use 'float32' (matmuls at precision 'highest')")
  with jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext():
    params = jax.tree.map(functools.partial(_as_dtype, dtype=dtype), params)
    model_state = None if model_state is None else jax.tree.map(
        functools.partial(_as_dtype, dtype=dtype), model_state)
    x1 = _inputs_as_dtype(x1, dtype)
    x2 = None if x2 is None else _inputs_as_dtype(x2, dtype)
    mesh = parallel.make_mesh()
    settings = dict(method=method, tile_size=tile_size, band=band, logit_chunk=logit_chunk,
                    rotate=rotate, memory_budget_bytes=memory_budget_bytes,
                    factored_layers=factored_layers)
    key = (_model_signature(apply_fn, params, x1, model_state), len(x1),
           None if x2 is None else len(x2), logits, mesh, precision, tuple(settings.items()))
    plan = _PLANS.get(key)
    if plan is None:
      plan = fit_plan(apply_fn, params, x1, x2, logits, mesh=mesh, precision=precision,
                      model_state=model_state, **settings)
      _PLANS[key] = plan
      while len(_PLANS) > MAX_CACHED_PLANS:
        _PLANS.pop(next(iter(_PLANS)))
    kernel = np.zeros((plan.num_rows, plan.num_cols) + plan.logits.tile_suffix, dtype)

    def store(i: int, j: int, tile: np.ndarray) -> None:
      rows, cols = tile_slices(plan, i, j)
      kernel[rows, cols] = tile
      if plan.symmetric and i != j:
        kernel[cols, rows] = mirror_tile(tile)

    run_tiles(apply_fn, params, x1, x2, plan, store, precision=precision, mesh=mesh,
              model_state=model_state)
  return parallel.sum_over_processes(kernel)  # each tile was written by exactly one process
