"""Checkpoint loading: every layout against an independent forward, resampling, and clear errors.

torch layouts are checked against the PyTorch port of the official model
(tests/references/torch_reference.py); timm .safetensors and big_vision .npz need no torch
and are checked against a float64 numpy forward written here.
"""
import argparse
import logging
import math
import sys

import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

from adaptformer_jax import models
from adaptformer_jax import pretrained
from adaptformer_jax.errors import UserError
from adaptformer_jax.models import tuning
from conftest import IMAGES
from conftest import tiny_cfg

def timm_weights(cfg, seed=0, grid=None, width=None, depth=None, num_classes=None):
  """A random timm ViT state dict (numpy) for `cfg`, optionally with another shape."""
  rng = np.random.RandomState(seed)
  d, depth = width or cfg.width, depth or cfg.depth
  grid = grid or cfg.image_size // cfg.patch_size
  weight = lambda *s: (rng.standard_normal(s) / math.sqrt(np.prod(s[1:]))).astype(np.float32)
  vec = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)
  ln = lambda name: {f'{name}.weight': 1 + vec(d) / 3, f'{name}.bias': vec(d)}
  sd = {'patch_embed.proj.weight': weight(d, 3, cfg.patch_size, cfg.patch_size),
        'patch_embed.proj.bias': vec(d), 'cls_token': vec(1, 1, d),
        'pos_embed': vec(1, grid * grid + 1, d), **ln('norm'),
        'head.weight': weight(num_classes or cfg.num_classes, d),
        'head.bias': vec(num_classes or cfg.num_classes)}
  for i in range(depth):
    b = f'blocks.{i}.'
    sd.update({**ln(b + 'norm1'), **ln(b + 'norm2'),
               b + 'attn.qkv.weight': weight(3 * d, d), b + 'attn.qkv.bias': vec(3 * d),
               b + 'attn.proj.weight': weight(d, d), b + 'attn.proj.bias': vec(d),
               b + 'mlp.fc1.weight': weight(cfg.mlp_dim, d), b + 'mlp.fc1.bias': vec(cfg.mlp_dim),
               b + 'mlp.fc2.weight': weight(d, cfg.mlp_dim), b + 'mlp.fc2.bias': vec(d)})
  return sd


