"""The empirical NTK engine: tiles planned from a memory budget, computed on every device, stored
on disk as they finish (see engine.py for the tile loop, plan.py for the cost model,
compiled_memory.py for the plan held to XLA's count of its programs' memory)."""

from ntk_scale.ntk.engine import empirical_ntk, fit_plan, plan_for, run_tiles
from ntk_scale.ntk.plan import KernelPlan, KernelPlanError
from ntk_scale.ntk.tile_math import LogitSpec, parse_logits

__all__ = ["empirical_ntk", "fit_plan", "plan_for", "run_tiles", "KernelPlan", "KernelPlanError", "LogitSpec",
           "parse_logits"]
