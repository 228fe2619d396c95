"""Synthetic adapter exports for the serving benchmarks and tests: random adapter values.

Fresh adapters act as the identity (AdaptFormer's up projection and LoRA's b start at
zero), which would hide any mix-up between tasks; these exports draw every trainable
leaf (and the head's BatchNorm statistics) at random instead, and are written by
`exports.export_adapters` with the backbone record of `--mode export`.
"""
import copy
from typing import Any

import flax.traverse_util
import ml_collections
import numpy as np

from adaptformer_jax import runtime
from adaptformer_jax.weights import exports


def write_export(out_dir: str, config: ml_collections.ConfigDict, tuning: str,
                 num_classes: int, seed: int, **model: Any) -> str:
  """Writes an export of `tuning` with `num_classes` classes over `config`'s backbone;
  `model` overrides model fields (nested dicts for sections). Returns `out_dir`."""
  config = copy.deepcopy(config)
  config.model.update(dict(tuning=tuning, num_classes=num_classes))
  for key, value in model.items():
    if isinstance(value, dict):
      config.model[key].update(value)
    else:
      config.model[key] = value
  run = runtime.Run(config)
  variables = run.abstract_variables  # the frozen leaves are not exported: shapes suffice
  rng = np.random.default_rng(seed)
  mask = flax.traverse_util.flatten_dict(run.mask, sep='/')
  params = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  for key, value in params.items():
    if mask[key]:
      params[key] = rng.normal(0, 0.3, value.shape).astype(np.float32)
  stats = flax.traverse_util.flatten_dict(variables.get('batch_stats', {}), sep='/')
  for key, value in stats.items():
    stats[key] = (rng.uniform(0.5, 2.0, value.shape) if key.endswith('var')
                  else rng.normal(0, 0.5, value.shape)).astype(np.float32)
  variables = {'params': flax.traverse_util.unflatten_dict(params, sep='/')}
  if stats:
    variables['batch_stats'] = flax.traverse_util.unflatten_dict(stats, sep='/')
  names = [f'{tuning}_{seed}_class{i}' for i in range(num_classes)]
  exports.export_adapters(out_dir, variables, run.mask, config.model, names,
                          backbone=exports.backbone_record(config), overwrite=True)
  return out_dir
