"""SIGTERM/SIGINT during training: checkpoint the current step, then stop as if killed."""
import contextlib
import os
import signal
import threading
from collections.abc import Iterator


class Interrupted(Exception):
  """SIGTERM or SIGINT stopped training after the current step was checkpointed.

  Not a UserError: the CLI exits with 128 + the signal number, as if killed, so
  schedulers see a preemption rather than a failure.
  """

  def __init__(self, signum: int, step: int, workdir: str):
    self.signum = signum
    super().__init__(f'{signal.Signals(signum).name} received: saved step {step} in '
                     f'{os.path.join(workdir, "checkpoints")}; run the same command to '
                     'resume.')


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
  """Yields a list that SIGTERM/SIGINT append to instead of ending the process.

  The training loop checkpoints and stops once it is non-empty (a preemption
  notice, Ctrl-C); a second signal acts as it did before. Only the main thread
  can install handlers; elsewhere signals keep their usual effect.
  """
  received = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return
  previous = {}

  def handler(signum, frame):
    del frame
    received.append(signum)
    signal.signal(signum, previous[signum])

  for signum in (signal.SIGTERM, signal.SIGINT):
    old = signal.signal(signum, handler)
    previous[signum] = signal.SIG_DFL if old is None else old  # None: set outside Python
  try:
    yield received
  finally:
    for signum, old in previous.items():
      signal.signal(signum, old)
