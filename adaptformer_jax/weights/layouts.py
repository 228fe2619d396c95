"""Checkpoint layouts: each family's key names mapped onto this project's parameter tree.

The tables are data: (checkpoint module regex, our module[, kind]) rows for PyTorch
(official AdaptFormer, MAE, timm, DINOv2, VideoMAE), OpenCLIP and big_vision/AugReg
files; `convert` tells the layout apart by its keys and returns every tensor under
our path with the checkpoint key it came from, for error messages.
"""
import re
from typing import Any

import numpy as np

from adaptformer_jax.errors import UserError

# Torch modules (official AdaptFormer, MAE, timm) -> (our module, kind).
_TORCH_MODULES = (
    (r'patch_embed\.proj', 'embedding', 'conv'),
    (r'blocks\.(\d+)\.norm([12])', r'block\1/norm\2', 'ln'),
    (r'blocks\.(\d+)\.attn\.qkv', r'block\1/attn/qkv', 'linear'),
    (r'blocks\.(\d+)\.attn\.proj', r'block\1/attn/out', 'linear'),
    (r'blocks\.(\d+)\.(?:mlp\.)?(fc[12])', r'block\1/mlp/\2', 'linear'),
    (r'blocks\.(\d+)\.adaptmlp\.(down|up)_proj', r'block\1/adapter/\2', 'linear'),
    (r'blocks\.(\d+)\.adaptmlp\.adapter_layer_norm_before', r'block\1/adapter/norm', 'ln'),
    (r'(norm|fc_norm|norm_pre)', r'\1', 'ln'),
    (r'attn_pool\.(q|kv)', r'map_head/\1', 'linear'),  # timm AttentionPoolLatent
    (r'attn_pool\.proj', 'map_head/out', 'linear'),
    (r'attn_pool\.norm', 'map_head/norm', 'ln'),
    (r'attn_pool\.mlp\.(fc[12])', r'map_head/mlp/\1', 'linear'),
    (r'head(?:\.1)?', 'head/linear', 'linear'),
    (r'head\.0', 'head/bn', 'bn'),
    # Adapter+ (official vit_adapter.Adapter): bottleneck = [Identity, down, GELU, Identity, up].
    (r'blocks\.(\d+)\.adapter\.bottleneck\.1', r'block\1/adapter_plus/down', 'linear'),
    (r'blocks\.(\d+)\.adapter\.bottleneck\.4', r'block\1/adapter_plus/up', 'linear'),
    # Official RepAdapter (1x1 Conv1d, the up one grouped) and FacT (bias-free Linear) on timm.
    (r'blocks\.(\d+)\.adapter_(attn|mlp)\.conv_A', r'block\1/repadapter_\2/down', 'conv1x1'),
    (r'blocks\.(\d+)\.adapter_(attn|mlp)\.conv_B', r'block\1/repadapter_\2/up', 'conv1x1'),
    (r'FacT([uv])', r'fact/\1', 'linear'),
    (r'blocks\.(\d+)\.attn\.(q|k|v|proj)_FacTs', r'block\1/fact/\2', 'linear'),
    (r'blocks\.(\d+)\.mlp\.(fc[12])_FacTs', r'block\1/fact/\2', 'linear'),
)

# Torch parameter names -> ours, per kind (timm_layout writes the reverse).
TORCH_PARAMS = {
    'conv': {'weight': 'kernel', 'bias': 'bias'},
    'linear': {'weight': 'kernel', 'bias': 'bias'},
    'conv1x1': {'weight': 'kernel', 'bias': 'bias'},  # (out, in / groups, 1): a Linear's
    'ln': {'weight': 'scale', 'bias': 'bias'},
    'bn': {'running_mean': 'mean', 'running_var': 'var'},
}

_TORCH_LEAVES = ((r'cls_token', 'cls'), (r'pos_embed', 'pos_embedding'),
                 (r'blocks\.(\d+)\.adaptmlp\.scale', r'block\1/adapter/scale'),
                 # VideoMAE/BEiT attention: q and v biases, none for k.
                 (r'blocks\.(\d+)\.attn\.([qv])_bias', r'block\1/attn/\2_bias'),
                 # LayerScale: VideoMAE/BEiT `gamma_1/2`, timm `ls1/2.gamma`.
                 (r'blocks\.(\d+)\.(?:gamma_|ls)([12])(?:\.gamma)?', r'block\1/ls\2'),
                 (r'reg_token|register_tokens', 'registers'),  # timm | DINOv2
                 (r'attn_pool\.latent', 'map_head/probe'),
                 (r'prompts', 'prompts'),  # stacked from the official `embeddings.N`
                 (r'blocks\.(\d+)\.adapter\.scaling', r'block\1/adapter_plus/scale'),
                 # Official SSF: ssf_{scale,shift}_N on the module of the layer they follow.
                 (r'patch_embed\.ssf_(scale|shift)_1', r'ssf_embedding/\1'),
                 (r'blocks\.(\d+)\.ssf_(scale|shift)_([12])', r'block\1/ssf_norm\3/\2'),
                 (r'blocks\.(\d+)\.attn\.ssf_(scale|shift)_1', r'block\1/attn/ssf_qkv/\2'),
                 (r'blocks\.(\d+)\.attn\.ssf_(scale|shift)_2', r'block\1/attn/ssf_out/\2'),
                 (r'blocks\.(\d+)\.mlp\.ssf_(scale|shift)_([12])', r'block\1/mlp/ssf_fc\3/\2'),
                 (r'ssf_(scale|shift)_1', r'ssf_norm/\1'),  # after the final norm
                 (r'FacT([pc])', r'fact/\1'))  # FacT-TK's shared tensors, same layout

