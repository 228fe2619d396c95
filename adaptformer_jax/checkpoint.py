"""Orbax checkpoints of the train state, and adapter export/import (safetensors + json).

Orbax writes no checksums, so each saved step also gets `integrity.MANIFEST`,
written inside the step before orbax renames it into place and verified on
restore: a flipped byte in tensor data is an unreadable step, not a silently
different model.

An adapter export holds only what a task adds to a frozen backbone: the trainable
parameters and the head's BatchNorm statistics -- about 5 MB for ViT-B/16.
"""
import contextlib
import errno
import glob
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging
import flax.traverse_util
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from adaptformer_jax import files
from adaptformer_jax import integrity
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.errors import first_line
from adaptformer_jax.errors import UserError
from adaptformer_jax.models import methods

ADAPTER_WEIGHTS = 'adapter.safetensors'
ADAPTER_CONFIG = 'adapter_config.json'
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
    integrity.verify_manifest(os.path.join(self.directory, str(step)))
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


def restore_path(path: str, abstract_state: Any) -> Any:
  """Restores a checkpoint given as `<workdir>/checkpoints/<step>` (for `--checkpoint`)."""
  path = os.path.abspath(path)
  parent, step = os.path.split(path.rstrip('/'))
  if not step.isdigit() or not os.path.isdir(path):
    raise UserError(f'--checkpoint {path}: not a checkpoint step directory; expected '
                    '<workdir>/checkpoints/<step>.')
  manager = ocp.CheckpointManager(parent)
  try:
    integrity.verify_manifest(path)
    return manager.restore(int(step), args=ocp.args.StandardRestore(abstract_state))
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


def export_adapters(out_dir: str, variables: dict[str, Any], mask: Any,
                    model_cfg: ml_collections.ConfigDict, class_names: Sequence[str],
                    source: str | None = None, backbone: dict[str, Any] | None = None,
                    overwrite: bool = False) -> dict[str, np.ndarray]:
  """Writes the trainable leaves (+ batch_stats) and the config that rebuilds the model.

  `source` (the checkpoint step exported) and `backbone` (`backbone_record`: what the
  frozen weights they need were) are recorded with them. A directory that
  already holds other files or a different export is refused unless `overwrite`;
  each file is replaced atomically.
  """
  flat = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  flat_mask = flax.traverse_util.flatten_dict(mask, sep='/')
  tensors = {f'params/{k}': np.asarray(jax.device_get(v))
             for k, v in flat.items() if flat_mask[k]}
  for k, v in flax.traverse_util.flatten_dict(
      variables.get('batch_stats', {}), sep='/').items():
    tensors[f'batch_stats/{k}'] = np.asarray(jax.device_get(v))
  weights = safetensors.numpy.save(tensors)
  config = json.dumps({'format': 'adaptformer_jax.adapters/1', 'model': model_cfg.to_dict(),
                       'class_names': list(class_names), 'tensors': sorted(tensors),
                       'checkpoint': source, 'backbone': backbone}, indent=2)
  _check_export_dir(out_dir, weights, overwrite)
  try:
    os.makedirs(out_dir, exist_ok=True)
    for name, content in ((ADAPTER_WEIGHTS, weights), (ADAPTER_CONFIG, config.encode())):
      files.write_atomic(os.path.join(out_dir, name), content)
  except OSError as e:
    raise UserError(f'--out {out_dir}: cannot write the export ({e.strerror}); choose a '
                    'writable directory with free space.') from None
  return tensors


def _check_export_dir(out_dir: str, weights: bytes, overwrite: bool) -> None:
  """Refuses to replace anything but the same export, unless `overwrite`."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f'--out {out_dir} is a file; pass a new or empty directory.')
  present = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
  if not present or overwrite:
    return
  if present <= {ADAPTER_WEIGHTS, ADAPTER_CONFIG} and ADAPTER_WEIGHTS in present:
    with open(os.path.join(out_dir, ADAPTER_WEIGHTS), 'rb') as f:
      if f.read() == weights:
        return  # the same export again
  what = ('a different export' if ADAPTER_CONFIG in present else
          f'other files ({", ".join(sorted(present)[:3])})')
  raise UserError(f'--out {out_dir} already holds {what}; pass --overwrite to replace it, '
                  'or choose a new directory.')


def backbone_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The frozen weights a run's adapters were trained on: `config.init_from` (with its
  SHA-256 while it is a readable file) or, without one, a fresh init from `config.seed`."""
  init_from = config.init_from
  digest = integrity.sha256(init_from) if init_from and os.path.isfile(init_from) else None
  return {'init_from': init_from, 'sha256': digest, 'seed': config.seed}


