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

On TPUs every work unit runs main.py with `--distributed`: a multi-host slice (a pod) runs one
copy per host, and JAX's cluster detection joins them into one job (a single-host slice is a job
of one process). GPU work units are one VM each, one process.
"""

import os
import shlex
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    "a100=1, h100=8, tpu_v3=8, tpu_v4=8 (vertex); empty for CPU only.")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.11", "Docker image the container is built on.")
_TITLE = flags.DEFINE_string("title", None, "Experiment title (default: the config).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the work units' commands; launch nothing.")
flags.mark_flags_as_required(["config", "workdir_root"])

# jax's accelerator wheels, by the kind of resource asked for
_JAX_EXTRA = {"tpu": "jax[tpu]", "gpu": "jax[cuda13]"}


def requirements(spec: str) -> dict[str, int]:
  """`name=count[,name=count]` -> {name: count}; errors name the flag."""
  parsed = {}
  for item in (i for i in spec.split(",") if i):
    name, sep, count = item.partition("=")
    if not sep or not count.isdigit() or int(count) <= 0:
      raise ValueError(f"--accelerator={spec!r}: expected name=count items such as local_gpu=1 or tpu_v3=8.")
    parsed[name.strip().lower()] = int(count)
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


# xm.JobRequirements' GPU names: each counts the devices JAX sees in the unit's one process.
GPUS = ("local_gpu", "p4", "t4", "l4", "p100", "v100", "a100", "a100_80gib", "h100", "h200", "b200")


# TensorCores per JAX device of the TPU generations whose count names TensorCores (a v3-8 is 8
# devices; a v4-16 is 8 chips, each one device of two cores). A v5e or v6e chip has one core and is
# one device. A TPU7x chip has two cores; its count over 2 is at most its devices however they are
# counted (chips or cores) and exposed (a device a chip or a core).
TPU_CORES_PER_DEVICE = {"tpu_v2": 1, "tpu_v3": 1, "tpu_v4": 2, "tpu_v5p": 2, "tpu_v5e": 1, "tpu_v6e": 1,
                        "tpu_v7x": 2}


def devices_per_unit(resources: dict[str, int]) -> int:
  """The devices a work unit's job sees, at least, for the checks before launching: its GPUs; a TPU
  slice's count over its cores per device (a multiple of that many devices is needed however many
  hosts share them: a batch of 500 on a v4-16 was refused only once the slice had started); 1 on
  CPU and for TPU generations not in TPU_CORES_PER_DEVICE (checked on the slice itself). Were
  the count chips, not cores, this is half the devices: a weaker check, never a wrong refusal."""
  gpus = sum(count for name, count in resources.items() if name in GPUS)
  tpus = sum(count // TPU_CORES_PER_DEVICE[name] for name, count in resources.items()
             if name in TPU_CORES_PER_DEVICE)
  return max(gpus, tpus, 1)


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


def launch(units: list[WorkUnit], resources: dict[str, int], *, title: str, executor: str = "local",
           base_image: str = "python:3.11", volumes: dict[str, str] | None = None) -> None:
  """One XManager experiment, one job per work unit, each with `resources`; local jobs' containers
  mount `volumes` (host path -> container path, see workdir_volumes), each host path made first."""
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
                            executor=executor_type(requirements=xm.JobRequirements(**resources),
                                                   **options)))


def main(argv: list[str]) -> None:
  resources = requirements(_ACCELERATOR.value)
  volumes = workdir_volumes(_WORKDIR_ROOT.value, _EXECUTOR.value)
  units = work_units(_CONFIG.value, argv[1:], _WORKDIR_ROOT.value, devices_per_unit(resources))
  if _DRY_RUN.value:
    for unit in units:  # as a shell would run it
      print(shlex.join(unit.command(job_flags(unit, resources))))
    print(f"{len(units)} work unit(s); executor {_EXECUTOR.value}, resources {resources or 'CPU'}.")
    return
  launch(units, resources, title=_TITLE.value or _CONFIG.value, executor=_EXECUTOR.value,
         base_image=_BASE_IMAGE.value, volumes=volumes)


if __name__ == "__main__":
  app.run(main)