# Pretraining-only parts of MAE / DINOv2 / VideoMAE checkpoints, and BatchNorm's step counter.
_TORCH_IGNORED = re.compile(
    r'decoder_.*|decoder\..*|encoder_to_decoder\..*|mask_token|.*\.num_batches_tracked')

# VideoMAE's pre-training files nest the ViT under `encoder.`.
_ENCODER_PREFIX = 'encoder.'
# Official Adapter+ Lightning checkpoints nest the timm ViT under `vit.`.
_LIGHTNING_PREFIX = 'vit.'

# OpenCLIP / OpenAI CLIP image tower (`visual.*`) -> timm names; the rest is the text
# tower. OpenCLIP models built on a timm trunk (SigLIP) hold `visual.trunk.<timm name>`.
_OPENCLIP_NAMES = (
    (r'visual\.conv1\.', 'patch_embed.proj.'),
    (r'visual\.class_embedding$', 'cls_token'),
    (r'visual\.positional_embedding$', 'pos_embed'),
    (r'visual\.ln_pre\.', 'norm_pre.'),
    (r'visual\.ln_post\.', 'norm.'),
    (r'visual\.proj$', 'head.weight'),
    (r'visual\.transformer\.resblocks\.(\d+)\.ln_([12])\.', r'blocks.\1.norm\2.'),
    (r'visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_', r'blocks.\1.attn.qkv.'),
    (r'visual\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.', r'blocks.\1.attn.proj.'),
    (r'visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.', r'blocks.\1.mlp.fc1.'),
    (r'visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.', r'blocks.\1.mlp.fc2.'),
    (r'visual\.transformer\.resblocks\.(\d+)\.ls_([12])\.', r'blocks.\1.ls\2.'),
)

# big_vision / vit_jax names (AugReg uses LayerNorm_0/2, MlpBlock_3; big_vision LayerNorm_0/1).
_BV_MODULES = (
    (r'embedding', 'embedding'),
    (r'Transformer/encoderblock_(\d+)/LayerNorm_0', r'block\1/norm1'),
    (r'Transformer/encoderblock_(\d+)/LayerNorm_[12]', r'block\1/norm2'),
    (r'Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_\d/qkv', r'block\1/attn/qkv'),
    (r'Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_\d/out', r'block\1/attn/out'),
    (r'Transformer/encoderblock_(\d+)/MlpBlock_\d/Dense_0', r'block\1/mlp/fc1'),
    (r'Transformer/encoderblock_(\d+)/MlpBlock_\d/Dense_1', r'block\1/mlp/fc2'),
    (r'Transformer/encoder_norm', 'norm'),
    (r'MAPHead_0/MultiHeadDotProductAttention_0/(q|kv|out)', r'map_head/\1'),
    (r'MAPHead_0/LayerNorm_0', 'map_head/norm'),
    (r'MAPHead_0/MlpBlock_0/Dense_0', 'map_head/mlp/fc1'),
    (r'MAPHead_0/MlpBlock_0/Dense_1', 'map_head/mlp/fc2'),
    (r'pre_logits', 'pre_logits'),
    (r'head', 'head/linear'),
)

_BV_LEAVES = ((r'cls', 'cls'), (r'(?:Transformer/posembed_input/)?pos_embedding', 'pos_embedding'),
              (r'MAPHead_0/probe', 'map_head/probe'))

# Where the model lives in a big_vision / vit_jax file: a bare model, a training
# checkpoint (params/ next to opt/), an old vit_jax one (opt/target/), a two-tower
# image tower (params/img/, SigLIP / LiT).
_BV_PREFIXES = ('params/img/', 'opt/target/', 'params/', '')


