"""The work units of a sweep: one `main.py` run, with its own workdir, per point of the sweep a
config file defines. Pure Python, so a sweep is built and checked without XManager.

A config file may define `get_sweep(arg) -> list[dict]`; each dict is one work unit:
  "name":  the unit's workdir under the root (default: its overrides, joined)
  "arg":   the `file.py:arg` argument of get_config for this unit (default: the one launched with)
  "a.b":   any other key sets config field a.b, as `--config.a.b=value` would
Without get_sweep a launch is a single work unit whose workdir is the root itself. Overrides given to the launcher apply to every
unit (a unit's own values win over them, but not what its "arg" builds). A value that is a string
is the flag's text; any other (a number, bool, tuple, None) is written so that main.py's flag
parser reads back that value (None: no flag, so the field keeps get_config's None). Every unit is
checked before anything is launched: its fields exist, main.py's own parser (config_flags) accepts
its whole flag list and reads back the sweep's values, and a train job passes the train job's
checks that load no data, so a typo or a refused value fails at once, naming the unit and the flag;
units that would run one experiment twice (a common override replacing what the sweep sets per
unit, such as its seeds) are refused. The config file must lie inside the repository (the
container holds the repository only); units name it relative to the repository root.
"""

import dataclasses
import importlib.util
import os
import re
import warnings
from typing import Any

import ml_collections

from ntk_scale.config_fields import missing_field_message

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESERVED = ("name", "arg")


@dataclasses.dataclass(frozen=True)
class WorkUnit:
  name: str
  config: str  # file.py or file.py:arg, relative to the repository
  overrides: tuple[tuple[str, Any], ...]  # (field, value), applied as --config.<field>=<value>
  workdir: str

  def flags(self) -> dict[str, Any]:
    """main.py's flags, for xm.Job(args=...); a field set to None has none (see _flag_value)."""
    return {"config": self.config, "workdir": self.workdir,
            **{f"config.{field}": _flag_value(value) for field, value in self.overrides
               if value is not None}}

  def command(self, flags: dict[str, Any] | None = None) -> list[str]:
    """main.py's command line with `flags` (default: the unit's own)."""
    return ["python", "main.py"] + [f"--{k}={v}" for k, v in (flags or self.flags()).items()]


def _flag_value(value: Any) -> str:
  """`value` as main.py's parser (ml_collections' config_flags) reads it back: a tuple as a Python
  literal, its strings quoted (unquoted, `(a,b)` would be the one string '(a,b)'), floats in full;
  a string is the flag's text as is. None has no text a float, int or bool field accepts: the unit
  passes no flag, which keeps get_config's value (checked to be None, by _check_flags)."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  if isinstance(value, float):
    return repr(value)
  return str(value)


def repo_config(path: str) -> str:
  """The config file `path` (absolute, or relative to the repository) relative to the repository
  root, as the container (which holds the repository only, as its working directory) finds it; a
  file outside the repository is refused."""
  root = os.path.realpath(REPO)
  full = os.path.realpath(path if os.path.isabs(path) else os.path.join(REPO, path))
  relative = os.path.relpath(full, root)
  if relative == os.pardir or relative.startswith(os.pardir + os.sep):
    raise ValueError(f"--config={path}: the file lies outside the repository {root}, which is all "
                     f"the container holds; move it into the repository.")
  return relative


def _module(path: str):
  full = path if os.path.isabs(path) else os.path.join(REPO, path)
  if not os.path.isfile(full):
    raise FileNotFoundError(f"--config={path}: no such config file.")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(full))[0], full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_override(flag: str) -> tuple[str, str]:
  """`--config.a.b=value` -> ("a.b", "value"); anything else is an error naming the flag."""
  match = re.fullmatch(r"--config\.([A-Za-z_][\w.]*)=(.*)", flag)
  if not match:
    raise ValueError(f"{flag!r}: the launcher passes on only overrides of the form --config.<field>=<value>.")
  return match.group(1), match.group(2)


def _check_field(config: ml_collections.ConfigDict, field: str, where: str) -> None:
  message = missing_field_message(config, field)
  if message:
    raise ValueError(f"{where}: {message}")


def main_config(unit: WorkUnit) -> ml_collections.ConfigDict:
  """The config main.py builds from `unit`'s flags, by main.py's own flags (config_flags'
  DEFINE_config_file, locked, and --workdir) on a fresh FlagValues; a value it refuses raises
  absl's flags.Error naming the flag."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["main.py"] + [f"--{k}={v}" for k, v in unit.flags().items()]
  argv[1] = f"--config={os.path.join(REPO, unit.config)}"  # wherever the launcher runs
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "config", flag_values=values,
                                           lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "workdir", flag_values=values)
  with warnings.catch_warnings():  # config_flags loads the file with the deprecated load_module()
    warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
    values(argv)
  return holder.value


def _field(config: ml_collections.ConfigDict, field: str) -> Any:
  for part in field.split("."):
    config = config[part]
  return config


