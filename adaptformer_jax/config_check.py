"""One validation of a run config: structure, types, ranges and enumerations.

Applied where a config enters: `train.setup`, which every job (train, eval,
export; from the CLI's `--config` with its overrides or the library) starts with,
and `workdirs.load_config`, for a workdir's `config.json` read back. So
that a hand-edited `{}`, a `width: "abc"` or a zero batch ends in one ConfigError
listing every bad field, before anything is compiled, trained or written.
Fields this table does not name are left to the code that reads them.
"""
import math
import re
from typing import Any, Callable

import ml_collections

from adaptformer_jax.errors import ConfigError
from adaptformer_jax.models import presets

Check = Callable[[Any], str | None]  # a value -> what is wrong with it, or None


def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
  return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


def integer(at_least: int | None = None, or_value: int | None = None,
            meaning: str = '') -> Check:
  want = ('an integer' + (f' >= {at_least}' if at_least is not None else '')
          + (f' or {or_value} ({meaning})' if or_value is not None else ''))

  def check(v):
    if _is_int(v) and (v == or_value or at_least is None or v >= at_least):
      return None
    return f'must be {want}'
  return check


def number(low: float, high: float | None = None, low_open: bool = False) -> Check:
  want = f"a number {'>' if low_open else '>='} {low}" + (
      f' and < {high}' if high is not None else '')

  def check(v):
    ok = _is_number(v) and (v > low if low_open else v >= low) and (high is None or v < high)
    return None if ok else f'must be {want}'
  return check


def one_of(*allowed: Any) -> Check:
  return lambda v: None if v in allowed and isinstance(v, type(allowed[0])) else (
      f"must be one of {', '.join(map(repr, allowed))}")


def string(optional: bool = False) -> Check:
  return lambda v: None if isinstance(v, str) or (optional and v is None) else (
      'must be a string' + (' or null' if optional else ''))


def boolean(v):
  return None if isinstance(v, bool) else 'must be true or false'


def regexes(v):
  if not isinstance(v, (list, tuple)) or not all(isinstance(r, str) for r in v):
    return 'must be a list of regular expressions (strings)'
  for r in v:
    try:
      re.compile(r)
    except re.error as e:
      return f'{r!r} is not a regular expression ({e})'
  return None


def adapter_scale(v):
  return None if v == 'learnable' or _is_number(v) else "must be a number or 'learnable'"


def optional(check: Check) -> Check:
  """`check`, or null."""
  return lambda v: None if v is None or check(v) is None else f'{check(v)} or null'


def anything(v):
  del v


class IfPresent:
  """A field that configs written before it existed may lack, or a section only some
  models have (missing or null); checked like any other where it is there."""

  def __init__(self, check: Check | dict):
    self.check = check


POSITIVE = integer(at_least=1)

MODEL = {
    'name': string(), 'patch_size': POSITIVE, 'width': POSITIVE, 'depth': POSITIVE,
    'num_heads': POSITIVE, 'mlp_dim': POSITIVE, 'image_size': POSITIVE,
    'num_classes': integer(at_least=1, or_value=0, meaning='0 takes the count from the data'),
    'pool': string(), 'head': string(),
    'head_init_std': number(0), 'tuning': string(),
    # Checkpoint-family options (their allowed values: presets.CHOICES).
    'gelu': string(), 'class_token': boolean, 'num_registers': integer(at_least=0),
    'ln_pre': boolean, 'layerscale': optional(number(0, low_open=True)),
    'qkv_bias': string(), 'pre_logits': integer(at_least=0),
    'norm_eps': number(0, low_open=True), 'posemb_resample': string(),
    # Video variant.
    'patch_embed': string(), 'num_frames': POSITIVE, 'tubelet': POSITIVE, 'posemb': string(),
    'adapter': {'bottleneck': POSITIVE, 'scale': adapter_scale, 'layernorm': string(),
                'dropout': number(0, 1), 'placement': string(), 'init': string()},
    'vpt': {'num_tokens': POSITIVE},
    'lora': {'rank': POSITIVE, 'alpha': number(0, low_open=True)},
    'trainable': regexes, 'dtype': string(), 'frozen_dtype': string(),
    'attention': string(),
    'remat': anything,  # presets.validate knows its spellings
    # Masked-autoencoder pre-training (models.mae); absent for a classifier.
    'mae': IfPresent({'mask_ratio': number(0, 1, low_open=True), 'decoder_width': POSITIVE,
                   'decoder_depth': POSITIVE, 'decoder_heads': POSITIVE}),
}

