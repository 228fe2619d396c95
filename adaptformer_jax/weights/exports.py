"""Adapter exports: what a task adds to a frozen backbone, as safetensors + JSON.

An export holds the trainable parameters and the head's BatchNorm statistics --
about 5 MB for ViT-B/16 -- with the model config that rebuilds it, its class names
and a record of the frozen weights it was trained on, so it is never swapped into
another backbone by mistake.
"""
import json
import os
from collections.abc import Sequence
from typing import Any

from absl import logging
import flax.traverse_util
import jax
import ml_collections
import numpy as np
import safetensors.numpy

from adaptformer_jax import files
from adaptformer_jax.errors import UserError
from adaptformer_jax.models import presets
from adaptformer_jax.models import tuning
from adaptformer_jax.weights import integrity

ADAPTER_WEIGHTS = 'adapter.safetensors'

ADAPTER_CONFIG = 'adapter_config.json'

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
  saved['model'] = presets.upgrade(saved['model'])
  return saved

def swap_in_adapters(adapter_dir: str, variables: dict[str, Any], mask: Any,
                     model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """`variables` with the exported leaves of `adapter_dir` in place of the trainable ones.

  Every model field that changes what the exported weights mean (all but
  tuning.EXPORT_FREE_FIELDS) must match, and the export must hold exactly the trainable leaves,
  all finite floats; anything else is a UserError listing what differs.
  """
  saved = flax.traverse_util.flatten_dict(read_adapter_config(adapter_dir)['model'], sep='.')
  # Through JSON, as the export was: tuples become lists.
  current = flax.traverse_util.flatten_dict(json.loads(model_cfg.to_json()), sep='.')
  absent = '<absent>'
  diffs = [f'{k}: adapters {saved.get(k, absent)!r} vs config {current.get(k, absent)!r}'
           for k in sorted(set(saved) | set(current))
           if k not in tuning.EXPORT_FREE_FIELDS
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
