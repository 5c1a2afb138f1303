"""The eigenpairs a job reads of a stored kernel: every one, or the top k.

The evolution, eigen_features and eigen_images jobs decompose a kernel whole (float64 eigh, the
kernel in host memory) while it is small, and above DENSE_MAX_ROWS matrix rows take the spectrum
job's top k eigenpairs instead (LOBPCG over every device, resumable, saved in the kernel's
spectrum/): a kernel of 50,000 images is 10 GB in float32, twice that in float64, and hours of eigh.
Each job's `eigensolver` field is "auto" (by the kernel's size), "dense" or "top".
"""

import ml_collections

from ntk_scale.ntk.spectrum import Eigenpairs, eigh
from ntk_scale.ntk.spectrum_job import kernel_spectrum, load_spectrum, solving
from ntk_scale.ntk.store import KernelStore

EIGENSOLVERS = ("auto", "dense", "top")
# auto: every eigenpair up to this many matrix rows (N, or N*C for a full kernel): 8192 rows hold
# 0.5 GB in float64 and take about a minute on 2 CPU cores; above it the top eigenpairs (any size).
DENSE_MAX_ROWS = 8192


def check_eigensolver(value: str, field: str) -> None:
  if value not in EIGENSOLVERS:
    raise ValueError(f"{field}={value!r}; expected one of {', '.join(EIGENSOLVERS)}.")


def resolve_eigensolver(setting: str, matrix_size: int) -> str:
  """"dense" or "top": `setting`, with auto resolved by the kernel's matrix size."""
  if setting == "auto":
    return "dense" if matrix_size <= DENSE_MAX_ROWS else "top"
  return setting


def describe_choice(solver: str, setting: str, field: str, matrix_size: int, num_pairs: int,
                    of: str = "") -> str:
  """What was chosen and why, for a job's start-up line (`of`: " of each kernel", say)."""
  if solver == "dense":
    return f"every eigenpair{of} ({matrix_size} rows)"
  why = f"{matrix_size} rows, above {DENSE_MAX_ROWS}" if setting == "auto" else f"{field}='top'"
  return f"the top {num_pairs} eigenpairs{of} by the spectrum job ({why})"


def with_num_eigenpairs(config: ml_collections.ConfigDict, num_pairs: int, matrix_size: int
                        ) -> ml_collections.ConfigDict:
  """A copy of `config` whose spectrum job solves for the top `num_pairs` (at most every row)."""
  one = ml_collections.ConfigDict(config.to_dict())
  one.spectrum.num_eigenpairs = min(num_pairs, matrix_size)
  return one


def eigenpairs_config(config: ml_collections.ConfigDict, setting: str, matrix_size: int,
                      needed: int) -> tuple[str, ml_collections.ConfigDict]:
  """For a job that reads `needed` top eigenpairs of a kernel of `matrix_size` rows: the solver
  `setting` resolves to, and the config whose spectrum job solves for the top
  max(config.spectrum.num_eigenpairs, needed) (the eigen_features and eigen_images jobs and their
  dry runs)."""
  return (resolve_eigensolver(setting, matrix_size),
          with_num_eigenpairs(config, max(config.spectrum.num_eigenpairs, needed), matrix_size))


def dense_eigenpairs(store: KernelStore) -> tuple[Eigenpairs, float]:
  """Every eigenpair of a stored kernel read whole (float64), and its trace."""
  pairs = eigh(store.read(), name=f"kernel {store.directory}")
  return pairs, float(pairs.values.sum())


def top_eigenpairs(config: ml_collections.ConfigDict, workdir: str, kernel: dict
                   ) -> tuple[Eigenpairs, float]:
  """config.spectrum's top eigenpairs of a kernel job's kernel (solved, resumed or read back), and
  the kernel's trace. config.spectrum is checked by the caller; every process calls it."""
  with solving(config, kernel["kernel"]):  # no other job replaces it before it is loaded
    pairs, record = load_spectrum(kernel_spectrum(config, workdir, kernel)["spectrum"])
  # A dense solve keeps every eigenvalue; a stored solve of more pairs may answer this one.
  k = config.spectrum.num_eigenpairs
  residuals = None if pairs.residuals is None else pairs.residuals[:k]
  return Eigenpairs(pairs.values[:k], pairs.vectors[:, :k], residuals), float(record["trace"])


def kernel_eigenpairs(config: ml_collections.ConfigDict, workdir: str, kernel: dict, solver: str
                      ) -> tuple[Eigenpairs, float]:
  """`dense_eigenpairs` or `top_eigenpairs` (config.spectrum.num_eigenpairs of them) by `solver`."""
  if solver == "dense":
    return dense_eigenpairs(KernelStore.open(kernel["kernel"]))
  return top_eigenpairs(config, workdir, kernel)