def numpy_forward(sd, images, num_heads):
  """timm's ViT forward (cls pooling, linear head) in float64 numpy."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  erf = np.vectorize(math.erf)

  def ln(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * sd[name + '.weight'] + sd[name + '.bias']

  def linear(x, name):
    return x @ sd[name + '.weight'].T + sd[name + '.bias']

  w = sd['patch_embed.proj.weight']
  d, c, p, _ = w.shape
  b, h = images.shape[:2]
  patches = images.reshape(b, h // p, p, h // p, p, c).transpose(0, 1, 3, 5, 2, 4)
  x = patches.reshape(b, -1, c * p * p) @ w.reshape(d, -1).T + sd['patch_embed.proj.bias']
  x = np.concatenate([np.broadcast_to(sd['cls_token'], (b, 1, d)), x], 1) + sd['pos_embed']
  i = 0
  while f'blocks.{i}.norm1.weight' in sd:
    pre = f'blocks.{i}.'
    heads = lambda t: t.reshape(b, -1, num_heads, d // num_heads).transpose(0, 2, 1, 3)
    q, k, v = map(heads, np.split(linear(ln(x, pre + 'norm1'), pre + 'attn.qkv'), 3, -1))
    a = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // num_heads)
    a = np.exp(a - a.max(-1, keepdims=True))
    o = (a / a.sum(-1, keepdims=True)) @ v
    x = x + linear(o.transpose(0, 2, 1, 3).reshape(b, -1, d), pre + 'attn.proj')
    y = linear(ln(x, pre + 'norm2'), pre + 'mlp.fc1')
    x = x + linear(0.5 * y * (1 + erf(y / math.sqrt(2))), pre + 'mlp.fc2')
    i += 1
  return linear(ln(x, 'norm')[:, 0], 'head')


def big_vision_layout(sd, num_heads, posemb_with_class=True):
  """timm weights under AugReg's npz names (or big_vision's class-less `pos_embedding`)."""
  d = sd['cls_token'].shape[-1]
  hd = d // num_heads
  out = {'embedding/kernel': sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
         'embedding/bias': sd['patch_embed.proj.bias'], 'cls': sd['cls_token'],
         'Transformer/encoder_norm/scale': sd['norm.weight'],
         'Transformer/encoder_norm/bias': sd['norm.bias'],
         'head/kernel': sd['head.weight'].T, 'head/bias': sd['head.bias']}
  if posemb_with_class:
    out['Transformer/posembed_input/pos_embedding'] = sd['pos_embed']
  else:
    out['pos_embedding'] = sd['pos_embed'][:, 1:]
  i = 0
  while f'blocks.{i}.norm1.weight' in sd:
    t, e = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
    for ours, norm in (('LayerNorm_0', 'norm1'), ('LayerNorm_2', 'norm2')):
      out[f'{e}{ours}/scale'] = sd[t + norm + '.weight']
      out[f'{e}{ours}/bias'] = sd[t + norm + '.bias']
    qkv_w = np.split(sd[t + 'attn.qkv.weight'], 3)
    qkv_b = np.split(sd[t + 'attn.qkv.bias'], 3)
    for j, name in enumerate(('query', 'key', 'value')):
      out[f'{e}MultiHeadDotProductAttention_1/{name}/kernel'] = qkv_w[j].T.reshape(d, num_heads, hd)
      out[f'{e}MultiHeadDotProductAttention_1/{name}/bias'] = qkv_b[j].reshape(num_heads, hd)
    out[f'{e}MultiHeadDotProductAttention_1/out/kernel'] = \
        sd[t + 'attn.proj.weight'].T.reshape(num_heads, hd, d)
    out[f'{e}MultiHeadDotProductAttention_1/out/bias'] = sd[t + 'attn.proj.bias']
    for j in (1, 2):
      out[f'{e}MlpBlock_3/Dense_{j - 1}/kernel'] = sd[f'{t}mlp.fc{j}.weight'].T
      out[f'{e}MlpBlock_3/Dense_{j - 1}/bias'] = sd[f'{t}mlp.fc{j}.bias']
    i += 1
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_weights(tmp_path, sd, cfg, container):
  """timm weights `sd` written as 'safetensors', 'timm_pth', 'augreg_npz' or 'big_vision_npz'."""
  path = tmp_path / f'ckpt.{container.rpartition("_")[2]}'
  if container == 'safetensors':
    save_file(sd, path)
  elif container == 'timm_pth':
    torch = pytest.importorskip('torch')
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  else:
    np.savez(path, **big_vision_layout(sd, cfg.num_heads, container == 'augreg_npz'))
  return path


def logits(cfg, variables):
  return np.asarray(models.build(cfg).apply(variables, IMAGES))


def init(cfg, seed=1):
  return models.build(cfg).init(jax.random.key(seed), IMAGES[:1])


def flat(variables):
  return flax.traverse_util.flatten_dict(variables, sep='/')


# ---------------------------------------------------------------- torch layouts


def test_training_script_checkpoint_matches_torch_reference(ref, tmp_path):
  """The official layout (split q/k/v, fc1 on the block, adapters, BN head) as saved by the
  official training script: under "model", next to optimizer/epoch/args. The bare layout
  is test_vit_torch_parity's."""
  cfg = tiny_cfg(adapter=dict(scale='learnable', layernorm='in'), head='bn_linear')
  torch_model = ref.randomized(cfg)
  ref.torch.save({'model': torch_model.state_dict(), 'epoch': 7,
                  'optimizer': {'state': {}, 'param_groups': []}, 'scaler': {'scale': 1024.0},
                  'args': argparse.Namespace(lr=1e-3, ffn_num=8)}, tmp_path / 'ckpt.pth')
  variables = pretrained.load(tmp_path / 'ckpt.pth', cfg)
  np.testing.assert_allclose(logits(cfg, variables), ref.logits(torch_model, IMAGES),
                             atol=1e-5, rtol=0)


def _mae(sd, torch):
  decoder = {'mask_token': torch.zeros(1, 1, 16), 'decoder_embed.weight': torch.ones(16, 32),
             'decoder_blocks.0.norm1.weight': torch.ones(16),
             'decoder_pred.weight': torch.ones(192, 16)}
  return {'model': {**sd, **decoder}, 'epoch': 799}


@pytest.mark.parametrize('layout', ['mae', 'timm'])
def test_fused_qkv_backbone_loads_with_fresh_adapters(layout, ref, tmp_path):
  """MAE/timm backbones (fused qkv, mlp.fc*): fresh adapters leave the backbone's logits."""
  torch_model = ref.randomized(tiny_cfg(tuning='linear'))
  sd = ref.fused_layout(torch_model.state_dict())
  ref.torch.save(_mae(sd, ref.torch) if layout == 'mae' else sd, tmp_path / 'ckpt.pth')
  cfg = tiny_cfg(tuning='adaptformer')
  variables = pretrained.load(tmp_path / 'ckpt.pth', cfg)
  np.testing.assert_allclose(logits(cfg, variables), ref.logits(torch_model, IMAGES),
                             atol=1e-5, rtol=0)


