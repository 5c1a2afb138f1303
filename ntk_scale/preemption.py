"""Preemption: a job told to stop (SIGTERM, as Cloud TPU VMs and most schedulers send before they
evict a job) finishes its step, keeps what it has (training: a checkpoint at that step; the kernel
job: every finished tile; the spectrum's LOBPCG and the robust set's optimisation: that round or
step) and exits with PREEMPTED_EXIT_CODE; rerunning the same command resumes.

With several processes, JAX's preemption service (started by jax.distributed.initialize) catches
SIGTERM on any of them and agrees on the step to stop at: the largest step any process has reached,
plus one (multihost_utils.reached_preemption_sync_point, which every process calls after every step
of a lockstep loop). The steps it is given are counted over the process's life, not per loop, so a
step agreed in the last step of one loop (or between loops) is reached at the next loop's first,
and once reached the notice stands for every later loop. One process has no such service: a SIGTERM
handler, set for the length of the loop, notes the signal, and the note likewise stays for the
process's later loops. Outside these loops SIGTERM keeps its usual effect; every job resumes from
what it last wrote.
"""

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job that SIGTERM stopped
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: a job stopped by Ctrl-C
_NOTICED = threading.Event()  # one process: a notice (SIGTERM or a first Ctrl-C) is never taken back
_INTERRUPTED = threading.Event()  # the notice was a Ctrl-C


class _SyncPoints:
  """Several processes: the steps of every loop so far (the same count on every process, as every
  loop runs in lockstep) and whether the agreed step was reached (never taken back either)."""
  steps = 0
  reached = False


class Preempted(Exception):
  """A job stopped for a preemption after keeping its work (`what`); `step`: the loop's step."""

  def __init__(self, what: str, step: int):
    stopped = "interrupted (Ctrl-C)" if _INTERRUPTED.is_set() else "preempted"
    super().__init__(f"{stopped}: {what}; rerun the same command to resume.")
    self.step = step


def exit_code() -> int:
  """The exit status of a job stopped by a notice: a shell's for the signal that sent it."""
  return INTERRUPTED_EXIT_CODE if _INTERRUPTED.is_set() else PREEMPTED_EXIT_CODE


def _interrupted(signum, frame) -> None:
  """A first Ctrl-C: a notice, as SIGTERM's; the next Ctrl-C raises KeyboardInterrupt."""
  _INTERRUPTED.set()
  _NOTICED.set()
  signal.signal(signal.SIGINT, signal.default_int_handler)
  # os.write, not print: a handler that prints can land inside another print to stderr.
  os.write(2, b"\nCtrl-C: stopping after this step, keeping its work (rerunning the same command "
              b"resumes); Ctrl-C again stops at once, losing the work since the last save.\n")


def _reached_sync_point(step: int) -> bool:
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # the preemption service is switched off (jax_enable_preemption_service)
    return False


class CheckpointManager(ocp.CheckpointManager):
  """Orbax's CheckpointManager, which saves where it is told: it would also ask JAX's sync service
  about its own checkpoint steps, and the service answers only the last step it was given, so those
  calls would move this module's count (a notice then agreed on a step no loop reaches)."""

  def reached_preemption(self, step: int) -> bool:
    return False


def _reached_by_every_process() -> bool:
  if not _SyncPoints.reached:
    _SyncPoints.steps += 1
    _SyncPoints.reached = _reached_sync_point(_SyncPoints.steps)  # True at one step, on every process
  return _SyncPoints.reached


@contextlib.contextmanager
def preemption_notices() -> Iterator[Callable[[], bool]]:
  """Yields `noticed()`, to be called after every step of a loop by every process: whether a
  preemption notice has arrived, True on every process from the same step on."""
  if jax.process_count() > 1:
    yield _reached_by_every_process
    return
  if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
    yield lambda: False
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: _NOTICED.set())
  previous_int = signal.getsignal(signal.SIGINT)
  if previous_int is signal.default_int_handler and not _NOTICED.is_set():
    signal.signal(signal.SIGINT, _interrupted)
  try:
    yield _NOTICED.is_set
  finally:
    signal.signal(signal.SIGTERM, previous)
    signal.signal(signal.SIGINT, previous_int)
