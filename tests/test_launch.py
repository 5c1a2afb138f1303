"""The launcher builds a sweep's work units (checked, one workdir each) and hands them to XManager
as one job per unit, without launching anything here (XManager is replaced by a recorder)."""

import contextlib
import os
import re
import subprocess
import sys
import types

import pytest
from absl import flags
from absl.testing import flagsaver

from xm_launch import launch, sweep
from xm_launch.sweep import parse_override, work_units

from main_py_flags import main_py_config, main_py_in_process
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
  with pytest.raises(FileNotFoundError, match="--config=configs/nope.py: no such config file"):
    work_units("configs/nope.py", [], "/r")
  with pytest.raises(ValueError, match="--accelerator='gpu'"):
    launch.requirements("gpu")
  with pytest.raises(ValueError, match="--accelerator='local_gpu=0': expected name=count"):
    launch.requirements("local_gpu=0")
  assert launch.requirements("") == {}  # CPU only
  assert launch.requirements(" TPU_V3=8,", "vertex") == {"tpu_v3": 8}
  assert parse_override("--config.data.data_dir=") == ("data.data_dir", "")  # an empty string is a value
  assert launch.requirements("tpu_v3=8", "vertex") == {"tpu_v3": 8}
  with pytest.raises(ValueError, match=r"--accelerator='tpu_v4=8': XManager's vertex executor does not "
                                       r"provide tpu_v4; it provides p4, .* \(empty for CPU only\)\. TPU v4 "
                                       r"and later slices: start main.py with --distributed on every host"):
    launch.requirements("tpu_v4=8", "vertex")
  # The local executor gives Docker only local_gpu: an h100 unit ran on the CPU.
  with pytest.raises(ValueError, match=r"local executor does not provide h100; it provides local_gpu"):
    launch.requirements("h100=8", "local")
  with pytest.raises(ValueError, match=r"vertex executor does not provide local_gpu"):
    launch.requirements("local_gpu=1", "vertex")
  assert launch.jax_wheel({"tpu_v3": 8}) == "jax[tpu]"
  assert launch.jax_wheel({"local_gpu": 1}) == "jax[cuda13]"
  assert launch.jax_wheel({}) == "jax"
  # Every accelerator the Vertex AI executor provides counts its devices; TPUs of either generation
  # get the TPU wheel and --distributed.
  accelerators = set(launch.EXECUTOR_RESOURCES["vertex"]) - {"cpu", "ram", "memory"}
  assert {name for name in accelerators if launch.devices_per_unit({name: 2}) == 2} == accelerators
  assert all(launch.on_tpu({name: 8}) and launch.jax_wheel({name: 8}) == "jax[tpu]"
             for name in ("tpu_v2", "tpu_v3"))


def test_an_override_below_a_value_is_named_as_an_absent_field():
  """config.seed is an int and config.data.name a string: a path through them names no field, and
  is refused as one (`'x' in 0` is a TypeError, and 'g' in 'digits' would look a part up)."""
  for field, parent in (("seed.x", "seed"), ("data.name.g", "data.name")):
    with pytest.raises(ValueError, match=rf"config\.{re.escape(field)} does not exist, so "
                                         rf"--config\.{re.escape(field)} cannot be set "
                                         rf"\(config\.{re.escape(parent)} has: none\)"):
      work_units("configs/digits.py:adversarial", [f"--config.{field}=1"], "/r")


def _field(config, field: str):
  for part in field.split("."):
    config = config[part]
  return config


# A sweep over the digits smoke config, in a stand-in repository (the launcher's REPO): arg
# "epoch2" sets evaluate.epoch, whose default is None; the units are the JSON after "# units: ".
_SWEEP = """import json
from configs.digits import get_config as _digits


def get_config(arg=""):
  c = _digits("smoke")
  if arg == "epoch2":
    c.evaluate.epoch = 2.0
  return c


def get_sweep(arg=""):
  return SWEEP
"""


def _sweep_repo(tmp_path, monkeypatch, units: list[dict]) -> str:
  """A repository holding sweep.py, whose get_sweep returns `units`; the launcher's REPO."""
  (tmp_path / "sweep.py").write_text(_SWEEP + f"\n\nSWEEP = {units!r}\n")
  monkeypatch.setattr(sweep, "REPO", str(tmp_path))
  return "sweep.py"


