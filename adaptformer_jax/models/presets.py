"""The preset table, `preset(name, **overrides)` and `build(model_cfg)`.

A model is described entirely by a ConfigDict, so the same dict drives building,
checkpoint loading, the trainable mask and the workdir's saved config.
"""
import difflib

import ml_collections

from adaptformer_jax.errors import ConfigError

# name: (patch, width, depth, heads, mlp_dim) -- ViT (Dosovitskiy et al.) and
# "Scaling Vision Transformers" (Zhai et al.) Table 2.
PRESETS = {
    'vit_ti16': (16, 192, 12, 3, 768),
    'vit_s16': (16, 384, 12, 6, 1536),
    'vit_b16': (16, 768, 12, 12, 3072),
    'vit_l16': (16, 1024, 24, 16, 4096),
    'vit_h14': (14, 1280, 32, 16, 5120),
    'vit_g14': (14, 1408, 40, 16, 6144),
    'vit_G14': (14, 1664, 48, 16, 8192),
}

# Each tuning method and the parameters it trains (regexes over '/'-joined paths,
# full match). Methods combine with '+', e.g. 'adaptformer+vpt_deep'.
TUNING_RULES = {
    'full': ('.*',),
    'linear': ('head/.*',),
    'adaptformer': ('head/.*', r'block\d+/adapter/.*'),
    'vpt_shallow': ('head/.*', 'prompts'),
    'vpt_deep': ('head/.*', 'prompts'),
    'lora': ('head/.*', r'block\d+/attn/lora_.*'),
}

CHOICES = {
    'pool': ('cls', 'gap'),
    'head': ('linear', 'bn_linear'),
    'adapter.layernorm': ('none', 'in', 'out'),
    'adapter.placement': ('parallel', 'sequential'),
    'dtype': ('float32', 'bfloat16'),
}

# model.remat: which activations each block keeps for the backward pass; the rest
# is recomputed there. 'none' keeps whatever autodiff needs; 'block' only the block's
# input (the block runs twice); 'dots' the matmul outputs, recomputing the LayerNorms,
# softmax and GELU -- what adapter tuning wants: frozen matmuls need no saved inputs,
# so it drops the large elementwise intermediates for little compute (RESULTS.md).
# False and True are the older spellings of 'none' and 'block'.
REMAT = {False: 'none', True: 'block', 'none': 'none', 'block': 'block', 'dots': 'dots'}


def tuning_methods(model_cfg):
  """The tuning string split into its methods, validated."""
  methods = tuple(m.strip() for m in str(model_cfg.tuning).split('+'))
  for m in methods:
    if m not in TUNING_RULES:
      raise ConfigError(
          f'model.tuning: unknown method {m!r}{_did_you_mean(m, TUNING_RULES)}; '
          f"allowed: {', '.join(TUNING_RULES)} (combine with '+').")
  if 'vpt_shallow' in methods and 'vpt_deep' in methods:
    raise ConfigError("model.tuning: choose one of 'vpt_shallow' and 'vpt_deep'.")
  return methods


