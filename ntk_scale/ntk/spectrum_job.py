"""The `spectrum` job: the top eigenpairs of config.kernel's kernel (the kernel job's, computed or
resumed first), to `<workdir>/kernels/<name>/spectrum/`, resumable.

    python main.py --config configs/digits.py --workdir workdirs/digits --config.job=spectrum \
        --config.kernel.num_examples=0 --config.spectrum.num_eigenpairs=100

Methods (config.spectrum.method; auto picks the first that applies):
- dense: every eigenpair by one eigendecomposition (on a device; on the host for float64 on
  TPUs), when the block of k + oversample vectors is too wide for LOBPCG (5 times the block must
  be below the matrix size);
- sharded: LOBPCG on the devices, the kernel's rows split over every device of every host, when
  XLA's memory analysis of the compiled round fits the per-device budget (and, in float64, the
  devices are not TPUs, which have no float64 arithmetic);
- streamed: LOBPCG on the host, the kernel read from disk by row panels at every product (slow, but
  any size).
LOBPCG runs in rounds of `round_iters` iterations; after each round the Ritz pairs' residuals
||K v - lambda v|| / lambda_max are measured and the block is saved (iterate_<round>.npy, then
iterate.json, which commits it and names the best round so far, whose block is kept too), so a
killed job resumes at its last round and ends with the same result as one never interrupted; a
preempted one (SIGTERM, ntk_scale/preemption.py) stops once its round is saved. It stops when every
residual is below `tol`, after `max_iters`, or when two rounds in a row bring no 10% gain on the
best residual (round-off floor: about 1e-6 in float32), with the pairs of its best round. A dense result is final whatever its residual (the exact decomposition at the dtype's
round-off): a rerun reads it back.

Files: values.npy (the k eigenvalues, largest first; every eigenvalue for the dense method),
vectors.npy [N*C, k] (unit eigenvectors as columns, each with entries summing to >= 0; rows as
in spectrum.as_matrix), residuals.npy, spectrum.json (settings, method, iterations, residuals,
trace, seconds), written last. The directory holds one solve; a request it answers (`_covers`: the
same one, or fewer pairs at a looser tol) reads it back, any other replaces it. One job at a time
solves or reads it (`solving`, a lock beside it); another is refused, naming the first.

Measured (2-core CPU, 4 emulated devices, float32): the trace kernel of the digits CNN on all 1,437
training images, top 100 eigenpairs: see the README.
"""

import dataclasses
import logging
import math
import os
import time
from typing import Any, ContextManager

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ntk_scale import files, parallel, writer_lock
from ntk_scale.config_numbers import is_whole_number
from ntk_scale.data import check_seed
from ntk_scale.ntk.job import SPLITS, check_kernel_config, kernel_job, select_examples
from ntk_scale.ntk.plan import device_budget_bytes
from ntk_scale.matmul_precision import check_precision
from ntk_scale.ntk.spectrum import (Eigenpairs, NonFiniteKernelError, as_matrix, eigh,
                                    relative_residuals)
from ntk_scale.ntk.spectrum_rounds import (STALL_ROUNDS, ShardedKernel, StreamedKernel, finished,
                                           first_state, matrix_layout, run_rounds, start_block)
from ntk_scale.ntk.store import KernelStore
from ntk_scale.ntk.tile_math import parse_logits
from ntk_scale.preemption import Preempted, preemption_notices

SPECTRUM_DIR = "spectrum"
LOCK_FILE = ".writer.spectrum.lock"  # in the kernel's directory (`solving`)
RESULT_FILE, STATE_FILE = "spectrum.json", "iterate.json"
ARRAYS = ("values", "vectors", "residuals")
METHODS = ("auto", "dense", "sharded", "streamed")
DEFAULT_TOL = {"float32": 1e-5, "float64": 1e-10}


