"""The tile plan: tile size and band height from a memory budget, the method from a cost model.

A kernel of N1 x N2 examples is cut into T x T tiles; with x2 absent only tiles (i, j), i <= j,
are computed (the kernel is symmetric). The Jacobian method holds the Jacobian rows of a band of
b consecutive row tiles resident while it forms column blocks of T rows and contracts them with
the band: a column block is formed once per band instead of once per row tile, so for a fixed
memory a tall band and narrow columns recompute fewer Jacobian rows than square tiles (about
N^2 / (2 b T) column rows for a symmetric kernel against N^2 / (2 T)). Per device it holds the
band's rows (b T C' P numbers, kept per parameter group) and a column block's with one group's
per-array gradients, (1 + g) T C' P, g the largest group's share of P; a band is formed with one
group's gradients too, b T (1 + g) C' P ((1 + g) N C' P for a symmetric kernel in one tile);
plus activations. When every device can hold one block of N / D rows three times (its own, the
column rows it sends and those it receives: (3 + g) T C' P), the blocks rotate over the ring of
devices instead, every row formed once (schedule.ring_schedule). A trace kernel may form its
rows L of its C logits at a time, C' = L in all of the above, every round of the schedule run
C / L times and its tiles summed (schedule.in_logit_chunks). The NTK-vector-product method holds
one example's Jacobian rows and the activations of a JVP over a row block. The cost model counts
FLOPs with the forward pass of one example measured by XLA (F) and the parameter count (P):

  Jacobian rows of one example      F * (1 + 2 C')   (in chunks of L logits: C'/L * F * (1 + 2 L))
  jacobian tile contraction         2 T^2 C' P   (full: 2 T^2 C^2 P)
  ntvp tile                         T * F (1 + 2 C') + 3 F T^2 C'

A layer factored (factored_layers.py: chosen by `factored_layers`, "auto" where it saves
multiply-adds) keeps its input and output cotangents instead of its weight gradients: C' P above
loses its parameters and gains the factors' numbers, the contraction its multiply-adds per pair,
and a tile holds the factors' Grams (ModelCost.row_numbers, pair_macs, pair_workspace).
"""

import dataclasses
import math
import os
from typing import Any

import jax
import numpy as np

from ntk_scale import parallel
from ntk_scale.config_numbers import is_whole_number
from ntk_scale.cost_analysis import all_equations, program_flops
from ntk_scale.ntk.schedule import round_lengths
from ntk_scale.ntk.factored_layers import MODES as FACTORING_MODES
from ntk_scale.ntk.factored_layers import FactoredLayer, choose, find_layers, trace
from ntk_scale.ntk.tile_math import ApplyFn, LogitSpec, parameter_groups

METHODS = ("auto", "jacobian", "ntvp")
# Of the memory XLA may use on a device (its pool: 75% of a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION
# says otherwise); the rest is left to XLA's own buffers and to fragmentation of its pool by
# multi-GiB Jacobian blocks.
DEVICE_MEMORY_FRACTION = 0.8
HOST_MEMORY_FRACTION = 0.5  # of host memory, shared by the host's devices when they report no limit
BAND_HEIGHTS = (1, 2, 4, 8)  # row tiles per resident band that the planner tries
# A chosen tile never shrinks below this to make a band taller: narrower column blocks make the
# column matmuls and the vmapped reverse passes inefficient on accelerators.
MIN_BANDED_TILE = 128


