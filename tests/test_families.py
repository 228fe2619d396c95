"""Checkpoint families against code this project did not write: timm's ViT (DINOv2, CLIP,
SigLIP, AugReg, MAE variants), OpenCLIP's VisionTransformer, and timm's own reader of
big_vision .npz files. Random weights, every parameter perturbed, tiny shapes.
"""
import functools
import logging

import flax.traverse_util
import jax
import numpy as np
import pytest

from adaptformer_jax import models
from adaptformer_jax import peft
from adaptformer_jax import pretrained
from adaptformer_jax.errors import UserError
from adaptformer_jax.models import tuning
from conftest import shipped_config

IMAGES = np.random.RandomState(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, image_size=32,
            num_classes=5)
TIMM_TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                 img_size=32, num_classes=5)


@pytest.fixture(name='timm', scope='module')
def _timm():
  from references import timm_reference  # pylint: disable=g-import-not-at-top
  timm_reference.import_timm()
  return timm_reference


def _ln_eps5():
  import torch  # pylint: disable=g-import-not-at-top
  return functools.partial(torch.nn.LayerNorm, eps=1e-5)


# name: (our preset, timm VisionTransformer kwargs, our overrides).
FAMILIES = {
    'augreg_cls': ('vit_b16_augreg', dict(act_layer='gelu_tanh'), {}),
    'mae_gap_fc_norm': ('vit_b16', dict(global_pool='avg'), dict(pool='gap')),
    'dinov2': ('vit_s14_dinov2', dict(init_values=1e-5), {}),
    'dinov2_reg4': ('vit_s14_dinov2_reg4',
                    dict(init_values=1e-5, reg_tokens=4, no_embed_class=True), {}),
    'dinov2_reg4_gap_prenorm': ('vit_s14_dinov2_reg4', dict(
        init_values=1e-5, reg_tokens=4, no_embed_class=True, global_pool='avg',
        fc_norm=False), dict(pool='gap_prenorm')),
    'clip_quickgelu': ('vit_b16_clip', dict(pre_norm=True, act_layer='quick_gelu'), {}),
    'siglip_map': ('vit_b16_siglip', dict(class_token=False, global_pool='map',
                                          act_layer='gelu_tanh'), {}),
    'siglip_gap_prenorm': ('vit_b16_siglip', dict(
        class_token=False, global_pool='avg', fc_norm=False, act_layer='gelu_tanh'),
                           dict(pool='gap_prenorm')),
    'map_with_class_token': ('vit_b16', dict(global_pool='map'), dict(pool='map')),
    'no_qkv_bias': ('vit_b16', dict(qkv_bias=False), dict(qkv_bias='none')),
}


def timm_model(timm, family, seed=0, **overrides):
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  kwargs = {**TIMM_TINY, **FAMILIES[family][1], **overrides}
  if kwargs.get('pre_norm'):
    kwargs['norm_layer'] = _ln_eps5()
  return timm.randomize(vision_transformer.VisionTransformer(**kwargs), seed)


def our_cfg(family, **overrides):
  name, _, ours = FAMILIES[family]
  return models.preset(name, **{**TINY, 'tuning': 'linear', **ours, **overrides})


def nan_variables(cfg):
  """A full variable tree of NaNs: any leaf the load fails to fill poisons the logits."""
  shapes = jax.eval_shape(models.build(cfg).init, jax.random.key(0), IMAGES[:1])
  return jax.tree.map(lambda s: np.full(s.shape, np.nan, s.dtype), shapes)


def assert_close(ours, ref, rtol=1e-5):
  """Logits within `rtol` of the reference, relative to its largest magnitude."""
  err = np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref))
  assert err <= rtol, f'relative error {err:.2e}'


def forward(cfg, variables, images=IMAGES):
  return np.asarray(models.build(cfg).apply(variables, images))


def save_torch(state_dict, path):
  import torch  # pylint: disable=g-import-not-at-top
  torch.save(state_dict, path)
  return path


# ---------------------------------------------------------------- timm layouts


