"""Files written whole or not at all: into a temporary beside the target, then renamed over it
(`os.replace` is atomic within a file system). A killed job leaves the old file or the new one,
never half of one, plus at most a stray temporary, whose name holds ".tmp" so that readers listing
a directory skip it.
"""

import json
import os
from typing import IO, Any, Callable


def temporary_name(path: str) -> str:
  """A temporary beside `path`, one per process (hosts sharing a directory never collide)."""
  return f"{path}.tmp{os.getpid()}"


def write_atomic(path: str, write: Callable[[IO[bytes]], Any]) -> None:
  """`write(f)` into a temporary binary file beside `path`, then renamed over it."""
  tmp = temporary_name(path)
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str, value: Any, **dump_options: Any) -> None:
  """`value` as JSON (json.dumps' `dump_options`, e.g. indent=2, sort_keys=True)."""
  write_text(path, json.dumps(value, **dump_options))


def save_figure(fig, path: str, dpi: int) -> str:
  """A matplotlib figure laid out tightly, saved in the format of `path`'s extension and closed."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel  (plots only)

  fig.tight_layout()
  write_atomic(path, lambda f: fig.savefig(f, format=os.path.splitext(path)[1][1:], dpi=dpi))
  plt.close(fig)
  return path