def check_spectrum_config(config: ml_collections.ConfigDict, num_classes: int | None = None) -> None:
  """config.spectrum's fields, and k against the kernel's size where config.kernel fixes it."""
  s = config.spectrum
  for field, low in (("num_eigenpairs", 1), ("oversample", 0), ("round_iters", 1), ("max_iters", 1)):
    if not is_whole_number(s[field], low):
      raise ValueError(f"config.spectrum.{field}={s[field]!r} must be an integer >= {low}.")
  check_seed(s.seed, "config.spectrum.seed")
  if s.method not in METHODS:
    raise ValueError(f"config.spectrum.method={s.method!r}; expected one of {', '.join(METHODS)}.")
  if s.dtype not in DEFAULT_TOL:
    raise ValueError(f"config.spectrum.dtype={s.dtype!r}; expected one of {', '.join(DEFAULT_TOL)}.")
  if s.method == "sharded":
    parallel.check_float64_devices(s.dtype, "config.spectrum.dtype", "use method 'streamed' or "
                                   "'dense' (on the host, in float64) or dtype 'float32'")
  if not 0 <= s.tol < 1:
    raise ValueError(f"config.spectrum.tol={s.tol!r} must be in [0, 1) (largest residual relative to "
                     f"the top eigenvalue; 0: {DEFAULT_TOL[s.dtype]:g} in {s.dtype}).")
  for field in ("memory_budget_gb", "max_block_mb"):
    if not s[field] >= 0:
      raise ValueError(f"config.spectrum.{field}={s[field]!r} must be >= 0 (0: the default).")
  check_precision(s.precision, "config.spectrum.precision")
  if num_classes is not None and config.kernel.num_examples > 0:
    spec = parse_logits(config.kernel.logits, num_classes, "config.kernel.logits")
    check_num_eigenpairs(s, spec.matrix_rows(config.kernel.num_examples))


def check_num_eigenpairs(s: ml_collections.ConfigDict, size: int) -> None:
  """config.spectrum `s` against a kernel of `size` matrix rows: k at most every row, and LOBPCG's
  block (method sharded or streamed) under a fifth of them."""
  if s.num_eigenpairs > size:
    raise ValueError(f"config.spectrum.num_eigenpairs={s.num_eigenpairs} is more than the kernel's "
                     f"{size} rows (config.kernel.num_examples, times the logits of a full kernel).")
  width = min(s.num_eigenpairs + s.oversample, size)
  if s.method not in ("auto", "dense") and 5 * width >= size:
    raise ValueError(f"config.spectrum.method={s.method!r} needs a block of num_eigenpairs + "
                     f"oversample = {width} vectors under a fifth of the {size} rows; lower "
                     f"them or use method 'dense'.")


def resolved_tol(s: ml_collections.ConfigDict) -> float:
  """config.spectrum.tol, or its dtype's default for 0."""
  return s.tol or DEFAULT_TOL[s.dtype]


def solve_settings(s: ml_collections.ConfigDict) -> dict[str, Any]:
  """What makes two solves the same solve (a saved round of another is not resumed; results derived
  from the eigenpairs record it)."""
  return {"num_eigenpairs": s.num_eigenpairs, "oversample": s.oversample, "dtype": s.dtype,
          "tol": resolved_tol(s), "seed": s.seed, "round_iters": s.round_iters,
          "precision": s.precision}


class SpectrumDoesNotFit(ValueError):
  """method 'sharded' asked of devices that cannot hold the kernel's rows; names what to change."""


@dataclasses.dataclass(frozen=True)
class SpectrumPlan:
  method: str  # dense | sharded | streamed
  size: int  # rows of the kernel's matrix (N, or N*C for a full kernel)
  width: int  # vectors in LOBPCG's block: num_eigenpairs + oversample
  # The compiled device program, where it was built: for method sharded, and for auto when its
  # memory per device exceeded the budget (method streamed then; its size says by how much).
  sharded: ShardedKernel | None