def test_timm_pth_equals_timm_safetensors(ref, tmp_path):
  """The same timm weights through the torch and the safetensors readers load identically."""
  cfg = tiny_cfg(tuning='linear')
  sd = timm_weights(cfg)
  ref.torch.save({k: ref.torch.from_numpy(v) for k, v in sd.items()}, tmp_path / 'a.pth')
  save_file(sd, tmp_path / 'a.safetensors')
  a, b = (flat(pretrained.load(tmp_path / f, cfg)) for f in ('a.pth', 'a.safetensors'))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------- torch-free layouts


@pytest.mark.parametrize('container', ['safetensors', 'augreg_npz', 'big_vision_npz'])
def test_torch_free_layouts_match_numpy_reference(container, tmp_path):
  """timm .safetensors, AugReg .npz and big_vision .npz (no class-token posemb) without torch."""
  cfg = tiny_cfg(tuning='linear')
  sd = timm_weights(cfg)
  if container == 'big_vision_npz':  # no class-token position embedding there
    sd['pos_embed'][:, 0] = 0
  path = save_weights(tmp_path, sd, cfg, container)
  expected = numpy_forward(sd, IMAGES, cfg.num_heads)
  np.testing.assert_allclose(logits(cfg, pretrained.load(path, cfg)), expected,
                             atol=1e-5, rtol=0)


def test_backbone_checkpoint_keeps_fresh_peft_leaves(tmp_path):
  """A backbone has no adapters, prompts or head: those keep init_variables (or rng) values."""
  cfg = tiny_cfg(tuning='adaptformer+vpt_deep', head='bn_linear')
  sd = {k: v for k, v in timm_weights(cfg).items() if not k.startswith('head.')}
  save_file(sd, tmp_path / 'backbone.safetensors')
  fresh = init(cfg, seed=3)
  loaded = flat(pretrained.load(tmp_path / 'backbone.safetensors', cfg, init_variables=fresh))
  from_rng = flat(pretrained.load(tmp_path / 'backbone.safetensors', cfg,
                                  rng=jax.random.key(3)))
  fresh = flat(fresh)
  assert set(loaded) == set(fresh)
  peft = [k for k in fresh if tuning.FRESH_ON_LOAD.fullmatch(k)]
  assert any('adapter' in k for k in peft) and 'params/prompts' in peft
  assert 'batch_stats/head/bn/var' in peft
  for k in peft:
    np.testing.assert_array_equal(loaded[k], fresh[k], err_msg=k)
    np.testing.assert_array_equal(from_rng[k], fresh[k], err_msg=k)
  np.testing.assert_array_equal(loaded['params/block1/mlp/fc1/kernel'],
                                sd['blocks.1.mlp.fc1.weight'].T)


def test_own_exports_round_trip(tmp_path):
  """Our safetensors export and orbax train checkpoints; an adapter-only export needs a backbone."""
  cfg = tiny_cfg(head='bn_linear', adapter=dict(scale='learnable'))
  variables = flat(init(cfg, seed=5))
  save_file({k: np.asarray(v) for k, v in variables.items()}, tmp_path / 'full.safetensors')
  adapters = {k: np.asarray(v) for k, v in variables.items()
              if tuning.FRESH_ON_LOAD.fullmatch(k)}
  save_file(adapters, tmp_path / 'adapters.safetensors')
  manager = ocp.CheckpointManager(tmp_path / 'checkpoints')  # as train.py: <step>/default
  manager.save(12, args=ocp.args.StandardSave(
      {**flax.traverse_util.unflatten_dict(variables, sep='/'), 'step': 12,
       'opt_state': [np.zeros(3)]}))
  manager.wait_until_finished()

  backbone = init(cfg, seed=6)
  merged = flat(pretrained.load(tmp_path / 'adapters.safetensors', cfg,
                                init_variables=backbone))
  full, step, latest = (flat(pretrained.load(tmp_path / p, cfg))
                        for p in ('full.safetensors', 'checkpoints/12', 'checkpoints'))
  for k, v in variables.items():
    for restored in (full, step, latest):
      np.testing.assert_array_equal(restored[k], v, err_msg=k)
    np.testing.assert_array_equal(merged[k], v if k in adapters else flat(backbone)[k], err_msg=k)
  with pytest.raises(UserError, match='pass it as init_variables'):
    pretrained.load(tmp_path / 'adapters.safetensors', cfg)


