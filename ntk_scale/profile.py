"""A trace of a few steps of a job's loop (config.profile_steps: each training phase's train steps,
the kernel job's tile steps) for TensorBoard's profile plugin (xprof): where a slow job spends its
time, per device and per op, and how long the devices wait on the host or on each other.

jax.profiler writes `<log dir>/plugins/profile/<run>/<host>.xplane.pb`; traced into a local
directory first and then copied into the job's directory (local or gs://, through files.py: the
phase directory, beside its TensorBoard metrics, or the kernel's), where `tensorboard --logdir
<workdir>` finds it. Process 0 traces its own devices.
"""

import os
import tempfile
from typing import Any

import jax
from absl import logging

from ntk_scale import files
from ntk_scale.config_numbers import is_whole_number

# The first steps of a training run compile and warm up; the trace starts after them. The kernel
# job compiles its programs before its loop (its memory check), so it traces from its first step.
SKIP_STEPS = 2


def check_profile_steps(value: Any) -> None:
  if not is_whole_number(value, 0):
    raise ValueError(f"config.profile_steps={value!r} must be an integer >= 0 (train or kernel tile "
                     f"steps traced for TensorBoard's profile plugin; 0: none).")


class StepProfile:
  """Traces steps [start + skip, start + skip + num_steps) of a loop that begins at `start`
  (clipped to `end`, None: unbounded), into `directory`. Call `before(step)` and
  `after(step, outputs)` around each step; leaving the context ends a trace still running (a loop
  stopped, or shorter than asked), or warns that a loop of `skip` steps or fewer traced none."""

  def __init__(self, directory: str, start: int, end: int | None, num_steps: int,
               skip: int = SKIP_STEPS):
    self._directory = directory
    self._first = start + skip
    self._stop = self._first + num_steps if end is None else min(self._first + num_steps, end)
    self._asked = num_steps > 0 and jax.process_index() == 0
    self._enabled = self._asked and self._first < self._stop
    self._traced = False
    self._local: tempfile.TemporaryDirectory | None = None

  def __enter__(self) -> "StepProfile":
    return self

  def __exit__(self, *exc_info) -> None:
    if self._local is not None:
      self._finish(None)
    elif self._asked and not self._traced and exc_info[0] is None:
      logging.warning("config.profile_steps: the loop ended before step %d, the first it traces "
                      "(the steps before compile and warm up); nothing traced", self._first + 1)

  def before(self, step: int) -> None:
    if self._enabled and step == self._first:
      self._local = tempfile.TemporaryDirectory(prefix="ntk_scale_profile_")
      self._traced = True
      jax.profiler.start_trace(self._local.name)

  def after(self, step: int, outputs: Any) -> None:
    if self._local is not None and step + 1 == self._stop:
      self._finish(outputs)

  def _finish(self, outputs: Any) -> None:
    """Waits for the traced steps' device work, stops the trace and copies it into the directory."""
    local, self._local = self._local, None
    try:
      jax.block_until_ready(outputs)
    finally:
      jax.profiler.stop_trace()
      for root, _, names in os.walk(local.name):
        for name in names:
          source = os.path.join(root, name)
          target = os.path.join(self._directory, os.path.relpath(source, local.name))
          files.make_dirs(os.path.dirname(target))
          files.copy_file(source, target)
      local.cleanup()
    logging.info("profile of steps %d-%d written under %s", self._first + 1, self._stop,
                 os.path.join(self._directory, "plugins", "profile"))

  @classmethod
  def off(cls) -> "StepProfile":
    """One that traces nothing."""
    return cls("", 0, None, 0)
