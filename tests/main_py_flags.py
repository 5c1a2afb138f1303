"""main.py's own flags, loaded in the test's process: its flag checks run without a process of
their own (seconds of imports each), and tests of what builds its command lines (xm_launch) read
them back with the real parser, not a copy of its flag definitions."""

import contextlib
import importlib.util
import logging
import os
import sys
import warnings

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _another_entry_point(module_name: str) -> bool:
  """Whether the module is one of the repository's other programs (xm_launch/, benchmarks/), whose
  flags share absl's FLAGS with main.py's when imported here."""
  path = getattr(sys.modules.get(module_name), "__file__", None) or ""
  top = os.path.relpath(os.path.abspath(path), REPO).split(os.sep)[0]
  return top in ("xm_launch", "benchmarks")


@contextlib.contextmanager
def main_py_in_process(*args: str):
  """main.py loaded in this process as `python main.py <args>` loads it, so that its flag parsing
  and main() run without a process of their own (seconds of imports each); yields (the module, its
  argv). Its --config flag reads the config file named in sys.argv, so sys.argv is that argv
  meanwhile. Its flags go on absl's global FLAGS, where xm_launch/launch.py (which
  tests/test_launch.py imports) defines --config and --dry_run too and requires --workdir_root:
  the flags of the repository's other programs are set aside, and put back after with the parsed
  state. So are the logging levels and root handlers: absl's --verbosity, unparsed, set absl's
  logger to WARNING, and the INFO lines later tests read (caplog) were dropped."""
  values, argv = flags.FLAGS, ["main.py", *args]
  was_parsed, saved_argv = values.is_parsed(), sys.argv
  absl_logger = logging.getLogger("absl")
  levels, root_handlers = (absl_logger.level, logging.root.level), list(logging.root.handlers)
  aside = {flag.name: (module, flag) for module, defined in values.flags_by_module_dict().items()
           if _another_entry_point(module) for flag in defined
           if values.find_module_defining_flag(flag.name) == module}.values()
  spec = importlib.util.spec_from_file_location("main", os.path.join(REPO, "main.py"))
  main = importlib.util.module_from_spec(spec)
  for _, flag in aside:
    delattr(values, flag.name)
  sys.argv = argv
  try:
    with warnings.catch_warnings():  # config_flags loads the file with the deprecated load_module()
      warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
      spec.loader.exec_module(main)
      yield main, argv
  finally:
    sys.argv = saved_argv
    own = {v.name for v in vars(main).values() if isinstance(v, flags.FlagHolder)}
    for name in [n for n in values if n in own or n.startswith("config.")]:
      delattr(values, name)
    for module, flag in aside:
      values[flag.name] = flag
      values.register_flag_by_module(module, flag)
      values.register_flag_by_module_id(id(sys.modules[module]), flag)
    if not was_parsed:
      values.unparse_flags()
    absl_logger.setLevel(levels[0])
    logging.root.setLevel(levels[1])
    logging.root.handlers[:] = root_handlers


def main_py_config(command: list[str], root: str = REPO):
  """The config main.py's flags build from `command` (python main.py --config=<file relative to
  `root`> ...). Parsed by absl itself, so a refused value raises its flags.Error."""
  args = [f"--config={os.path.join(root, a.partition('=')[2])}" if a.startswith("--config=") else a
          for a in command[2:]]
  with main_py_in_process(*args) as (main, argv):
    flags.FLAGS(argv)
    return main._CONFIG.value
