"""Where one small kernel call's time goes: ntk_scale's parts against neural-tangents' one call.

    python benchmarks/ntk_call_parts.py                          # the CNN, N = 256, class 0 and trace
    python benchmarks/ntk_call_parts.py --model resnet18 --n 64 --logits 0

A kernel of one tile is one device program, so on a GPU its time is mostly fixed costs (the
CNN's class-0 kernel of 256 images is 1.8 GFLOP, 40 us of an H200's float32 peak, and took 3-4
ms against neural-tangents' 2 ms on 2026-12-04). Rows, each the fastest of --calls after a
warm-up (fixed costs: the fastest is the least disturbed), in one process on the same inputs:
  whole call             `empirical_ntk(...)` from host inputs to the numpy kernel
  place parameters       `parallel.replicate` of the parameters and model state over the mesh
  place images           the images' block on the devices (engine.blocks_on_devices)
  device program         the plan's one program on placed arguments, waited for (dispatch + run)
  copy back              the finished tile to the host (np.asarray of a ready array)
  rest                   whole call less the four parts: planning lookups, output assembly
  nt: whole call         neural-tangents' best (JACOBIAN_CONTRACTION, vmap_axes=0), host images
                         in, numpy kernel out, as benchmarks/ntk_engine.py times it
  nt: device program     the same on images already on the device, waited for
  nt: copy back          its kernel to the host
"""

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ntk_engine import at_precision, best_time, build, nt_functions, nt_kernel_fn  # noqa: E402
from ntk_scale import parallel  # noqa: E402
from ntk_scale.matmul_precision import default_precision  # noqa: E402
from ntk_scale.nt_compat import NeuralTangentsUnavailableError, load_neural_tangents  # noqa: E402
from ntk_scale.ntk import empirical_ntk, fit_plan  # noqa: E402
from ntk_scale.ntk.engine import blocks_on_devices  # noqa: E402
from ntk_scale.ntk.programs import plan_steps, program_of, step_programs  # noqa: E402


def best_ms(fn, calls: int) -> float:
  return 1e3 * best_time(fn, calls)


def ours(apply_fn, params, x: np.ndarray, logits, precision: str, calls: int) -> dict[str, float]:
  mesh = parallel.make_mesh()
  plan = fit_plan(apply_fn, params, x, None, logits, mesh=mesh, precision=precision)
  steps = plan_steps(plan, plan.tiles())
  if len(steps) != 1:
    raise SystemExit(f"{plan.describe()}: {len(steps)} steps; this script splits one-step kernels")
  (step,) = steps
  program = step_programs(apply_fn, False, plan.logits, precision, mesh, plan.logit_chunk,
                          plan.factoring)[program_of(step, plan.symmetric)]
  placed_params, state = parallel.replicate(params, mesh), parallel.replicate({}, mesh)
  x_band = blocks_on_devices(x, step.blocks, plan.band * plan.tile, mesh)
  first = np.int32(0)

  def run_program():
    with default_precision(precision):
      return jax.block_until_ready(program(placed_params, state, first, x_band))

  tile = run_program()
  parts = {
      "whole call": best_ms(lambda: empirical_ntk(apply_fn, params, x, logits=logits,
                                                    precision=precision), calls),
      "place parameters": best_ms(lambda: jax.block_until_ready(
          (parallel.replicate(params, mesh), parallel.replicate({}, mesh))), calls),
      "place images": best_ms(lambda: jax.block_until_ready(
          blocks_on_devices(x, step.blocks, plan.band * plan.tile, mesh)), calls),
      "device program": best_ms(run_program, calls),
      "copy back": best_ms(lambda: [np.asarray(s.data) for s in tile.addressable_shards], calls),
  }
  parts["rest"] = parts["whole call"] - sum(v for k, v in parts.items() if k != "whole call")
  return parts


def neural_tangents(nt, apply_fn, params, x: np.ndarray, logits: str, precision: str,
                    calls: int) -> dict[str, float]:
  f, trace_axes, _ = nt_functions(apply_fn, logits)
  kernel_fn = jax.jit(nt_kernel_fn(nt, f, trace_axes))
  on_device = jax.device_put(x)
  whole = at_precision(lambda: np.asarray(kernel_fn(x, None, params)), precision)
  device = at_precision(lambda: jax.block_until_ready(kernel_fn(on_device, None, params)), precision)
  out = device()
  return {"nt: whole call": best_ms(whole, calls), "nt: device program": best_ms(device, calls),
          "nt: copy back": best_ms(lambda: np.asarray(out), calls)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="cnn", choices=("cnn", "resnet18", "mlp"))
  parser.add_argument("--n", type=int, default=256)
  parser.add_argument("--logits", default="0,trace", help="class indices and/or trace")
  parser.add_argument("--calls", type=int, default=50, help="timed calls per row (the fastest)")
  parser.add_argument("--precision", default="highest", choices=("highest", "high", "default"))
  args = parser.parse_args()
  try:
    nt = load_neural_tangents("benchmarks/ntk_call_parts.py")
  except NeuralTangentsUnavailableError as error:
    nt = None
    print(f"# neural-tangents rows skipped: {error}")
  apply_fn, params, shape = build(args.model)
  x = np.random.default_rng(0).uniform(size=(args.n, *shape)).astype(np.float32)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x {jax.device_count()}; "
        f"{args.model}, N = {args.n}, precision {args.precision}; fastest of {args.calls} calls")
  for logits in args.logits.split(","):
    mode = logits if logits == "trace" else int(logits)
    rows = ours(apply_fn, params, x, mode, args.precision, args.calls)
    if nt:
      rows.update(neural_tangents(nt, apply_fn, params, x, logits, args.precision, args.calls))
    print(f"\nlogits {logits}")
    print(f"{'part':>20s} {'ms':>8s}")
    for name, ms in rows.items():
      print(f"{name:>20s} {ms:8.3f}")


if __name__ == "__main__":
  main()