def plan_spectrum(s: ml_collections.ConfigDict, shape: tuple[int, ...], mesh: Mesh, device_budget: float,
                  device_budget_field: str = "config.spectrum.memory_budget_gb") -> SpectrumPlan:
  """The method config.spectrum gets for a kernel of `shape` on `mesh`, from shapes alone (the job
  and the dry run): dense where the block is too wide for LOBPCG, sharded where XLA's memory per
  device fits the budget (config.spectrum.memory_budget_gb, or `device_budget`) and the devices
  compute in its dtype (float64: not on TPUs), else streamed;
  SpectrumDoesNotFit for method 'sharded' over the budget, naming `device_budget_field` where
  `device_budget` is the budget (the dry run's target devices: its flag). Call under
  jax.enable_x64 for float64."""
  n, c = matrix_layout(shape)
  size = n * c
  width = min(s.num_eigenpairs + s.oversample, size)
  check_num_eigenpairs(s, size)
  if s.method == "dense" or 5 * width >= size:
    return SpectrumPlan("dense", size, width, None)
  if s.method == "streamed" or not parallel.devices_compute(s.dtype):
    return SpectrumPlan("streamed", size, width, None)
  budget = s.memory_budget_gb * 2**30 or device_budget
  budget_field = "config.spectrum.memory_budget_gb" if s.memory_budget_gb else device_budget_field
  engine = ShardedKernel(shape, mesh, width, s.num_eigenpairs, s.dtype, s.round_iters, s.precision,
                         resolved_tol(s))
  needed = engine.bytes_per_device()
  if needed is not None and needed > budget:
    if s.method == "sharded":
      raise SpectrumDoesNotFit(
          f"config.spectrum.method='sharded' needs {needed / 2**30:.3g} GiB per device (the "
          f"{size}-row matrix over {mesh.devices.size} devices, and the block), over the "
          f"{budget / 2**30:.3g} GiB budget ({budget_field}); use more devices, "
          f"method 'streamed', or raise the budget.")
    return SpectrumPlan("streamed", size, width, engine)
  return SpectrumPlan("sharded", size, width, engine)


def _describe(plan: SpectrumPlan, engine: Any, s: ml_collections.ConfigDict) -> str:
  size = plan.size
  if plan.method == "dense":
    return f"dense eigendecomposition of the {size} x {size} matrix in {s.dtype}"
  if plan.method == "sharded":
    products = engine.flops_per_round()
    memory = engine.bytes_per_device()
    where = f"rows split over {jax.device_count()} devices" + (
        "" if memory is None else f", memory per device {memory / 2**30:.3g} GiB (compiled)")
  else:
    products = 2.0 * size * size * plan.width * s.round_iters
    where = f"read from disk by panels of {engine.operator.rows_per_read} examples at each product"
  return (f"{plan.method} LOBPCG for the top {s.num_eigenpairs} of the {size} x {size} matrix in "
          f"{s.dtype}, {where}; a block of {plan.width} vectors, rounds of {s.round_iters} iterations "
          f"(at most {s.max_iters}), {products:.3g} FLOP of products per round")


def _write_result(directory: str, pairs: Eigenpairs, record: dict) -> None:
  """The arrays, then spectrum.json (removed first, written last: it marks the result whole)."""
  files.make_dirs(directory)
  if files.exists(os.path.join(directory, RESULT_FILE)):
    files.remove(os.path.join(directory, RESULT_FILE))
  for name in ARRAYS:
    files.save_array(os.path.join(directory, f"{name}.npy"), np.asarray(getattr(pairs, name)))
  files.write_json(os.path.join(directory, RESULT_FILE), record, indent=2, sort_keys=True)


def load_spectrum(directory: str) -> tuple[Eigenpairs, dict]:
  """A finished spectrum (a kernel directory's spectrum/): its eigenpairs and record."""
  record = files.read_json(os.path.join(directory, RESULT_FILE))
  arrays = {name: files.load_array(os.path.join(directory, f"{name}.npy")) for name in ARRAYS}
  return Eigenpairs(**arrays).oriented(), record  # results written before 2026-12-02 were not


