"""Which device computes which tiles at which step: the lockstep schedule of the tile loop.

All devices run the same program at each step (one `shard_map` call), each on its own blocks, so
the schedule is a list of steps, each giving every device its input block and the tiles it hands
over, placed in its output.

Jacobian method: rows are held in bands of `band` consecutive row tiles. A step is either a "row"
step (every device forms the Jacobian rows of one band, kept resident, and for a symmetric kernel
the band's tiles on and above the diagonal), a "diagonal" step (the same tiles when no device has
a column left for its band, so nothing is kept resident), or a "column" step (every device forms
the Jacobian rows of one column block outside its band's diagonal and contracts them with its
resident rows: one tile per row tile of the band). A task is one band and a run of up to S of its
column blocks; tasks are packed D at a time into rounds (a row step and as many column steps as the
longest task). S is chosen to minimise the work of the steps, a row step weighing its FLOPs in
column steps (about b of them for bands of b): long runs form each band's Jacobian once, short
runs keep every device busy. A band of b tiles forms a column block's Jacobian once for
b tiles, so a taller band recomputes fewer columns.
Rotation (every device's band fits at once): a "form" step in which device d forms the Jacobian
rows of row block d (and of column block d for a cross kernel), then "rotate" steps in which the
column rows move one device along the ring (lax.ppermute), so every row is formed exactly once and
travels instead of being recomputed.
Logit chunks (a trace kernel, whose Jacobian rows are formed L of its C logits at a time): every
round (a row or form step and the column or rotate steps that use its rows) runs once per chunk
and each tile is the sum of its C / L partial tiles, handed over with the last chunk; a diagonal
step forms its chunks itself (tile_math.symmetric_tile_by_logit_chunks).
NTK-vector products: every step is a "tile" step, tiles dealt out in row-major order.
"""

import collections
import dataclasses

Tile = tuple[int, int]
# A tile, its (row, column) tile offset in the device's output, and whether the output holds its
# mirror image (the tile at (j, i) of a symmetric kernel).
Placed = tuple[Tile, tuple[int, int], bool]


@dataclasses.dataclass(frozen=True)
class Step:
  kind: str  # "row" | "diagonal" | "column" | "form" | "rotate" | "tile"
  blocks: tuple[int | Tile, ...]  # per device: the band (row, diagonal), column block, or tile it reads
  tiles: tuple[tuple[Placed, ...], ...]  # per device: the tiles it hands over; empty when unused
  chunk: int | None = None  # the logit chunk whose partial tiles it forms; None: all logits


@dataclasses.dataclass(frozen=True)
class _Task:
  band: int
  diagonal: tuple[Placed, ...]  # the band's own tiles (symmetric kernels), from its row step
  columns: tuple[tuple[int, tuple[Placed, ...]], ...]  # (column block, its tiles) in order


def _tasks(todo: list[Tile], symmetric: bool, band: int, run_length: int) -> list[_Task]:
  diagonal: dict[int, list[Placed]] = collections.defaultdict(list)
  columns: dict[int, dict[int, list[Placed]]] = collections.defaultdict(lambda: collections.defaultdict(list))
  for i, j in sorted(todo):
    b, r = divmod(i, band)
    if symmetric and j < (b + 1) * band:  # i <= j: inside the band's diagonal block
      diagonal[b].append(((i, j), (r, j - b * band), False))
    else:
      columns[b][j].append(((i, j), (r, 0), False))
  tasks = []
  for b in sorted(set(diagonal) | set(columns)):
    runs = sorted((j, tuple(placed)) for j, placed in columns[b].items())
    runs = [tuple(runs[k:k + run_length]) for k in range(0, len(runs), run_length)] or [()]
    tasks += [_Task(b, tuple(diagonal[b]) if k == 0 else (), run) for k, run in enumerate(runs)]
  return sorted(tasks, key=lambda t: -len(t.columns))


def _rounds(tasks: list[_Task], num_devices: int) -> list[list[_Task]]:
  return [tasks[k:k + num_devices] for k in range(0, len(tasks), num_devices)]


def _longest_tasks(run_length: int, columns_per_band: list[int], num_devices: int) -> list[int]:
  """The column steps of each round with runs of `run_length`, from the run lengths alone: tasks
  sorted longest first, D to a round, a round as long as its first."""
  lengths = []
  for count in columns_per_band:
    full, rest = divmod(count, run_length)
    lengths += [run_length] * full + ([rest] if rest or not full else [])
  lengths.sort(reverse=True)
  return lengths[::num_devices]


def _run_length(columns_per_band: list[int], num_devices: int, row_step_weight: float) -> int:
  """The run length of the least work (a row step per round, weighing `row_step_weight` column
  steps, and the round's column steps), then the most rounds (shorter runs for the same work).
  A band of b row tiles forms b blocks' rows in its row step and one in a column step: counted as
  one step each, runs of 3 were chosen, doing 1.7x the work of runs of 8 (bands of 8, 4 devices)."""
  def cost(run_length: int) -> tuple[float, int]:
    rounds = _longest_tasks(run_length, columns_per_band, num_devices)
    return row_step_weight * len(rounds) + sum(rounds), -len(rounds)
  return min(range(1, max(1, *columns_per_band) + 1), key=cost)


