"""Launching ntk_scale experiments and sweeps (XManager, see launch.py)."""