@pytest.mark.parametrize('family', FAMILIES)
def test_timm_checkpoint_matches_timm_forward(family, timm, tmp_path):
  ref = timm_model(timm, family, seed=len(family))
  cfg = our_cfg(family)
  path = save_torch(ref.state_dict(), tmp_path / 'timm.pth')
  variables = pretrained.load(path, cfg, init_variables=nan_variables(cfg))
  assert_close(forward(cfg, variables), timm.logits(ref, IMAGES))


@pytest.mark.parametrize('family', ['dinov2', 'dinov2_reg4', 'siglip_map', 'clip_quickgelu'])
def test_position_embedding_resampled_as_timm_does(family, timm, tmp_path):
  """A 224 px checkpoint at 160 px (here 56 -> 40 px, 4 px patches: 14x14 -> 10x10),
  against timm's own loader (checkpoint_filter_fn: bicubic, antialiased)."""
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  big = timm_model(timm, family, seed=3, patch_size=4, img_size=56)
  small = timm_model(timm, family, seed=4, patch_size=4, img_size=40)
  small.load_state_dict(vision_transformer.checkpoint_filter_fn(big.state_dict(), small))
  cfg = our_cfg(family, patch_size=4, image_size=40, posemb_resample='bicubic')
  path = save_torch(big.state_dict(), tmp_path / 'timm.pth')
  images = np.random.RandomState(1).standard_normal((2, 40, 40, 3)).astype(np.float32)
  variables = pretrained.load(path, cfg, init_variables=nan_variables(cfg))
  assert_close(forward(cfg, variables, images), timm.logits(small, images))


@pytest.mark.parametrize('family', ['dinov2_reg4', 'siglip_map'])
def test_peft_attaches_the_same_way_to_every_family(family, timm, tmp_path):
  """Fresh adapters and LoRA leave the backbone's logits; only they and the head train."""
  ref = timm_model(timm, family, seed=5)
  path = save_torch(ref.state_dict(), tmp_path / 'timm.pth')
  for tuning in ('adaptformer', 'lora'):
    cfg = our_cfg(family, tuning=tuning)
    variables = pretrained.load(path, cfg)
    assert_close(forward(cfg, variables), timm.logits(ref, IMAGES))
    mask = flax.traverse_util.flatten_dict(peft.trainable_mask(variables['params'], cfg),
                                           sep='/')
    trained = {k.split('/')[0] if k.startswith('head') else k.split('/', 2)[1]
               for k, v in mask.items() if v}
    assert trained == {'head', 'adapter' if tuning == 'adaptformer' else 'attn'}


@pytest.mark.parametrize('family', ['dinov2_reg4', 'siglip_map', 'dinov2_reg4_gap_prenorm'])
def test_vpt_deep_with_registers_and_without_class_token(family, timm, tmp_path):
  """VPT-deep prompts go in front of every block and out after it, so pooling still
  sees [class token] [registers] patches: checked against timm's blocks run by hand."""
  import torch  # pylint: disable=g-import-not-at-top
  ref = timm_model(timm, family, seed=6)
  cfg = our_cfg(family, tuning='vpt_deep', vpt=dict(num_tokens=3))
  variables = pretrained.load(save_torch(ref.state_dict(), tmp_path / 'timm.pth'), cfg,
                              rng=jax.random.key(7))
  prompts = torch.from_numpy(np.array(variables['params']['prompts']))
  with torch.no_grad():
    x = ref.patch_embed(torch.from_numpy(IMAGES).permute(0, 3, 1, 2))
    x = ref.norm_pre(ref._pos_embed(x))  # pylint: disable=protected-access
    for i, block in enumerate(ref.blocks):
      x = block(torch.cat([prompts[i:i + 1].expand(len(x), -1, -1), x], 1))[:, 3:]
    expected = ref.forward_head(ref.norm(x)).numpy()
  assert_close(forward(cfg, variables), expected)


# ---------------------------------------------------------------- OpenCLIP


