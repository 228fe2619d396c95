"""Loading pretrained ViT checkpoints into this project's parameter tree.

`load` reads the official AdaptFormer (image and video) / MAE / VideoMAE / timm
PyTorch checkpoints (timm's DINOv2, CLIP and SigLIP included), DINOv2's and
OpenCLIP's own state dicts, big_vision (AugReg, SigLIP) `.npz` files -- training
checkpoints too -- and this project's own exports, and returns variables shaped
exactly like `models.build(cfg).init(...)`. Layouts are told apart by their keys,
so users never name the format. Anything that would load silently wrong (missing
backbone weights, leftover keys, wrong shapes, an ambiguous final norm) is one
UserError listing every offending key: only head, adapter, LoRA and prompt leaves
may start fresh, and one log line per load says how many leaves came from where.
"""
import argparse
import math
import os
import re
import zipfile
from typing import Any

from absl import logging
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adaptformer_jax import integrity
from adaptformer_jax.errors import UserError
from adaptformer_jax.errors import described
from adaptformer_jax.models import methods
from adaptformer_jax.models import presets

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
)
_TORCH_PARAMS = {
    'conv': {'weight': 'kernel', 'bias': 'bias'},
    'linear': {'weight': 'kernel', 'bias': 'bias'},
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
                 (r'prompts', 'prompts'))  # stacked from the official `embeddings.N`
# Pretraining-only parts of MAE / DINOv2 / VideoMAE checkpoints, and BatchNorm's step counter.
_TORCH_IGNORED = re.compile(
    r'decoder_.*|decoder\..*|encoder_to_decoder\..*|mask_token|.*\.num_batches_tracked')
# VideoMAE's pre-training files nest the ViT under `encoder.`.
_ENCODER_PREFIX = 'encoder.'
# State-dict wrappers: official/MAE/VideoMAE training scripts, VideoMAE's
# deepspeed `module`, timm/lightning `state_dict`.
_TORCH_WRAPPERS = ('model', 'module', 'state_dict')

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