def _load_state(directory: str, settings: dict) -> dict | None:
  """The last saved round of this solve (process 0 reads; every process gets its round)."""
  state = None
  if jax.process_index() == 0 and files.exists(os.path.join(directory, STATE_FILE)):
    state = files.read_json(os.path.join(directory, STATE_FILE))
    if state.get("settings") != settings:
      logging.info("spectrum %s: the saved round is of other settings; starting over", directory)
      state = None
  round_number = -1 if state is None else int(state["rounds"])
  if jax.process_count() > 1:
    round_number = int(multihost_utils.broadcast_one_to_all(np.int64(round_number)))
  if round_number < 0:
    return None
  if state is None:  # the other processes read the state process 0 found
    state = files.read_json(os.path.join(directory, STATE_FILE))
  load = lambda number: files.load_array(os.path.join(directory, f"iterate_{number}.npy"))
  state["block"] = load(round_number)
  best = state.get("best_round")  # a round saved before 2026-12-01 has none
  state["best_block"] = None if best is None else state["block"] if best == round_number else load(best)
  return state


def _save_state(directory: str, state: dict) -> None:
  """This round's block, then iterate.json naming it and the best round (the commit), then the
  blocks of neither go."""
  writer_lock.check_claims(f"saving round {state['rounds']} of {directory}")
  if jax.process_index() == 0:
    files.save_array(os.path.join(directory, f"iterate_{state['rounds']}.npy"), state["block"])
    files.write_json(os.path.join(directory, STATE_FILE),
                     {k: v for k, v in state.items() if k not in ("block", "best_block")})
    keep = {f"iterate_{state['rounds']}.npy", f"iterate_{state.get('best_round')}.npy", STATE_FILE}
    for name in files.list_dir(directory):
      if name.startswith("iterate_") and name not in keep:
        files.remove(os.path.join(directory, name))
  parallel.barrier("spectrum round saved")


def _remove_rounds(directory: str) -> None:
  """Saved rounds: kept while a solve may go on (more max_iters), dropped once converged."""
  if jax.process_index() == 0:
    for name in files.list_dir(directory):
      if name.startswith("iterate"):
        files.remove(os.path.join(directory, name))


def _is_final(record: dict, max_iters: int) -> bool:
  """Whether a stored result is all this solve can give, so a rerun reads it back: a dense one
  always (the exact decomposition; its residual is the dtype's round-off, which no rerun lowers),
  LOBPCG once converged, stalled, or out of max_iters (more max_iters resume it)."""
  if not math.isfinite(record["max_residual"]):  # recorded before non-finite kernels were refused
    return False
  return (record["method"] == "dense" or record["converged"] or record["stalled"]
          or record["iterations"] >= max_iters)


def _covers(record: dict, directory: str, s: ml_collections.ConfigDict, settings: dict) -> bool:
  """Whether a stored final result answers config.spectrum `s` (whose solve is `settings`), so it
  is read back rather than replaced: the same solve, or one of at least as many pairs in the same
  dtype and precision whose top `num_eigenpairs` residuals meet this tol (a dense one's are its
  round-off, final whatever the tol). An explicit method takes only its own results; auto, any."""
  if s.method not in ("auto", record["method"]):
    return False
  if record["settings"] == settings:
    return True
  stored, k = record["settings"], settings["num_eigenpairs"]
  if (stored["dtype"], stored["precision"]) != (settings["dtype"], settings["precision"]) or (
      record["num_eigenpairs"] < k):
    return False
  return record["method"] == "dense" or float(
      files.load_array(os.path.join(directory, "residuals.npy"))[:k].max()) <= settings["tol"]


def _residual_note(record: dict) -> str:
  """Why a residual is above tol, and what would lower it: for dense only a wider dtype (more
  max_iters cannot help an exact decomposition); for LOBPCG more max_iters, unless it stalled."""
  settings = record["settings"]
  if record["converged"]:
    return ""
  if record["method"] == "dense":
    why = f"{settings['dtype']}'s round-off floor of the exact decomposition; " + (
        "config.spectrum.dtype='float64' would lower it" if settings["dtype"] == "float32"
        else "raise config.spectrum.tol")
  else:
    why = "stalled at round-off" if record["stalled"] else "raise config.spectrum.max_iters"
  return f" (not below tol {settings['tol']:g}: {why})"


