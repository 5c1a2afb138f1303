"""Whether `--config.<field>=...` names a field of a config: one check for main.py's flags and the
launcher's sweeps, so a misspelt or absent field is refused with what its parent holds."""

import ml_collections


def missing_field_message(config: ml_collections.ConfigDict, field: str) -> str | None:
  """Why --config.<field> cannot be set on `config` (the first part of its dotted path that is
  absent, and the fields its parent has), or None when the field exists."""
  node = config
  parts = field.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none"
      parent = "".join("." + p for p in parts[:i])
      return (f"config{parent}.{part} does not exist, so --config.{field} cannot be set "
              f"(config{parent} has: {known}).")
    node = node[part]
  return None
