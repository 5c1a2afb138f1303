"""Empirical NTK: ntk_scale's engine against neural-tangents, on one model, subset and machine.

    python benchmarks/ntk_engine.py                      # CPU-sized defaults
    python benchmarks/ntk_engine.py --models cnn,resnet18 --sizes 256,1024   # the GPU table
    python benchmarks/ntk_engine.py --models cnn --sizes 1024 --logits 0 --loo_max 0 \
        --tile_size 128 --variants band=1,band=4  # tall bands against square tiles
    python benchmarks/ntk_engine.py --models cnn --sizes 1024 --logits trace --loo_max 0 \
        --memory_budget_gb 1 --variants band=1    # a trace in logit chunks against tiles
    python benchmarks/ntk_engine.py --models cnn --sizes 2048 --logits trace --loo_max 0 \
        --memory_budget_gb 0.4 --variants logit_chunk=10  # bands a logit at a time against all
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/ntk_engine.py --models cnn \
        --sizes 1024 --logits 0 --loo_max 0 --variants rotate=False   # rotation against tiles
    python benchmarks/ntk_engine.py --models mlp,resnet18 --sizes 256 --resnet_sizes 256 \
        --logits 0,trace --loo_max 0 --variants factored_layers=none  # factored layers against rows

Rows, each timed after compilation (best of --repeats) on the same inputs:
  ntk_scale      `ntk_scale.ntk.empirical_ntk`, default settings (symmetric tiles, plan from memory)
                 or the given --tile_size / --memory_budget_gb
  key=value      the same with that planner setting (--variants: band=1 square tiles, band=4,
                 rotate=False, logit_chunk=2, factored_layers=none, ...)
  loo2022        Loo et al.'s code (calculate_kernel.py): jitted nt.empirical_ntk_fn with
                 NTK_VECTOR_PRODUCTS and its defaults (vmap_axes=None) on 4-image blocks, one call per
                 pair of upper-triangle blocks, mirrored on the host; `loo2022*` where it ran only
                 the first --loo_calls calls (each the same program on the same shapes), its time
                 scaled to all of them and its error over the entries they made
  nt_best        nt.empirical_ntk_fn(JACOBIAN_CONTRACTION, vmap_axes=0), the whole kernel in one call
  nt_batchB      nt.batch of nt_best with the largest batch B that fits (when the one call does not):
                 the largest divisor of N (nt.batch needs one) whose compiled program XLA counts
                 within the device's budget, a smaller one if it still runs out of memory; batches
                 whose two Jacobians alone exceed the budget are passed over without compiling
                 them; warmed up on 2B images (4 calls of the same program), then timed on all
`seconds` is the best of --repeats calls after a warm-up one; `vs ours` is seconds / ours (above
1: slower than ours). GFLOP/s is the kernel's useful work by the engine's cost model (Jacobian
rows once and the symmetric contraction: ntk_scale's plan for its rows, the plan without factored
layers for neural-tangents' and Loo's) over the row's time, against this machine's float32 matmul
peak measured in the same run. A method that forms Jacobians again for every block pair or
contracts both triangles does more work than it is credited with: its rate is not its hardware's.
`err` is the largest difference to the ntk_scale kernel relative to its largest entry.
neural-tangents' "trace" averages over logits; its kernels are multiplied by C here so that all
rows compute the same sum.
With a device lent for minutes, `--deadline_s` starts no case after that many seconds (what has
finished is printed as it finishes) and `--compilation_cache DIR` keeps compiled programs for a
rerun: XLA:GPU takes up to a minute per ResNet-18 program. Where neural-tangents cannot be loaded
(not installed, or a JAX it was not adapted to), its rows are skipped with the reason and ours run.
Of ntk_scale's dependencies this script imports only jax and flax (no TensorFlow, tfds or clu): on a
GPU image that has those, `pip install --no-deps ml-collections neural-tangents==0.6.5 frozendict`
is all it needs (tried: a virtual environment of jax 0.10.2, flax, optax and their own
dependencies, plus those three).
"""

import argparse
import ast
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ntk_scale.base_config import base_config  # noqa: E402
from ntk_scale.cost_analysis import memory_per_device  # noqa: E402
from ntk_scale.device_rates import matmul_rate  # noqa: E402
from ntk_scale.models import build_model  # noqa: E402
from ntk_scale.nt_compat import NeuralTangentsUnavailableError, load_neural_tangents  # noqa: E402
from ntk_scale.ntk import empirical_ntk, fit_plan, plan_for  # noqa: E402
from ntk_scale.ntk.plan import device_budget_bytes  # noqa: E402

