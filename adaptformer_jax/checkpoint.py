"""Orbax checkpoints of the train state, and adapter export/import (safetensors + json).

An adapter export holds only what a task adds to a frozen backbone: the trainable
parameters and the head's BatchNorm statistics -- about 5 MB for ViT-B/16.
"""
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

from absl import logging
import flax.traverse_util
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from adaptformer_jax.errors import UserError
from adaptformer_jax.models import methods

ADAPTER_WEIGHTS = 'adapter.safetensors'
ADAPTER_CONFIG = 'adapter_config.json'


class Checkpointer:
  """Atomic, asynchronous saves of the train state under `<workdir>/checkpoints/<step>`.

  orbax writes each step to `<step>.orbax-checkpoint-tmp-*` and renames it when
  complete, so a save cut short (kill -9, preemption) is never listed as a step;
  a writable Checkpointer deletes such leftovers when it opens. A read-only one
  (eval, export) creates, deletes and renames nothing.
  """

  def __init__(self, workdir: str, max_to_keep: int = 3, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.read_only = read_only
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only,
            cleanup_tmp_directories=not read_only))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    self._manager.save(int(step), args=ocp.args.StandardSave(state))

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores `step` into the structure and shardings of `abstract_state`.

    Without `step`, the newest step that reads back: a newer one that does not
    (files truncated or lost, e.g. a full disk or a copy cut short) is logged and,
    unless read-only, renamed to `<step>.unreadable` so training can save that
    step again. A run thus resumes from the last good checkpoint.
    """
    if step is not None:
      return self._restore(step, abstract_state)
    failed = []
    for candidate in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._restore(candidate, abstract_state)
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

  def _restore(self, step, abstract_state):
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

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
    """Waits for pending saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def latest_step(workdir: str) -> int | None:
  """The newest complete step in `<workdir>/checkpoints`, or None; creates nothing."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return None
  with Checkpointer(workdir, read_only=True) as ckpt:
    return ckpt.latest_step()


def first_line(error: BaseException) -> str:
  """The gist of a library exception, for one-line messages."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def restore_path(path: str, abstract_state: Any) -> Any:
  """Restores a checkpoint given as `<workdir>/checkpoints/<step>` (for `--checkpoint`)."""
  path = os.path.abspath(path)
  parent, step = os.path.split(path.rstrip('/'))
  if not step.isdigit() or not os.path.isdir(path):
    raise UserError(f'--checkpoint {path}: not a checkpoint step directory; expected '
                    '<workdir>/checkpoints/<step>.')
  manager = ocp.CheckpointManager(parent)
  try:
    return manager.restore(int(step), args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
    raise UserError(f'--checkpoint {path}: cannot restore it ({first_line(e)}); pass '
                    'another step of the same run.') from None
  finally:
    manager.close()


def export_adapters(out_dir: str, variables: dict[str, Any], mask: Any,
                    model_cfg: ml_collections.ConfigDict,
                    class_names: Sequence[str]) -> dict[str, np.ndarray]:
  """Writes the trainable leaves (+ batch_stats) and the config that rebuilds the model."""
  os.makedirs(out_dir, exist_ok=True)
  flat = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  flat_mask = flax.traverse_util.flatten_dict(mask, sep='/')
  tensors = {f'params/{k}': np.asarray(jax.device_get(v))
             for k, v in flat.items() if flat_mask[k]}
  for k, v in flax.traverse_util.flatten_dict(
      variables.get('batch_stats', {}), sep='/').items():
    tensors[f'batch_stats/{k}'] = np.asarray(jax.device_get(v))
  safetensors.numpy.save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS))
  with open(os.path.join(out_dir, ADAPTER_CONFIG), 'w') as f:
    json.dump({'format': 'adaptformer_jax.adapters/1', 'model': model_cfg.to_dict(),
               'class_names': list(class_names), 'tensors': sorted(tensors)}, f, indent=2)
  return tensors


def read_adapter_config(adapter_dir: str) -> dict[str, Any]:
  path = os.path.join(adapter_dir, ADAPTER_CONFIG)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'--adapters {adapter_dir}: cannot read {ADAPTER_CONFIG} ({e}); '
                    'pass a directory written by `--mode export`.') from None


def swap_in_adapters(adapter_dir: str, variables: dict[str, Any], mask: Any,
                     model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """`variables` with the exported leaves of `adapter_dir` in place of the trainable ones.

  The adapters must come from the same architecture and tuning method, and hold
  exactly the trainable leaves; anything else is a UserError listing what differs.
  """
  saved = read_adapter_config(adapter_dir)['model']
  diffs = [f'{k}: adapters {saved.get(k)!r} vs config {model_cfg[k]!r}'
           for k in methods.ARCHITECTURE_FIELDS if saved.get(k) != model_cfg[k]]
  if diffs:
    raise UserError(f'--adapters {adapter_dir} were trained for another model ('
                    + '; '.join(diffs) + '); use the config they were exported with.')
  try:
    tensors = safetensors.numpy.load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS))
  except Exception as e:  # safetensors raises several types for damaged files
    raise UserError(f'--adapters {adapter_dir}: cannot read {ADAPTER_WEIGHTS} ({e}).') from None
  flat = {f'params/{k}': v for k, v in
          flax.traverse_util.flatten_dict(variables['params'], sep='/').items()}
  flat.update({f'batch_stats/{k}': v for k, v in flax.traverse_util.flatten_dict(
      variables.get('batch_stats', {}), sep='/').items()})
  expected = {f'params/{k}' for k, m in
              flax.traverse_util.flatten_dict(mask, sep='/').items() if m}
  expected |= {k for k in flat if k.startswith('batch_stats/')}
  problems = [f'missing {k}' for k in sorted(expected - set(tensors))]
  problems += [f'unexpected {k}' for k in sorted(set(tensors) - expected)]
  problems += [f'{k}: shape {tensors[k].shape} vs model {flat[k].shape}'
               for k in sorted(expected & set(tensors)) if tensors[k].shape != flat[k].shape]
  if problems:
    raise UserError(f'--adapters {adapter_dir} do not fit this model: ' + '; '.join(problems))
  flat.update({k: tensors[k] for k in expected})
  out = {}
  for collection in ('params', 'batch_stats'):
    items = {k[len(collection) + 1:]: v for k, v in flat.items()
             if k.startswith(collection + '/')}
    if items:
      out[collection] = flax.traverse_util.unflatten_dict(items, sep='/')
  return out