def _check_flags(unit: WorkUnit, where: str) -> ml_collections.ConfigDict:
  """main.py's config for `unit`: its flags parsed by main.py's parser, each non-string sweep value
  read back as itself; errors name the unit and the flag."""
  from absl import flags

  try:
    config = main_config(unit)
  except (flags.Error, ValueError, TypeError) as e:
    raise ValueError(f"{where}: main.py would refuse the flags of work unit {unit.name!r}: {e}") from None
  for field, value in unit.overrides:
    if isinstance(value, str):  # the flag's text: main.py reads it as the launcher passes it on
      continue
    parsed = _field(config, field)
    expected = tuple(value) if isinstance(value, list) else value
    if (parsed is None) != (expected is None) or parsed != expected:
      flag = (f"no --config.{field} flag (None has no text a {type(parsed).__name__} field accepts)"
              if value is None else f"--config.{field}={_flag_value(value)}")
      raise ValueError(f"{where}: work unit {unit.name!r} sets config.{field}={value!r}, but with "
                       f"{flag}, main.py's config has {parsed!r}; set it through the config's "
                       f"argument instead.")
  return config


def _check_job(config: ml_collections.ConfigDict, name: str, where: str, num_devices: int) -> None:
  """The checks main.py's job makes before it writes anything, without data (jobs.check_config), at
  the `num_devices` a unit sees (batch sizes are checked against it)."""
  from ntk_scale import jobs

  try:
    jobs.check_config(config, num_devices)
  except ValueError as e:
    raise ValueError(f"{where}: main.py would refuse work unit {name!r}: {e}") from None


def _unit_name(entry: dict[str, Any]) -> str:
  items = [f"{k.split('.')[-1]}={v}" for k, v in entry.items() if k not in _RESERVED]
  if "arg" in entry:
    items.insert(0, str(entry["arg"]))
  return entry.get("name") or "_".join(items) or "run"


def _safe(name: str) -> str:
  return re.sub(r"[^\w.=+-]+", "_", name).strip("_") or "run"


def work_units(config: str, overrides: list[str], workdir_root: str, num_devices: int = 1
               ) -> list[WorkUnit]:
  """The sweep `config` (file.py or file.py:arg) defines, one WorkUnit each, checked as main.py
  would check it on `num_devices` devices (launch.devices_per_unit; 1 where the launcher cannot
  tell: batch sizes then go unchecked)."""
  path, _, arg = config.partition(":")
  module = _module(path)
  path = repo_config(path)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config={path} defines no get_config(arg).")
  common = [parse_override(flag) for flag in overrides]
  entries = module.get_sweep(arg) if hasattr(module, "get_sweep") else [{}]
  if not entries:
    raise ValueError(f"{path}: get_sweep({arg!r}) returned no work units.")
  units, names, runs = [], set(), []
  for entry in entries:
    unit_arg = str(entry.get("arg", arg))
    built = module.get_config(unit_arg)
    fields = dict(common)
    fields.update({k: v for k, v in entry.items() if k not in _RESERVED})
    for field in fields:
      _check_field(built, field, f"{path}:{unit_arg}")
    name = _safe(_unit_name(entry)) if len(entries) > 1 or entry else "run"
    if not name.strip("."):  # its workdir would be the root or the root's parent
      raise ValueError(f"{path}: the work unit of get_sweep entry {entry!r} is named {name!r}, which "
                       f"as a workdir under the root is the root itself or its parent; give it "
                       f"another 'name'.")
    if name in names:
      raise ValueError(f"{path}: two work units are named {name!r}; give them distinct 'name's.")
    names.add(name)
    single = not hasattr(module, "get_sweep")  # the launch itself is the one work unit
    unit = WorkUnit(name=name, config=f"{path}:{unit_arg}" if unit_arg else path,
                    overrides=tuple(fields.items()),
                    workdir=workdir_root if single else os.path.join(workdir_root, name))
    _check_job(_check_flags(unit, f"{path}:{unit_arg}"), name, f"{path}:{unit_arg}", num_devices)
    units.append(unit)
    runs.append((name, built, fields))
  _refuse_identical_units(runs, common, path)
  return units


def _refuse_identical_units(runs: list[tuple[str, ml_collections.ConfigDict, dict[str, Any]]],
                            common: list[tuple[str, str]], path: str) -> None:
  """Two units whose configs end up equal would run one experiment twice: a common override
  (`-- --config.seed=1`) replaces a field the sweep sets per unit (its seeds)."""
  from flax import traverse_util  # imported here: work_units has imported it with the jobs already

  seen = {}
  for name, built, fields in runs:
    leaves = traverse_util.flatten_dict(built.to_dict(), sep=".")  # every field, references resolved
    values = {field: repr(value) for field, value in leaves.items()}
    final = {**values, **{field: f"--config.{field}={value}" for field, value in fields.items()}}
    key = tuple(sorted(final.items()))
    if key in seen:
      other, other_values = seen[key]
      erased = [f"--config.{field}" for field, _ in common if values.get(field) != other_values.get(field)]
      raise ValueError(f"{path}: work units {other!r} and {name!r} would run the same experiment: "
                       f"{', '.join(erased) or 'their overrides'} replaces what the sweep sets per unit "
                       f"(drop it, or set it in the sweep's argument).")
    seen[key] = (name, values)
