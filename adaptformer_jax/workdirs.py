"""A workdir's config.json: written at the start, compared when a run resumes."""
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from adaptformer_jax import checkpoint
from adaptformer_jax.errors import UserError

CONFIG_FILE = 'config.json'
# Fields that may change when a run resumes; anything else is a conflict.
RESUMABLE_FIELDS = ('num_epochs', 'num_train_steps', 'log_every_steps', 'eval_every_steps',
                    'checkpoint_every_steps', 'keep_checkpoints', 'progress',
                    'eval_batch_size', 'nonfinite', 'model_parallel')


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates workdir, records the config, and refuses to resume with a different model/data.

  Only a checkpoint makes a workdir hold a run: until the first one, a restart may
  change anything (e.g. fix the init_from that failed to load) and rewrites config.json.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write_test')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f'--workdir {workdir} is not writable ({e.strerror}); choose '
                    'another directory.') from None
  if checkpoint.latest_step(workdir) is None:
    if jax.process_index() == 0:
      path = os.path.join(workdir, CONFIG_FILE)
      with open(path + '.tmp', 'w') as f:  # a kill mid-write leaves the old file whole
        f.write(config.to_json(indent=2))
      os.replace(path + '.tmp', path)
    return
  saved = _flat(load_config(workdir).to_dict())
  conflicts, changes = [], []
  for key, value in _flat(config.to_dict()).items():
    old = saved.get(key, '<absent>')
    if old != value:
      (changes if key.split('.')[0] in RESUMABLE_FIELDS else conflicts).append(
          f'{key}: {old!r} -> {value!r}')
  if conflicts:
    raise UserError(f'--workdir {workdir} holds a run with a different config ('
                    + '; '.join(conflicts) + '); use a new --workdir or the same config.')
  for change in changes:
    logging.warning('Resuming with a changed setting: %s', change)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's run was started with (what eval/export use without --config)."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise UserError(f'--workdir {workdir}: cannot read {CONFIG_FILE} ({e}); pass --config.'
                    ) from None


def _flat(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  return out
