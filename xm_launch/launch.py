r"""Launches an ntk_scale experiment, or the sweep its config file defines, with XManager.

One work unit per point of the config's `get_sweep(arg)` (see sweep.py), each running
`python -m main --config=... --workdir=<workdir_root>/<name> --config.*=...` in a container built
from this repository. `--config.*` overrides after `--` apply to every work unit.

    pip install -e '.[xm]'
    # one local GPU per work unit (Docker with the NVIDIA runtime):
    xmanager launch xm_launch/launch.py -- \
        --config=configs/catastrophic_overfitting.py:eps=0.25 --workdir_root=/tmp/co -- --config.seed=1
    # a TPU VM on Vertex AI per work unit:
    xmanager launch xm_launch/launch.py -- --config=configs/cifar10_resnet18.py \
        --workdir_root=gs://BUCKET/ntk --executor=vertex --accelerator=tpu_v3=8
    # what would be launched, without XManager installed:
    python xm_launch/launch.py --config=configs/catastrophic_overfitting.py --workdir_root=/tmp/co --dry_run

Where results go: with the local executor, a local --workdir_root (an absolute path) is mounted into
every container at the same path, so the units' workdirs are on this machine; on Vertex AI the root
must be a Cloud Storage path (gs://...), which main.py writes to directly. --config must name a file
inside the repository (the container holds the repository, at /<repository's directory name>).

The units of a sweep share one JAX compilation cache, <workdir_root>/compilation_cache (each
job's JAX_COMPILATION_CACHE_DIR): units whose programs are alike (the CO sweep's betas and seeds)
compile them once, and a unit resumed after a preemption loads them.

On TPUs every work unit runs main.py with `--distributed` (JAX's cluster detection; one host of
Cloud TPU v2/v3, the generations XManager's Vertex AI executor provides). TPU v4 and later slices
are started on each of their hosts by hand (README, Multi-host jobs). GPU work units are one VM
each, one process.
"""

import os
import shlex
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ntk_scale import compilation_cache  # noqa: E402
from xm_launch.sweep import REPO, WorkUnit, work_units  # noqa: E402

_CONFIG = flags.DEFINE_string("config", None, "Config file inside the repository, `file.py` or `file.py:arg`, "
                              "relative to the repository or absolute.")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", None, "Each work unit's workdir is <workdir_root>/<name>: "
                                    "an absolute local path (local executor) or gs://... .")
_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "vertex"],
                              "local: Docker on this machine; vertex: Vertex AI (GPU or TPU VMs).")
_ACCELERATOR = flags.DEFINE_string(
    "accelerator", "local_gpu=1",
    "Resources per work unit as name=count, xm.JobRequirements' names: local_gpu=1 (local), "
    "a100=1, h100=8, tpu_v3=8 (vertex); empty for CPU only.")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.11", "Docker image the container is built on.")
_TITLE = flags.DEFINE_string("title", None, "Experiment title (default: the config).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the work units' commands; launch nothing.")
_SHARED_CACHE = flags.DEFINE_bool(
    "shared_compilation_cache", True, "The units share one JAX compilation cache, "
    "<workdir_root>/compilation_cache; without, each keeps its own in its workdir.")
flags.mark_flags_as_required(["config", "workdir_root"])

# jax's accelerator wheels, by the kind of resource asked for
_JAX_EXTRA = {"tpu": "jax[tpu]", "gpu": "jax[cuda13]"}


# What XManager (0.8.5, the release pinned in pyproject.toml) does with each resource name, by
# executor: its local executor hands Docker only local_gpu and drops any other name (h100=8 ran on
# the CPU); its Vertex AI executor maps these GPUs and Cloud TPU v2/v3 (xmanager/cloud/vertex.py),
# and failed on any other accelerator only after the container was built.
EXECUTOR_RESOURCES = {
    "local": ("local_gpu",),
    "vertex": ("p4", "t4", "l4_24th", "p100", "v100", "a100", "a100_80gib", "h100", "h200", "b200",
               "tpu_v2", "tpu_v3", "cpu", "ram", "memory"),
}


def requirements(spec: str, executor: str = "local") -> dict[str, int]:
  """`name=count[,name=count]` -> {name: count}, each name one `executor` acts on; errors name the
  flag and what the executor accepts."""
  parsed = {}
  for item in (i for i in spec.split(",") if i):
    name, sep, count = item.partition("=")
    if not sep or not count.isdigit() or int(count) <= 0:
      raise ValueError(f"--accelerator={spec!r}: expected name=count items such as local_gpu=1 or tpu_v3=8.")
    parsed[name.strip().lower()] = int(count)
  unknown = [name for name in parsed if name not in EXECUTOR_RESOURCES[executor]]
  if unknown:
    pods = (" TPU v4 and later slices: start main.py with --distributed on every host of the slice "
            "(README, Multi-host jobs)." if any(n.startswith("tpu") for n in unknown) else "")
    raise ValueError(f"--accelerator={spec!r}: XManager's {executor} executor does not provide "
                     f"{', '.join(unknown)}; it provides {', '.join(EXECUTOR_RESOURCES[executor])} "
                     f"(empty for CPU only).{pods}")
  return parsed