def load(path: str | os.PathLike, model_cfg: ml_collections.ConfigDict, *,
         init_variables: dict[str, Any] | None = None, rng: jax.Array | None = None,
         strict: bool = True, init_has_backbone: bool = True) -> dict[str, Any]:
  """Variables for `models.build(model_cfg)` with the weights of checkpoint `path`.

  Args:
    path: a PyTorch `.pth` (official AdaptFormer, MAE, timm, DINOv2, OpenCLIP), a
      `.safetensors` (timm, or this project's '/'-keyed export), a big_vision
      `.npz` (a bare model or a training checkpoint), or an orbax checkpoint
      directory holding 'params' (and 'batch_stats').
    model_cfg: the model ConfigDict; the result matches its `init` tree exactly.
    init_variables: values for the leaves the checkpoint lacks (adapters, LoRA,
      prompts, head). An export of this project that holds no backbone leaf at
      all (an adapter export) takes the whole backbone from here.
    rng: used to init those leaves when `init_variables` is None (default key 0).
    strict: if False, checkpoint keys the model has no place for are a warning.
      It never lets a backbone leaf start fresh.
    init_has_backbone: False when `init_variables` are a fresh init (training from
      `config.init_from`): an adapter export then cannot supply the backbone.

  Returns:
    {'params': ..., 'batch_stats': ... (bn_linear head only)} of numpy arrays.
  """
  model = presets.build(model_cfg)
  dummy = jnp.zeros((1, *presets.input_shape(model_cfg)), jnp.float32)
  target = flax.traverse_util.flatten_dict(
      jax.eval_shape(model.init, jax.random.key(0), dummy), sep='/')

  flat, kind = _read(path)
  layout, converted, ignored = _convert(path, flat, kind)
  fresh_why = {}  # our path -> why it keeps its initial value
  if _mae_final_norm(path, model_cfg, converted, layout):
    converted = {k: v for k, v in converted.items() if not k.startswith('params/norm/')}
    ignored['final norm (MAE convention with pool=gap)'] = 2
    fresh_why.update({k: 'fc_norm (MAE: starts at identity)' for k in target
                      if k.startswith('params/fc_norm/')})
  grid = presets.token_grid(model_cfg)
  loaded, problems = _match(converted, target, grid, model_cfg.posemb_resample, fresh_why)
  missing = sorted(set(target) - set(loaded))
  backbone = [k for k in target if not methods.FRESH_ON_LOAD.fullmatch(k)]
  # An adapter export holds no backbone leaf: the backbone comes from init_variables.
  backbone_elsewhere = layout == 'this project' and not any(k in loaded for k in backbone)
  if backbone_elsewhere and not (init_variables is not None and init_has_backbone):
    raise UserError(
        f'{path} holds no backbone, only adapters and a head (an adapter export): as '
        'config.init_from pass the backbone they were trained on (adapter_config.json '
        "beside it names it); to evaluate or predict with the export, pass its folder as "
        '--adapters (in Python: load the backbone first and pass it as init_variables).')
  mismatched = {k for k, _ in problems['shape mismatches (checkpoint vs model)']}
  problems['missing from the checkpoint'] = [
      (k, f'{k} {tuple(target[k].shape)}') for k in missing
      if not (k in mismatched or methods.FRESH_ON_LOAD.fullmatch(k) or k in fresh_why
              or backbone_elsewhere)]
  ignored['unexpected keys (strict=False)'] = len(problems['unexpected in the checkpoint'])
  _raise_or_warn(path, problems, strict, converted, model_cfg, layout == 'this project')
  integrity.check_values(path, {converted[k][1]: v for k, v in loaded.items()})

  if missing:
    if init_variables is None:
      init_variables = model.init(rng if rng is not None else jax.random.key(0), dummy)
    fresh = flax.traverse_util.flatten_dict(init_variables, sep='/')
    if set(fresh) != set(target):
      raise ValueError('init_variables do not match the model tree: '
                       f'{sorted(set(fresh) ^ set(target))[:5]}')
    loaded.update({k: fresh[k] for k in missing})
  _log_load(path, layout, backbone, missing, fresh_why, ignored, backbone_elsewhere,
            _posemb_note(converted, target, model_cfg.posemb_resample)
            if len(grid) == 2 else '')
  out = {k: np.asarray(loaded[k], target[k].dtype) for k in target}
  return flax.traverse_util.unflatten_dict(out, sep='/')


def _mae_final_norm(path, model_cfg, converted, layout):
  """Whether pool='gap' drops the checkpoint's final norm, as MAE fine-tuning does.

  A final norm without fc_norm means either "norm, then pool" (timm fc_norm=False,
  big_vision gap) or an MAE-style backbone whose fine-tuning starts fc_norm fresh.
  A backbone without a classifier is taken as the latter; a checkpoint with a head
  was trained on the normed features, so pool='gap' would silently change them.
  """
  if not (model_cfg.pool == 'gap' and 'params/norm/scale' in converted
          and 'params/fc_norm/scale' not in converted):
    return False
  if any(k.startswith('params/head/') for k in converted) or layout == 'big_vision':
    raise UserError(
        f"{path}: the checkpoint normalises before its head (final norm, no fc_norm), "
        "but model.pool='gap' averages first and normalises with a fresh fc_norm. "
        "Choose model.pool='gap_prenorm' (norm, then the mean: timm global_pool='avg' "
        "with fc_norm=False, big_vision pool_type='gap') or model.pool='cls' (the class "
        'token after the norm).')
  return True