class KernelPlanError(ValueError):
  """The requested kernel cannot be computed within the settings; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ModelCost:
  """What the cost model needs to know about the model, measured once on one example."""
  num_params: int
  forward_flops: float  # per example
  activation_bytes: float  # per example, every intermediate of the forward pass
  itemsize: int
  largest_group: int  # parameters in the largest group of tile_math.parameter_groups
  layers: tuple[FactoredLayer, ...] = ()  # every layer that could be factored (factored_layers.py)
  factoring: str = "none"  # which of them are: factored_layers.choose's mode (make_plan sets it)

  def factored(self, spec: LogitSpec) -> tuple[FactoredLayer, ...]:
    return choose(self.layers, spec.rows_per_example, spec.kind, self.factoring)

  def row_numbers(self, spec: LogitSpec, logit_rows: int) -> float:
    """Numbers of one example's Jacobian rows for `logit_rows` logits, factored layers as factors."""
    layers = self.factored(spec)
    return (logit_rows * (self.num_params - sum(layer.num_params for layer in layers))
            + sum(layer.row_numbers(logit_rows) for layer in layers))

  def pair_macs(self, spec: LogitSpec) -> float:
    """Multiply-adds of one kernel entry (of all C x C for "full") from two examples' rows."""
    layers = self.factored(spec)
    per_entry = spec.num_classes ** 2 if spec.kind == "full" else spec.rows_per_example
    return (per_entry * (self.num_params - sum(layer.num_params for layer in layers))
            + sum(layer.pair_macs(spec.rows_per_example) for layer in layers))

  def pair_workspace(self, spec: LogitSpec) -> float:
    """Numbers per pair of examples that a factored layer's share of a tile holds at its peak."""
    return max((layer.pair_workspace() for layer in self.factored(spec)), default=0.0)

  @classmethod
  def measure(cls, apply_fn: ApplyFn, params: Any, example: jax.ShapeDtypeStruct,
              model_state: Any = None) -> "ModelCost":
    """From shapes alone (arrays or jax.ShapeDtypeStruct): nothing is allocated. With
    `model_state`, the model is `apply_fn(params, x, model_state)` (see engine.empirical_ntk)."""
    leaves = jax.tree.leaves(params)
    x = jax.ShapeDtypeStruct((1,) + example.shape, example.dtype)
    shape_of = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    p = shape_of(params)
    if model_state is not None:
      state, stateful = shape_of(model_state), apply_fn
      apply_fn = lambda params, x, state: stateful(params, x, state)
      args = (p, x, state)
    else:
      args = (p, x)
    jaxpr = jax.make_jaxpr(apply_fn)(*args)
    activations = sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize
                      for eqn in all_equations(jaxpr.jaxpr) for v in eqn.outvars)
    # The lowered (backend-independent) HLO: after GPU compilation convolutions are cuDNN custom
    # calls that cost analysis counts as 0 FLOPs, which made "auto" pick ntvp there, 50x slower.
    # Never below the matmul floor: every parameter enters at least one multiply-add.
    flops = max(program_flops(apply_fn, *args).flops, 2.0 * sum(a.size for a in leaves))
    treedef = jax.tree.structure(params)
    program = trace(lambda leaves, *rest: apply_fn(jax.tree.unflatten(treedef, leaves), *rest),
                    jax.tree.leaves(p), *args[1:])
    layers = find_layers(program, len(leaves))
    return cls(num_params=int(sum(a.size for a in leaves)), forward_flops=flops,
               activation_bytes=float(activations), itemsize=int(leaves[0].dtype.itemsize),
               largest_group=int(np.diff(parameter_groups(params)).max()), layers=layers)