def preset(name, **overrides):
  """A model ConfigDict for preset `name`, with top-level or nested overrides.

  Nested sections take dicts: `preset('vit_b16', adapter=dict(bottleneck=16))`.
  """
  if name not in PRESETS:
    raise ConfigError(
        f'model.name: unknown preset {name!r}{_did_you_mean(name, PRESETS)}; '
        f"allowed: {', '.join(PRESETS)}.")
  patch, width, depth, heads, mlp_dim = PRESETS[name]
  cfg = ml_collections.ConfigDict(dict(
      name=name, patch_size=patch, width=width, depth=depth, num_heads=heads,
      mlp_dim=mlp_dim, image_size=224, num_classes=1000, pool='cls',
      head='linear', head_init_std=0.01, tuning='adaptformer',
      # Official AdaptFormer defaults: ffn_num=64, fixed scale 0.1, no LN,
      # dropout 0.1, parallel to the MLP.
      adapter=dict(bottleneck=64, scale=0.1, layernorm='none', dropout=0.1,
                   placement='parallel'),
      vpt=dict(num_tokens=1),  # official --vpt_num default
      lora=dict(rank=8, alpha=8.0),
      # Regexes over parameter paths that train; empty = the tuning method's.
      trainable=(),
      dtype='float32',  # compute dtype; parameters stay float32
      # 'none' | 'block' | 'dots' or False | True, see REMAT; untyped, so both
      # `--config.model.remat=dots` and `=True` parse.
      remat=ml_collections.FieldReference(False, field_type=object),
  ))
  for key, value in overrides.items():
    if key not in cfg:
      raise ConfigError(
          f'model: unknown field {key!r}{_did_you_mean(key, cfg)}; '
          f"allowed: {', '.join(sorted(cfg.keys()))}.")
    if isinstance(cfg[key], ml_collections.ConfigDict):
      for sub, sub_value in dict(value).items():
        if sub not in cfg[key]:
          raise ConfigError(f'model.{key}: unknown field {sub!r}; '
                            f"allowed: {', '.join(cfg[key].keys())}.")
        _assign(cfg[key], sub, sub_value)
    else:
      _assign(cfg, key, value)
  validate(cfg)
  return cfg


def _assign(cfg, key, value):
  # ConfigDict locks a field's type on creation; scale may be a float or 'learnable'.
  if key == 'scale' or key == 'trainable':
    with cfg.ignore_type():
      cfg[key] = value
  else:
    cfg[key] = value


def validate(cfg):
  """Raises ConfigError naming the field and its allowed values."""
  if cfg.name not in PRESETS:
    preset(cfg.name)  # raises the unknown-preset error
  for field, allowed in CHOICES.items():
    value = cfg
    for part in field.split('.'):
      value = value[part]
    if value not in allowed:
      raise ConfigError(f'model.{field}: {value!r} is not one of '
                        f"{', '.join(map(repr, allowed))}.")
  if not (isinstance(cfg.remat, (bool, str)) and cfg.remat in REMAT):
    raise ConfigError(f'model.remat: {cfg.remat!r} is not one of '
                      f"{', '.join(map(repr, REMAT))}.")
  if cfg.image_size <= 0 or cfg.image_size % cfg.patch_size:
    raise ConfigError(
        f'model.image_size: {cfg.image_size} is not a positive multiple of the '
        f'patch size {cfg.patch_size}; use e.g. '
        f'{max(1, round(cfg.image_size / cfg.patch_size)) * cfg.patch_size}.')
  if cfg.width % cfg.num_heads:
    raise ConfigError(f'model.num_heads: {cfg.num_heads} does not divide '
                      f'model.width {cfg.width}.')
  if cfg.num_classes <= 0:
    raise ConfigError(f'model.num_classes: must be > 0, got {cfg.num_classes}.')
  if cfg.adapter.bottleneck <= 0:
    raise ConfigError(f'model.adapter.bottleneck: must be > 0, got '
                      f'{cfg.adapter.bottleneck}.')
  scale = cfg.adapter.scale
  if not (scale == 'learnable' or isinstance(scale, (int, float))):
    raise ConfigError(f"model.adapter.scale: {scale!r} is neither a number nor "
                      "'learnable'.")
  if not 0 <= cfg.adapter.dropout < 1:
    raise ConfigError(f'model.adapter.dropout: must be in [0, 1), got '
                      f'{cfg.adapter.dropout}.')
  if cfg.vpt.num_tokens <= 0:
    raise ConfigError(f'model.vpt.num_tokens: must be > 0, got {cfg.vpt.num_tokens}.')
  if cfg.lora.rank <= 0:
    raise ConfigError(f'model.lora.rank: must be > 0, got {cfg.lora.rank}.')
  tuning_methods(cfg)


def build(model_cfg):
  """The Flax module for a model ConfigDict (validated first)."""
  from adaptformer_jax.models import vit  # pylint: disable=g-import-not-at-top
  validate(model_cfg)
  return vit.VisionTransformer(cfg=ml_collections.FrozenConfigDict(model_cfg))


def _did_you_mean(name, choices):
  close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
  return f' (did you mean {close[0]!r}?)' if close else ''
