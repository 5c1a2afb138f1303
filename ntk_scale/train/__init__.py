"""Training: state (state.py), optimizer and schedules, steps, writers, and the phase loop (loop.py)."""
