"""Loading pretrained ViT checkpoints into this project's parameter tree.

`load` reads the official AdaptFormer (image and video) / MAE / VideoMAE / timm
PyTorch checkpoints, big_vision (AugReg) `.npz` files and this project's own
exports, and returns
variables shaped exactly like `models.build(cfg).init(...)`. Layouts are told
apart by their keys, so users never name the format. Anything that would load
silently wrong (missing backbone weights, leftover keys, wrong shapes) is one
UserError listing every offending key.
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
    (r'(norm|fc_norm)', r'\1', 'ln'),
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
                 (r'prompts', 'prompts'))  # stacked from the official `embeddings.N`
# Pretraining-only parts of MAE / VideoMAE checkpoints, and BatchNorm's step counter.
_TORCH_IGNORED = re.compile(
    r'decoder_.*|decoder\..*|encoder_to_decoder\..*|mask_token|.*\.num_batches_tracked')
# VideoMAE's pre-training files nest the ViT under `encoder.`.
_ENCODER_PREFIX = 'encoder.'
# State-dict wrappers: official/MAE/VideoMAE training scripts, VideoMAE's
# deepspeed `module`, timm/lightning `state_dict`.
_TORCH_WRAPPERS = ('model', 'module', 'state_dict')

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
    (r'head', 'head/linear'),
)
_BV_LEAVES = ((r'cls', 'cls'), (r'(?:Transformer/posembed_input/)?pos_embedding', 'pos_embedding'))


def load(path: str | os.PathLike, model_cfg: ml_collections.ConfigDict, *,
         init_variables: dict[str, Any] | None = None, rng: jax.Array | None = None,
         strict: bool = True) -> dict[str, Any]:
  """Variables for `models.build(model_cfg)` with the weights of checkpoint `path`.

  Args:
    path: a PyTorch `.pth` (official AdaptFormer, MAE, timm), a `.safetensors`
      (timm, or this project's '/'-keyed export), a big_vision `.npz`, or an
      orbax checkpoint directory holding 'params' (and 'batch_stats').
    model_cfg: the model ConfigDict; the result matches its `init` tree exactly.
    init_variables: values for the leaves the checkpoint lacks (adapters, LoRA,
      prompts, head). For this project's own exports, which may hold only the
      trained leaves, every missing leaf comes from here (e.g. a loaded backbone).
    rng: used to init those leaves when `init_variables` is None (default key 0).
    strict: if False, checkpoint keys the model has no place for are a warning.

  Returns:
    {'params': ..., 'batch_stats': ... (bn_linear head only)} of numpy arrays.
  """
  model = presets.build(model_cfg)
  dummy = jnp.zeros((1, *presets.input_shape(model_cfg)), jnp.float32)
  target = flax.traverse_util.flatten_dict(
      jax.eval_shape(model.init, jax.random.key(0), dummy), sep='/')

  flat, kind = _read(path)
  layout, converted = _convert(path, flat, kind)
  # MAE's convention: a gap model drops the pretrained final norm; fc_norm starts fresh.
  mae_gap = (model_cfg.pool == 'gap' and 'params/norm/scale' in converted
             and 'params/fc_norm/scale' not in converted)
  if mae_gap:
    logging.info('%s: the final norm is unused with pool=gap; fc_norm keeps its '
                'initial (identity) value, as in MAE.', path)
    converted = {k: v for k, v in converted.items() if not k.startswith('params/norm/')}
  loaded, problems = _match(converted, target, presets.token_grid(model_cfg))
  missing = sorted(set(target) - set(loaded))
  own_export = layout == 'this project'
  if not (own_export and init_variables is not None):
    mismatched = {k for k, _ in problems['shape mismatches (checkpoint vs model)']}
    problems['missing from the checkpoint'] = [
        (k, f'{k} {tuple(target[k].shape)}') for k in missing if not (
            k in mismatched or methods.FRESH_ON_LOAD.fullmatch(k)
            or (mae_gap and k.startswith('params/fc_norm/')))]
  _raise_or_warn(path, problems, strict, converted, model_cfg, own_export)
  integrity.check_values(path, {converted[k][1]: v for k, v in loaded.items()})

  if missing:
    if init_variables is None:
      init_variables = model.init(rng if rng is not None else jax.random.key(0), dummy)
    fresh = flax.traverse_util.flatten_dict(init_variables, sep='/')
    if set(fresh) != set(target):
      raise ValueError('init_variables do not match the model tree: '
                       f'{sorted(set(fresh) ^ set(target))[:5]}')
    logging.info('%s: %d leaves not in the checkpoint keep their initial values: %s',
                path, len(missing), _summarise(missing))
    loaded.update({k: fresh[k] for k in missing})
  out = {k: np.asarray(loaded[k], target[k].dtype) for k in target}
  return flax.traverse_util.unflatten_dict(out, sep='/')


def resample_posemb(posemb: jax.Array | np.ndarray,
                    new_grid: int | tuple[int, int]) -> jax.Array:
  """Bilinearly resizes the patch grid of a (1, 1 + h*w, D) position embedding.

  The class-token row is kept as is; the old grid must be square. `new_grid` is
  a side length or an (h, w) pair.
  """
  new_h, new_w = (new_grid, new_grid) if np.ndim(new_grid) == 0 else new_grid
  cls, grid = posemb[:, :1], posemb[0, 1:]
  side = math.isqrt(grid.shape[0])
  if side * side != grid.shape[0]:
    raise UserError(f'pos_embedding: {grid.shape[0]} patch positions do not form a '
                    'square grid, so they cannot be resampled to the model image size.')
  grid = jax.image.resize(jnp.asarray(grid, jnp.float32).reshape(side, side, -1),
                          (new_h, new_w, grid.shape[-1]), method='bilinear')
  return jnp.concatenate([jnp.asarray(cls, jnp.float32),
                          grid.reshape(1, new_h * new_w, -1)], axis=1)


# ---------------------------------------------------------------- reading files


def _read(path):
  """({name: np.ndarray}, file kind) for any supported container."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return _read_orbax(path), 'orbax'
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
  reader = {'torch': _read_torch, 'safetensors': _read_safetensors, 'npz': _read_npz}
  return reader[kind](path), kind


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
  reason = (str(e).strip().splitlines() or [''])[0][:200]
  return UserError(f'{path}: could not read it as {what} ({type(e).__name__}: {reason}); '
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
  """(layout, {our path: (array, 'checkpoint key (stored shape)')}) from raw keys."""
  keys = list(flat)
  if kind == 'orbax' or any(k.startswith(('params/', 'batch_stats/')) for k in keys):
    return 'this project', {k: (v, _described(k, v)) for k, v in flat.items()}
  if any(k.startswith('Transformer/encoderblock_') for k in keys):
    return 'big_vision', _convert_big_vision(flat)
  if any(k.startswith(('blocks.', 'patch_embed.')) for k in keys):
    return 'torch', _convert_torch(flat)
  if any(k.startswith(_ENCODER_PREFIX + 'blocks.') for k in keys):
    logging.info('%s: a VideoMAE pre-training file; its encoder is the backbone, the '
                'decoder is dropped.', path)
    return 'torch', _convert_torch({k[len(_ENCODER_PREFIX):]: v for k, v in flat.items()
                                    if k.startswith(_ENCODER_PREFIX)})
  raise UserError(
      f'{path}: unknown checkpoint layout (first keys: {sorted(keys)[:4]}); expected the '
      'official AdaptFormer/MAE or timm ViT (blocks.N...), VideoMAE (encoder.blocks.N...), '
      'big_vision/AugReg '
      '(Transformer/encoderblock_N/...) or this project (params/...) layout.')


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
  flat = dict(flat)
  origin = {k: _described(k, v) for k, v in flat.items()}
  # Attention projections are (D, heads, head_dim) / (heads, head_dim, D): flatten and fuse.
  for name in [k for k in flat if re.fullmatch(r'.*/MultiHeadDotProductAttention_\d/query/\w+', k)]:
    parts = [name.replace('/query/', f'/{p}/') for p in ('query', 'key', 'value')]
    if all(p in flat for p in parts):
      fused = name.replace('/query/', '/qkv/')
      arrays = [flat.pop(p) for p in parts]
      flat[fused] = np.concatenate([a.reshape(a.shape[0], -1) if a.ndim == 3 else a.reshape(-1)
                                    for a in arrays], axis=-1)
      origin[fused] = f"{name.replace('/query/', '/{query,key,value}/')} 3x{arrays[0].shape}"
  for name in [k for k in flat if re.fullmatch(r'.*/MultiHeadDotProductAttention_\d/out/kernel', k)
               and flat[k].ndim == 3]:
    flat[name] = flat[name].reshape(-1, flat[name].shape[-1])
  out = {}
  for name, value in flat.items():
    leaf = next((t for p, t in _BV_LEAVES if re.fullmatch(p, name)), None)
    if leaf is None:
      leaf, _ = _rename(name, _BV_MODULES)
    out[f'params/{leaf}' if leaf else f'?{origin[name]}'] = (value, origin[name])
  return out


# ---------------------------------------------------------------- matching


def _match(converted, target, grid):
  """Checkpoint leaves fitted to the target tree, and the (our path, text) problems.

  `grid` is the model's patch grid, (h, w) or (t, h, w) for video.
  """
  loaded, unexpected, mismatched = {}, [], []
  shape = lambda a: tuple(np.shape(a))
  for key, (value, src) in converted.items():
    if key not in target:
      unexpected.append((key, src))
      continue
    want = tuple(target[key].shape)
    if key == 'params/pos_embedding' and shape(value) != want and shape(value)[-1] == want[-1]:
      value = (_fit_posemb(value, want, src) if len(grid) == 2
               else _fit_video_posemb(value, want, src, grid))
    elif (key.startswith('params/head/linear/') and shape(value) != want
          and shape(value)[:-1] == want[:-1]):
      if key.endswith('kernel'):
        logging.info('%s: %d classes in the checkpoint, %d in the model; the head keeps '
                    'its initial value.', src, shape(value)[-1], want[-1])
      continue
    if shape(value) != want:
      mismatched.append((key, f'{src} vs model {key} {want}'))
      continue
    loaded[key] = value
  return loaded, {'unexpected in the checkpoint': unexpected,
                  'shape mismatches (checkpoint vs model)': mismatched}


def _fit_posemb(value, want, src):
  """A position embedding resampled to the model's grid (a missing class row is zeros)."""
  tokens = value.shape[1]
  if math.isqrt(tokens) ** 2 == tokens:
    logging.info('%s has no class-token row (big_vision, timm no_embed_class); the '
                'class token gets a zero position embedding, as there.', src)
    value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
  new_side, old_side = math.isqrt(want[1] - 1), math.isqrt(value.shape[1] - 1)
  if old_side != new_side:
    logging.info('%s: resampling the position embedding from a %dx%d to a %dx%d grid.',
                src, old_side, old_side, new_side, new_side)
    value = np.asarray(resample_posemb(value, new_side))
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
    (r'params/block\d+/attn/[qv]_bias', "the checkpoint has separate q and v biases "
     "(VideoMAE/BEiT): set model.qkv_bias='qv'"),
    (r'params/block\d+/attn/qkv/bias', "the checkpoint has a fused qkv bias: set "
     "model.qkv_bias='qkv'"),
    (r'params/block\d+/ls[12]', 'the checkpoint has LayerScale: set model.layerscale'),
    (r'params/pos_embedding', "the checkpoint has a learned position table: set "
     "model.posemb='learned' (a 'sincos' table is never stored)"),
    (r'params/cls', 'the checkpoint has a class token: set model.class_token=True'),
    (r'params/embedding/kernel', "the patch embeddings differ: a 5-D kernel is a video "
     "tubelet (model.patch_embed='tubelet', model.tubelet = its first size, e.g. a "
     "videomae_* preset), a 4-D one an image patch (model.patch_embed='2d')"),
) + methods.LOAD_HINTS


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
