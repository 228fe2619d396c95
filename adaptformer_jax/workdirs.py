"""A workdir: owned by one training run at a time; its config.json written at the start,
compared when a run resumes, validated when read back.

Ownership is an OS advisory lock (`flock`) on `<workdir>/.lock`. Such a lock belongs
to the open file, so the kernel drops it however its holder ends -- kill -9 and OOM
kills included -- and a crashed run never leaves a stale lock behind. Only training
takes it; eval and export read a workdir being trained without it (checkpoints
appear by atomic rename). In a multi-host run process 0 holds it for all.
"""
import fcntl
import json
import os
import socket
from typing import Any

from absl import logging
import jax
import ml_collections

from adaptformer_jax import files
from adaptformer_jax import schema
from adaptformer_jax.errors import UserError
from adaptformer_jax.models import presets
from adaptformer_jax.weights import checkpoints

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'
# Fields that may change when a run resumes; anything else is a conflict.
RESUMABLE_FIELDS = ('num_epochs', 'num_train_steps', 'log_every_steps', 'eval_every_steps',
                    'checkpoint_every_steps', 'keep_checkpoints', 'progress',
                    'eval_batch_size', 'nonfinite', 'model_parallel',
                    'data.eval_clips', 'data.eval_crops')


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates workdir, records the config, and refuses to resume with a different model/data.

  Only a checkpoint makes a workdir hold a run: until the first one, a restart may
  change anything (e.g. fix the init_from that failed to load) and rewrites config.json.
  """
  check_writable(workdir, '--workdir')
  if checkpoints.latest_step(workdir) is None:
    if jax.process_index() == 0:
      files.write_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json(indent=2))
    return
  saved = _flat(load_config(workdir).to_dict())
  conflicts, changes = [], []
  for key, value in _flat(config.to_dict()).items():
    old = saved.get(key, '<absent>')
    if old != value:
      resumable = key in RESUMABLE_FIELDS or key.split('.')[0] in RESUMABLE_FIELDS
      (changes if resumable else conflicts).append(
          f'{key}: {old!r} -> {value!r}')
  if conflicts:
    raise UserError(f'--workdir {workdir} holds a run with a different config ('
                    + '; '.join(conflicts) + '); use a new --workdir or the same config.')
  for change in changes:
    logging.warning('Resuming with a changed setting: %s', change)


def check_writable(directory: str, flag: str) -> None:
  """Creates `directory`; a UserError naming `flag` if it cannot be written."""
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, '.write_test')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise _not_writable(directory, e, flag) from None


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's run was started with (what eval/export use without --config),
  validated as a --config is: a hand-edited file fails here, in one line."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'--workdir {workdir}: cannot read {CONFIG_FILE} ({e}); pass --config.'
                    ) from None
  if isinstance(saved, dict) and 'model' in saved:
    saved['model'] = presets.upgrade(saved['model'])
  schema.validate(saved, f'--workdir {workdir}: {CONFIG_FILE} is not a valid run '
                        'config: ', '; restore the file or pass --config')
  return ml_collections.ConfigDict(saved)


class Lock:
  """`with Lock(workdir):` owns the workdir, or raises a UserError naming its holder."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def __enter__(self) -> 'Lock':
    if jax.process_index() != 0:
      return self
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise _not_writable(self.workdir, e) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors='replace').split()
      os.close(fd)
      who = (f'process {holder[0]} on {holder[1]}' if len(holder) == 2 else
             'another process')
      raise UserError(f'--workdir {self.workdir} is in use by another training run '
                      f'({who}, holding {self.path}); wait for it to finish or stop it, '
                      'or use another --workdir.') from None
    except OSError as e:  # a filesystem without flock (some network mounts)
      os.close(fd)
      logging.warning('Cannot lock %s (%s): nothing stops a second run from using this '
                      'workdir at the same time.', self.path, e.strerror)
      return self
    self._fd = fd
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()} {socket.gethostname()}\n'.encode(), 0)
    return self

  def __exit__(self, *exc_info: object) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # no stale PID for a run refused in the next holder's first instant
      os.close(self._fd)  # releases the lock
      self._fd = None


def _not_writable(directory, error, flag='--workdir'):
  return UserError(f'{flag} {directory} is not writable ({error.strerror}); choose '
                   'another directory.')


def _flat(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  return out