@pytest.mark.parametrize('quick_gelu', [True, False])
def test_openclip_state_dict_matches_openclip_forward(quick_gelu, tmp_path):
  """OpenCLIP's own names (`visual.*`, text tower alongside), against its VisionTransformer."""
  from references import timm_reference  # pylint: disable=g-import-not-at-top
  transformer = timm_reference.import_open_clip_transformer()
  import torch  # pylint: disable=g-import-not-at-top
  act = transformer.QuickGELU if quick_gelu else torch.nn.GELU
  visual = timm_reference.randomize(transformer.VisionTransformer(
      image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
      output_dim=5, act_layer=act), seed=8)
  state = {f'visual.{k}': v for k, v in visual.state_dict().items()}
  state.update({'token_embedding.weight': torch.ones(10, 16), 'logit_scale': torch.ones(()),
                'transformer.resblocks.0.ln_1.weight': torch.ones(16)})
  cfg = models.preset('vit_b16_clip' if quick_gelu else 'vit_b16_openclip',
                      **{**TINY, 'tuning': 'linear'})
  variables = pretrained.load(save_torch(state, tmp_path / 'open_clip.pt'), cfg,
                              init_variables=nan_variables(cfg))
  assert_close(forward(cfg, variables), timm_reference.logits(visual, IMAGES))


# ---------------------------------------------------------------- big_vision .npz


