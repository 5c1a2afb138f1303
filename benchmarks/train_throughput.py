"""Training throughput of the project's real jitted train step, against a matmul peer.

For each model (the small CNN at width 32 and ResNet-18 at width 64, both with BatchNorm, on 32x32x3
inputs with 10 classes) this builds the train state, optimizer (SGD with momentum from
`base_config()`), mesh and sharded batch through the `ntk_scale` API, compiles
`ntk_scale.train.steps.make_train_step` once, and times it on random data on every device jax sees.
It reports the median step time, images/s, the FLOPs per step that XLA counts in the lowered step
(the whole step, all devices; ntk_scale.cost_analysis), the achieved FLOP rate, and that rate as a
fraction of a peer measured in the same run: a jitted square matmul (2048 on CPU, 8192 on GPU) on
one device, timed the same way and scaled by the device count, which is the practical dense FLOP
ceiling of this machine; float32 for the float32 steps, bfloat16 for the bfloat16 ones (whose peak
on a GPU is about twice TF32's). Each row is printed as soon as it is measured (a stopped run keeps
them), then the table. On CPU a model stops timing early once its timed steps pass --max_seconds
(45 s; at least 3 steps) so that the default run takes about 3 minutes.

Run from the repository root:

    .venv/bin/python benchmarks/train_throughput.py
    .venv/bin/python benchmarks/train_throughput.py --models cnn --steps 20 --batch_size 256
    .venv/bin/python benchmarks/train_throughput.py --linearizations linear centered  # phase-2 cost
    .venv/bin/python benchmarks/train_throughput.py --compute_dtypes bfloat16  # config.train.compute_dtype
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ntk_scale.models  # noqa: E402
import ntk_scale.parallel
import ntk_scale.train.optimizer
import ntk_scale.train.state
import ntk_scale.train.steps
from ntk_scale.base_config import base_config
from ntk_scale.cost_analysis import program_flops
from ntk_scale.linearize import LINEARIZATIONS, LinearizedModel

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
MODELS = {"cnn": 32, "resnet18": 64}  # name -> width; both with batch_norm=True
PEER_SIZE = {"cpu": 2048}  # any other backend: 8192
DEFAULT_STEPS = {"cpu": 10}  # any other backend: 50
MAX_SECONDS = {"cpu": 45.0}  # timed seconds per model before stopping early; elsewhere no limit


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  parameters: int | None
  batch: int | None
  devices: int
  step_seconds: float
  timed_steps: int
  flops: float
  dtype: str = "float32"  # of the matmuls: which peer it is compared with


@dataclasses.dataclass(frozen=True)
class Timing:
  """How many calls to time at most, and when to stop early (after at least `min_steps`)."""
  warmup: int
  steps: int
  max_seconds: float
  min_steps: int = 3


def median_seconds(run_once: Callable[[], Any], timing: Timing) -> tuple[float, int]:
  """Median wall time of the timed calls of `run_once` (each blocked until its outputs are
  ready) and how many were timed: `timing.steps`, or fewer once `timing.max_seconds` is spent."""
  for _ in range(timing.warmup):
    jax.block_until_ready(run_once())
  times: list[float] = []
  while len(times) < timing.steps and (len(times) < timing.min_steps or sum(times) < timing.max_seconds):
    start = time.perf_counter()
    jax.block_until_ready(run_once())
    times.append(time.perf_counter() - start)
  return statistics.median(times), len(times)


def model_config(name: str):
  config = base_config()
  config.model.name = name
  config.model.width = MODELS[name]
  config.model.batch_norm = True
  return config


def build_state_and_batch(name: str, batch_size: int, linearization: str | None = None,
                          ) -> tuple[ntk_scale.train.state.TrainState, dict[str, jax.Array]]:
  """The replicated train state of model `name` (or of its phase-2 `linearization` around its
  initialisation, BatchNorm frozen) and a sharded random batch of `batch_size`."""
  config = model_config(name)
  model = ntk_scale.models.build_model(config.model, num_classes=NUM_CLASSES)
  tx, _ = ntk_scale.train.optimizer.build_optimizer(config.optimizer, steps_per_epoch=100, total_steps=1000)
  mesh = ntk_scale.parallel.make_mesh()
  state = ntk_scale.train.state.create_train_state(model, tx, IMAGE_SHAPE, seed=0, mesh=mesh)
  if linearization:
    model = LinearizedModel(model, state.params, state.batch_stats, linearization, "frozen")
    state = ntk_scale.train.state.create_train_state(model, tx, IMAGE_SHAPE, seed=0, mesh=mesh)
  rng = np.random.default_rng(0)
  arrays = {"images": rng.random((batch_size, *IMAGE_SHAPE), dtype=np.float32),
            "labels": rng.integers(0, NUM_CLASSES, batch_size, dtype=np.int32)}
  return state, ntk_scale.parallel.global_batch(mesh, arrays, np.arange(batch_size))


def measure_model(name: str, batch_size: int, timing: Timing, linearization: str | None = None,
                  compute_dtype: str = "float32") -> Row:
  """Compiles the train step once and times that executable; it donates the state, so rebind it.
  A `compute_dtype` other than float32 is phase 1's config.train.compute_dtype."""
  state, batch = build_state_and_batch(name, batch_size, linearization)
  parameters = ntk_scale.train.state.count_parameters(state.params)
  compute_apply_fn = None
  if compute_dtype != "float32":
    model = ntk_scale.models.build_model(model_config(name).model, NUM_CLASSES)
    compute_apply_fn = model.clone(dtype=jnp.dtype(compute_dtype)).apply
  step = ntk_scale.train.steps.make_train_step("none", seed=0, compute_apply_fn=compute_apply_fn)
  flops = program_flops(step, state, batch).flops
  compiled = step.lower(state, batch).compile()

  def run_once() -> Any:
    nonlocal state
    state, metrics = compiled(state, batch)
    return metrics

  seconds, timed = median_seconds(run_once, timing)
  # The whole step, before it is split over the devices (ntk_scale.cost_analysis).
  devices = jax.device_count()
  label = f"{name} [{linearization or compute_dtype}]" if linearization or compute_dtype != "float32" else name
  return Row(label, parameters, batch_size, devices, seconds, timed, flops, compute_dtype)