def round_lengths(columns_per_band: list[int], num_devices: int,
                  row_step_weight: float = 1.0) -> list[int]:
  """The column steps of each round of `jacobian_schedule` for bands with these numbers of column
  blocks (the cost model's view of the schedule, without building it)."""
  return _longest_tasks(_run_length(columns_per_band, num_devices, row_step_weight), columns_per_band,
                        num_devices)


def jacobian_schedule(todo: list[Tile], symmetric: bool, num_devices: int, band: int = 1,
                      row_step_weight: float = 1.0) -> list[Step]:
  """Steps covering `todo` with bands of `band` row tiles: every tile handed over exactly once;
  `row_step_weight`: a row step's work in column steps (KernelPlan.row_step_weight)."""
  if not todo:
    return []
  columns = {(i // band, j) for i, j in todo if not (symmetric and j < (i // band + 1) * band)}
  per_band = collections.Counter(b for b, _ in columns)
  counts = [per_band[b] for b in sorted({i // band for i, _ in todo})]
  rounds = _rounds(_tasks(todo, symmetric, band, _run_length(counts, num_devices, row_step_weight)),
                  num_devices)
  steps = []
  for tasks in rounds:
    length = max(len(t.columns) for t in tasks)
    tasks = tasks + [None] * (num_devices - len(tasks))
    bands = [t.band if t else tasks[0].band for t in tasks]
    steps.append(Step("row" if length else "diagonal", tuple(bands),
                      tuple(t.diagonal if t else () for t in tasks)))
    for k in range(length):
      blocks, tiles = [], []
      for b, t in zip(bands, tasks):
        if t and k < len(t.columns):
          j, placed = t.columns[k]
          blocks.append(j)
          tiles.append(placed)
        else:  # nothing left for this device: it contracts a block anyway and its output is dropped
          blocks.append(0)
          tiles.append(())
      steps.append(Step("column", tuple(blocks), tuple(tiles)))
  return steps


def tile_schedule(todo: list[Tile], num_devices: int) -> list[Step]:
  steps = []
  for k in range(0, len(todo), num_devices):
    chunk = list(todo[k:k + num_devices])
    steps.append(Step("tile", tuple(chunk + [chunk[0]] * (num_devices - len(chunk))),
                      tuple(((t, (0, 0), False),) for t in chunk) + ((),) * (num_devices - len(chunk))))
  return steps


def ring_schedule(todo: list[Tile], symmetric: bool, num_devices: int) -> list[Step]:
  """Device d keeps row block d; after s rotations it holds column block (d + s) mod D. A cross
  kernel needs D - 1 rotations; a symmetric one D // 2, as blocks d and e meet at distance e - d
  one way round the ring and D - (e - d) the other (at D / 2 both ways: handed over once)."""
  wanted, devices = set(todo), range(num_devices)
  if not wanted:
    return []

  def placed(d: int, e: int) -> tuple[Placed, ...]:
    tile, mirrored = ((e, d), True) if symmetric and d > e else ((d, e), False)
    return ((tile, (0, 0), mirrored),) if tile in wanted else ()

  steps = [Step("form", tuple(devices), tuple(placed(d, d) for d in devices))]
  for shift in range(1, num_devices // 2 + 1 if symmetric else num_devices):
    halfway = symmetric and 2 * shift == num_devices
    steps.append(Step("rotate", tuple((d + shift) % num_devices for d in devices),
                      tuple(() if halfway and d >= shift else placed(d, (d + shift) % num_devices)
                            for d in devices)))
  while not any(steps[-1].tiles):  # nothing left to hand over: no more rotations
    steps.pop()
    if not steps:
      break
  return steps


def in_logit_chunks(steps: list[Step], chunks: int) -> list[Step]:
  """The steps of a trace kernel formed a logit chunk at a time: each round repeated for chunks
  0 .. chunks - 1 (its tiles are partial sums until the last); diagonal steps once, all chunks."""
  if chunks == 1:
    return steps
  if any(s.kind == "tile" for s in steps):
    raise ValueError("NTK-vector products form no Jacobian rows to chunk.")
  rounds: list[list[Step]] = []
  for step in steps:
    if step.kind in ("row", "diagonal", "form") or not rounds:
      rounds.append([step])
    else:
      rounds[-1].append(step)
  chunked = []
  for round_steps in rounds:
    if round_steps[0].kind == "diagonal":
      chunked += round_steps
    else:
      chunked += [dataclasses.replace(s, chunk=k) for k in range(chunks) for s in round_steps]
  return chunked