def test_sweep_values_are_read_back_by_main_py_as_the_sweep_set_them(tmp_path, monkeypatch):
  """Each unit's flags, parsed by main.py's own flags, give the sweep's value: strings, tuples of
  strings (quoted; unquoted `(a,b)` would be the one string '(a,b)'), ints, floats, bools, None
  (no flag: the default None, which no float or bool flag text sets)."""
  values = {"name": "values", "train.mode": "A", "data.data_dir": "/data dir/x",
            "evaluate.transfer_sets": ("workdirs/a/adversarial/pgd", "workdirs/b/adversarial/pgd"),
            "eigen_features.source": "empirical", "kernel.classes": (0, 1), "seed": 7,
            "num_epochs": 0.1 + 0.2, "save_adversarial": False, "kernel.rotate": True,
            "evaluate.epoch": 1.5}
  nones = {"name": "nones", "evaluate.epoch": None, "kernel.epoch": None, "kernel.rotate": None,
           "data.data_dir": None}
  one = {"name": "one", "evaluate.transfer_sets": ("a,b",), "kernel.classes": [3]}
  path = _sweep_repo(tmp_path, monkeypatch, [values, nones, one])
  units = work_units(path, ["--config.kernel.rotate=false"], "/runs/s")
  for unit, entry in zip(units, (values, nones, one)):
    config = main_py_config(unit.command(), str(tmp_path))
    for field, value in entry.items():
      if field != "name":
        parsed = _field(config, field)
        assert parsed == (tuple(value) if isinstance(value, list) else value), (unit.name, field)
        assert type(parsed) is type(value) or isinstance(value, list), (unit.name, field, parsed)
  assert "--config.evaluate.epoch=None" not in " ".join(units[1].command())
  # None is not a flag: a field get_config sets cannot be put back to None by one, so it is refused
  path = _sweep_repo(tmp_path, monkeypatch, [{"arg": "epoch2", "evaluate.epoch": None}, {"arg": "epoch2"}])
  with pytest.raises(ValueError, match=r"work unit 'epoch2_epoch=None' sets config.evaluate.epoch=None, but "
                                       r"with no --config.evaluate.epoch flag .*, main.py's config has 2.0"):
    work_units(path, [], "/runs/s")


def test_values_main_py_would_refuse_are_refused_before_launching(tmp_path, monkeypatch):
  """Each unit's whole flag list goes through main.py's parser, and a train job through the train
  job's checks that load no data, so a bad value fails here, naming the unit and the flag."""
  with pytest.raises(ValueError, match=r"refuse the flags of work unit 'fgsm_b0_e0.2': flag "
                                       r"--config.num_epochs=three: could not convert string to float"):
    work_units(f"{CO}:eps=0.2,smoke", ["--config.num_epochs=three"], "/runs/co")
  with pytest.raises(ValueError, match=r"refuse work unit 'fgsm_b0_e0.2': config.train.mode='Z'; expected"):
    work_units(f"{CO}:eps=0.2,smoke", ["--config.train.mode=Z"], "/runs/co")
  with pytest.raises(ValueError, match=r"config.num_epochs=-1.0 must be positive"):
    work_units(f"{CO}:eps=0.2,smoke", ["--config.num_epochs=-1"], "/runs/co")
  with pytest.raises(ValueError, match=r"config.job='trian' is not a known job"):
    work_units("configs/digits.py:smoke", ["--config.job=trian"], "/runs/d")
  # A job other than train is checked by its own job, which needs the workdir: its fields pass here
  (unit,) = work_units("configs/digits.py:smoke", ["--config.job=kernel", "--config.kernel.epoch=1"], "/d")
  assert main_py_config(unit.command()).kernel.epoch == 1.0
  path = _sweep_repo(tmp_path, monkeypatch, [{"seed": "x"}, {"seed": 1}])  # a string: the flag's text
  with pytest.raises(ValueError, match=r"work unit 'seed=x': flag --config.seed=x: invalid literal"):
    work_units(path, [], "/runs/s")


def test_units_named_only_dots_are_refused(tmp_path, monkeypatch):
  """A unit named '.' or '..' would have the root, or the root's parent, as its workdir."""
  for name in (".", "..", "..."):
    path = _sweep_repo(tmp_path, monkeypatch, [{"name": "a", "seed": 1}, {"name": name, "seed": 2}])
    with pytest.raises(ValueError, match=rf"get_sweep entry \{{'name': '{name}', 'seed': 2\}} is "
                                         rf"named '{name}', which as a workdir under the root"):
      work_units(path, [], "/runs/s")
  path = _sweep_repo(tmp_path, monkeypatch, [{"name": ".a", "seed": 1}, {"name": "b..", "seed": 2}])
  assert [u.workdir for u in work_units(path, [], "/runs/s")] == ["/runs/s/.a", "/runs/s/b.."]