MODELS = {  # name -> (config.model fields, input shape)
    "cnn": (dict(name="cnn", width=8, batch_norm=False), (16, 16, 3)),  # ~18k parameters
    "resnet18": (dict(name="resnet18", width=64, batch_norm=True), (32, 32, 3)),  # 11.2M
    # Many parameters per FLOP of forward pass: the contraction dominates, as for ResNet-18 at
    # N >= 256, in a model small enough for a CPU.
    "mlp": (dict(name="mlp", width=1024, depth=2, batch_norm=False), (16, 16, 3)),  # 1.85M
}
NUM_CLASSES = 10
LOO_BLOCK = 4


def build(name: str, seed: int = 0):
  fields, shape = MODELS[name]
  c = base_config()
  for k, v in fields.items():
    setattr(c.model, k, v)
  model = build_model(c.model, NUM_CLASSES)
  variables = jax.jit(lambda: model.init(jax.random.key(seed), jnp.zeros((1, *shape)), train=False))()
  batch_stats = variables.get("batch_stats", {})
  apply_fn = lambda p, x: model.apply({"params": p, "batch_stats": batch_stats}, x, train=False)
  return apply_fn, variables["params"], shape


def _setting(value: str):
  """A --variants value: a Python literal (2, False, None), else the word itself (none)."""
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def best_time(fn, repeats: int, warmup=None) -> float:
  """The fastest of `repeats` calls after a first one that compiles and warms up (`warmup`, where
  a smaller call runs the same programs); with repeats 0, one call, compilation included."""
  if repeats == 0:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
  (warmup or fn)()  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def timed_with_plan(run, plan, repeats: int, show):
  """(seconds, plan) of our kernel. fit_plan compiles the engine's programs (its memory check),
  which the kernel then reuses: with `repeats` 0 (one call, compilation included, as for the
  peers) the plan is made after the timed call, so the compilation is timed; otherwise first.
  `show(plan, seconds)` prints the plan once it is made, with the seconds making it took: a run
  stopped by its time limit then tells whether it was planning (compiling) or computing."""
  def make():
    started = time.perf_counter()
    made = plan()
    show(made, time.perf_counter() - started)
    return made
  if repeats == 0:
    seconds = best_time(run, 0)
    return seconds, make()
  made = make()
  return best_time(run, repeats), made


def nt_functions(apply_fn, logits: str):
  """neural-tangents' view of the model for a logits mode: (function, trace_axes, scale)."""
  if logits == "trace":
    return apply_fn, (-1,), NUM_CLASSES
  index = int(logits)
  return (lambda p, x: apply_fn(p, x)[:, index:index + 1]), (-1,), 1


def loo2022(nt, f, trace_axes, params, x, max_calls: int | None = None):
  """One jitted NTK-vector-product call per pair of upper-triangle 4-image blocks, as Loo et al.'s
  calculate_kernel.py (nt's defaults otherwise: vmap_axes=None); with `max_calls`, only the first
  that many, the entries they do not make NaN. Returns (run, warm-up, calls run, calls in all)."""
  kernel_fn = jax.jit(nt.empirical_ntk_fn(f, trace_axes=trace_axes,
                                          implementation=nt.NtkImplementation.NTK_VECTOR_PRODUCTS))
  n = len(x)
  blocks = [x[i:i + LOO_BLOCK] for i in range(0, n, LOO_BLOCK)]
  pairs = [(i, j) for i in range(len(blocks)) for j in range(i, len(blocks))]
  calls = pairs[:max_calls] if max_calls else pairs

  def run():
    out = np.full((n, n), np.nan, np.float32)
    for i, j in calls:
      tile = np.asarray(kernel_fn(blocks[i], blocks[j], params))
      out[i * LOO_BLOCK:(i + 1) * LOO_BLOCK, j * LOO_BLOCK:(j + 1) * LOO_BLOCK] = tile
      out[j * LOO_BLOCK:(j + 1) * LOO_BLOCK, i * LOO_BLOCK:(i + 1) * LOO_BLOCK] = tile.T
    return out
  def warmup():  # every shape of block pair there is (the last block is short where 4 does not divide N)
    return [np.asarray(kernel_fn(blocks[i], blocks[j], params)) for i, j in {(0, 0), (0, -1), (-1, -1)}]

  return run, warmup, len(calls), len(pairs)


def at_precision(run, precision: str):
  """`run` with jax's default matmul precision set, so neural-tangents computes as ours does."""
  def wrapped():
    with jax.default_matmul_precision(precision):
      return run()
  return wrapped


def nt_kernel_fn(nt, f, trace_axes):
  return nt.empirical_ntk_fn(f, trace_axes=trace_axes, vmap_axes=0,
                             implementation=nt.NtkImplementation.JACOBIAN_CONTRACTION)