def _posemb_note(converted, target, method):
  """'; position embedding 28x28 -> 4x4 (bicubic)' when it was resampled."""
  if 'params/pos_embedding' not in converted or 'params/pos_embedding' not in target:
    return ''
  old = np.shape(converted['params/pos_embedding'][0])[1]
  new = target['params/pos_embedding'].shape[1]
  old, new = (math.isqrt(n - _class_rows(n)) for n in (old, new))
  return f'; position embedding {old}x{old} -> {new}x{new} ({method})' if old != new else ''


def _log_load(path, layout, backbone, missing, fresh_why, ignored, backbone_elsewhere,
              note):
  """The one line per load: where every leaf came from."""
  missing = set(missing)
  why = {}
  for k in sorted(missing):
    if k in fresh_why:
      reason = fresh_why[k]
    elif backbone_elsewhere and not methods.FRESH_ON_LOAD.fullmatch(k):
      reason = 'backbone from init_variables'
    else:
      reason = next((name for pattern, name in _FRESH_KINDS if re.fullmatch(pattern, k)),
                    'not in the checkpoint')
    why[reason] = why.get(reason, 0) + 1
  from_file = sum(k not in missing for k in backbone)
  skipped = ', '.join(f'{n} {what}' for what, n in ignored.items() if n)
  logging.info('%s (%s layout): %d of %d backbone leaves from the file; %d leaves fresh%s%s%s',
              path, layout, from_file, len(backbone), len(missing),
              f" ({', '.join(f'{n} {r}' for r, n in why.items())})" if why else '',
              f'; ignored: {skipped}' if skipped else '', note)


_FRESH_KINDS = (  # (our path, what it is) for the log line
    (r'params/block\d+/adapter/.*', 'adapter'),
    (r'params/block\d+/attn/lora_[qv]/.*', 'LoRA'),
    (r'params/prompts', 'VPT prompts'),
    (r'(params|batch_stats)/head/.*', 'head'),
)


def resample_posemb(posemb, new_grid, method='bicubic'):
  """Resizes the patch grid of a (1, [1 +] h*w, D) position embedding.

  A class-token row (when the token count is not a square) is kept as is; the
  old grid must be square. `new_grid` is a side length or an (h, w) pair.
  `method` follows the checkpoint family's own loader: 'bicubic' as timm
  (antialiased when shrinking, torch's F.interpolate(antialias=True)), 'bilinear'
  as big_vision (scipy.ndimage.zoom(order=1): corners aligned, no antialiasing).
  """
  new_h, new_w = (new_grid, new_grid) if np.ndim(new_grid) == 0 else new_grid
  tokens = posemb.shape[1]
  prefix = 0 if math.isqrt(tokens) ** 2 == tokens else 1
  head, grid = np.asarray(posemb[:, :prefix], np.float32), np.asarray(posemb[0, prefix:])
  side = math.isqrt(grid.shape[0])
  if side * side != grid.shape[0]:
    raise UserError(f'pos_embedding: {grid.shape[0]} patch positions do not form a '
                    'square grid, so they cannot be resampled to the model image size.')
  grid = grid.astype(np.float32).reshape(side, side, -1)
  if method == 'bicubic':
    grid = np.asarray(jax.image.resize(grid, (new_h, new_w, grid.shape[-1]), 'bicubic',
                                       antialias=True))
  elif method == 'bilinear':
    rows, cols = _aligned_linear(side, new_h), _aligned_linear(side, new_w)
    grid = np.einsum('ia,jb,abd->ijd', rows, cols, grid.astype(np.float64))
  else:
    raise ValueError(f'resample_posemb: unknown method {method!r}')
  return np.concatenate([head, grid.reshape(1, new_h * new_w, -1).astype(np.float32)], 1)


def _aligned_linear(old, new):
  """(new, old) linear-interpolation weights mapping first to first, last to last."""
  pos = np.arange(new) * ((old - 1) / (new - 1) if new > 1 else 0.0)
  lo = np.clip(np.floor(pos).astype(int), 0, max(old - 2, 0))
  frac = pos - lo
  weights = np.zeros((new, old))
  weights[np.arange(new), lo] = 1 - frac
  weights[np.arange(new), np.minimum(lo + 1, old - 1)] += frac
  return weights