@dataclasses.dataclass(frozen=True)
class KernelPlan:
  """Everything decided before compute starts."""
  num_rows: int
  num_cols: int
  symmetric: bool
  logits: LogitSpec
  method: str
  tile: int
  num_devices: int
  band: int  # row tiles per resident band (1 for ntvp)
  logit_chunk: int  # logits whose Jacobian rows are formed at a time (C' unless a trace is chunked)
  rotate: bool  # one block per device, column rows passed along the ring of devices (schedule.py)
  bytes_per_device: float
  budget_bytes: float
  flops: float  # of the kernel's tiles, all devices together
  device_flops: float  # on one device through the lockstep steps, idle work included (the choice)
  cost: ModelCost
  memory_compiled: bool = False  # bytes_per_device by XLA's analysis of the compiled programs
  transfer_bytes: float = 0.0  # what each device sends to the next with rotation

  @property
  def row_step_weight(self) -> float:
    """A row step's FLOPs in column steps, by which the Jacobian schedule chooses its runs."""
    row_step, column_step = _step_flops(self.tile, self.band, self.symmetric, self.logits, self.cost,
                                        self.logit_chunk)
    return row_step / column_step

  @property
  def row_blocks(self) -> int:
    return -(-self.num_rows // self.tile)

  @property
  def row_bands(self) -> int:
    return -(-self.row_blocks // self.band)

  @property
  def col_blocks(self) -> int:
    return -(-self.num_cols // self.tile)

  def tiles(self) -> list[tuple[int, int]]:
    """Every tile (row block, column block) to compute, row-major (schedule.py groups them into
    bands and steps)."""
    if self.symmetric:
      return [(i, j) for i in range(self.row_blocks) for j in range(i, self.col_blocks)]
    return [(i, j) for i in range(self.row_blocks) for j in range(self.col_blocks)]

  def layout(self) -> str:
    """Method, tile, band and logit chunks, e.g. "jacobian, tile 128, bands of 4 row tiles"."""
    chunked = self.logit_chunk < self.logits.rows_per_example
    factored = self.factored_layers
    return (f"method {self.method}, tile {self.tile}"
            + (", column rows rotating over the devices" if self.rotate else "")
            + (f", bands of {self.band} row tiles" if self.band > 1 else "")
            + (f", {self.logit_chunk} logit{'s' * (self.logit_chunk > 1)} at a time"
               if chunked else "")
            + (f", {len(factored)} layer{'s' * (len(factored) > 1)} factored "
               f"({sum(layer.num_params for layer in factored):,} parameters)" if factored else ""))

  @property
  def factored_layers(self) -> tuple[FactoredLayer, ...]:
    """The layers whose Jacobian rows the tiles form as factors (none with NTK-vector products)."""
    return self.cost.factored(self.logits) if self.method == "jacobian" else ()

  @property
  def factoring(self) -> str:
    """factored_layers.choose's mode for the Jacobian rows ("none" with NTK-vector products)."""
    return self.cost.factoring if self.method == "jacobian" else "none"

  def describe(self) -> str:
    tiles = len(self.tiles())
    shape = f"{self.num_rows} x {self.num_cols}" + "".join(f" x {c}" for c in self.logits.tile_suffix)
    return (f"kernel {shape} ({self.logits.describe()}{', symmetric' if self.symmetric else ''}), "
            f"{self.cost.num_params:,} parameters; {self.layout()}: "
            f"{tiles} tiles on {self.num_devices} device(s); "
            f"memory per device {_gib(self.bytes_per_device)}"
            f"{' (compiled)' if self.memory_compiled else ' (estimated)'} of a "
            f"{_gib(self.budget_bytes)} budget; "
            f"{self.flops:.3g} FLOP" + (f", {self.device_flops:.3g} per device in lockstep steps"
                                         if self.num_devices > 1 else "")
            + (f", {_gib(self.transfer_bytes)} sent by each" if self.rotate else ""))


def _gib(num_bytes: float) -> str:
  return f"{num_bytes / 2**30:.3g} GiB"


def device_budget_bytes(device: jax.Device) -> float:
  """A fraction of the device's memory limit; for devices that report none (CPU), a fraction of
  host memory divided among the host's devices. With several processes, the smallest of theirs:
  every process must make the same plan (the same programs, the same collectives), and hosts may
  differ in memory. So every process calls this at the same point of a job."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  limit = (stats or {}).get("bytes_limit")
  if limit:
    budget = DEVICE_MEMORY_FRACTION * limit
  else:
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = HOST_MEMORY_FRACTION * host / jax.local_device_count()
  if jax.process_count() > 1:
    budget = float(np.min(parallel.gather_from_processes(np.float64(budget))))
  return budget


def bytes_per_device(method: str, tile: int, spec: LogitSpec, cost: ModelCost,
                     column_blocks: bool = True, band: int = 1, logit_chunk: int | None = None,
                     rotate: bool = False) -> float:
  """Peak bytes per device with bands of `band` row tiles; `column_blocks` False for a symmetric
  kernel in one band, whose Jacobian rows are formed once and contracted with themselves, and
  formed `logit_chunk` logits at a time when given; `rotate` for resident rows and column rows
  that travel (the rows sent and those received are both alive during a rotation)."""
  rows = logit_chunk or spec.rows_per_example
  entry = math.prod(spec.tile_suffix) if spec.tile_suffix else 1
  height = band * tile
  out_tile = 2 * height * height * entry * cost.itemsize  # this step's tiles and the previous one's
  params = cost.num_params * cost.itemsize
  if method == "jacobian":
    # A band's rows with one group's per-array gradients before they are raveled (its row step);
    # the resident band and a column block's rows (XLA frees each parameter group's rows once
    # contracted, but may not) with one group's per-array gradients (a column step).
    g = cost.largest_group / cost.num_params
    if rotate:
      blocks = tile * (3 + g)
    else:
      blocks = height + tile * max(band * g, 1 + g) if column_blocks else height * (1 + g)
    jacobians = blocks * cost.row_numbers(spec, rows) * cost.itemsize
    workspace = height * (1 + rows) * cost.activation_bytes  # vmapped reverse passes
    pairs = height * (tile if column_blocks or rotate else height)
    factored = pairs * cost.pair_workspace(spec) * cost.itemsize  # a factored layer's Grams
    return params + jacobians + workspace + out_tile + factored
  workspace = tile * 2 * rows * cost.activation_bytes  # primal and C' tangents over the rows
  return params + rows * params + workspace + out_tile  # one column example's Jacobian rows


def symmetric_pieces(tile: int) -> int:
  """Diagonal tiles are split into pieces x pieces blocks of which only those on and above the
  diagonal are multiplied; pieces of at least 128 rows keep each matmul efficient."""
  for pieces in (8, 4, 2):
    if tile % pieces == 0 and tile // pieces >= 128:
      return pieces
  return 1


def rows_flops(spec: LogitSpec, cost: ModelCost, logit_chunk: int | None = None) -> float:
  """FLOPs of one example's Jacobian rows: a forward pass and two per logit, per chunk of logits;
  a factored layer's reverse pass forms no weight gradient (one of its two per logit)."""
  rows = spec.rows_per_example
  chunk = logit_chunk or rows
  unformed = sum(layer.forward_flops for layer in cost.factored(spec))
  return rows // chunk * (cost.forward_flops * (1 + 2 * chunk) - chunk * unformed)


def _contraction_flops(tile: int, spec: LogitSpec, cost: ModelCost) -> float:
  """FLOPs of one T x T tile contracted from Jacobian rows."""
  return 2 * tile * tile * cost.pair_macs(spec)


def _flops(method: str, tile: int, band: int, num_rows: int, num_cols: int, symmetric: bool,
           spec: LogitSpec, cost: ModelCost, logit_chunk: int | None = None) -> float:
  jacobian_per_example = rows_flops(spec, cost, logit_chunk)
  row_blocks, col_blocks = -(-num_rows // tile), -(-num_cols // tile)
  if method == "ntvp":
    num_tiles = row_blocks * (row_blocks + 1) // 2 if symmetric else row_blocks * col_blocks
    return num_tiles * (tile * jacobian_per_example
                        + 3 * cost.forward_flops * tile * tile * spec.rows_per_example)
  contraction = _contraction_flops(tile, spec, cost)
  bands = -(-row_blocks // band)
  if symmetric:  # each band's diagonal block, then the column blocks after it
    pieces = symmetric_pieces(band * tile)
    columns = sum(max(0, col_blocks - (b + 1) * band) for b in range(bands))
    tiles = bands * band * band * (pieces + 1) / (2 * pieces) + band * columns
  else:
    columns = bands * col_blocks
    tiles = band * columns
  return tiles * contraction + (bands * band + columns) * tile * jacobian_per_example


def _device_flops(method: str, tile: int, band: int, num_rows: int, num_cols: int, symmetric: bool,
                  spec: LogitSpec, cost: ModelCost, logit_chunk: int | None,
                  num_devices: int) -> float:
  """FLOPs on each device through the schedule's lockstep steps (schedule.py): a device with no
  tile left in a step computes one anyway, so the longest task of each round sets its time. Every
  row step of a symmetric kernel is charged its diagonal block (a round of continued runs alone
  has none: an upper bound)."""
  if num_devices == 1:
    return _flops(method, tile, band, num_rows, num_cols, symmetric, spec, cost, logit_chunk)
  row_blocks, col_blocks = -(-num_rows // tile), -(-num_cols // tile)
  if method == "ntvp":
    num_tiles = row_blocks * (row_blocks + 1) // 2 if symmetric else row_blocks * col_blocks
    one = _flops(method, tile, 1, tile, tile, False, spec, cost)
    return -(-num_tiles // num_devices) * one
  bands = -(-row_blocks // band)
  if symmetric:
    columns = [max(0, col_blocks - (b + 1) * band) for b in range(bands)]
  else:
    columns = [col_blocks] * bands
  row_step, column_step = _step_flops(tile, band, symmetric, spec, cost, logit_chunk)
  rounds = round_lengths(columns, num_devices, row_step / column_step)
  return len(rounds) * row_step + sum(rounds) * column_step


def _step_flops(tile: int, band: int, symmetric: bool, spec: LogitSpec, cost: ModelCost,
                logit_chunk: int | None) -> tuple[float, float]:
  """FLOPs of one device's row step (its band's rows and, for a symmetric kernel, the band's
  diagonal block) and of one column step (a column block's rows, a tile per row tile of the band),
  every logit chunk's together."""
  rows, contraction = rows_flops(spec, cost, logit_chunk), _contraction_flops(tile, spec, cost)
  row_step = band * tile * rows
  if symmetric:
    pieces = symmetric_pieces(band * tile)
    row_step += band * band * (pieces + 1) / (2 * pieces) * contraction
  return row_step, tile * rows + band * contraction


def _ring_flops(tile: int, num_devices: int, symmetric: bool, spec: LogitSpec, cost: ModelCost,
                logit_chunk: int | None = None) -> float:
  """Every block's rows formed once; a symmetric kernel contracts each device's diagonal tile and
  D // 2 rotations of D tiles, a cross kernel D rotations (the first without moving)."""
  pieces = symmetric_pieces(tile)
  tiles = (num_devices * ((pieces + 1) / (2 * pieces) + num_devices // 2) if symmetric
           else num_devices * num_devices)
  blocks = num_devices * (1 if symmetric else 2)
  return (tiles * _contraction_flops(tile, spec, cost)
          + blocks * tile * rows_flops(spec, cost, logit_chunk))


def _ring_transfer_bytes(tile: int, num_devices: int, symmetric: bool, spec: LogitSpec,
                        cost: ModelCost, logit_chunk: int) -> float:
  """Bytes each device sends with rotation: its block's rows (of a chunk of logits) once per
  rotation, D // 2 rotations for a symmetric kernel, D - 1 for a cross kernel, per chunk."""
  rotations = num_devices // 2 if symmetric else num_devices - 1
  chunks = spec.rows_per_example // logit_chunk
  return chunks * rotations * tile * cost.row_numbers(spec, logit_chunk) * cost.itemsize


def _largest_tile(method: str, cap: int, budget: float, spec: LogitSpec, cost: ModelCost,
                  band: int, logit_chunk: int | None = None) -> int:
  """The largest tile <= cap whose memory fits `budget` (0 when not even a tile of 1 fits)."""
  lo, hi = 0, cap
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if bytes_per_device(method, mid, spec, cost, band=band, logit_chunk=logit_chunk) <= budget:
      lo = mid
    else:
      hi = mid - 1
  return lo


def _balanced_tiles(tile: int, band: int, num_rows: int, num_cols: int) -> tuple[int, ...]:
  """Tiles no larger than `tile` that cut the rows into as many bands (the columns into as many
  blocks) with the least padding: the largest tile that fits may leave a last band mostly padding,
  which the engine computes all the same."""
  bands, blocks = -(-num_rows // (band * tile)), -(-num_cols // tile)
  return -(-num_rows // (band * bands)), -(-num_cols // blocks)


def logit_chunks(spec: LogitSpec) -> tuple[int, ...]:
  """The logits a trace kernel may form at a time, all first: the divisors of C (the partial
  kernels of equal chunks compile to one program). Other kernels form all their rows at once."""
  if spec.kind != "trace":
    return (spec.rows_per_example,)
  return tuple(c for c in range(spec.num_classes, 0, -1) if spec.num_classes % c == 0)


def setting_names(fields: dict[str, str] | None = None) -> dict[str, str]:
  """The names of the planner's settings as the caller's user knows them (`fields` overrides),
  for errors that say what to change."""
  return {"method": "method", "tile_size": "tile_size", "band": "band", "logit_chunk": "logit_chunk",
          "rotate": "rotate", "memory_budget": "memory_budget_bytes",
          "factored_layers": "factored_layers", **(fields or {})}


def check_settings(spec: LogitSpec, *, method: str = "auto", tile: int | None = None,
                   band: int | None = None, logit_chunk: int | None = None,
                   fields: dict[str, str] | None = None) -> None:
  """KernelPlanError naming a setting that no machine could plan with (a logit chunk of a class
  kernel, say): checked for a complete kernel too, which is read back without a plan."""
  names = setting_names(fields)
  if method not in METHODS:
    raise KernelPlanError(f"{names['method']}={method!r} is not a kernel method; expected one of "
                          f"{', '.join(METHODS)}.")
  for name, value in (("tile_size", tile), ("band", band), ("logit_chunk", logit_chunk)):
    if value is not None and not is_whole_number(value, 1):
      raise KernelPlanError(f"{names[name]}={value!r} must be a positive integer (or unset to "
                            "follow the memory budget).")
  if band is not None and band > 1 and method == "ntvp":
    raise KernelPlanError(f"{names['band']}={band} needs method 'jacobian' (NTK-vector products "
                          "keep no rows resident).")
  if logit_chunk is not None and (spec.kind != "trace" or spec.num_classes % logit_chunk
                                  or method == "ntvp"):
    raise KernelPlanError(
        f"{names['logit_chunk']}={logit_chunk} needs a trace kernel by the Jacobian method and a "
        f"divisor of the {spec.num_classes} logits.")


def make_plan(cost: ModelCost, num_rows: int, num_cols: int, symmetric: bool, spec: LogitSpec, *,
              num_devices: int, method: str = "auto", tile: int | None = None,
              band: int | None = None, logit_chunk: int | None = None,
              rotate: bool | None = None, budget_bytes: float | None = None,
              flops_per_transfer_byte: float = 0.0, factored_layers: str = "auto",
              fields: dict[str, str] | None = None) -> KernelPlan:
  """The plan for a kernel, or KernelPlanError naming the setting (`fields` maps "method",
  "tile_size", "band", "logit_chunk", "rotate" and "memory_budget" to the names the caller's user
  knows) that must change.

  Unset, the tile, band and logit chunk come from the budget: the fewest FLOPs per device
  through the lockstep steps (Jacobian rows recomputed and idle devices' dropped tiles included)
  among bands of BAND_HEIGHTS row tiles, each with the largest tile that fits or, cutting the
  kernel into as many bands or blocks, the least padding (a band taller than one tile only with
  tiles of at least MIN_BANDED_TILE rows); for a trace kernel also with its Jacobian rows formed
  L logits at a time (`logit_chunk`, a divisor of C):
  every round of the schedule runs C / L times for one more forward pass per chunk, in L / C of
  the memory, so a band is taller (or the kernel one tile) where all logits at once recompute
  most rows. On several devices, also one block per device with the column rows rotating over
  the devices (`rotate` True: only that; False: never), its transfers counted as
  `flops_per_transfer_byte` FLOPs per byte sent (the rate at which a device forms Jacobian rows
  over its link's bandwidth, engine.fit_plan measures both; 0: transfers free).
  """
  names = setting_names(fields)
  check_settings(spec, method=method, tile=tile, band=band, logit_chunk=logit_chunk, fields=fields)
  if factored_layers not in FACTORING_MODES:
    raise KernelPlanError(f"{names['factored_layers']}={factored_layers!r} is not a factoring "
                          f"mode; expected one of {', '.join(FACTORING_MODES)}.")
  cost = dataclasses.replace(cost, factoring=factored_layers)
  ring_tile = -(-max(num_rows, num_cols) // num_devices)
  if rotate and (method == "ntvp" or band or tile not in (None, ring_tile)):
    raise KernelPlanError(
        f"{names['rotate']}=True needs the Jacobian method with one block of {ring_tile} examples per "
        f"device: leave {names['band']} unset and {names['tile_size']} unset or {ring_tile}.")
  budget = float(budget_bytes) if budget_bytes else device_budget_bytes(jax.local_devices()[0])
  chunks = (logit_chunk,) if logit_chunk else logit_chunks(spec)

  def candidate(m: str, size: int, b: int, chunk: int, memory: float, flops: float,
                per_device: float, rotates: bool = False, sent: float = 0.0) -> KernelPlan:
    return KernelPlan(num_rows=num_rows, num_cols=num_cols, symmetric=symmetric, logits=spec,
                      method=m, tile=size, num_devices=num_devices, band=b, logit_chunk=chunk,
                      rotate=rotates, bytes_per_device=memory, budget_bytes=budget, flops=flops,
                      device_flops=per_device, cost=cost, transfer_bytes=sent)

  def rank(plan: KernelPlan) -> tuple:
    """The least wins: time per device in FLOPs, transfers included, then the simpler layout."""
    return (plan.device_flops + flops_per_transfer_byte * plan.transfer_bytes, plan.band,
            -plan.logit_chunk, plan.rotate, plan.method, plan.tile)

  ring = []
  for chunk in chunks:
    memory = bytes_per_device("jacobian", ring_tile, spec, cost, logit_chunk=chunk, rotate=True)
    if memory <= budget:
      flops = _ring_flops(ring_tile, num_devices, symmetric, spec, cost, chunk)
      sent = _ring_transfer_bytes(ring_tile, num_devices, symmetric, spec, cost, chunk)
      ring.append(candidate("jacobian", ring_tile, 1, chunk, memory, flops, flops / num_devices,
                            rotates=True, sent=sent))
  if rotate and not ring:
    least = bytes_per_device("jacobian", ring_tile, spec, cost, logit_chunk=chunks[-1], rotate=True)
    raise KernelPlanError(
        f"{names['rotate']}=True does not fit: a block of {ring_tile} examples per device needs "
        f"{_gib(least)} but {names['memory_budget']} allows {_gib(budget)}; raise "
        f"{names['memory_budget']}, use more devices, or unset {names['rotate']}.")
  # Enough bands that every device gets a tile, and no bigger than the kernel.
  blocks = 1
  while (blocks * (blocks + 1) // 2 if symmetric else blocks * blocks) < num_devices:
    blocks += 1
  cap = max(1, -(-max(num_rows, num_cols) // blocks))  # rows of a band

  one_band = lambda size, b: symmetric and size * b >= num_rows  # no column blocks
  peak = lambda m, size, b, chunk: bytes_per_device(m, size, spec, cost, not one_band(size, b), b,
                                                    chunk)
  # Bands of row tiles and logit chunks are the Jacobian method's: asked for, "auto" means it.
  banded = band is not None and band > 1
  methods = ("jacobian", "ntvp") if method == "auto" and not logit_chunk and not banded else (
      "jacobian" if method == "auto" else method,)
  candidates = []
  for m in methods:
    for chunk in chunks if m == "jacobian" else (spec.rows_per_example,):
      for b in (1,) if m == "ntvp" else (band,) if band else BAND_HEIGHTS:
        if tile:
          size = min(tile, max(num_rows, num_cols))
          if b > 1 and b * size > cap and not band:
            continue  # a band taller than the kernel (or than a device's share) gains nothing
        elif b == 1 and one_band(cap, 1) and peak(m, cap, 1, chunk) <= budget:
          size = cap
        else:
          size = _largest_tile(m, max(1, cap // b), budget, spec, cost, b, chunk)
          if b > 1 and size < MIN_BANDED_TILE and not band:
            continue
        if size == 0 or peak(m, size, b, chunk) > budget:
          continue
        sizes = {size} if tile else {size, *_balanced_tiles(size, b, num_rows, num_cols)}
        for size in sizes:
          if b == 1 or size >= MIN_BANDED_TILE or band:
            flops = _flops(m, size, b, num_rows, num_cols, symmetric, spec, cost, chunk)
            per_device = _device_flops(m, size, b, num_rows, num_cols, symmetric, spec, cost, chunk,
                                       num_devices)
            candidates.append(candidate(m, size, b, chunk, peak(m, size, b, chunk), flops,
                                        per_device))
  if rotate:
    candidates = ring
  elif (rotate is None and num_devices > 1 and method != "ntvp" and not band
        and tile in (None, ring_tile)):
    candidates += ring
  if not candidates:
    smallest = min(bytes_per_device(m, tile or 1, spec, cost, band=band or 1,
                                    logit_chunk=chunks[-1] if m == "jacobian" else None)
                   for m in methods)
    hint = (f"lower {names['tile_size']}, " if tile else "") + (
        f"lower {names['band']}, " if band and band > 1 else "") + (
        f"lower {names['logit_chunk']}, " if logit_chunk and logit_chunk > 1 else "") + (
        f"set {names['method']}='ntvp' (no Jacobian block is stored), " if method == "jacobian" else "")
    setting = (f", band {band}" if band else "") + (
        f", {chunks[-1]} logit{'s' * (chunks[-1] > 1)} at a time"
        if chunks[-1] < spec.rows_per_example else "")
    raise KernelPlanError(
        f"the kernel does not fit: method {method} needs {_gib(smallest)} per device at tile "
        f"{tile or 1}{setting} but {names['memory_budget']} allows {_gib(budget)}; {hint}raise "
        f"{names['memory_budget']}, or use devices with more memory.")
  return min(candidates, key=rank)