def nt_best(nt, f, trace_axes, params, x, batch_size: int | None, compiled=None):
  """(run, warm-up) of neural-tangents' best: the one call (`compiled`, the program the memory
  check compiled, where given) or nt.batch, warmed up on its first 2 batches (the same program)."""
  if batch_size is None:
    call = compiled or jax.jit(nt_kernel_fn(nt, f, trace_axes))
    run = lambda: np.asarray(call(x, None, params))
    return run, run
  batched = nt.batch(nt_kernel_fn(nt, f, trace_axes), batch_size=batch_size, store_on_device=False)
  return (lambda: np.asarray(batched(x, None, params)),
          lambda: np.asarray(batched(x[:2 * batch_size], None, params)))


def nt_batch_sizes(nt, f, trace_axes, params, x, largest: int | None = None
                   ) -> list[tuple[int, object]]:
  """(batch, compiled one call or None) for the divisors of N up to `largest` (nt.batch needs a
  divisor; N itself is the one call, compiled here once for the check and the run), largest
  first, from the largest whose program XLA counts within the device's budget (on a backend
  without a memory analysis, all of them). Checked before running: a CPU process that allocates
  past the host's memory is killed, not told RESOURCE_EXHAUSTED. Each candidate is a compile (a
  minute for ResNet-18 on a GPU): `largest` spares those known not to fit. No bound from the
  Jacobians' size will do: XLA fuses them into the contraction where it can (an MLP's traced
  kernel at N=256 fits a batch of 128 in 11.8 GiB, whose two Jacobians alone would be 19 GB)."""
  n, budget = len(x), device_budget_bytes(jax.local_devices()[0])
  jitted = jax.jit(nt_kernel_fn(nt, f, trace_axes))
  sizes = [b for b in range(min(n, largest or n), 0, -1) if n % b == 0]
  for index, b in enumerate(sizes):
    block = jax.ShapeDtypeStruct((b, *x.shape[1:]), x.dtype)
    compiled = jitted.lower(block, None if b == n else block, params).compile()
    needed = memory_per_device(compiled)
    if needed is None or needed <= budget:
      return [(b, compiled if b == n else None)] + [(s, None) for s in sizes[index + 1:]]
  return []