# ---------------------------------------------------------------- reading files


def container(path: str | os.PathLike) -> str:
  """'orbax', 'torch', 'safetensors' or 'npz' from the path and the file's first bytes;
  a UserError for a missing path or an unknown format. Reads no weights, so a job
  can check `init_from` in a moment, before it prepares data or builds a model."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return 'orbax'
  if not os.path.isfile(path):
    raise UserError(f'pretrained checkpoint {path!r} does not exist; pass a .pth, '
                    '.safetensors or .npz file, or an orbax checkpoint directory.')
  kind = _sniff(path)
  if kind is None:
    ext = os.path.splitext(path)[1].lower()
    kind = {'.pth': 'torch', '.pt': 'torch', '.bin': 'torch', '.ckpt': 'torch',
            '.safetensors': 'safetensors', '.npz': 'npz'}.get(ext)
  if kind is None:
    raise UserError(f'{path}: not a checkpoint this loader knows; expected a PyTorch '
                    '.pth, a .safetensors, a big_vision .npz or an orbax directory.')
  return kind


def _read(path):
  """({name: np.ndarray}, file kind) for any supported container."""
  kind = container(path)
  reader = {'orbax': _read_orbax, 'torch': _read_torch, 'safetensors': _read_safetensors,
            'npz': _read_npz}
  return reader[kind](os.fspath(path)), kind


def _sniff(path):
  """The container format from the file's bytes, or None if unrecognised."""
  if zipfile.is_zipfile(path):
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except (zipfile.BadZipFile, OSError):
      return None
    if any(n.endswith('.npy') for n in names):
      return 'npz'
    if any(n.endswith('data.pkl') for n in names):
      return 'torch'
    return None
  with open(path, 'rb') as f:
    head = f.read(9)
  if len(head) == 9 and head[8:9] == b'{':
    return 'safetensors'
  if head[:1] == b'\x80':  # a pickle: torch's legacy (non-zip) format
    return 'torch'
  return None


def _unreadable(path, what, e):
  return UserError(f'{path}: could not read it as {what} ({described(e)}); '
                   'the file may be truncated or corrupt: download it again.')


def _read_torch(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"{path} is a PyTorch checkpoint; reading it needs torch: "
                    "pip install 'adaptformer_jax[torch]'.") from None
  try:
    # The official training script also saves its argparse Namespace.
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, 'a PyTorch checkpoint', e) from None
  for wrapper in _TORCH_WRAPPERS:
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
      break
  if not isinstance(obj, dict):
    raise UserError(f'{path}: holds a {type(obj).__name__}, not a state dict of tensors.')
  return {k: (v.detach().float() if v.is_floating_point() else v).numpy()
          for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _read_safetensors(path):
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    # The flax framework reads bfloat16, which safetensors' numpy one cannot.
    with safe_open(path, framework='flax') as f:
      return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, 'a .safetensors file', e) from None


def _read_npz(path):
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, 'a .npz file', e) from None


def _orbax_item(path):
  """The directory holding the pytree: `path`, its only item (`<step>/default`), or
  that of its latest step (a `<workdir>/checkpoints` directory)."""
  if os.path.exists(os.path.join(path, '_METADATA')):
    return path
  subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
  steps = [d for d in subdirs if d.isdigit()]
  if steps:
    return _orbax_item(os.path.join(path, max(steps, key=int)))
  if len(subdirs) == 1 and os.path.exists(os.path.join(path, subdirs[0], '_METADATA')):
    return os.path.join(path, subdirs[0])
  raise UserError(f'{path}: a directory but not an orbax checkpoint (no _METADATA file); '
                  'pass a <workdir>/checkpoints/<step> directory.')