def big_vision_npz(state, heads, *, vit_jax_names=False, scan=False):
  """A timm state dict under big_vision's (or vit_jax/AugReg's) npz names."""
  d = state['patch_embed.proj.weight'].shape[0]
  hd = d // heads
  out = {'embedding/kernel': state['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
         'embedding/bias': state['patch_embed.proj.bias'],
         'Transformer/encoder_norm/scale': state['norm.weight'],
         'Transformer/encoder_norm/bias': state['norm.bias'],
         'head/kernel': state['head.weight'].T, 'head/bias': state['head.bias']}
  if 'cls_token' in state:
    out['cls'] = state['cls_token']
  pos = 'Transformer/posembed_input/pos_embedding' if vit_jax_names else 'pos_embedding'
  out[pos] = state['pos_embed']
  qkv = lambda w, b, prefix, names: {
      **{f'{prefix}/{n}/kernel': wi.T.reshape(d, heads, hd)
         for n, wi in zip(names, np.split(w, len(names)))},
      **{f'{prefix}/{n}/bias': bi.reshape(heads, hd)
         for n, bi in zip(names, np.split(b, len(names)))}}
  if 'attn_pool.latent' in state:
    m = 'MAPHead_0/MultiHeadDotProductAttention_0'
    out.update({'MAPHead_0/probe': state['attn_pool.latent'],
                **qkv(state['attn_pool.q.weight'], state['attn_pool.q.bias'], m, ['query']),
                **qkv(state['attn_pool.kv.weight'], state['attn_pool.kv.bias'], m,
                      ['key', 'value']),
                f'{m}/out/kernel': state['attn_pool.proj.weight'].T.reshape(heads, hd, d),
                f'{m}/out/bias': state['attn_pool.proj.bias'],
                'MAPHead_0/LayerNorm_0/scale': state['attn_pool.norm.weight'],
                'MAPHead_0/LayerNorm_0/bias': state['attn_pool.norm.bias']})
    for j in (0, 1):
      out[f'MAPHead_0/MlpBlock_0/Dense_{j}/kernel'] = state[f'attn_pool.mlp.fc{j + 1}.weight'].T
      out[f'MAPHead_0/MlpBlock_0/Dense_{j}/bias'] = state[f'attn_pool.mlp.fc{j + 1}.bias']
  ln2, mha, mlp = ('LayerNorm_2', 'MultiHeadDotProductAttention_1', 'MlpBlock_3') \
      if vit_jax_names else ('LayerNorm_1', 'MultiHeadDotProductAttention_0', 'MlpBlock_0')
  blocks = []
  i = 0
  while f'blocks.{i}.norm1.weight' in state:
    t = f'blocks.{i}.'
    block = {'LayerNorm_0/scale': state[t + 'norm1.weight'],
             'LayerNorm_0/bias': state[t + 'norm1.bias'],
             f'{ln2}/scale': state[t + 'norm2.weight'], f'{ln2}/bias': state[t + 'norm2.bias'],
             **qkv(state[t + 'attn.qkv.weight'], state[t + 'attn.qkv.bias'], mha,
                   ['query', 'key', 'value']),
             f'{mha}/out/kernel': state[t + 'attn.proj.weight'].T.reshape(heads, hd, d),
             f'{mha}/out/bias': state[t + 'attn.proj.bias']}
    for j in (0, 1):
      block[f'{mlp}/Dense_{j}/kernel'] = state[f'{t}mlp.fc{j + 1}.weight'].T
      block[f'{mlp}/Dense_{j}/bias'] = state[f'{t}mlp.fc{j + 1}.bias']
    blocks.append(block)
    i += 1
  if scan:
    out.update({f'Transformer/encoderblock/{k}': np.stack([b[k] for b in blocks])
                for k in blocks[0]})
  else:
    out.update({f'Transformer/encoderblock_{i}/{k}': v
                for i, b in enumerate(blocks) for k, v in b.items()})
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


NPZ_CASES = {
    # (family, timm overrides, writer options, file prefix, other keys in the file)
    'augreg_vit_jax_names': ('augreg_cls', {}, dict(vit_jax_names=True), '', {}),
    'siglip_scanned_two_tower': (
        'siglip_map', {}, dict(scan=True), 'params/img/',
        {'params/txt/Encoder_0/encoder_norm/scale': np.ones(8, np.float32),
         'params/t': np.ones(1, np.float32), 'params/b': np.ones(1, np.float32)}),
    'big_vision_train_gap': (
        'siglip_gap_prenorm', {}, {}, 'params/',
        {'opt/0/mu/embedding/kernel': np.ones((8, 8, 3, 32), np.float32),
         'opt/0/count': np.ones((), np.int32)}),
    'big_vision_tok': ('augreg_cls', dict(no_embed_class=True), {}, '', {}),
}


@pytest.mark.parametrize('case', NPZ_CASES)
def test_big_vision_npz_matches_timm(case, timm, tmp_path):
  """Our npz reader against timm's (`_load_weights`): the file is first checked to load
  into timm unchanged, then ours must reproduce timm's logits."""
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  family, timm_overrides, writer, prefix, extra = NPZ_CASES[case]
  ref = timm_model(timm, family, seed=9, **timm_overrides)
  state = timm.state_dict_numpy(ref)
  arrays = {prefix + k: v for k, v in big_vision_npz(state, 2, **writer).items()}
  np.savez(tmp_path / 'ckpt.npz', **arrays, **extra)
  timm_loaded = timm_model(timm, family, seed=10, **timm_overrides)
  vision_transformer._load_weights(timm_loaded, str(tmp_path / 'ckpt.npz'))  # pylint: disable=protected-access
  expected = timm.logits(ref, IMAGES)
  assert_close(timm.logits(timm_loaded, IMAGES), expected, rtol=1e-6)
  cfg = our_cfg(family)
  variables = pretrained.load(tmp_path / 'ckpt.npz', cfg, init_variables=nan_variables(cfg))
  assert_close(forward(cfg, variables), expected)


def test_big_vision_npz_resampled_as_big_vision_does(timm, tmp_path):
  """A SigLIP npz at 56 px into a 40 px model (14x14 -> 10x10, as 224 -> 160 px) against
  big_vision's resampling: scipy.ndimage.zoom(order=1) of the grid (vit.resample_posemb)."""
  ndimage = pytest.importorskip('scipy.ndimage')
  import torch  # pylint: disable=g-import-not-at-top
  big = timm_model(timm, 'siglip_map', seed=16, patch_size=4, img_size=56)
  np.savez(tmp_path / 'siglip.npz', **big_vision_npz(timm.state_dict_numpy(big), 2))
  small = timm_model(timm, 'siglip_map', seed=17, patch_size=4, img_size=40)
  state = big.state_dict()
  grid = state['pos_embed'].numpy().reshape(14, 14, -1)
  state['pos_embed'] = torch.from_numpy(
      ndimage.zoom(grid, (10 / 14, 10 / 14, 1), order=1).reshape(1, 100, -1))
  small.load_state_dict(state)
  cfg = our_cfg('siglip_map', patch_size=4, image_size=40)
  assert cfg.posemb_resample == 'bilinear'
  images = np.random.RandomState(2).standard_normal((2, 40, 40, 3)).astype(np.float32)
  variables = pretrained.load(tmp_path / 'siglip.npz', cfg, init_variables=nan_variables(cfg))
  assert_close(forward(cfg, variables, images), timm.logits(small, images))


def test_big_vision_pre_logits(timm, tmp_path, caplog):
  """AugReg i21k files end in a tanh pre-logits dense: model.pre_logits loads it; without
  it a strict load names the fix, strict=False drops it and keeps the backbone."""
  import torch  # pylint: disable=g-import-not-at-top
  ref = timm_model(timm, 'augreg_cls', seed=11, num_classes=32)
  state = timm.state_dict_numpy(ref)
  rng = np.random.RandomState(2)
  head_w = rng.standard_normal((32, 5)).astype(np.float32) / 6
  head_b = rng.standard_normal(5).astype(np.float32)
  arrays = big_vision_npz(state, 2, vit_jax_names=True)
  arrays['pre_logits/kernel'], arrays['pre_logits/bias'] = arrays['head/kernel'], arrays['head/bias']
  arrays['head/kernel'], arrays['head/bias'] = head_w, head_b
  np.savez(tmp_path / 'i21k.npz', **arrays)
  with torch.no_grad():  # big_vision: head(tanh(pre_logits(features)))
    features = ref(torch.from_numpy(IMAGES).permute(0, 3, 1, 2)).numpy()
  expected = np.tanh(features) @ head_w + head_b
  cfg = our_cfg('augreg_cls', pre_logits=32)
  variables = pretrained.load(tmp_path / 'i21k.npz', cfg, init_variables=nan_variables(cfg))
  assert_close(forward(cfg, variables), expected)
  plain = our_cfg('augreg_cls')
  with pytest.raises(UserError, match=r'pre_logits/kernel.*set model.pre_logits'):
    pretrained.load(tmp_path / 'i21k.npz', plain)
  with caplog.at_level(logging.INFO):
    loaded = pretrained.load(tmp_path / 'i21k.npz', plain, strict=False)
  assert 'ignored: 2 unexpected keys (strict=False)' in caplog.text
  np.testing.assert_array_equal(loaded['params']['block1']['mlp']['fc1']['kernel'],
                                state['blocks.1.mlp.fc1.weight'].T)


# ---------------------------------------------------------------- the silent loads of issue 15


def test_training_checkpoint_loads_params_not_four_leaves(timm, tmp_path, caplog):
  """A big_vision training checkpoint (params/ + opt/) once loaded 4 of 152 leaves under
  strict=False with the rest random; now every backbone leaf comes from params/."""
  ref = timm_model(timm, 'augreg_cls', seed=12, no_embed_class=True)
  arrays = {f'params/{k}': v for k, v in big_vision_npz(timm.state_dict_numpy(ref), 2).items()}
  arrays.update({f'opt/state/mu/{k[7:]}': np.zeros_like(v) for k, v in arrays.items()})
  np.savez(tmp_path / 'train.npz', **arrays)
  cfg = our_cfg('augreg_cls', tuning='adaptformer')
  for strict in (True, False):
    with caplog.at_level(logging.INFO):
      variables = pretrained.load(tmp_path / 'train.npz', cfg, strict=strict,
                                  init_variables=models.build(cfg).init(
                                      jax.random.key(0), IMAGES[:1]))
    assert_close(forward(cfg, variables), timm.logits(ref, IMAGES))
  backbone = sum(not tuning.FRESH_ON_LOAD.fullmatch(k) for k in flax.traverse_util.flatten_dict(
      variables, sep='/'))
  assert f'{backbone} of {backbone} backbone leaves from the file' in caplog.text
  assert 'keys outside params/' in caplog.text


def test_own_export_with_partial_backbone_is_refused(tmp_path):
  """An export of this project's layout holding part of a backbone never fills the rest
  from init_variables (that was the 4-of-152 path); an adapter-only export still merges."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  cfg = our_cfg('augreg_cls', tuning='adaptformer')
  fresh = models.build(cfg).init(jax.random.key(0), IMAGES[:1])
  flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(fresh, sep='/').items()}
  partial = {k: v for k, v in flat.items() if k in (
      'params/cls', 'params/pos_embedding', 'params/embedding/kernel', 'params/embedding/bias')}
  save_file(partial, tmp_path / 'partial.safetensors')
  with pytest.raises(UserError, match=r'missing from the checkpoint: .*params/block\{0-1\}/attn'):
    pretrained.load(tmp_path / 'partial.safetensors', cfg, init_variables=fresh, strict=False)
  adapters = {k: v for k, v in flat.items() if '/adapter/' in k}
  save_file(adapters, tmp_path / 'adapters.safetensors')
  merged = pretrained.load(tmp_path / 'adapters.safetensors', cfg, init_variables=fresh)
  np.testing.assert_array_equal(merged['params']['block0']['attn']['qkv']['kernel'],
                                flat['params/block0/attn/qkv/kernel'])


def test_final_norm_without_fc_norm_is_not_silently_dropped(timm, tmp_path):
  """timm global_pool='avg', fc_norm=False has the keys of a class-token model; with
  pool='gap' its trained final norm used to be dropped (logits 120% off). Now the
  ambiguity is refused naming both choices, and gap_prenorm loads it exactly."""
  ref = timm_model(timm, 'mae_gap_fc_norm', seed=13, fc_norm=False)
  path = save_torch(ref.state_dict(), tmp_path / 'timm.pth')
  for strict in (True, False):
    with pytest.raises(UserError, match=r"model.pool='gap_prenorm'.*model.pool='cls'"):
      pretrained.load(path, our_cfg('mae_gap_fc_norm'), strict=strict)
  cfg = our_cfg('mae_gap_fc_norm', pool='gap_prenorm')
  assert_close(forward(cfg, pretrained.load(path, cfg)), timm.logits(ref, IMAGES))


def test_headless_backbone_with_gap_follows_mae(timm, tmp_path, caplog):
  """A backbone without a classifier (MAE's released encoder) under pool='gap': the final
  norm is dropped and fc_norm starts at identity, as MAE fine-tuning does; the log says so."""
  ref = timm_model(timm, 'mae_gap_fc_norm', seed=14, global_pool='token')
  state = {k: v for k, v in ref.state_dict().items() if not k.startswith('head.')}
  cfg = our_cfg('mae_gap_fc_norm')
  with caplog.at_level(logging.INFO):
    variables = pretrained.load(save_torch(state, tmp_path / 'mae.pth'), cfg)
  assert 'fc_norm (MAE: starts at identity)' in caplog.text
  np.testing.assert_array_equal(variables['params']['fc_norm']['scale'], np.ones(32))


def test_layout_option_mismatches_name_the_fix(timm, tmp_path):
  """A DINOv2 file into a model without LayerScale/registers, and the reverse."""
  path = save_torch(timm_model(timm, 'dinov2_reg4').state_dict(), tmp_path / 'dinov2.pth')
  with pytest.raises(UserError) as e:
    pretrained.load(path, our_cfg('augreg_cls'))
  assert 'model.layerscale' in str(e.value) and 'model.num_registers' in str(e.value)
  plain = save_torch(timm_model(timm, 'augreg_cls').state_dict(), tmp_path / 'plain.pth')
  with pytest.raises(UserError, match=r'missing from the checkpoint: .*params/block\{0-1\}/ls1'
                     r'.*set model.layerscale=None'):
    pretrained.load(plain, our_cfg('dinov2'), strict=False)
  with pytest.raises(UserError, match=r'params/map_head/probe.*set model.pool to'):
    pretrained.load(plain, our_cfg('augreg_cls', pool='map'), strict=False)


# ---------------------------------------------------------------- what users train


def test_trainable_parameter_table(capsys):
  """Adapters (bottleneck 64) + a 100-class head per family preset at 224 px: printed
  for users, and checked to be exactly what the adapters and head hold."""
  rows = []
  for name in ('vit_s14_dinov2', 'vit_b14_dinov2', 'vit_l14_dinov2', 'vit_b16_augreg',
               'vit_b16_clip', 'vit_b16_siglip'):
    cfg = models.preset(name, num_classes=100)
    params = jax.eval_shape(models.build(cfg).init, jax.random.key(0),
                            np.zeros((1, 224, 224, 3), np.float32))['params']
    trainable = peft.count(params, peft.trainable_mask(params, cfg))
    d, depth = cfg.width, cfg.depth
    assert trainable == depth * (2 * 64 * d + 64 + d) + (d + 1) * 100
    rows.append(f'{name:22s} {peft.count(params) / 1e6:8.1f} M {trainable:>11,}')
  with capsys.disabled():
    print('\npreset                    total   trainable (adapters + 100-class head)')
    print('\n'.join(rows))


# Each family preset next to timm's model of the same checkpoints.
TIMM_NAMES = {
    'vit_b16_augreg': 'vit_base_patch16_224',
    'vit_s14_dinov2': 'vit_small_patch14_dinov2',
    'vit_l14_dinov2_reg4': 'vit_large_patch14_reg4_dinov2',
    'vit_b16_clip': 'vit_base_patch16_clip_quickgelu_224',
    'vit_b16_siglip': 'vit_base_patch16_siglip_224',
}


@pytest.mark.parametrize('name', TIMM_NAMES)
def test_family_presets_have_timms_parameter_count(name, timm):
  """Architecture check at full size (timm builds on torch's meta device: no memory).
  Two same-function differences of one width each: CLIP's patch embedding has no bias
  in timm (ours holds zeros), and timm's DINOv2-with-registers folds the class token's
  position into the token (ours keeps DINOv2's class row)."""
  import torch  # pylint: disable=g-import-not-at-top
  import timm as timm_lib  # pylint: disable=g-import-not-at-top
  with torch.device('meta'):
    ref = timm_lib.create_model(TIMM_NAMES[name], pretrained=False, img_size=224,
                                num_classes=1000)
  cfg = models.preset(name, tuning='full')
  params = jax.eval_shape(models.build(cfg).init, jax.random.key(0),
                          np.zeros((1, 224, 224, 3), np.float32))['params']
  expected = sum(p.numel() for p in ref.parameters()) + cfg.width * (
      cfg.ln_pre + bool(cfg.num_registers))
  assert peft.count(params) == expected


def test_recipe_takes_a_backbone_preset():
  model = shipped_config('cifar100', 'adaptformer,vit_b14_dinov2').model
  assert (model.name, model.patch_size, model.layerscale, model.head) == (
      'vit_b14_dinov2', 14, 1e-5, 'bn_linear')
  assert shipped_config('cifar100', 'lora').model.name == 'vit_b16'
  with pytest.raises(UserError, match="unknown preset 'vit_b14_dino'"):
    shipped_config('cifar100', 'adaptformer,vit_b14_dino')


def test_openclip_around_a_timm_trunk(timm, tmp_path):
  """OpenCLIP's SigLIP files hold the timm model under `visual.trunk.`, next to the text tower."""
  import torch  # pylint: disable=g-import-not-at-top
  ref = timm_model(timm, 'siglip_map', seed=15)
  state = {f'visual.trunk.{k}': v for k, v in ref.state_dict().items()}
  state['text.transformer.resblocks.0.ln_1.weight'] = torch.ones(16)
  cfg = our_cfg('siglip_map')
  variables = pretrained.load(save_torch(state, tmp_path / 'open_clip_pytorch_model.bin'), cfg,
                              init_variables=nan_variables(cfg))
  assert_close(forward(cfg, variables), timm.logits(ref, IMAGES))