def is_out_of_memory(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="cnn,mlp,resnet18")
  parser.add_argument("--sizes", default="128,256", help="kernel sizes N (comma-separated)")
  parser.add_argument("--resnet_sizes", default="32", help="sizes for resnet18 (CPU default: small)")
  parser.add_argument("--logits", default="0,trace", help="class indices and/or trace")
  parser.add_argument("--loo_max", type=int, default=256, help="skip loo2022 above this N")
  parser.add_argument("--nt_batch", type=int, default=None,
                      help="neural-tangents: try nt.batch sizes from this one down, not from N "
                           "(each size tried is a compile)")
  parser.add_argument("--loo_calls", type=int, default=0,
                      help="loo2022: time only this many of its calls and scale to all (0: all)")
  parser.add_argument("--tile_size", type=int, default=None, help="ours: this tile, not the plan's")
  parser.add_argument("--variants", default="",
                      help="ours again with each of these planner settings, e.g. band=1,rotate=False")
  parser.add_argument("--memory_budget_gb", type=float, default=None,
                      help="ours: this per-device budget, not 80%% of the device's memory")
  parser.add_argument("--repeats", type=int, default=2,
                      help="timed calls after a warm-up one; 0: one call, compilation included")
  parser.add_argument("--precision", default="highest", choices=("highest", "high", "default"),
                      help="matmul precision of every row (ours and neural-tangents'); on GPUs "
                           "'default' is TF32")
  parser.add_argument("--deadline_s", type=float, default=None,
                      help="start no case (model, N, logits) after this many seconds")
  parser.add_argument("--compilation_cache", default=None,
                      help="a directory for jax's persistent compilation cache (reruns skip compiles)")
  args = parser.parse_args()
  started = time.perf_counter()
  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  try:
    nt = load_neural_tangents("benchmarks/ntk_engine.py")
  except NeuralTangentsUnavailableError as error:  # ours are still measured: a GPU loan is short
    nt = None
    print(f"# neural-tangents rows skipped: {error}", flush=True)
  # The engine's contraction setting (HIGHEST), on a matrix large enough for the device's peak.
  peak = matmul_rate("highest", size=2048 if jax.default_backend() == "cpu" else 8192, seconds=1.0)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x {jax.device_count()}, "
        f"precision {args.precision}; "
        f"float32 matmul peak {peak / 1e9:.0f} GFLOP/s")
  header = (f"{'model':>9s} {'params':>10s} {'N':>5s} {'logits':>6s} {'method':>20s} {'seconds':>9s} "
            f"{'vs ours':>8s} {'GFLOP/s':>9s} {'% peak':>7s} {'err':>8s}")
  print(header)
  print("-" * len(header))
  for name in args.models.split(","):
    apply_fn, params, shape = build(name)
    num_params = sum(a.size for a in jax.tree.leaves(params))
    sizes = args.resnet_sizes if name == "resnet18" else args.sizes
    for n in map(int, sizes.split(",")):
      x = np.random.default_rng(0).uniform(size=(n, *shape)).astype(np.float32)
      for logits in args.logits.split(","):
        if args.deadline_s is not None and time.perf_counter() - started > args.deadline_s:
          print(f"# deadline: {name} N={n} logits={logits} not started", flush=True)
          continue
        mode = logits if logits == "trace" else int(logits)
        budget = args.memory_budget_gb and args.memory_budget_gb * 2**30
        settings = dict(tile_size=args.tile_size, memory_budget_bytes=budget)
        ours_kernel = lambda **variant: empirical_ntk(apply_fn, params, x, logits=mode,
                                                      precision=args.precision, **settings, **variant)
        plan_ours = lambda **variant: fit_plan(apply_fn, params, x, None, mode,
                                               precision=args.precision, **settings, **variant)
        ours_out = {}
        show = lambda label: lambda plan, seconds: print(
            f"{label}: {plan.describe()}; planned in {seconds:.1f} s", flush=True)
        ours, plan = timed_with_plan(lambda: ours_out.setdefault("k", ours_kernel()), plan_ours,
                                     args.repeats, show(f"# {name} N={n} logits={logits}"))
        reference = ours_out["k"]

        def row(label: str, seconds: float, kernel: np.ndarray, flops: float) -> None:
          """One line of the table, printed as soon as its method has run."""
          err = np.nanmax(np.abs(kernel - reference)) / np.abs(reference).max()  # loo2022*: its part
          rate = flops / seconds
          print(f"{name:>9s} {num_params:>10,d} {n:>5d} {logits:>6s} {label:>20s} {seconds:>9.3f} "
                f"{seconds / ours:>7.1f}x {rate / 1e9:>9.1f} {100 * rate / peak:>6.1f}% {err:>8.1e}",
                flush=True)

        row("ntk_scale", ours, reference, plan.flops)
        for label in (v for v in args.variants.split(",") if v):
          key, value = label.split("=")
          variant = {key: _setting(value)}
          out = {}
          seconds, varied = timed_with_plan(lambda: out.setdefault("k", ours_kernel(**variant)),
                                            lambda: plan_ours(**variant), args.repeats,
                                            show(f"#   {label}"))
          row(label, seconds, out["k"], varied.flops)
        f, trace_axes, scale = nt_functions(apply_fn, logits) if nt else (None, None, 1.0)
        unfactored_flops = plan_for(apply_fn, params, x, None, mode, method="jacobian",
                                    factored_layers="none", **settings).flops
        if nt:  # the one call where it fits, else nt.batch with the largest batch that does
          with jax.default_matmul_precision(args.precision):  # compiled as it runs
            batches = nt_batch_sizes(nt, f, trace_axes, params, x, args.nt_batch)
          if args.nt_batch and args.nt_batch < n:
            print(f"# nt: batches of at most {args.nt_batch} tried (--nt_batch)", flush=True)
          for batch, compiled in batches:
            out = {}
            run, warmup = nt_best(nt, f, trace_axes, params, x, None if batch == n else batch, compiled)
            run, warmup = at_precision(run, args.precision), at_precision(warmup, args.precision)
            try:
              seconds = best_time(lambda: out.setdefault("k", run()), args.repeats, warmup)
            except Exception as error:  # noqa: BLE001
              if not is_out_of_memory(error):
                raise
              continue
            row("nt_best" if batch == n else f"nt_batch{batch}", seconds, out["k"] * scale,
                unfactored_flops)
            break
          else:
            print(f"# {name} N={n} logits={logits}: no nt.batch size fits", flush=True)
        if nt and n <= args.loo_max:
          out = {}
          run, warmup, calls, all_calls = loo2022(nt, f, trace_axes, params, x, args.loo_calls)
          seconds = best_time(lambda: out.setdefault("k", at_precision(run, args.precision)()),
                              args.repeats, at_precision(warmup, args.precision))
          if calls < all_calls:
            print(f"# loo2022*: {calls:,d} of its {all_calls:,d} calls timed, {seconds:.3f} s, "
                  f"scaled to all", flush=True)
          row("loo2022" if calls == all_calls else "loo2022*", seconds * all_calls / calls,
              out["k"] * scale, unfactored_flops)


if __name__ == "__main__":
  main()