SCHEMA = {
    'model': MODEL,
    'data': {'name': string(), 'data_dir': string(optional=True), 'train_split': string(),
             'eval_split': string(), 'train_pp': string(), 'eval_pp': string(),
             'normalize': string(), 'shuffle_buffer': POSITIVE,
             'val_fraction': number(0, 1), 'max_unreadable_fraction': number(0, 1),
             # Video eval views per clip (official test_num_segment x test_num_crop).
             'eval_clips': IfPresent(POSITIVE), 'eval_crops': IfPresent(POSITIVE)},
    'init_from': string(), 'init_dont_load': regexes, 'seed': integer(),
    'batch_size': POSITIVE, 'accum_steps': POSITIVE, 'model_parallel': POSITIVE,
    'eval_batch_size': POSITIVE, 'num_epochs': POSITIVE,
    # 0 would train nothing: refused rather than read as "use num_epochs".
    'num_train_steps': integer(at_least=1, or_value=-1,
                               meaning='-1 trains config.num_epochs epochs'),
    'warmup_epochs': integer(at_least=0),
    'warmup_steps': integer(at_least=0, or_value=-1,
                            meaning='-1 warms up for config.warmup_epochs epochs'),
    'optimizer': {'name': one_of('sgd', 'adamw'), 'momentum': number(0, 1),
                  'weight_decay': number(0), 'base_lr': number(0, low_open=True),
                  'label_smoothing': number(0, 1)},
    'nonfinite': one_of('stop', 'skip'),
    'log_every_steps': POSITIVE, 'eval_every_steps': integer(at_least=0),
    'checkpoint_every_steps': POSITIVE, 'keep_checkpoints': POSITIVE,
    'progress': boolean,
}


def problems(config: Any) -> list[str]:
  """Every field of `config` (a ConfigDict or plain dict) that is missing or invalid."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  if not isinstance(config, dict):
    return [f'a run config is an object of fields, not {_kind(config)}']
  if not set(config) & set(SCHEMA):
    return [f"holds none of a run config's fields ({', '.join(list(SCHEMA)[:4])}, ...)"]
  found = _check(config, SCHEMA, '')
  if not found:
    found += _views(config)
  if not any(p.startswith('model') for p in found):
    try:
      model = ml_collections.ConfigDict(config['model'])
      model.num_classes = model.num_classes or 1  # 0: from the data, resolved before building
      presets.validate(model)
    except ConfigError as e:
      found.append(str(e).rstrip('.'))
  return found


def validate(config: Any, where: str = '', fix: str = '') -> None:
  """Raises one ConfigError listing every problem of `config`, between `where` and `fix`."""
  found = problems(config)
  if found:
    more = f' (and {len(found) - 4} more)' if len(found) > 4 else ''
    raise ConfigError(where + '; '.join(found[:4]) + more + fix + '.')


def _check(values, schema, prefix):
  found = []
  for key, check in schema.items():
    name = prefix + key
    if not name.startswith(('model', 'data', 'config.')):
      name = 'config.' + name  # as the README and the other messages name loop settings
    if isinstance(check, IfPresent):
      if key not in values or (values[key] is None and isinstance(check.check, dict)):
        continue
      check = check.check
    if key not in values:
      found.append(f'{name}: missing')
    elif isinstance(check, dict):
      if isinstance(values[key], dict):
        found += _check(values[key], check, name + '.')
      else:
        found.append(f'{name}: must be a section of fields, got {_kind(values[key])}')
    else:
      why = check(values[key])
      if why:
        found.append(f'{name}: {why}, got {values[key]!r}')
  return found


# data/preprocess.py's ops that take `crop=(j, n)`: what data.eval_crops moves.
CROP_OPS = ('center_crop', 'short_side_center_crop', 'resize_center_crop')


def check_views(clips: int, crops: int, ops: Any, *, video: bool, train: bool = False,
                field: str = 'data.eval_pp') -> None:
  """A ConfigError unless `clips` x `crops` eval views can be taken: positive
  counts, a video model for more than one, evaluation, and a crop among the
  `ops` (an op string or its op names) when crops > 1."""
  for name, value in (('eval_clips', clips), ('eval_crops', crops)):
    if not _is_int(value) or value < 1:
      raise ConfigError(f'data.{name}: must be an integer >= 1, got {value!r}.')
  if clips * crops == 1:
    return
  if not video:
    raise ConfigError(f'data.eval_clips={clips}, data.eval_crops={crops}: several views '
                      'of an example are a video evaluation; set both to 1 for an image model.')
  if train:
    raise ConfigError('data.eval_clips/eval_crops: several views are for evaluation only.')
  names = [op.strip() for op in ops.split('|')] if isinstance(ops, str) else list(ops)
  if crops > 1 and not set(names) & set(CROP_OPS):
    raise ConfigError(
        f'data.eval_crops={crops}: {field}={"|".join(names)!r} has no crop to move, so '
        f"every crop would be the same view; use one of {', '.join(CROP_OPS)} (e.g. "
        "'short_side_center_crop', the official video eval) or data.eval_crops=1.")


def _views(config):
  """data.eval_clips x eval_crops against the model and data.eval_pp."""
  data = config['data']
  try:
    check_views(data.get('eval_clips', 1), data.get('eval_crops', 1), data['eval_pp'],
                video=config['model'].get('patch_embed') == 'tubelet')
  except ConfigError as e:
    return [str(e).rstrip('.')]
  return []


def _kind(value):
  return 'null' if value is None else f'{type(value).__name__} {value!r}'[:60]
