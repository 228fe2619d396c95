"""Orbax checkpoints of the train state: atomic, asynchronous, hash-checked saves.

Orbax writes no checksums, so each saved step also gets `integrity.MANIFEST`,
written inside the step before orbax renames it into place and verified on
restore: a flipped byte in tensor data is an unreadable step, not a silently
different model.
"""
import contextlib
import errno
import glob
import os
import shutil
from collections.abc import Iterator
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from adaptformer_jax.errors import ConfigError
from adaptformer_jax.errors import first_line
from adaptformer_jax.errors import UserError
from adaptformer_jax.weights import integrity

# orbax's metadata beside the tensor data of a step (about 100 KB), with room to spare.
METADATA_BYTES = 2**20

class Checkpointer:
  """Atomic, asynchronous, hash-checked saves of the train state in `<workdir>/checkpoints/<step>`.

  orbax writes each step to `<step>.orbax-checkpoint-tmp-*` and renames it when
  complete, so a save cut short (kill -9, preemption) is never listed as a step;
  a writable Checkpointer deletes such leftovers when it opens. A read-only one
  (eval, export) creates, deletes and renames nothing. Retention keeps the
  `max_to_keep` newest steps (at least 1: the newest is never deleted); None keeps all.
  """

  def __init__(self, workdir: str, max_to_keep: int | None = 3, read_only: bool = False):
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or
                                    not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ConfigError(f'config.keep_checkpoints: must be an integer >= 1 (the newest '
                        f'checkpoint is always kept), got {max_to_keep!r}.')
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.read_only = read_only
    self._saving = None  # the step whose save is in flight, for _seal
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only,
            cleanup_tmp_directories=not read_only,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal)))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, metadata: dict[str, Any] | None = None) -> None:
    """Starts saving `state` as `step`; a full disk is a UserError naming the directory.

    `metadata` (JSON, e.g. the class names) travels in the step's directory.
    A save that cannot fit in the free space is refused before it starts (a write
    failing halfway leaves orbax's threads complaining); one that fails anyway
    surfaces here at the next save, or at close().
    """
    with self._os_errors(self._saving):  # the previous save's background write
      self._manager.wait_until_finished()  # (orbax would wait too; _saving names one save)
    need = sum(x.nbytes for x in jax.tree.leaves(state)) + METADATA_BYTES
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise self._failed(step, f'the device is full ({free / 2**20:.1f} MiB free, the step '
                               f'needs about {need / 2**20:.1f} MiB)')
    self._saving = int(step)
    with self._os_errors(step):
      self._manager.save(int(step), args=ocp.args.StandardSave(state),
                         custom_metadata=metadata)

  def metadata(self, step: int | None = None) -> dict[str, Any]:
    """The `metadata` saved with `step` (default: the latest), {} if none."""
    step = self.latest_step() if step is None else step
    return dict(self._manager.metadata(step).custom_metadata or {})

  def _seal(self) -> None:
    """Writes the manifest of the step orbax has just finished (its background thread).

    orbax calls this before it renames the step into place, so the manifest is part
    of the atomic commit; should a later orbax rename first, the final name is used.
    """
    if jax.process_index() != 0:
      return
    final = os.path.join(self.directory, str(self._saving))
    found = glob.glob(glob.escape(final) + '.orbax-checkpoint-tmp*') or [final]
    try:
      integrity.write_manifest(found[0])
    except OSError as e:  # the step itself is complete; it restores unverified
      logging.warning('Could not write %s for checkpoint step %d: %s', integrity.MANIFEST,
                      self._saving, e)

  @contextlib.contextmanager
  def _os_errors(self, step: int | None = None) -> Iterator[None]:
    """A full disk or a failing device during a save as one UserError (the last step survives)."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # orbax wraps OSErrors in many types
      cause = _os_cause(e)
      if cause is None:
        raise
      raise self._failed(step, 'the device is full' if cause.errno == errno.ENOSPC else
                         cause.strerror or first_line(cause)) from None

  def _failed(self, step: int | None, reason: str) -> UserError:
    what = f'saving checkpoint step {step}' if step is not None else 'saving a checkpoint'
    last = self._manager.latest_step()
    kept = ('no earlier checkpoint exists' if last is None else
            f'the last complete checkpoint (step {last}) is kept')
    return UserError(f'{self.directory}: {what} failed: {reason}; {kept}. Free space or '
                     'fix the device, then rerun the same command to resume.')

  def restore(self, abstract_state: Any, step: int | None = None,
              partial: bool = False) -> Any:
    """Restores `step` into the structure and shardings of `abstract_state`
    (with `partial`, a dict of some of the saved entries: only those are read).

    Without `step`, the newest step that reads back: a newer one that does not
    (files truncated or lost, e.g. a full disk or a copy cut short) is logged and,
    unless read-only, renamed to `<step>.unreadable` so training can save that
    step again. A run thus resumes from the last good checkpoint.
    """
    if step is not None:
      return self._restore(step, abstract_state, partial)
    failed = []
    for candidate in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._restore(candidate, abstract_state, partial)
      except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
        failed.append(candidate)
        logging.warning('Checkpoint step %d in %s is unreadable: %s', candidate,
                        self.directory, first_line(e))
        continue
      if failed:
        self._set_aside(failed)
        logging.warning('Restored checkpoint step %d instead of the unreadable step %s%s.',
                        candidate, ', '.join(map(str, failed)),
                        '' if self.read_only else ' (kept as <step>.unreadable)')
      return state
    raise UserError(f'{self.directory}: no checkpoint step could be restored (see the '
                    'warnings above); move the directory away to start afresh.')

  def _restore(self, step, abstract_state, partial):
    integrity.verify_manifest(os.path.join(self.directory, str(step)))
    return self._manager.restore(step, args=_restore_args(abstract_state, partial))

  def _set_aside(self, steps):
    if self.read_only:
      return
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self.directory, str(step))
        shutil.rmtree(path + '.unreadable', ignore_errors=True)
        os.rename(path, path + '.unreadable')
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('checkpoint set aside')
    self._manager.reload()

  def close(self) -> None:
    """Waits for pending saves (a failed one is a UserError), then releases the manager."""
    with self._os_errors(self._saving):
      self._manager.wait_until_finished()
      self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

def _os_cause(error: BaseException | None) -> OSError | None:
  """The OSError (with an errno) behind a library exception, or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno:
      return error
    if 'No space left on device' in str(error):  # tensorstore's text, without an OSError
      return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    error = error.__cause__ or error.__context__
  return None