def measure_peer(size: int, timing: Timing, dtype: str = "float32") -> Row:
  """A jitted `size` x `size` matmul in `dtype` on the first device, timed like the train step."""
  a, b = jax.device_put(jax.random.normal(jax.random.key(0), (2, size, size), jnp.dtype(dtype)))
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  seconds, timed = median_seconds(lambda: compiled(a, b), timing)
  short = {"float32": "f32", "bfloat16": "bf16"}[dtype]
  return Row(f"peer: matmul {size}x{size} {short}", None, None, 1, seconds, timed,
             2.0 * size**3, dtype)


def peer_fraction(row: Row, peers: dict[str, Row]) -> float:
  """The row's FLOP rate over its dtype's peer rate times its devices."""
  peer = peers[row.dtype]
  return row.flops / row.step_seconds / (peer.flops / peer.step_seconds * row.devices)


def format_table(rows: list[Row], peers: dict[str, Row]) -> str:
  header = ("model", "parameters", "batch", "devices", "steps", "step ms", "images/s", "GFLOP/step",
            "GFLOP/s", "frac of peer")
  lines = [header]
  for row in rows:
    rate = row.flops / row.step_seconds
    images = f"{row.batch / row.step_seconds:,.0f}" if row.batch else "-"
    lines.append((row.name, f"{row.parameters:,}" if row.parameters else "-", str(row.batch or "-"),
                  str(row.devices), str(row.timed_steps), f"{row.step_seconds * 1e3:.1f}", images,
                  f"{row.flops / 1e9:.2f}", f"{rate / 1e9:.1f}", f"{peer_fraction(row, peers):.3f}"))
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  fmt = lambda line: "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths)))
  return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]])


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
  parser.add_argument("--batch_size", type=int, default=128, help="global batch over all devices")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps per model at most (default: 10 on CPU, 50 elsewhere)")
  parser.add_argument("--max_seconds", type=float, default=None,
                      help="stop timing a model once its timed steps add up to this, after at least 3 "
                           "(default: 45 on CPU, unlimited elsewhere)")
  parser.add_argument("--linearizations", nargs="*", default=[], choices=LINEARIZATIONS,
                      help="also time phase 2's train step on these linearized forms of each model")
  parser.add_argument("--compute_dtypes", nargs="*", default=[], choices=("bfloat16",),
                      help="also time phase 1's train step computing in these dtypes "
                           "(config.train.compute_dtype)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  parser.add_argument("--peer_size", type=int, default=None,
                      help="side of the peer matmul (default: 2048 on CPU, 8192 elsewhere)")
  return parser.parse_args()


def main() -> None:
  args = parse_args()
  backend = jax.default_backend()
  timing = Timing(warmup=args.warmup, steps=args.steps or DEFAULT_STEPS.get(backend, 50),
                  max_seconds=args.max_seconds or MAX_SECONDS.get(backend, float("inf")))
  try:
    ntk_scale.parallel.check_batch_size(args.batch_size, jax.device_count(), "--batch_size")
  except ValueError as error:
    raise SystemExit(f"error: {error}") from None
  print(f"jax {jax.__version__}, backend {backend}, {jax.device_count()} x {jax.devices()[0].device_kind}")
  size = args.peer_size or PEER_SIZE.get(backend, 8192)
  peers = {dtype: measure_peer(size, timing, dtype) for dtype in ("float32", *args.compute_dtypes)}
  for peer in peers.values():
    print(f"measured {peer.name}: {peer.flops / peer.step_seconds / 1e9:.1f} GFLOP/s", flush=True)
  rows, overheads = [], []

  def measured(row: Row) -> Row:
    rows.append(row)
    print(f"measured {row.name}: {row.step_seconds * 1e3:.1f} ms/step, "
          f"{row.batch / row.step_seconds:,.0f} images/s, {peer_fraction(row, peers):.3f} of the "
          f"{row.dtype} peer", flush=True)
    return row

  for name in args.models:
    standard = measured(measure_model(name, args.batch_size, timing))
    variants = [(kind, "float32") for kind in args.linearizations]
    variants += [(None, dtype) for dtype in args.compute_dtypes]
    for kind, dtype in variants:
      row = measured(measure_model(name, args.batch_size, timing, kind, dtype))
      overheads.append(f"{row.name}: {row.step_seconds / standard.step_seconds:.2f}x "
                       f"the standard (float32) step's time")
  print(format_table(rows + list(peers.values()), peers))
  for line in overheads:
    print(line)
  print(f"step ms: median of the timed steps (column 'steps'), after compilation and {timing.warmup} "
        "warm-up step(s).\nGFLOP/step: XLA cost analysis of the lowered step (all devices); "
        "frac of peer: GFLOP/s over (GFLOP/s of the peer of the step's dtype x devices).")


if __name__ == "__main__":
  main()
