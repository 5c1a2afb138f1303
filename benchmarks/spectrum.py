"""Kernel spectra: dense eigendecomposition time by size, and the top k eigenpairs of a stored kernel
by the spectrum job's LOBPCG rounds (ntk_scale/ntk/spectrum_rounds.py) against scipy's LOBPCG, the
peer, in one run on one machine.

    python benchmarks/spectrum.py                                       # CPU-sized defaults
    python benchmarks/spectrum.py --dense 8192,16384 --topk 16384,50000 --k 1000  # a GPU's table

Kernels are random PSD matrices with a kernel-like spectrum (eigenvalues decaying as a power law),
K = X X^T for X [n, r] with columns scaled by i^-1, written tile by tile into a KernelStore in
float32 as the kernel job writes it. Top-k rows, all to a largest residual ||K v - lambda v|| /
lambda_1 of 1e-5 (the spectrum job's float32 default): scipy's LOBPCG on the matrix in memory (the
peer; one call) and streamed from the store by row panels of --block-mb; jax's lobpcg_standard and
ours (ntk_scale/ntk/lobpcg.py), one jitted call each on the matrix on the device; the spectrum
job's rounds on the devices (the rows split over all of them; after compiling, loading the rows
and a warm-up round, given apart) and streamed.
Set XLA_FLAGS=--xla_force_host_platform_device_count=N to split a CPU into N devices.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from ntk_scale import parallel  # noqa: E402
from ntk_scale.ntk import spectrum  # noqa: E402
from ntk_scale.ntk.spectrum_rounds import (ShardedKernel, StreamedKernel, first_state,  # noqa: E402
                                           run_rounds, start_block)
from ntk_scale.ntk.store import KernelStore  # noqa: E402


def factor(n: int, rank: int, seed: int = 0) -> np.ndarray:
  """X [n, rank] with column scales i^-1: K = X X^T has eigenvalues decaying like i^-2."""
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, rank)) / np.arange(1, rank + 1)).astype(np.float32)


def time_dense(n: int, backend: str) -> float:
  x = factor(n, min(n, 2048))
  kernel = x @ x.T
  start = time.perf_counter()
  spectrum.eigh(kernel, backend=backend)
  return time.perf_counter() - start


def write_kernel(directory: str, x: np.ndarray, tile: int) -> KernelStore:
  n = len(x)
  meta = {"shape": [n, n], "tile": tile, "dtype": "float32", "complete": True}
  store = KernelStore.create_or_resume(directory, meta, ("shape",), np.arange(n), np.zeros(n, int))
  blocks = range(-(-n // tile))
  for i in blocks:
    for j in blocks:
      if i <= j:
        store.write_tile(i, j, x[i * tile:(i + 1) * tile] @ x[j * tile:(j + 1) * tile].T, mirror=True)
  return KernelStore.open(directory)


def time_topk(n: int, k: int, block_mb: float, tile: int, dtype: str, round_iters: int) -> list[tuple]:
  """Rows (solver, seconds, iterations or passes, largest residual, eigenvalues) for the top k of one
  kernel:
  scipy's LOBPCG on the matrix in memory (the peer) and streamed from the store, and the spectrum
  job's rounds, sharded over the devices and streamed, to the same tolerance (float32's default)."""
  tol = 1e-5
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    x = factor(n, min(n, 4 * k + 512))
    store = write_kernel(directory, x, tile)
    kernel = x @ x.T

    start = time.perf_counter()
    peer = spectrum.top_eigenpairs(kernel, k, tol=tol, dtype=dtype)
    rows.append(("scipy LOBPCG, in memory", time.perf_counter() - start, "", peer.residuals.max(),
                 peer.values))
    rows += _one_call_lobpcgs(kernel.astype(dtype), k, dtype)
    operator = spectrum.StoredKernelOperator(store, dtype, max_block_bytes=int(block_mb * 2**20))
    start = time.perf_counter()
    streamed = spectrum.top_eigenpairs(operator, k, tol=tol, dtype=dtype)
    rows.append(("scipy LOBPCG, streamed", time.perf_counter() - start, f"{operator.passes} passes",
                 streamed.residuals.max(), streamed.values))

    width = k + 10
    with jax.enable_x64(dtype == "float64"):
      start = time.perf_counter()
      engine = ShardedKernel(store.shape, parallel.make_mesh(), width, k, dtype, round_iters, "highest", tol)
      engine.load(store)
      engine.ritz(engine.advance(start_block(engine.size, width, 1, np.dtype(dtype)))[0])  # warm-up
      ready = time.perf_counter() - start  # compiling, loading the rows, a first round (XLA:CPU
      start = time.perf_counter()          # generates code at a program's first run)
      pairs, state = _rounds(engine, width, dtype, tol)
      rows.append((f"ours, sharded on {jax.device_count()} device(s)", time.perf_counter() - start,
                   f"{state['iterations']} it.", pairs.residuals.max(), pairs.values, ready))
    ours = StreamedKernel(store, k, dtype, round_iters, tol, int(block_mb * 2**20),
                          start_block(store.shape[0], width, 0, np.dtype(dtype)))
    start = time.perf_counter()
    pairs, state = _rounds(ours, width, dtype, tol)
    rows.append(("ours, streamed", time.perf_counter() - start,
                 f"{ours.operator.passes} passes", pairs.residuals.max(), pairs.values))
  return rows


ITERATIONS = 30


def _one_call_lobpcgs(kernel: np.ndarray, k: int, dtype: str) -> list[tuple]:
  """jax's lobpcg_standard (what the device path ran before lobpcg.py) and ours, one jitted call
  each on the matrix on the device, from the same block of k + 10 vectors, after a warm-up call:
  ITERATIONS iterations each (no early stop), then the top k's largest residual, from exact
  products."""
  from jax.experimental.sparse.linalg import lobpcg_standard  # pylint: disable=import-outside-toplevel

  from ntk_scale.ntk.lobpcg import lobpcg_top  # pylint: disable=import-outside-toplevel

  n = len(kernel)
  with jax.enable_x64(dtype == "float64"):
    matrix = jax.device_put(kernel)
    block = jax.device_put(start_block(n, k + 10, 0, np.dtype(dtype)))
    highest = jax.lax.Precision.HIGHEST
    solvers = {
        f"jax lobpcg_standard, {ITERATIONS} it.": lambda m, b: lobpcg_standard(
            lambda v: jax.numpy.matmul(m, v, precision=highest), b, m=ITERATIONS, tol=0.0),
        f"ours (lobpcg.py), {ITERATIONS} it.": lambda m, b: lobpcg_top(
            lambda v: jax.numpy.matmul(m, v, precision=highest), b, ITERATIONS, 0.0)}
    rows = []
    for name, solver in solvers.items():
      run = jax.jit(solver)
      jax.block_until_ready(run(matrix, block))
      start = time.perf_counter()
      values, vectors, iterations = jax.block_until_ready(run(matrix, block))
      seconds = time.perf_counter() - start
      order = np.argsort(-np.asarray(values))[:k]
      values, vectors = np.asarray(values)[order], np.asarray(vectors)[:, order]
      exact = kernel.astype(np.float64) @ vectors
      residual = np.linalg.norm(exact - vectors * values, axis=0).max() / values[0]
      rows.append((name, seconds, f"{seconds / int(iterations):.3f} s/it.", residual, values))
  return rows


def _rounds(engine, width: int, dtype: str, tol: float):
  return run_rounds(engine, first_state(start_block(engine.size, width, 0, np.dtype(dtype))), tol, 400)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dense", default="1024,2048", help="sizes for the dense eigh")
  parser.add_argument("--backends", default="numpy,jax")
  parser.add_argument("--topk", default="4096", help="sizes for the top-k solvers")
  parser.add_argument("--k", type=int, default=100)
  parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
  parser.add_argument("--round-iters", type=int, default=10)
  parser.add_argument("--block-mb", type=float, default=64.0, help="row panel size per read")
  parser.add_argument("--tile", type=int, default=1024, help="the store's tile (chunk) side")
  args = parser.parse_args()
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}")
  print(f"{'solve':<34}{'n':>8}{'seconds':>10}")
  for n in (int(s) for s in args.dense.split(",") if s):
    for backend in args.backends.split(","):
      print(f"{'dense eigh (' + backend + ')':<34}{n:>8}{time_dense(n, backend):>10.2f}", flush=True)
  for n in (int(s) for s in args.topk.split(",") if s):
    rows = time_topk(n, args.k, args.block_mb, args.tile, args.dtype, args.round_iters)
    peer, peer_values = rows[0][1], np.asarray(rows[0][4], np.float64)
    for name, seconds, work, residual, values, *ready in rows:
      extra = f", {ready[0]:.1f} s to compile, load and warm up" if ready else ""
      # Both to the same residual: their eigenvalues must agree to about that, relative to lambda_1.
      apart = np.abs(np.asarray(values, np.float64) - peer_values).max() / peer_values.max()
      print(f"{f'top-{args.k} {name}':<34}{n:>8}{seconds:>10.2f}   {peer / seconds:5.1f}x the peer, "
            f"{work + ', ' if work else ''}residual {residual:.1e}, eigenvalues within "
            f"{apart:.1e} x lambda_1 of the peer's{extra}", flush=True)


if __name__ == "__main__":
  main()
