"""The launcher builds a sweep's work units (checked, one workdir each) and hands them to XManager
as one job per unit, without launching anything here (XManager is replaced by a recorder)."""

import os
import subprocess
import sys
import types

import pytest

from xm_launch import launch
from xm_launch.sweep import parse_override, work_units

from test_train import REPO, load_config
from conftest import xla_flags

CO = "configs/catastrophic_overfitting.py"


def test_the_co_sweep_has_one_checked_unit_per_method_and_beta():
  units = work_units(f"{CO}:eps=0.2,smoke", ["--config.seed=3"], "/runs/co")
  assert len(units) == 12
  assert len({u.workdir for u in units}) == 12
  assert units[0].name == "fgsm_b0_e0.2" and units[0].workdir == "/runs/co/fgsm_b0_e0.2"
  for unit in units:
    method, beta = unit.name.split("_b")[0], float(unit.name.split("_b")[1].split("_e")[0])
    config = load_config("catastrophic_overfitting", unit.config.partition(":")[2])
    assert config.data.transform.beta == beta
    assert config.train.attack.eps == 0.2 and config.num_epochs == 3.0  # eps and smoke kept
    assert (config.train.grad_align > 0) == (method == "grad_align")
    assert unit.flags()["config.seed"] == "3"


def test_the_co_sweep_takes_seeds_and_a_run_its_seed():
  units = work_units(f"{CO}:eps=0.2,smoke,seeds=3", [], "/runs/co")
  assert len(units) == 36 and units[1].name == "fgsm_b0_e0.2_s1"
  seeds = [load_config("catastrophic_overfitting", u.config.partition(":")[2]).seed for u in units[:3]]
  assert seeds == [0, 1, 2]
  assert load_config("catastrophic_overfitting", "seed=4").seed == 4
  for arg, message in (("seeds=3", "seeds=3 makes a sweep"), ("seed=-1", "seed='-1' must be an integer")):
    with pytest.raises(ValueError, match=message):
      load_config("catastrophic_overfitting", arg)


def test_a_common_override_that_makes_units_alike_is_refused():
  """seeds=3 sets each unit's seed through its arg; `-- --config.seed=1` would replace all three
  with seed 1 and run each method and beta three times alike."""
  with pytest.raises(ValueError, match=r"work units 'fgsm_b0_e0.2_s0' and 'fgsm_b0_e0.2_s1' would run "
                                       r"the same experiment: --config.seed replaces"):
    work_units(f"{CO}:eps=0.2,smoke,seeds=3", ["--config.seed=1", "--config.num_epochs=1"], "/runs/co")
  units = work_units(f"{CO}:eps=0.2,smoke,seeds=3", ["--config.num_epochs=1"], "/runs/co")
  assert len(units) == 36  # an override the sweep does not vary leaves the units apart


def test_the_co_sweep_passes_lambda_to_grad_align_units_only():
  units = work_units(f"{CO}:eps=0.2,lambda=2,smoke", [], "/runs/co")
  for unit in units:
    config = load_config("catastrophic_overfitting", unit.config.partition(":")[2])
    assert config.train.grad_align == (2.0 if unit.name.startswith("grad_align") else 0.0), unit.name


def test_a_config_without_sweep_is_one_unit_in_the_root():
  (unit,) = work_units("configs/digits.py:adversarial", ["--config.num_epochs=2"], "/runs/d")
  assert unit.workdir == "/runs/d"
  assert unit.command() == ["python", "main.py", "--config=configs/digits.py:adversarial",
                            "--workdir=/runs/d", "--config.num_epochs=2"]


def test_bad_overrides_and_files_are_named_before_launching():
  with pytest.raises(ValueError, match=r"config.train.atack does not exist, so --config.train.atack.eps cannot be set "
                                       r"\(config.train has: attack, "):
    work_units(CO, ["--config.train.atack.eps=0.1"], "/r")
  with pytest.raises(ValueError, match="--config.<field>=<value>"):
    parse_override("--seed=1")
  with pytest.raises(FileNotFoundError, match="configs/nope.py"):
    work_units("configs/nope.py", [], "/r")
  with pytest.raises(ValueError, match="--accelerator='gpu'"):
    launch.requirements("gpu")
  assert launch.requirements("tpu_v4=8") == {"tpu_v4": 8}
  assert launch.jax_wheel({"tpu_v4": 8}) == "jax[tpu]"
  assert launch.jax_wheel({"local_gpu": 1}) == "jax[cuda13]"
  assert launch.jax_wheel({}) == "jax"


def _recording_xmanager(recorded: dict) -> dict[str, types.ModuleType]:
  """Stand-ins for xmanager.xm and xm_local that record what the launcher asks of them."""
  xm = types.ModuleType("xmanager.xm")
  xm.ModuleName = lambda name: ("module", name)
  xm.JobRequirements = lambda **resources: ("requirements", resources)
  xm.python_container = lambda **kw: recorded.setdefault("container", kw) and "packageable"
  xm.Job = lambda **kw: kw

  class Experiment:
    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def package(self, packageables):
      recorded["packaged"] = packageables
      return ["executable"]

    def add(self, job):
      recorded.setdefault("jobs", []).append(job)

  class Local:
    Spec = staticmethod(lambda: "local spec")

    def __init__(self, requirements):
      self.requirements = requirements

  xm_local = types.ModuleType("xmanager.xm_local")
  xm_local.Local, xm_local.Vertex = Local, Local
  xm_local.create_experiment = lambda experiment_title: recorded.setdefault("title", experiment_title) and Experiment()
  package = types.ModuleType("xmanager")
  package.xm, package.xm_local = xm, xm_local
  return {"xmanager": package, "xmanager.xm": xm, "xmanager.xm_local": xm_local}


def test_launch_adds_one_job_per_unit_with_main_flags(monkeypatch):
  recorded = {}
  for name, module in _recording_xmanager(recorded).items():
    monkeypatch.setitem(sys.modules, name, module)
  units = work_units(CO, [], "/runs/co")
  launch.launch(units, {"local_gpu": 1}, title="co sweep")
  assert recorded["title"] == "co sweep"
  assert recorded["container"]["entrypoint"] == ("module", "main")
  assert recorded["container"]["path"] == REPO
  assert any("jax[cuda13]" in step for step in recorded["container"]["docker_instructions"])
  assert [job["args"] for job in recorded["jobs"]] == [u.flags() for u in units]
  assert all(job["executor"].requirements == ("requirements", {"local_gpu": 1}) for job in recorded["jobs"])
  # The hosts of a TPU slice join one multi-process job (JAX's cluster detection)
  recorded.clear()
  launch.launch(units, {"tpu_v4": 32}, title="co sweep", executor="vertex")
  assert [job["args"] for job in recorded["jobs"]] == [{**u.flags(), "distributed": True} for u in units]


def test_dry_run_lists_the_units_and_each_command_runs_main():
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "xm_launch/launch.py", f"--config={CO}:smoke",
                        "--workdir_root=/runs/co", "--dry_run", "--", "--config.seed=2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  commands = [line.split() for line in out.stdout.splitlines() if line.startswith("python main.py")]
  assert len(commands) == 12 and "12 work unit(s)" in out.stdout
  # main.py accepts a unit's flags as they are (its own --dry_run: nothing is trained or written)
  first = commands[0][1:] + ["--dry_run", "--config.num_epochs=0.5"]
  ran = subprocess.run([sys.executable] + first, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert ran.returncode == 0, ran.stderr[-2000:]
  assert "dry run of job 'train'" in ran.stdout