def test_the_config_is_named_inside_the_repository(tmp_path):
  """The container holds the repository only, as its working directory: an absolute path inside it
  becomes relative to it; a file outside it is refused."""
  (unit,) = work_units(f"{REPO}/configs/digits.py:smoke", [], "/runs/d")
  assert unit.config == "configs/digits.py:smoke"
  (tmp_path / "outside.py").write_text("def get_config(arg=''):\n  return None\n")
  for config in (str(tmp_path / "outside.py"), os.path.relpath(tmp_path / "outside.py", REPO)):
    with pytest.raises(ValueError, match=r"outside the repository .*, which is all the container holds"):
      work_units(config, [], "/runs/d")


def test_workdir_roots_are_mounted_locally_and_on_cloud_storage_on_vertex():
  assert launch.workdir_volumes("/tmp/co", "local") == {"/tmp/co": "/tmp/co"}
  assert launch.workdir_volumes("/tmp/co/", "local") == {"/tmp/co": "/tmp/co"}
  assert launch.workdir_volumes("gs://bucket/co", "local") == {}
  assert launch.workdir_volumes("gs://bucket/co", "vertex") == {}
  with pytest.raises(ValueError, match=r"--workdir_root=workdirs/co: a relative path .* give an absolute"):
    launch.workdir_volumes("workdirs/co", "local")
  for root in ("/tmp/co", "workdirs/co"):
    with pytest.raises(ValueError, match=rf"--workdir_root={root}: Vertex AI .* use a Cloud Storage path"):
      launch.workdir_volumes(root, "vertex")


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

  class Vertex:
    Spec = staticmethod(lambda: "vertex spec")

    def __init__(self, requirements):
      self.requirements = requirements

  class Local(Vertex):
    Spec = staticmethod(lambda: "local spec")

    def __init__(self, requirements, docker_options=None):
      super().__init__(requirements)
      self.docker_options = docker_options

  xm_local = types.ModuleType("xmanager.xm_local")
  xm_local.Local, xm_local.Vertex = Local, Vertex
  xm_local.DockerOptions = lambda volumes: ("docker options", volumes)
  xm_local.create_experiment = lambda experiment_title: recorded.setdefault("title", experiment_title) and Experiment()
  package = types.ModuleType("xmanager")
  package.xm, package.xm_local = xm, xm_local
  return {"xmanager": package, "xmanager.xm": xm, "xmanager.xm_local": xm_local}


def test_launch_adds_one_job_per_unit_with_main_flags(monkeypatch, tmp_path):
  recorded = {}
  for name, module in _recording_xmanager(recorded).items():
    monkeypatch.setitem(sys.modules, name, module)
  root = str(tmp_path / "co")
  units = work_units(CO, [], root)
  shared = launch.shared_cache_environment(root)
  launch.launch(units, {"local_gpu": 1}, title="co sweep", volumes=launch.workdir_volumes(root, "local"),
                env_vars=shared)
  assert shared == {"JAX_COMPILATION_CACHE_DIR": f"{root}/compilation_cache"}
  assert all(job["env_vars"] == shared for job in recorded["jobs"])  # one cache for every unit
  # the root is mounted at the same path in every container, so the units' results stay here
  assert all(job["executor"].docker_options == ("docker options", {root: root}) for job in recorded["jobs"])
  assert os.path.isdir(root)
  assert recorded["title"] == "co sweep"
  assert recorded["container"]["entrypoint"] == ("module", "main")
  assert recorded["container"]["path"] == REPO
  assert any("jax[cuda13]" in step for step in recorded["container"]["docker_instructions"])
  assert [job["args"] for job in recorded["jobs"]] == [u.flags() for u in units]
  assert all(job["executor"].requirements == ("requirements", {"local_gpu": 1}) for job in recorded["jobs"])
  # A TPU unit runs with --distributed (JAX's cluster detection)
  recorded.clear()
  units = work_units(CO, [], "gs://bucket/co")
  launch.launch(units, {"tpu_v3": 8}, title="co sweep", executor="vertex",
                volumes=launch.workdir_volumes("gs://bucket/co", "vertex"))
  assert [job["args"] for job in recorded["jobs"]] == [{**u.flags(), "distributed": True} for u in units]
  assert all(job["env_vars"] == {} for job in recorded["jobs"])
  assert launch.shared_cache_environment("gs://bucket/co/") == {
      "JAX_COMPILATION_CACHE_DIR": "gs://bucket/co/compilation_cache"}
  assert recorded["container"]["executor_spec"] == "vertex spec"
  assert all(type(job["executor"]).__name__ == "Vertex" for job in recorded["jobs"])