def check_backbone(adapter_dir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to swap adapters into frozen weights other than those they were trained on
  (exports from before the record are taken as they are)."""
  trained = read_adapter_config(adapter_dir).get('backbone')
  if not trained:
    return
  now = backbone_record(config)
  where = f'--adapters {adapter_dir} were trained'
  if trained['init_from'] and not now['init_from']:
    raise UserError(f"{where} on the backbone {trained['init_from']}; pass it with "
                    f"--config.init_from={trained['init_from']}.")
  if not trained['init_from'] and now['init_from']:
    raise UserError(f"{where} on a randomly initialised backbone (seed {trained['seed']}), "
                    f"not on {now['init_from']}; drop --config.init_from.")
  if not trained['init_from'] and trained['seed'] != now['seed']:
    raise UserError(f"{where} on a randomly initialised backbone from seed {trained['seed']}; "
                    f"pass --config.seed={trained['seed']}.")
  if trained['sha256'] and now['sha256'] and trained['sha256'] != now['sha256']:
    logging.warning('%s on %s (SHA-256 %s), but config.init_from %s differs (SHA-256 %s): '
                    'unless it holds the same weights in another file, the results are wrong.',
                    where, trained['init_from'], trained['sha256'][:12], now['init_from'],
                    now['sha256'][:12])


def read_adapter_config(adapter_dir: str) -> dict[str, Any]:
  """The export's adapter_config.json, checked to be one (an object with a "model" object)."""
  path = os.path.join(adapter_dir, ADAPTER_CONFIG)
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'--adapters {adapter_dir}: cannot read {ADAPTER_CONFIG} ({e}); '
                    'pass a directory written by `--mode export`.') from None
  if not (isinstance(saved, dict) and isinstance(saved.get('model'), dict)):
    got = (f'"model" is {type(saved.get("model")).__name__}' if isinstance(saved, dict)
           else f'a JSON {type(saved).__name__}')
    raise UserError(f'--adapters {adapter_dir}: {ADAPTER_CONFIG} is not an export config '
                    f'(expected an object with a "model" object; {got}); pass a directory '
                    'written by `--mode export`.')
  return saved


def swap_in_adapters(adapter_dir: str, variables: dict[str, Any], mask: Any,
                     model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """`variables` with the exported leaves of `adapter_dir` in place of the trainable ones.

  Every model field that changes what the exported weights mean (all but
  methods.EXPORT_FREE_FIELDS) must match, and the export must hold exactly the trainable leaves,
  all finite floats; anything else is a UserError listing what differs.
  """
  saved = flax.traverse_util.flatten_dict(read_adapter_config(adapter_dir)['model'], sep='.')
  # Through JSON, as the export was: tuples become lists.
  current = flax.traverse_util.flatten_dict(json.loads(model_cfg.to_json()), sep='.')
  absent = '<absent>'
  diffs = [f'{k}: adapters {saved.get(k, absent)!r} vs config {current.get(k, absent)!r}'
           for k in sorted(set(saved) | set(current))
           if k not in methods.EXPORT_FREE_FIELDS
           and saved.get(k, absent) != current.get(k, absent)]
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
  integrity.check_values(f'--adapters {adapter_dir}', {k: tensors[k] for k in expected})
  flat.update({k: tensors[k] for k in expected})
  out = {}
  for collection in ('params', 'batch_stats'):
    items = {k[len(collection) + 1:]: v for k, v in flat.items()
             if k.startswith(collection + '/')}
    if items:
      out[collection] = flax.traverse_util.unflatten_dict(items, sep='/')
  return out
