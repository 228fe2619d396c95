"""Signals: during training, checkpoint the current step and stop as if killed;
anywhere else, Ctrl-C ends the job at once with status 130."""
import contextlib
import os
import signal
import sys
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


@contextlib.contextmanager
def exit_on_sigint(message: str) -> Iterator[None]:
  """SIGINT prints `message` to stderr and ends the process with status 130, at once.

  Not Python's KeyboardInterrupt: that is raised wherever the main thread happens
  to be, and inside a garbage-collection callback (JAX runs one) it is printed and
  swallowed, so the job goes on. Stopping at any point loses nothing: every file
  a job writes is written atomically (`files.write_atomic`, orbax's temporary
  directories). Training installs its own checkpointing handler on top of this one.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    del signum, frame
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(130)  # pylint: disable=protected-access

  previous = signal.signal(signal.SIGINT, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
