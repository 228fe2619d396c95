"""The one config schema: every field's type, allowed values and range, and the rules
that span fields, for the model (image, video, MAE), the data and the training loop.

A job validates its run config once, where it enters (`train.setup`, `jobs.model_config`,
`workdirs.load_config` for a saved config.json); `models.preset` and `models.build`
validate a model config (`validate_model`). Every problem is listed at once in one ConfigError, before
anything is compiled, trained or written.
"""
import math
import re
from typing import Any, Callable

import ml_collections

from adaptformer_jax.data import views
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.models import presets
from adaptformer_jax.models import tuning
from adaptformer_jax.models import vit

Check = Callable[[Any], str | None]  # a value -> what is wrong with it, or None
Rule = Callable[[dict[str, Any]], str | None]  # a section -> the whole message, or None


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(at_least: int | None = None, or_value: int | None = None,
            meaning: str = '') -> Check:
  want = ('an integer' + (f' >= {at_least}' if at_least is not None else '')
          + (f' or {or_value} ({meaning})' if or_value is not None else ''))
  return lambda v: None if _is_int(v) and (
      v == or_value or at_least is None or v >= at_least) else f'must be {want}'


def number(low: float, high: float | None = None, low_open: bool = False) -> Check:
  want = f"a number {'>' if low_open else '>='} {low}" + (
      f' and < {high}' if high is not None else '')
  return lambda v: None if _is_number(v) and (v > low if low_open else v >= low) and (
      high is None or v < high) else f'must be {want}'


def one_of(*allowed: Any) -> Check:
  return lambda v: None if v in allowed and isinstance(v, type(allowed[0])) else (
      f"must be one of {', '.join(map(repr, allowed))}")


def string(optional: bool = False) -> Check:
  return lambda v: None if isinstance(v, str) or (optional and v is None) else (
      'must be a string' + (' or null' if optional else ''))


def boolean(v: Any) -> str | None:
  return None if isinstance(v, bool) else 'must be true or false'


def regexes(v: Any) -> str | None:
  if not isinstance(v, (list, tuple)) or not all(isinstance(r, str) for r in v):
    return 'must be a list of regular expressions (strings)'
  for r in v:
    try:
      re.compile(r)
    except re.error as e:
      return f'{r!r} is not a regular expression ({e})'
  return None


def optional(check: Check) -> Check:
  """`check`, or null."""
  return lambda v: None if v is None or check(v) is None else f'{check(v)} or null'


def adapter_scale(v: Any) -> str | None:
  return None if v == 'learnable' or _is_number(v) else "must be a number or 'learnable'"


class OptionalSection(dict):
  """A section only some models have (absent or null elsewhere), checked where present."""


POSITIVE = integer(at_least=1)
PRECISION = one_of('float32', 'bfloat16')