def check_finite(pairs: Eigenpairs, kernel_dir: str) -> None:
  """NonFiniteKernelError where `pairs` (of the kernel in `kernel_dir`) are not finite: a NaN
  kernel gave NaN rounds until they "stalled", and a NaN result recorded as final."""
  residuals = np.zeros(0) if pairs.residuals is None else pairs.residuals
  if not (np.isfinite(pairs.values).all() and np.isfinite(residuals).all()):
    raise NonFiniteKernelError.of(f"kernel {kernel_dir}")


def _solve(engine: Any, directory: str, settings: dict, start: np.ndarray, max_iters: int
           ) -> tuple[Eigenpairs, dict, float]:
  """LOBPCG rounds from the saved round (or from `start`, the seeded block), each saved as it ends;
  also the seconds the saved rounds took in earlier runs."""
  state = _load_state(directory, settings)
  if state is None:
    _remove_rounds(directory)  # of an unfinished solve with other settings
    state = first_state(start)
    state["settings"] = settings
  elif jax.process_index() == 0:
    print(f"resuming the spectrum at round {state['rounds']} ({state['iterations']} iterations, "
          f"largest residual {state['residuals'][-1]:.2e})", flush=True)

  def after_round(state: dict, pairs: Eigenpairs, seconds: float) -> None:
    check_finite(pairs, os.path.dirname(directory))  # before a NaN round is saved
    _save_state(directory, state)
    if jax.process_index() == 0:
      print(f"spectrum round {state['rounds']}: {state['iterations']} iterations, largest residual "
            f"{state['residuals'][-1]:.2e} (tol {settings['tol']:g}), top eigenvalue "
            f"{pairs.values[0]:.6g}, {seconds:.1f} s", flush=True)

  earlier = float(state.get("seconds", 0.0))  # a round saved before 2026-12-01 has none
  with preemption_notices() as noticed:
    pairs, state = run_rounds(engine, state, settings["tol"], max_iters, after_round, stop=noticed)
  if not finished(pairs, state, settings["tol"], max_iters):  # stopped for a preemption
    raise Preempted(f"round {state['rounds']} of the spectrum is saved in {directory}", state["rounds"])
  return pairs, state, earlier