def _read_orbax(path):
  """params/batch_stats of an orbax pytree checkpoint, flattened to '/' keys."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(_orbax_item(path))
  integrity.verify_manifest(os.path.dirname(path))  # <step>/manifest.sha256, if any
  try:
    # Host numpy arrays: the saving run's devices and sharding do not matter here.
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree)
    tree = ocp.PyTreeCheckpointer().restore(path, restore_args=as_numpy)
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, 'an orbax checkpoint', e) from None
  if not isinstance(tree, dict) or 'params' not in tree:
    raise UserError(f'{path}: the orbax checkpoint has no top-level "params".')
  picked = {c: tree[c] for c in ('params', 'batch_stats') if tree.get(c)}
  return {k: np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(picked, sep='/').items()}


# ---------------------------------------------------------------- layouts


def _convert(path, flat, kind):
  """(layout, {our path: (array, 'checkpoint key (stored shape)')}, {ignored: count})."""
  keys = list(flat)
  if any(re.match(r'(.*/)?Transformer/encoderblock(_\d+)?/', k) for k in keys):
    return ('big_vision',) + _convert_big_vision(flat)
  if kind == 'orbax' or any(k.startswith(('params/', 'batch_stats/')) for k in keys):
    return 'this project', {k: (v, _described(k, v)) for k, v in flat.items()}, {}
  if any(k.startswith('visual.') for k in keys):
    flat, ignored = _openclip_to_timm(flat)
    return 'OpenCLIP', _convert_torch(flat), ignored
  if any(k.startswith(('blocks.', 'patch_embed.')) for k in keys):
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
      leaf, kind = _rename(name, _TORCH_MODULES, _TORCH_PARAMS)
    if leaf is None:
      out[f'?{src}'] = (value, src)
      continue
    if kind == 'linear' and value.ndim == 2:
      value = value.T
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


# ---------------------------------------------------------------- matching


def _match(converted, target, grid, method, fresh_why):
  """Checkpoint leaves fitted to the target tree, and the (our path, text) problems.

  `grid` is the model's patch grid, (h, w) or (t, h, w) for video. Leaves left
  fresh on purpose (a head with another class count) go to `fresh_why`.
  """
  loaded, unexpected, mismatched = {}, [], []
  shape = lambda a: tuple(np.shape(a))
  for key, (value, src) in converted.items():
    if key not in target:
      unexpected.append((key, src))
      continue
    want = tuple(target[key].shape)
    if key == 'params/pos_embedding' and shape(value) != want and shape(value)[-1] == want[-1]:
      value = (_fit_posemb(value, want, method) if len(grid) == 2
               else _fit_video_posemb(value, want, src, grid))
    elif (key.startswith('params/head/linear/') and shape(value) != want
          and shape(value)[:-1] == want[:-1]):
      fresh_why[key] = f'head ({shape(value)[-1]} classes in the checkpoint, {want[-1]} in the model)'
      continue
    if shape(value) != want:
      mismatched.append((key, f'{src} vs model {key} {want}'))
      continue
    loaded[key] = value
  return loaded, {'unexpected in the checkpoint': unexpected,
                  'shape mismatches (checkpoint vs model)': mismatched}


def _class_rows(tokens):
  """1 if a position embedding of `tokens` rows has a class-token row, else 0."""
  return 0 if math.isqrt(tokens) ** 2 == tokens else 1


def _fit_posemb(value, want, method):
  """A position embedding resampled to the model's grid.

  A checkpoint without a class-token row (big_vision, timm no_embed_class, whose
  class token carries its own position) gives the model's class token zeros.
  """
  if _class_rows(value.shape[1]) < _class_rows(want[1]):
    value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
  rows = _class_rows(want[1])
  if _class_rows(value.shape[1]) == rows and value.shape[1] != want[1]:
    value = resample_posemb(value, math.isqrt(want[1] - rows), method)
  return value


def _fit_video_posemb(value, want, src, grid):
  """A learned video table (prefix rows kept) resampled trilinearly to the model's
  (t, h, w) grid. The checkpoint's grid is a t x h x h that fits its row count:
  the one with the model's t (VideoMAE's own assumption), else its h, else its
  t:h ratio."""
  prefix = want[1] - math.prod(grid)
  tokens = value.shape[1] - prefix
  fits = [(t, math.isqrt(tokens // t)) for t in range(1, tokens + 1)
          if tokens % t == 0 and math.isqrt(tokens // t) ** 2 == tokens // t]
  old = next((f for rule in (lambda t, h: t == grid[0], lambda t, h: h == grid[1],
                             lambda t, h: t * grid[1] == h * grid[0])
              for f in fits if rule(*f)), None)
  if old is None or grid[1] != grid[2]:
    raise UserError(f'{src}: {tokens} position rows do not form a frames x side x side '
                    f'grid to resample to the model grid {grid}; set model.num_frames '
                    'and model.image_size to the checkpoint\'s.')
  old_grid = (old[0], old[1], old[1])
  logging.info('%s: resampling the video position embedding from a %s to a %s grid.',
              src, 'x'.join(map(str, old_grid)), 'x'.join(map(str, grid)))
  table = jnp.asarray(value[0, prefix:], jnp.float32).reshape(*old_grid, -1)
  table = jax.image.resize(table, (*grid, table.shape[-1]), method='linear')
  return np.concatenate([value[:, :prefix], np.asarray(table).reshape(1, -1, want[-1])], 1)


_HINTS = (  # (our paths among unexpected/mismatched keys, the fix)
    (r'batch_stats/head/bn/.*', "the checkpoint has a BatchNorm head: set model.head='bn_linear'"),
    (r'params/fc_norm/.*', "the checkpoint pools by global average: set model.pool='gap'"),
    (r'params/embedding/kernel', "the patch embeddings differ: a 5-D kernel is a video "
     "tubelet (model.patch_embed='tubelet', model.tubelet = its first size, e.g. a "
     "videomae_* preset), a 4-D one an image patch (model.patch_embed='2d')"),
) + methods.LOAD_HINTS

_UNEXPECTED_HINTS = (  # (our paths the model has no place for, the fix)
    (r'params/norm_pre/.*', 'the checkpoint normalises before the blocks (CLIP): set '
     'model.ln_pre=True'),
    (r'params/block\d+/ls[12]', 'the checkpoint has LayerScale (DINOv2, VideoMAE): set '
     'model.layerscale'),
    (r'params/registers', 'the checkpoint has register tokens: set model.num_registers'),
    (r'params/map_head/.*', "the checkpoint pools with an attention head: set model.pool='map'"),
    (r'params/pre_logits/.*', 'the checkpoint has a pre-logits layer: set model.pre_logits to '
     'its width, or load with strict=False to drop it'),
    (r'params/cls', 'the checkpoint has a class token: set model.class_token=True'),
    (r'params/block\d+/attn/[qv]_bias', "the checkpoint has separate q and v biases "
     "(VideoMAE/BEiT): set model.qkv_bias='qv'"),
    (r'params/block\d+/attn/qkv/bias', "the checkpoint has a fused qkv bias: set "
     "model.qkv_bias='qkv'"),
    (r'params/pos_embedding', "the checkpoint has a learned position table: set "
     "model.posemb='learned' (a 'sincos' table is never stored)"),
)


_MISSING_HINTS = (  # (our paths the checkpoint lacks, the fix)
    (r'params/block\d+/ls[12]', 'the checkpoint has no LayerScale: set model.layerscale=None'),
    (r'params/registers', 'the checkpoint has no register tokens: set model.num_registers=0'),
    (r'params/norm_pre/.*', 'the checkpoint has no pre-norm: set model.ln_pre=False'),
    (r'params/map_head/.*', "the checkpoint has no attention-pooling head: set model.pool to "
     "'cls', 'gap' or 'gap_prenorm'"),
    (r'params/cls', 'the checkpoint has no class token: set model.class_token=False '
     "and model.pool='gap_prenorm' or 'map'"),
    (r'params/pre_logits/.*', 'the checkpoint has no pre-logits layer: set model.pre_logits=0'),
    (r'params/block\d+/attn/qkv/bias', "the checkpoint's attention has no qkv bias: set "
     "model.qkv_bias='none' (or 'qv')"),
    (r'params/block\d+/attn/[qv]_bias', "set model.qkv_bias='qkv' (fused q, k, v biases)"),
)


def _raise_or_warn(path, problems, strict, converted, model_cfg, own_export):
  """One UserError listing every offending key, with the likely config fix."""
  unexpected = 'unexpected in the checkpoint'
  if problems[unexpected] and not strict:
    logging.warning('%s: ignoring %d checkpoint keys the model has no place for: %s',
                   path, len(problems[unexpected]),
                   _summarise([text for _, text in problems[unexpected]]))
    problems[unexpected] = []
  found = {what: items for what, items in problems.items() if items}
  if not found:
    return
  hints = []
  depth = 1 + max((int(m.group(1)) for k in converted
                   for m in [re.match(r'params/block(\d+)/', k)] if m), default=-1)
  width = (np.shape(converted['params/embedding/kernel'][0])[-1]
           if 'params/embedding/kernel' in converted else None)
  if (depth and depth != model_cfg.depth) or width not in (None, model_cfg.width):
    hints.append(f'the checkpoint has depth {depth}, width {width} and the model depth '
                 f'{model_cfg.depth}, width {model_cfg.width}: choose the matching '
                 'model.name preset or override model.depth/width')
  offending = [k for what in (unexpected, 'shape mismatches (checkpoint vs model)')
               for k, _ in found.get(what, [])]
  hints += [fix for pattern, fix in _HINTS if any(re.fullmatch(pattern, k) for k in offending)]
  extra = [k for k, _ in found.get(unexpected, [])]
  hints += [fix for pattern, fix in _UNEXPECTED_HINTS if any(re.fullmatch(pattern, k) for k in extra)]
  absent = [k for k, _ in found.get('missing from the checkpoint', [])]
  hints += [fix for pattern, fix in _MISSING_HINTS if any(re.fullmatch(pattern, k) for k in absent)]
  if own_export and 'missing from the checkpoint' in found:
    hints.append('an adapter export holds only the trained leaves: load the backbone '
                 'first and pass it as init_variables')
  if unexpected in found:
    hints.append('strict=False ignores unexpected keys')
  listing = '; '.join(f'{what}: {_summarise([t for _, t in items])}'
                      for what, items in found.items())
  raise UserError(f'{path} does not fit the model. {listing}. Fix: {"; ".join(hints)}.'
                  if hints else f'{path} does not fit the model. {listing}.')


_BLOCK_INDEX = re.compile(r'(blocks\.|block|encoderblock_)(\d+)')


def _summarise(names):
  """Names with block indices folded: 'blocks.{2-11}.norm1.weight (32,)'."""
  groups = {}
  for name in names:
    idx = {int(i) for _, i in _BLOCK_INDEX.findall(name)}
    if len(idx) == 1:
      groups.setdefault(_BLOCK_INDEX.sub(r'\1{}', name), []).append(idx.pop())
    else:
      groups.setdefault(name, [])
  return ', '.join(key.replace('{}', _ranges(sorted(idx))) if idx else key
                   for key, idx in groups.items())


def _ranges(idx):
  """'3' or '{0-2,5}'."""
  if len(idx) == 1:
    return str(idx[0])
  runs, start = [], idx[0]
  for prev, cur in zip(idx, idx[1:] + [None]):
    if cur != prev + 1:
      runs.append(str(start) if start == prev else f'{start}-{prev}')
      start = cur
  return '{' + ','.join(runs) + '}'