MODEL = {
    'name': string(),  # one of models.PRESETS: checked by _preset, with suggestions
    'patch_size': POSITIVE, 'width': POSITIVE, 'depth': POSITIVE,
    'num_heads': POSITIVE, 'mlp_dim': POSITIVE, 'image_size': POSITIVE,
    'num_classes': integer(at_least=1, or_value=0, meaning='0 takes the count from the data'),
    # cls: final norm, class token; gap: mean of the patch tokens, then fc_norm (MAE);
    # gap_prenorm: final norm, then the mean (big_vision, timm fc_norm=False);
    # map: final norm, then an attention-pooling head (big_vision MAPHead, SigLIP).
    'pool': one_of('cls', 'gap', 'gap_prenorm', 'map'),
    'head': one_of('linear', 'bn_linear'),
    'head_init_std': number(0),
    'tuning': string(),  # methods joined by '+': checked by TUNING below
    # Checkpoint-family options (models.presets.FAMILIES).
    'gelu': one_of('exact', 'tanh', 'quick'),  # erf (torch); tanh (flax); x*sigmoid(1.702x)
    'class_token': boolean, 'num_registers': integer(at_least=0),
    'ln_pre': boolean, 'layerscale': optional(number(0, low_open=True)),
    'qkv_bias': one_of('qkv', 'qv', 'none'), 'pre_logits': integer(at_least=0),
    'norm_eps': number(0, low_open=True),
    # How a checkpoint's position embedding is resized, as the family's own loader:
    # bicubic, antialiased (timm); bilinear with aligned corners (big_vision).
    'posemb_resample': one_of('bilinear', 'bicubic'),
    # Video: '2d' patches of images, or 'tubelet' patches of clips.
    'patch_embed': one_of('2d', 'tubelet'), 'num_frames': POSITIVE, 'tubelet': POSITIVE,
    'posemb': one_of('learned', 'sincos'),
    'adapter': {'bottleneck': POSITIVE, 'scale': adapter_scale,
                'layernorm': one_of('none', 'in', 'out'), 'dropout': number(0, 1),
                'placement': one_of('parallel', 'sequential'),
                'init': one_of('lora', 'trunc_normal')},
    'vpt': {'num_tokens': POSITIVE},
    'lora': {'rank': POSITIVE, 'alpha': number(0, low_open=True)},
    # Adapter+: bottleneck dim; where the block adds it (the official AdapterBlock's
    # post/pre/intermediate/parallel); stochastic depth on its branch.
    'adapter_plus': {'dim': POSITIVE,
                     'placement': one_of('post', 'pre', 'intermediate', 'parallel'),
                     'drop_path': number(0, 1)},
    'repadapter': {'dim': POSITIVE, 'groups': POSITIVE, 'scale': number(0, low_open=True),
                   'placement': one_of('block', 'attn')},
    'fact': {'rank': POSITIVE, 'scale': number(0, low_open=True)},
    'trainable': regexes, 'dtype': PRECISION, 'frozen_dtype': PRECISION,
    'attention': one_of('auto', 'xla', 'cudnn'),
    'kernels': one_of('xla', 'pallas'),  # the MLP branch: XLA's ops or fused Pallas kernels
    'remat': one_of(*vit.REMAT),  # what each block keeps for the backward pass
    # Masked-autoencoder pre-training (models.mae).
    'mae': OptionalSection({'mask_ratio': number(0, 1, low_open=True),
                            'decoder_width': POSITIVE, 'decoder_depth': POSITIVE,
                            'decoder_heads': POSITIVE}),
}


def _preset(m: dict[str, Any]) -> str | None:
  return presets.unknown_preset(m['name'])


def _tuning(m: dict[str, Any]) -> str | None:
  try:
    tuning.parse(m['tuning'])
  except ConfigError as e:
    return str(e).rstrip('.')
  return None


def _image_size(m: dict[str, Any]) -> str | None:
  if m['image_size'] % m['patch_size']:
    return (f"model.image_size: {m['image_size']} is not a positive multiple of the patch "
            f"size {m['patch_size']}; use e.g. "
            f"{max(1, round(m['image_size'] / m['patch_size'])) * m['patch_size']}")
  return None


def _frames(m: dict[str, Any]) -> str | None:
  if m['num_frames'] % m['tubelet']:
    return (f"model.num_frames: {m['num_frames']} is not a positive multiple of "
            f"model.tubelet {m['tubelet']}")
  if m['patch_embed'] == '2d' and (m['num_frames'], m['tubelet']) != (1, 1):
    return ("model.num_frames/tubelet: only a 'tubelet' patch embedding takes clips; set "
            "model.patch_embed='tubelet' or both to 1")
  return None


def _heads(m: dict[str, Any]) -> str | None:
  if m['width'] % m['num_heads']:
    return f"model.num_heads: {m['num_heads']} does not divide model.width {m['width']}"
  return None


def _pool(m: dict[str, Any]) -> str | None:
  if m['pool'] == 'cls' and not m['class_token']:
    return ("model.pool: 'cls' needs model.class_token=True; without a class token pool "
            "with 'gap', 'gap_prenorm' or 'map'")
  return None


def _mae(m: dict[str, Any]) -> str | None:
  mae = m.get('mae')
  if not mae:
    return None
  if mae['decoder_width'] % mae['decoder_heads']:
    return (f"model.mae.decoder_heads: {mae['decoder_heads']} does not divide "
            f"model.mae.decoder_width {mae['decoder_width']}")
  if (m['patch_embed'], m['tuning']) != ('2d', 'full') or not m['class_token']:
    return ("model.mae: pre-trains an image ViT with a class token, patch_embed='2d' and "
            "tuning='full'")
  return None


def _methods(m: dict[str, Any]) -> tuple[str, ...]:
  """The methods of model.tuning; none where it does not parse (_tuning reports that)."""
  try:
    return tuning.parse(m['tuning']).methods
  except ConfigError:
    return ()