def latest_step(workdir: str) -> int | None:
  """The newest complete step in `<workdir>/checkpoints`, or None; creates nothing."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return None
  with Checkpointer(workdir, read_only=True) as ckpt:
    return ckpt.latest_step()

def _restore_args(abstract_state: Any, partial: bool) -> ocp.args.CheckpointArgs:
  """All of a saved state, or (`partial`) the entries of a dict of some of them."""
  if not partial:
    return ocp.args.StandardRestore(abstract_state)
  return ocp.args.PyTreeRestore(
      abstract_state, ocp.checkpoint_utils.construct_restore_args(abstract_state),
      partial_restore=True)


def restore_path(path: str, abstract_state: Any, partial: bool = False) -> Any:
  """Restores a checkpoint given as `<workdir>/checkpoints/<step>` (for `--checkpoint`);
  `partial` as in `Checkpointer.restore`."""
  path = os.path.abspath(path)
  parent, step = os.path.split(path.rstrip('/'))
  if not step.isdigit() or not os.path.isdir(path):
    raise UserError(f'--checkpoint {path}: not a checkpoint step directory; expected '
                    '<workdir>/checkpoints/<step>.')
  manager = ocp.CheckpointManager(parent)
  try:
    integrity.verify_manifest(path)
    return manager.restore(int(step), args=_restore_args(abstract_state, partial))
  except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
    raise UserError(f'--checkpoint {path}: cannot restore it ({first_line(e)}); pass '
                    'another step of the same run.') from None
  finally:
    manager.close()

def step_metadata(path: str) -> dict[str, Any]:
  """The metadata saved with the checkpoint step directory `path` ({} if none)."""
  parent, step = os.path.split(os.path.abspath(path).rstrip('/'))
  if not step.isdigit() or not os.path.isdir(path):
    return {}  # restore_path says what is wrong with the path
  manager = ocp.CheckpointManager(parent)
  try:
    return dict(manager.metadata(int(step)).custom_metadata or {})
  finally:
    manager.close()