def spectrum_job(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The kernel (computed or resumed), then its top eigenpairs (read back where a stored solve
  answers config.spectrum, `_covers`).
  k is checked against the subset's size first: with config.kernel.num_examples=0 only the split's
  labels (and config.kernel.classes) say how many rows the kernel will have."""
  from ntk_scale.data import load_dataset, num_classes  # pylint: disable=import-outside-toplevel

  k = config.kernel
  check_spectrum_config(config, num_classes(config.data))
  dataset = load_dataset(config.data)
  split = getattr(dataset, k.split) if k.split in SPLITS else None
  check_kernel_config(config, dataset.num_classes, split.labels if split else None)
  num_examples = len(select_examples(config, split.labels))
  rows = parse_logits(k.logits, dataset.num_classes).matrix_rows(num_examples)
  check_num_eigenpairs(config.spectrum, rows)
  return kernel_spectrum(config, workdir, kernel_job(config, workdir, dataset))


def solving(config: ml_collections.ConfigDict, kernel_dir: str) -> ContextManager[None]:
  """The lock of `kernel_dir`'s spectrum/ while a job solves, reads back or loads it
  (writer_lock.holding): a second job is refused, naming the first. Two solves of other settings
  at once wrote one's arrays beside the other's spectrum.json; a reader could load arrays being
  replaced."""
  return writer_lock.holding(os.path.join(kernel_dir, LOCK_FILE), config.job,
                             f"the spectrum of {kernel_dir}",
                             "two would write one's eigenvectors beside the other's record",
                             "use another config.kernel.name")


def kernel_spectrum(config: ml_collections.ConfigDict, workdir: str, kernel: dict[str, Any]
                    ) -> dict[str, Any]:
  """config.spectrum's eigenpairs of the kernel a kernel job returned (`kernel`), on every process;
  read back when this solve is already on disk. config.spectrum is checked by the caller. Under
  the spectrum's lock (`solving`)."""
  if not kernel["complete"]:
    raise RuntimeError(f"kernel {kernel['kernel']} is not complete; rerun to resume it.")
  with solving(config, kernel["kernel"]):
    return _kernel_spectrum(config, workdir, kernel)


def _kernel_spectrum(config: ml_collections.ConfigDict, workdir: str, kernel: dict[str, Any]
                     ) -> dict[str, Any]:
  s = config.spectrum
  store = KernelStore.open(kernel["kernel"])
  n, c = matrix_layout(store.shape)
  check_num_eigenpairs(s, n * c)
  directory = os.path.join(kernel["kernel"], SPECTRUM_DIR)
  settings = solve_settings(s)
  result_path = os.path.join(directory, RESULT_FILE)
  if files.exists(result_path):
    record = files.read_json(result_path)
    if _is_final(record, s.max_iters) and _covers(record, directory, s, settings):
      if jax.process_index() == 0:
        more = ("" if record["num_eigenpairs"] == s.num_eigenpairs else
                f" (its top {record['num_eigenpairs']} {record['method']} eigenpairs hold the "
                f"{s.num_eigenpairs} asked)")
        print(f"spectrum of {kernel['kernel']} already computed{more}: top eigenvalue "
              f"{record['top_eigenvalue']:.6g}, largest residual {record['max_residual']:.2e}"
              + _residual_note(record), flush=True)
      if record["converged"]:  # rounds a kill between the result and their removal left
        _remove_rounds(directory)
      return {**record, "spectrum": directory}
  if jax.process_index() == 0:
    files.make_dirs(directory)

  started, earlier = time.time(), 0.0
  with jax.enable_x64(s.dtype == "float64"):
    plan = plan_spectrum(s, store.shape, parallel.make_mesh(), device_budget_bytes(jax.local_devices()[0]))
    method = plan.method
    start = start_block(plan.size, plan.width, s.seed, np.dtype(s.dtype))
    engine = plan.sharded if method == "sharded" else (
        StreamedKernel(store, s.num_eigenpairs, s.dtype, s.round_iters, resolved_tol(s),
                       int((s.max_block_mb or 256) * 2**20), start) if method == "streamed" else None)
    if jax.process_index() == 0:
      print(f"spectrum plan: {_describe(plan, engine, s)}", flush=True)
    if method == "dense":
      matrix = as_matrix(store.read()).astype(s.dtype)
      full = eigh(matrix, dtype=s.dtype,
                  backend="jax" if parallel.devices_compute(s.dtype) else "numpy",
                  name=f"kernel {kernel['kernel']}")
      vectors, values = full.vectors[:, :s.num_eigenpairs], full.values[:s.num_eigenpairs]
      pairs = Eigenpairs(full.values, vectors, relative_residuals(matrix @ vectors, vectors, values))
      state = first_state(None)
      trace = float(full.values.sum())
    else:
      if method == "sharded":
        engine.load(store)
      trace = engine.trace()
      pairs, state, earlier = _solve(engine, directory, settings, start, s.max_iters)
  pairs = pairs.oriented()
  residual = float(pairs.residuals.max())
  record = {"settings": settings, "method": method, "kernel": os.path.relpath(kernel["kernel"], workdir),
            "shape": list(store.shape), "num_eigenpairs": s.num_eigenpairs, "rounds": state["rounds"],
            "iterations": state["iterations"], "residuals_by_round": state["residuals"],
            "best_round": state.get("best_round"),  # whose pairs these are (None: dense)
            "max_residual": residual, "converged": residual <= settings["tol"],
            "stalled": state["stalled"] >= STALL_ROUNDS, "top_eigenvalue": float(pairs.values[0]),
            "trace": trace, "devices": jax.device_count(),
            "seconds": time.time() - started + earlier}  # with the rounds of earlier runs
  if jax.process_index() == 0:
    _write_result(directory, pairs, record)
    if record["converged"]:
      _remove_rounds(directory)
    print(f"spectrum: top {s.num_eigenpairs} eigenpairs of {kernel['kernel']} by {method} "
          f"({state['iterations']} iterations, {record['seconds']:.1f} s): top eigenvalue "
          f"{record['top_eigenvalue']:.6g}, largest residual {residual:.2e}"
          + _residual_note(record), flush=True)
  parallel.barrier("spectrum written")
  return {**record, "spectrum": directory}