# ---------------------------------------------------------------- position embeddings


@pytest.mark.parametrize('method', ['bilinear', 'bicubic'])
def test_resample_posemb_keeps_the_class_row_and_constants(method):
  posemb = np.random.RandomState(0).standard_normal((1, 1 + 16, 8)).astype(np.float32)
  small = pretrained.resample_posemb(posemb, 2, method)
  back = pretrained.resample_posemb(small, 4, method)
  assert small.shape == (1, 5, 8) and back.shape == (1, 17, 8)
  np.testing.assert_array_equal(small[:, 0], posemb[:, 0])
  np.testing.assert_array_equal(back[:, 0], posemb[:, 0])
  constant = np.ones((1, 17, 8), np.float32)
  np.testing.assert_allclose(pretrained.resample_posemb(constant, (3, 5), method),
                             np.ones((1, 16, 8)), rtol=1e-6)
  no_class_row = pretrained.resample_posemb(posemb[:, 1:], 3, method)
  assert no_class_row.shape == (1, 9, 8)


def test_bilinear_resample_is_big_visions_zoom():
  """big_vision resamples with scipy.ndimage.zoom(order=1): corners aligned, no antialiasing."""
  ndimage = pytest.importorskip('scipy.ndimage')
  grid = np.random.RandomState(1).standard_normal((7, 7, 4))
  for new in (3, 5, 12):
    expected = ndimage.zoom(grid, (new / 7, new / 7, 1), order=1)
    ours = pretrained.resample_posemb(grid.reshape(1, 49, 4).astype(np.float32), new, 'bilinear')
    np.testing.assert_allclose(ours.reshape(new, new, 4), expected, atol=1e-6, rtol=0)


def test_224px_checkpoint_loads_at_32px(tmp_path, caplog):
  cfg = tiny_cfg(tuning='linear')
  sd = timm_weights(cfg, grid=28)  # 224 px / 8 px patches
  save_file(sd, tmp_path / 'ckpt.safetensors')
  with caplog.at_level(logging.INFO):
    variables = pretrained.load(tmp_path / 'ckpt.safetensors', cfg)
  assert 'position embedding 28x28 -> 4x4 (bicubic)' in caplog.text
  sd['pos_embed'] = pretrained.resample_posemb(sd['pos_embed'], 4, 'bicubic')
  np.testing.assert_array_equal(variables['params']['pos_embedding'], sd['pos_embed'])
  np.testing.assert_allclose(logits(cfg, variables), numpy_forward(sd, IMAGES, cfg.num_heads),
                             atol=1e-5, rtol=0)


# ---------------------------------------------------------------- heads and mismatches


def test_head_with_other_class_count_is_replaced(tmp_path, caplog):
  cfg = tiny_cfg(tuning='linear')
  save_file(timm_weights(cfg, num_classes=7), tmp_path / 'ckpt.safetensors')
  fresh = init(cfg)
  with caplog.at_level(logging.INFO):
    variables = pretrained.load(tmp_path / 'ckpt.safetensors', cfg, init_variables=fresh)
  assert '7 classes in the checkpoint, 5 in the model' in caplog.text
  for leaf in ('kernel', 'bias'):
    np.testing.assert_array_equal(variables['params']['head']['linear'][leaf],
                                  fresh['params']['head']['linear'][leaf])


def load_error(tmp_path, sd, cfg, **kwargs):
  save_file(sd, tmp_path / 'ckpt.safetensors')
  with pytest.raises(UserError) as e:
    pretrained.load(tmp_path / 'ckpt.safetensors', cfg, **kwargs)
  assert '\n' not in str(e.value)
  return str(e.value)


def test_deeper_checkpoint_lists_every_unexpected_key(tmp_path):
  cfg = tiny_cfg()
  msg = load_error(tmp_path, timm_weights(cfg, depth=4), cfg)
  for key in ('blocks.{2-3}.attn.qkv.weight (96, 32)', 'blocks.{2-3}.mlp.fc2.bias (32,)',
              'blocks.{2-3}.norm2.weight (32,)', 'checkpoint has depth 4', 'strict=False'):
    assert key in msg


def test_shallower_checkpoint_lists_missing_keys(tmp_path):
  cfg = tiny_cfg(depth=3)
  msg = load_error(tmp_path, timm_weights(cfg, depth=2), cfg)
  assert 'missing from the checkpoint' in msg
  assert 'params/block2/attn/qkv/kernel (32, 96)' in msg and 'block2/adapter' not in msg