def convert(path: str, flat: dict[str, np.ndarray],
            kind: str) -> tuple[str, dict[str, tuple[Any, str]], dict[str, int]]:
  """(layout, {our path: (array, 'checkpoint key (stored shape)')}, {ignored: count})."""
  keys = list(flat)
  if any(re.match(r'(.*/)?Transformer/encoderblock(_\d+)?/', k) for k in keys):
    return ('big_vision',) + _convert_big_vision(flat)
  if kind == 'orbax' or any(k.startswith(('params/', 'batch_stats/')) for k in keys):
    return 'this project', {k: (v, _described(k, v)) for k, v in flat.items()}, {}
  if any(k.startswith('visual.') for k in keys):
    flat, ignored = _openclip_to_timm(flat)
    return 'OpenCLIP', _convert_torch(flat), ignored
  if any(k.startswith((_LIGHTNING_PREFIX + 'blocks.', _LIGHTNING_PREFIX + 'patch_embed.'))
         for k in keys):
    model = {k[len(_LIGHTNING_PREFIX):]: v for k, v in flat.items()
             if k.startswith(_LIGHTNING_PREFIX)}
    return 'Adapter+ Lightning', _convert_torch(model), {
        'keys outside vit.': len(flat) - len(model)}
  # FacT-TK's saved file (FacT* + head) has no block key.
  if any(k.startswith(('blocks.', 'patch_embed.', 'FacT')) for k in keys):
    ignored = sum(bool(_TORCH_IGNORED.fullmatch(k)) for k in keys)
    return 'timm', _convert_torch(flat), {'pretraining-only keys': ignored}
  if any(k.startswith(_ENCODER_PREFIX + 'blocks.') for k in keys):
    # A VideoMAE pre-training file: its encoder is the backbone, the decoder is dropped.
    encoder = {k[len(_ENCODER_PREFIX):]: v for k, v in flat.items()
               if k.startswith(_ENCODER_PREFIX)}
    return 'VideoMAE pre-training', _convert_torch(encoder), {
        'decoder and pretraining-only keys': len(flat) - len(encoder) + sum(
            bool(_TORCH_IGNORED.fullmatch(k)) for k in encoder)}
  raise UserError(
      f'{path}: unknown checkpoint layout (first keys: {sorted(keys)[:4]}); expected the '
      'official AdaptFormer/MAE, timm or DINOv2 ViT (blocks.N...), VideoMAE '
      '(encoder.blocks.N...), OpenCLIP (visual.*), '
      'big_vision/AugReg (Transformer/encoderblock_N/...) or this project (params/...) '
      'layout.')

def _openclip_to_timm(flat):
  """An OpenCLIP / OpenAI CLIP state dict's image tower under timm's names."""
  out, text_tower = {}, 0
  for name, value in flat.items():
    if not name.startswith('visual.'):
      text_tower += 1
      continue
    if name.startswith('visual.trunk.'):  # OpenCLIP around a timm trunk (SigLIP): timm names
      out[name[len('visual.trunk.'):]] = value
      continue
    for pattern, template in _OPENCLIP_NAMES:
      if re.match(pattern, name):
        name = re.sub(pattern, template, name, count=1)
        break
    if name == 'cls_token':  # (D,) -> (1, 1, D)
      value = value.reshape(1, 1, -1)
    elif name == 'pos_embed':  # (N, D) -> (1, N, D)
      value = value[None]
    elif name == 'head.weight':  # x @ proj, no bias
      value = value.T
      out['head.bias'] = np.zeros(value.shape[0], value.dtype)
    out[name] = value
  return out, {'text-tower keys': text_tower}

def _rename(name, modules, params=None):
  """Our path for checkpoint key `name` via a (module regex, our module[, kind]) table.

  Torch tables carry a kind whose `params` entry renames the parameter (the kind
  is returned, to pick the transpose); big_vision keys keep their parameter name.
  """
  module, _, param = name.rpartition('/' if params is None else '.')
  for pattern, template, *kind in modules:
    if not re.fullmatch(pattern, module):
      continue
    if not kind:
      return f'{re.sub(pattern, template, module)}/{param}', None
    if param in params[kind[0]]:
      return f'{re.sub(pattern, template, module)}/{params[kind[0]][param]}', kind[0]
  return None, None

def _described(name, value):
  """A checkpoint key with its shape as stored there, for error messages."""
  return f'{name} {tuple(np.shape(value))}'

