"""Preemption: a job told to stop (SIGTERM, as Cloud TPU VMs and most schedulers send before they
evict a job) finishes its step, keeps what it has (training: a checkpoint at that step; the kernel
job: every finished tile) and exits with PREEMPTED_EXIT_CODE; rerunning the same command resumes.

With several processes, JAX's preemption service (started by jax.distributed.initialize) catches
SIGTERM on any of them and agrees on the step to stop at (multihost_utils.
reached_preemption_sync_point, which every process calls after every step of a lockstep loop). One
process has no such service: a SIGTERM handler, set for the length of the loop, notes the signal,
and the note stays for the process's later loops (a notice that came during the last step of one
loop stops the next at its first). Outside these loops SIGTERM keeps its usual effect; every job
resumes from what it last wrote.
"""

import contextlib
import signal
import threading
from typing import Callable, Iterator

import jax
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job that SIGTERM stopped
_SIGTERM_NOTICED = threading.Event()  # one process: a notice is never taken back


class Preempted(Exception):
  """A job stopped for a preemption after keeping its work (`what`); `step`: the loop's step."""

  def __init__(self, what: str, step: int):
    super().__init__(f"preempted: {what}; rerun the same command to resume.")
    self.step = step


def _reached_sync_point(step: int) -> bool:
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # the preemption service is switched off (jax_enable_preemption_service)
    return False


@contextlib.contextmanager
def preemption_notices() -> Iterator[Callable[[int], bool]]:
  """Yields `noticed(step)`, to be called after every step of a loop by every process: whether a
  preemption notice has arrived, True on every process from the same step on."""
  if jax.process_count() > 1:
    reached = False

    def noticed(step: int) -> bool:
      nonlocal reached
      reached = reached or _reached_sync_point(step)  # True at one step, on every process
      return reached

    yield noticed
    return
  if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
    yield lambda step: False
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM_NOTICED.set())
  try:
    yield lambda step: _SIGTERM_NOTICED.is_set()
  finally:
    signal.signal(signal.SIGTERM, previous)