def test_wrong_width_lists_every_shape(tmp_path):
  cfg = tiny_cfg()
  msg = load_error(tmp_path, timm_weights(cfg, width=48), cfg)
  for key in ('cls_token (1, 1, 48) vs model params/cls (1, 1, 32)',
              'blocks.{0-1}.attn.qkv.weight (144, 48) vs model '
              'params/block{0-1}/attn/qkv/kernel (32, 96)',
              'head.weight (5, 48) vs model params/head/linear/kernel (32, 5)',
              'norm.bias (48,) vs model params/norm/bias (32,)', 'width 48'):
    assert key in msg
  assert 'missing' not in msg  # mismatched leaves are not listed twice
  assert 'class_token' not in msg  # a mis-shaped class token is a width problem


def test_unexpected_keys_warn_when_not_strict(tmp_path, caplog):
  cfg = tiny_cfg(tuning='linear')
  sd = {**timm_weights(cfg), 'blocks.0.ls1.gamma': np.ones(32, np.float32)}
  assert 'blocks.0.ls1.gamma (32,)' in load_error(tmp_path, sd, cfg)
  with caplog.at_level(logging.WARNING):
    pretrained.load(tmp_path / 'ckpt.safetensors', cfg, strict=False)
  assert 'blocks.0.ls1.gamma' in caplog.text


def test_batchnorm_head_into_linear_model_names_the_fix(tmp_path):
  cfg = tiny_cfg(tuning='linear')
  sd = timm_weights(cfg)
  sd['head.1.weight'], sd['head.1.bias'] = sd.pop('head.weight'), sd.pop('head.bias')
  sd['head.0.running_mean'] = sd['head.0.running_var'] = np.ones(32, np.float32)
  msg = load_error(tmp_path, sd, cfg)
  assert 'head.0.running_mean (32,)' in msg and "model.head='bn_linear'" in msg


def test_unknown_layout(tmp_path):
  msg = load_error(tmp_path, {'encoder.layer.0.weight': np.ones(3, np.float32)}, tiny_cfg())
  assert 'unknown checkpoint layout' in msg and 'encoder.layer.0.weight' in msg


@pytest.mark.parametrize('ext', ['safetensors', 'npz', 'pth'])
def test_truncated_file(ext, tmp_path):
  cfg = tiny_cfg(tuning='linear')
  path = save_weights(tmp_path, timm_weights(cfg), cfg,
                      {'npz': 'big_vision_npz', 'pth': 'timm_pth'}.get(ext, ext))
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  with pytest.raises(UserError, match=f'{path}: could not read it as .*truncated'):
    pretrained.load(path, cfg)


def test_not_a_checkpoint(tmp_path, monkeypatch):
  (tmp_path / 'notes.txt').write_text('hello')
  with pytest.raises(UserError, match='notes.txt: not a checkpoint'):
    pretrained.load(tmp_path / 'notes.txt', tiny_cfg())
  with pytest.raises(UserError, match='does not exist'):
    pretrained.load(tmp_path / 'nothing.pth', tiny_cfg())
  with pytest.raises(UserError, match='not an orbax checkpoint'):
    pretrained.load(tmp_path, tiny_cfg())
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if torch were not installed
  (tmp_path / 'model.pth').write_bytes(b'PK\x03\x04')
  with pytest.raises(UserError, match=r"pip install 'adaptformer_jax\[torch\]'"):
    pretrained.load(tmp_path / 'model.pth', tiny_cfg())


class _RunsCode:
  """Unpickling it would call os.system: a hostile object next to the tensors."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    import os  # pylint: disable=g-import-not-at-top
    return os.system, (f'touch {self.marker}',)


def test_objects_beside_the_tensors_are_read_past_without_running_code(tmp_path):
  """A Lightning checkpoint pickles its OmegaConf hyper-parameters, which torch's safe
  loader refuses; the tensors are read with every other object left opaque."""
  torch = pytest.importorskip('torch')
  marker = tmp_path / 'ran'
  weights = {'head.weight': torch.ones(2, 3), 'head.bias': torch.zeros(2)}
  torch.save({'state_dict': weights, 'hyper_parameters': {'cfg': _RunsCode(marker)}},
             tmp_path / 'last.ckpt')
  from adaptformer_jax.weights import formats  # pylint: disable=g-import-not-at-top
  flat, kind = formats.read(tmp_path / 'last.ckpt')
  assert kind == 'torch' and not marker.exists()
  assert sorted(flat) == ['head.bias', 'head.weight']
  np.testing.assert_array_equal(flat['head.weight'], np.ones((2, 3)))