def test_dry_run_lists_the_units_and_each_command_runs_main(capsys):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "xm_launch/launch.py", f"--config={CO}:smoke",
                        "--workdir_root=/runs/co", "--dry_run", "--", "--config.seed=2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  commands = [line.split() for line in out.stdout.splitlines() if line.startswith("python main.py")]
  assert len(commands) == 12 and "12 work unit(s)" in out.stdout
  # main.py accepts a unit's flags as they are (its own --dry_run: nothing is trained or written)
  with main_py_in_process(*commands[0][2:], "--dry_run", "--config.num_epochs=0.5") as (main, argv):
    main.main(main.parse_flags(argv))
  assert "dry run of job 'train'" in capsys.readouterr().out


@contextlib.contextmanager
def _launch_flags(**values):
  """launch.py's flags set to `values` as absl would parse them, for a call of launch.main; the
  flags' parsed state and values are restored after."""
  was_parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()
  try:
    with flagsaver.flagsaver(**values):
      yield
  finally:
    if not was_parsed:
      flags.FLAGS.unparse_flags()


def test_batch_sizes_are_checked_on_the_gpus_of_a_unit(capsys):
  """A GPU unit's one process sees its GPUs: a batch that does not split over them was refused
  only once the unit ran. A TPU v2/v3 count names TensorCores, each a device; CPU units, one."""
  assert launch.devices_per_unit({"h100": 8}) == 8 and launch.devices_per_unit({"local_gpu": 2}) == 2
  assert launch.devices_per_unit({"tpu_v3": 8}) == 8
  assert {launch.devices_per_unit(r) for r in ({}, {"cpu": 4, "ram": 2 ** 34})} == {1}
  bad = ["--config.batch_size=36", "--config.eval_batch_size=64"]
  with pytest.raises(ValueError, match=r"main.py would refuse work unit 'run': config\.batch_size=36 "
                                       r"must be a positive multiple of the device count \(8 devices\)"):
    work_units("configs/digits.py:smoke", bad, "/runs/d", num_devices=8)
  assert len(work_units("configs/digits.py:smoke", bad, "/runs/d", num_devices=4)) == 1
  # launch.py passes its --accelerator's count
  launch_flags = dict(config="configs/digits.py:smoke", workdir_root="gs://b/d", executor="vertex",
                      dry_run=True)
  with _launch_flags(**launch_flags, accelerator="h100=8"):
    with pytest.raises(ValueError, match=r"count \(8 devices\)"):
      launch.main(["launch.py", *bad])
  with _launch_flags(**launch_flags, accelerator="h100=4"):
    launch.main(["launch.py", *bad])
  assert ("1 work unit(s); executor vertex, resources {'h100': 4}; "
          "JAX_COMPILATION_CACHE_DIR=gs://b/d/compilation_cache." in capsys.readouterr().out)
  with _launch_flags(**launch_flags, accelerator="h100=4", shared_compilation_cache=False):
    launch.main(["launch.py", *bad])
  assert "1 work unit(s); executor vertex, resources {'h100': 4}.\n" in capsys.readouterr().out


def test_a_tpu_dry_run_prints_the_commands_the_units_run(capsys):
  """--dry_run shows each unit's command as launched: on TPUs with --distributed."""
  with _launch_flags(config="configs/digits.py:smoke", workdir_root="gs://b/d", executor="vertex",
                     dry_run=True, accelerator="tpu_v2=8"):
    launch.main(["launch.py"])
  assert capsys.readouterr().out.splitlines()[0] == (
      "python main.py --config=configs/digits.py:smoke --workdir=gs://b/d --distributed=True")


def test_sweeps_with_one_unit_no_unit_or_two_of_one_name_and_files_without_get_config(tmp_path,
                                                                                     monkeypatch):
  """A sweep of one unit is named by its overrides (its workdir under the root); an empty sweep, two
  units of one name and a file without get_config are refused, naming the file."""
  (unit,) = work_units(_sweep_repo(tmp_path, monkeypatch, [{"seed": 1}]), [], "/runs/s")
  assert (unit.name, unit.workdir, unit.config) == ("seed=1", "/runs/s/seed=1", "sweep.py")
  with pytest.raises(ValueError, match=r"sweep.py: get_sweep\(''\) returned no work units"):
    work_units(_sweep_repo(tmp_path, monkeypatch, []), [], "/runs/s")
  with pytest.raises(ValueError, match=r"sweep.py: two work units are named 'a'; give them distinct"):
    work_units(_sweep_repo(tmp_path, monkeypatch, [{"name": "a", "seed": 1}, {"name": "a", "seed": 2}]),
               [], "/runs/s")
  (tmp_path / "settings.py").write_text("SEED = 1\n")
  with pytest.raises(ValueError, match=r"--config=settings.py defines no get_config\(arg\)"):
    work_units("settings.py", [], "/runs/s")
