"""Preemption: a training job told to stop (SIGTERM, as Cloud TPU VMs and most schedulers send
before they evict a job) saves its state at a step every process agrees on and exits with
PREEMPTED_EXIT_CODE; rerunning the same command resumes from that checkpoint as from any other.

With several processes, JAX's preemption service (started by jax.distributed.initialize) catches
SIGTERM on any of them and agrees on the step (Orbax's CheckpointManager.reached_preemption, which
every process calls after every step). One process has no such service: a SIGTERM handler, set for
the length of the training loop, notes the signal instead. Outside the loop SIGTERM keeps its usual
effect; every job resumes from what it last wrote.
"""

import contextlib
import signal
import threading
from typing import Callable, Iterator

import jax

from ntk_scale.checkpoint import Checkpoints

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job that SIGTERM stopped


class Preempted(Exception):
  """Training stopped for a preemption after saving its state at `step` in `directory`."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted: the train state at step {step} is saved in {directory}; rerun "
                     f"the same command to resume from it.")
    self.step, self.directory = step, directory


@contextlib.contextmanager
def preemption_notices(checkpoints: Checkpoints) -> Iterator[Callable[[int], bool]]:
  """Yields `noticed(step)`, to be called after every training step by every process: whether a
  preemption notice has arrived, True on every process from the same step on."""
  if jax.process_count() > 1:
    reached = False

    def noticed(step: int) -> bool:
      nonlocal reached
      reached = reached or checkpoints.reached_preemption(step)  # True at one step, on all
      return reached

    yield noticed
    return
  if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
    yield lambda step: False
    return
  notice = threading.Event()
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: notice.set())
  try:
    yield lambda step: notice.is_set()
  finally:
    signal.signal(signal.SIGTERM, previous)