def _repadapter_fact(m: dict[str, Any]) -> str | None:
  """RepAdapter's grouped up projection and FacT's chunked MLP factors need whole shares."""
  methods = _methods(m)
  rep = m['repadapter']
  if 'repadapter' in methods and (rep['dim'] % rep['groups'] or m['width'] % rep['groups']):
    return (f"model.repadapter.groups: {rep['groups']} must divide both model.repadapter.dim "
            f"({rep['dim']}) and model.width ({m['width']}); the official value is 2")
  if any(f in methods for f in ('fact_tt', 'fact_tk')) and m['mlp_dim'] % m['width']:
    return (f"model.tuning: FacT reads the MLP's {m['mlp_dim']} hidden features as chunks of "
            f"model.width ({m['width']}); use an mlp_dim that is a multiple of the width")
  return None


def _kernels(m: dict[str, Any]) -> str | None:
  """The fused kernels compute the plain MLP branch: a method inside it cannot run there."""
  methods = _methods(m)
  changed = [x for x in methods if x in ('ssf', 'fact_tt', 'fact_tk') or (
      x == 'repadapter' and m['repadapter']['placement'] == 'block')]
  if m['kernels'] == 'pallas' and changed:
    return ("model.kernels='pallas' fuses the plain MLP branch (LayerNorm, fc1, GELU, fc2); "
            f"tuning {'+'.join(changed)} changes it; use model.kernels='xla'")
  return None


MODEL_RULES: tuple[Rule, ...] = (_preset, _pool, _image_size, _frames, _heads, _tuning, _mae,
                                 _repadapter_fact, _kernels)

DATA = {
    'name': string(), 'data_dir': string(optional=True), 'train_split': string(),
    'eval_split': string(), 'train_pp': string(), 'eval_pp': string(),
    'normalize': string(), 'shuffle_buffer': POSITIVE,
    'val_fraction': number(0, 1), 'max_unreadable_fraction': number(0, 1),
    # Video eval views per clip (official test_num_segment x test_num_crop).
    'eval_clips': POSITIVE, 'eval_crops': POSITIVE,
}

RUN = {
    'model': MODEL,
    'data': DATA,
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


def _views(config: dict[str, Any]) -> str | None:
  """data.eval_clips x eval_crops against the model and data.eval_pp."""
  data = config['data']
  try:
    views.check_views(data['eval_clips'], data['eval_crops'], data['eval_pp'],
                      video=config['model']['patch_embed'] == 'tubelet')
  except ConfigError as e:
    return str(e).rstrip('.')
  return None


def model_problems(model: Any) -> list[str]:
  """Every field of a model config (ConfigDict or dict) that is missing or invalid."""
  model = _as_dict(model)
  found = _check(model, MODEL, 'model.')
  return found or [why for rule in MODEL_RULES if (why := rule(model))]


def validate_model(model: Any) -> None:
  """Raises one ConfigError listing every problem of a model config."""
  raise_if(model_problems(model))


def problems(config: Any) -> list[str]:
  """Every field of a run config (a ConfigDict or plain dict) that is missing or invalid."""
  config = _as_dict(config)
  if not isinstance(config, dict):
    return [f'a run config is an object of fields, not {_kind(config)}']
  if not set(config) & set(RUN):
    return [f"holds none of a run config's fields ({', '.join(list(RUN)[:4])}, ...)"]
  found = _check(config, RUN, '')
  if found:
    return found
  found = [why for rule in MODEL_RULES if (why := rule(config['model']))]
  return found + [why for why in [_views(config)] if why]


def validate(config: Any, where: str = '', fix: str = '') -> None:
  """Raises one ConfigError listing every problem of run config `config`, between `where`
  and `fix`."""
  raise_if(problems(config), where, fix)


def raise_if(found: list[str], where: str = '', fix: str = '') -> None:
  """One ConfigError for `found` problems (the first four, and how many more)."""
  if found:
    more = f' (and {len(found) - 4} more)' if len(found) > 4 else ''
    raise ConfigError(where + '; '.join(found[:4]) + more + fix + '.')


def _as_dict(config: Any) -> Any:
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config


def _check(values: dict[str, Any], schema: dict[str, Any], prefix: str) -> list[str]:
  found = []
  for key, check in schema.items():
    name = prefix + key
    if not name.startswith(('model', 'data', 'config.')):
      name = 'config.' + name  # as the README and the other messages name loop settings
    if isinstance(check, OptionalSection) and values.get(key) is None:
      continue
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


def _kind(value: Any) -> str:
  return 'null' if value is None else f'{type(value).__name__} {value!r}'[:60]
