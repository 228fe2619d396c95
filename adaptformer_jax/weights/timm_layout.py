"""A plain ViT's weights under timm's names, with the `VisionTransformer` arguments that
rebuild it: how a merged model leaves this project for PyTorch.

The names are the inverse of the timm rows of `layouts` (the loader's table), and every
file is checked against that loader before it is written: read back, it must give the
same tensors at the same paths, so `pretrained.load` and timm agree on it.
"""
import re
from typing import Any

import flax.traverse_util
import ml_collections
import numpy as np

from adaptformer_jax.errors import UserError
from adaptformer_jax.weights import layouts

# Our module -> (timm module, kind); the kind names the parameters and the transpose.
_MODULES = (
    (r'embedding', 'patch_embed.proj', 'conv'),
    (r'block(\d+)/norm([12])', r'blocks.\1.norm\2', 'ln'),
    (r'block(\d+)/attn/qkv', r'blocks.\1.attn.qkv', 'linear'),
    (r'block(\d+)/attn/out', r'blocks.\1.attn.proj', 'linear'),
    (r'block(\d+)/mlp/(fc[12])', r'blocks.\1.mlp.\2', 'linear'),
    (r'(norm|fc_norm|norm_pre)', r'\1', 'ln'),
    (r'map_head/(q|kv)', r'attn_pool.\1', 'linear'),
    (r'map_head/out', 'attn_pool.proj', 'linear'),
    (r'map_head/norm', 'attn_pool.norm', 'ln'),
    (r'map_head/mlp/(fc[12])', r'attn_pool.mlp.\1', 'linear'),
    (r'head/linear', 'head', 'linear'),
)
# Our parameter names -> timm's, per kind: the loader's table turned round.
_PARAMS = {kind: {ours: theirs for theirs, ours in layouts.TORCH_PARAMS[kind].items()}
           for kind in ('conv', 'linear', 'ln')}
_LEAVES = ((r'cls', 'cls_token'), (r'pos_embedding', 'pos_embed'),
           (r'block(\d+)/ls([12])', r'blocks.\1.ls\2.gamma'), (r'map_head/probe', 'attn_pool.latent'))

# Model fields timm's VisionTransformer has no argument for: (field, the value it must have).
_FIXED = (('patch_embed', '2d'), ('posemb', 'learned'), ('num_registers', 0),
          ('pre_logits', 0), ('head', 'linear'))
_POOL = {'cls': ('token', False), 'gap': ('avg', True), 'gap_prenorm': ('avg', False),
         'map': ('map', False)}
_ACT = {'exact': 'gelu', 'tanh': 'gelu_tanh', 'quick': 'quick_gelu'}


def unsupported(model_cfg: ml_collections.ConfigDict) -> list[str]:
  """The fields of a plain ViT that timm's VisionTransformer cannot express."""
  why = [f'model.{k}={model_cfg[k]!r} (timm needs {v!r})' for k, v in _FIXED
         if model_cfg[k] != v]
  if model_cfg.qkv_bias == 'qv':
    why.append("model.qkv_bias='qv'")
  if model_cfg.tuning != 'full':
    why.append(f'model.tuning={model_cfg.tuning!r} (merge it first)')
  return why


def timm_kwargs(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """`timm.models.vision_transformer.VisionTransformer(**kwargs)` of this model."""
  global_pool, fc_norm = _POOL[model_cfg.pool]
  return dict(img_size=model_cfg.image_size, patch_size=model_cfg.patch_size,
              num_classes=model_cfg.num_classes, embed_dim=model_cfg.width,
              depth=model_cfg.depth, num_heads=model_cfg.num_heads,
              mlp_ratio=model_cfg.mlp_dim / model_cfg.width,
              qkv_bias=model_cfg.qkv_bias == 'qkv', class_token=model_cfg.class_token,
              global_pool=global_pool, fc_norm=fc_norm, init_values=model_cfg.layerscale,
              pre_norm=model_cfg.ln_pre, act_layer=_ACT[model_cfg.gelu])


def _timm_name(path: str) -> tuple[str, str | None]:
  for pattern, name in _LEAVES:
    if re.fullmatch(pattern, path):
      return re.sub(pattern, name, path), None
  module, _, param = path.rpartition('/')
  for pattern, name, kind in _MODULES:
    if re.fullmatch(pattern, module) and param in _PARAMS[kind]:
      return f'{re.sub(pattern, name, module)}.{_PARAMS[kind][param]}', kind
  raise UserError(f'{path}: no timm name for this parameter.')


def state_dict(variables: dict[str, Any],
               model_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The timm state dict (float32 NumPy) of a plain ViT, checked against our loader."""
  problems = unsupported(model_cfg)
  if problems:
    raise UserError('timm\'s VisionTransformer cannot hold this model: '
                    + '; '.join(problems) + '.')
  params = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  out = {}
  for path, value in params.items():
    name, kind = _timm_name(path)
    value = np.asarray(value, np.float32)
    if kind == 'linear' and value.ndim == 2:
      value = value.T
    elif kind == 'conv' and value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    out[name] = np.ascontiguousarray(value)
  _check_round_trip(out, params)
  return out


def _check_round_trip(timm_flat: dict[str, np.ndarray], params: dict[str, Any]) -> None:
  """Our loader must read the file back to the same tensors at the same paths."""
  _, back, _ = layouts.convert('merged model', timm_flat, 'torch')
  back = {k: v for k, (v, _) in back.items()}
  expected = {f'params/{k}' for k in params}
  wrong = sorted(set(back) ^ expected) + sorted(
      k for k in expected & set(back)
      if not np.array_equal(back[k], np.asarray(params[k[len('params/'):]], np.float32)))
  if wrong:
    raise AssertionError(f'timm layout does not read back as written: {wrong[:5]}')