def _convert_torch(flat):
  flat = dict(flat)
  origin = {k: _described(k, v) for k, v in flat.items()}
  # CLIP's patch embedding has no bias: a zero bias is the same function.
  if 'patch_embed.proj.weight' in flat and 'patch_embed.proj.bias' not in flat:
    weight = flat['patch_embed.proj.weight']
    flat['patch_embed.proj.bias'] = np.zeros(weight.shape[0], weight.dtype)
    origin['patch_embed.proj.bias'] = 'patch_embed.proj (no bias: zeros)'
  # Official AdaptFormer splits qkv into q_proj/k_proj/v_proj: fuse back, q|k|v order.
  for name in [k for k in flat if re.fullmatch(r'blocks\.\d+\.attn\.q_proj\.(weight|bias)', k)]:
    parts = [name.replace('q_proj', p) for p in ('q_proj', 'k_proj', 'v_proj')]
    if all(p in flat for p in parts):
      fused = name.replace('q_proj', 'qkv')
      origin[fused] = f"{name.replace('q_proj', '{q,k,v}_proj')} 3x{flat[name].shape}"
      flat[fused] = np.concatenate([flat.pop(p) for p in parts], axis=0)
  # Official VPT-deep prompts: a ParameterList `embeddings.N` of (1, tokens, D).
  prompts = sorted((int(k.split('.')[1]), k) for k in flat
                   if re.fullmatch(r'embeddings\.\d+', k))
  if prompts:
    origin['prompts'] = (f'embeddings.{{0-{prompts[-1][0]}}} '
                         f'{len(prompts)}x{flat[prompts[0][1]].shape}')
    flat['prompts'] = np.concatenate([flat.pop(k) for _, k in prompts], axis=0)

  out = {}
  for name, value in flat.items():
    src = origin[name]
    if _TORCH_IGNORED.fullmatch(name):
      continue
    leaf = next((re.sub(p, t, name) for p, t in _TORCH_LEAVES if re.fullmatch(p, name)), None)
    kind = None
    if leaf is None:
      leaf, kind = _rename(name, _TORCH_MODULES, TORCH_PARAMS)
    if leaf is None:
      out[f'?{src}'] = (value, src)
      continue
    if kind == 'linear' and value.ndim == 2:
      value = value.T
    elif kind == 'conv1x1' and value.ndim == 3:
      value = value[..., 0].T
    elif kind == 'conv' and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif kind == 'conv' and value.ndim == 5:
      value = value.transpose(2, 3, 4, 1, 0)  # video tubelets: OITHW -> THWIO
    out[('batch_stats/' if kind == 'bn' else 'params/') + leaf] = (value, src)
  return out

def _convert_big_vision(flat):
  prefix = next((p for p in _BV_PREFIXES if f'{p}embedding/kernel' in flat), '')
  ignored = {f'keys outside {prefix} (optimizer state, other tower)':
             sum(not k.startswith(prefix) for k in flat)}
  flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  origin = {k: _described(prefix + k, v) for k, v in flat.items()}
  # A scanned encoder (nn.scan) stacks the blocks on a leading axis: unstack.
  for name in [k for k in flat if k.startswith('Transformer/encoderblock/')]:
    stacked = flat.pop(name)
    for i, value in enumerate(stacked):
      block = name.replace('encoderblock/', f'encoderblock_{i}/')
      flat[block], origin[block] = value, f'{origin[name]}[{i}]'
  # Attention projections are (D, heads, head_dim) / (heads, head_dim, D): flatten and
  # fuse query|key|value (the blocks) or key|value (MAPHead, whose query is alone).
  attention = r'(Transformer/encoderblock_\d+|MAPHead_0)/MultiHeadDotProductAttention_\d'
  for name in [k for k in flat if re.fullmatch(attention + r'/query/\w+', k)]:
    map_head = name.startswith('MAPHead_0/')
    groups = ((('key', 'value'), 'kv'), (('query',), 'q')) if map_head else \
        ((('query', 'key', 'value'), 'qkv'),)
    for names, fused_name in groups:
      parts = [name.replace('/query/', f'/{p}/') for p in names]
      if all(p in flat for p in parts):
        fused = name.replace('/query/', f'/{fused_name}/')
        arrays = [flat.pop(p) for p in parts]
        flat[fused] = np.concatenate([a.reshape(a.shape[0], -1) if a.ndim == 3 else a.reshape(-1)
                                      for a in arrays], axis=-1)
        spelled = name.replace('/query/', f"/{{{','.join(names)}}}/")
        origin[fused] = f'{prefix}{spelled} {len(parts)}x{arrays[0].shape}'
  for name in [k for k in flat if re.fullmatch(attention + '/out/kernel', k) and flat[k].ndim == 3]:
    flat[name] = flat[name].reshape(-1, flat[name].shape[-1])
  out = {}
  for name, value in flat.items():
    leaf = next((t for p, t in _BV_LEAVES if re.fullmatch(p, name)), None)
    if leaf is None:
      leaf, _ = _rename(name, _BV_MODULES)
    out[f'params/{leaf}' if leaf else f'?{origin[name]}'] = (value, origin[name])
  return out, ignored