def workdir_volumes(workdir_root: str, executor: str) -> dict[str, str]:
  """Docker volumes (host path -> container path) that keep the work units' results: a local root
  mounted at the same path, so each unit's --workdir names the same directory inside its container
  and out (without it the results would stay in the container and be lost with it). On Vertex AI
  only a Cloud Storage root outlives a job. Errors name the flag."""
  on_gcs = workdir_root.startswith("gs://")
  if executor == "vertex":
    if not on_gcs:
      raise ValueError(f"--workdir_root={workdir_root}: Vertex AI jobs run on other machines, whose "
                       f"local disks are lost when the job ends; use a Cloud Storage path, "
                       f"--workdir_root=gs://BUCKET/....")
    return {}
  if on_gcs:  # main.py writes to Cloud Storage itself
    return {}
  if not os.path.isabs(workdir_root):
    raise ValueError(f"--workdir_root={workdir_root}: a relative path would name a directory inside "
                     f"each container, relative to its working directory, and be lost with it; give "
                     f"an absolute path (e.g. {os.path.abspath(workdir_root)}), mounted into the "
                     f"containers at the same path.")
  root = os.path.normpath(workdir_root)
  return {root: root}


def on_tpu(resources: dict[str, int]) -> bool:
  return any(name.startswith("tpu") for name in resources)


# The accelerators the executors provide, each counted in the devices JAX sees in a unit's one
# process: a GPU, or a TPU v2/v3 TensorCore.
DEVICES = ("local_gpu", "p4", "t4", "l4_24th", "p100", "v100", "a100", "a100_80gib", "h100", "h200", "b200",
           "tpu_v2", "tpu_v3")


def devices_per_unit(resources: dict[str, int]) -> int:
  """The devices a work unit's job sees, for the checks before launching; 1 on CPU."""
  return max(sum(count for name, count in resources.items() if name in DEVICES), 1)


def jax_wheel(resources: dict[str, int]) -> str:
  """The jax distribution for the accelerator asked for: TPU, CUDA or CPU."""
  if on_tpu(resources):
    return _JAX_EXTRA["tpu"]
  if resources:
    return _JAX_EXTRA["gpu"]
  return "jax"


def docker_instructions(resources: dict[str, int]) -> list[str]:
  """Install the repository with the jax wheel for the accelerator, copied last for layer caching."""
  name = os.path.basename(REPO)
  return ["ENV LANG=C.UTF-8",
          "RUN python -m pip install --upgrade pip",
          f"COPY {name}/pyproject.toml {name}/README.md /{name}/",
          f"RUN mkdir -p /{name}/ntk_scale && touch /{name}/ntk_scale/__init__.py && "
          f"python -m pip install '/{name}' '{jax_wheel(resources)}'",
          f"COPY {name}/ /{name}",
          f"RUN python -m pip install --no-deps -e /{name}",
          f"WORKDIR /{name}"]


def job_flags(unit: WorkUnit, resources: dict[str, int]) -> dict:
  """main.py's flags for `unit` on `resources`: on TPUs with --distributed, without which the hosts
  of a multi-host slice would each train alone, unaware of the others, in one workdir."""
  return {**unit.flags(), **({"distributed": True} if on_tpu(resources) else {})}


def shared_cache_environment(workdir_root: str) -> dict[str, str]:
  """The environment that gives every unit one compilation cache under the root, joined to it as
  the units' workdirs are (sweep.work_units). JAX's cache keys hold the cache's path, which is the
  same in every unit: the root is mounted at its own path (workdir_volumes) or is a bucket. main.py
  keeps XLA's autotuning cache out of a bucket."""
  return {compilation_cache.ENVIRONMENT: os.path.join(workdir_root, compilation_cache.CACHE_DIR)}


def launch(units: list[WorkUnit], resources: dict[str, int], *, title: str, executor: str = "local",
           base_image: str = "python:3.11", volumes: dict[str, str] | None = None,
           env_vars: dict[str, str] | None = None) -> None:
  """One XManager experiment, one job per work unit, each with `resources` and `env_vars`; local
  jobs' containers mount `volumes` (host path -> container path, see workdir_volumes), each host
  path made first."""
  from xmanager import xm, xm_local  # an optional extra: pip install -e '.[xm]'

  executor_type = xm_local.Local if executor == "local" else xm_local.Vertex
  options = {}
  if executor == "local" and volumes:
    for host in volumes:  # made by us, not by Docker (as root)
      os.makedirs(host, exist_ok=True)
    options = {"docker_options": xm_local.DockerOptions(volumes=dict(volumes))}
  with xm_local.create_experiment(experiment_title=title) as experiment:
    [executable] = experiment.package([xm.python_container(
        executor_spec=executor_type.Spec(), path=REPO, base_image=base_image,
        docker_instructions=docker_instructions(resources), entrypoint=xm.ModuleName("main"))])
    for unit in units:
      experiment.add(xm.Job(executable=executable, args=job_flags(unit, resources),
                            env_vars=dict(env_vars or {}),
                            executor=executor_type(requirements=xm.JobRequirements(**resources),
                                                   **options)))


def main(argv: list[str]) -> None:
  resources = requirements(_ACCELERATOR.value, _EXECUTOR.value)
  volumes = workdir_volumes(_WORKDIR_ROOT.value, _EXECUTOR.value)
  units = work_units(_CONFIG.value, argv[1:], _WORKDIR_ROOT.value, devices_per_unit(resources))
  env_vars = shared_cache_environment(_WORKDIR_ROOT.value) if _SHARED_CACHE.value else {}
  if _DRY_RUN.value:
    for unit in units:  # as a shell would run it
      print(shlex.join(unit.command(job_flags(unit, resources))))
    environment = "".join(f"; {name}={value}" for name, value in env_vars.items())
    print(f"{len(units)} work unit(s); executor {_EXECUTOR.value}, resources {resources or 'CPU'}"
          f"{environment}.")
    return
  launch(units, resources, title=_TITLE.value or _CONFIG.value, executor=_EXECUTOR.value,
         base_image=_BASE_IMAGE.value, volumes=volumes, env_vars=env_vars)


if __name__ == "__main__":
  app.run(main)
