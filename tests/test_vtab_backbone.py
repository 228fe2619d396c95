"""VTAB's standard backbone: the original ViT-B/16 ImageNet-21k `.npz` (vit_jax layout,
imagenet21k/ViT-B_16.npz) as preset vit_b16_in21k_orig, against timm's model of the same
weights (`vit_base_patch16_224.orig_in21k`): its architecture, then a tiny random file."""
import ml_collections
import numpy as np
import pytest

from adaptformer_jax import models
from adaptformer_jax import pretrained
from adaptformer_jax.data import preprocess
from adaptformer_jax.vtab import protocol
from adaptformer_jax.vtab import runner
from test_families import IMAGES
from test_families import TIMM_TINY
from test_families import TINY
from test_families import assert_close
from test_families import big_vision_npz
from test_families import forward
from test_families import nan_variables


@pytest.fixture(name='timm', scope='module')
def _timm():
  from references import timm_reference  # pylint: disable=g-import-not-at-top
  timm_reference.import_timm()
  return timm_reference


def test_preset_is_timms_orig_in21k_architecture(timm):
  import timm as timm_lib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  with torch.device('meta'):  # shapes and options only, no 86M weights
    arch = timm_lib.create_model('vit_base_patch16_224.orig_in21k', pretrained=False)
  cfg = models.preset('vit_b16_in21k_orig')
  block = arch.blocks[0]
  assert (cfg.patch_size, cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.image_size) == (
      arch.patch_embed.patch_size[0], arch.embed_dim, len(arch.blocks),
      block.attn.num_heads, block.mlp.fc1.out_features, arch.patch_embed.img_size[0])
  assert (cfg.class_token, cfg.pool, cfg.qkv_bias, cfg.norm_eps, cfg.ln_pre) == (
      arch.has_class_token, 'cls' if arch.global_pool == 'token' else arch.global_pool,
      'qkv' if block.attn.qkv.bias is not None else 'none', arch.norm.eps,
      not isinstance(arch.norm_pre, torch.nn.Identity))
  assert isinstance(arch.fc_norm, torch.nn.Identity) and cfg.num_registers == 0
  # The file's own network: flax's tanh GELU and its 768-wide representation layer, which
  # timm drops (its head-less port runs the exact GELU); normalised to [-1, 1] as timm says.
  assert (cfg.gelu, cfg.pre_logits, cfg.posemb_resample) == ('tanh', 768, 'bilinear')
  mean, std = preprocess.NORMALIZE[protocol.normalization('vit_b16_in21k_orig')]
  assert (mean, std) == (arch.pretrained_cfg['mean'], arch.pretrained_cfg['std'])


def test_original_npz_loads_exactly(timm, tmp_path):
  """A tiny random file in the original layout (vit_jax names, pre_logits, a 21k-style
  head): timm reads its backbone, and the preset reproduces head(tanh(pre_logits(x)))."""
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  make = lambda seed, **kw: timm.randomize(vision_transformer.VisionTransformer(
      **{**TIMM_TINY, 'act_layer': 'gelu_tanh', **kw}), seed)
  ref = make(21, num_classes=32)  # its head stands in for the pre_logits dense (32 wide)
  arrays = big_vision_npz(timm.state_dict_numpy(ref), 2, vit_jax_names=True)
  arrays['pre_logits/kernel'], arrays['pre_logits/bias'] = arrays['head/kernel'], arrays['head/bias']
  rng = np.random.RandomState(3)
  arrays['head/kernel'] = rng.standard_normal((32, 5)).astype(np.float32) / 6
  arrays['head/bias'] = rng.standard_normal(5).astype(np.float32)
  np.savez(tmp_path / 'ViT-B_16.npz', **arrays)
  headless = make(22, num_classes=0)  # timm's orig_in21k: no head, no pre_logits
  vision_transformer._load_weights(headless, str(tmp_path / 'ViT-B_16.npz'))  # pylint: disable=protected-access
  with torch.no_grad():
    features = headless(torch.from_numpy(IMAGES).permute(0, 3, 1, 2)).numpy()
    assert_close(ref.forward_head(ref.forward_features(
        torch.from_numpy(IMAGES).permute(0, 3, 1, 2)), pre_logits=True).numpy(), features)
  expected = np.tanh(features @ arrays['pre_logits/kernel'] + arrays['pre_logits/bias']) @ \
      arrays['head/kernel'] + arrays['head/bias']
  cfg = models.preset('vit_b16_in21k_orig', **{**TINY, 'tuning': 'linear', 'pre_logits': 32})
  variables = pretrained.load(tmp_path / 'ViT-B_16.npz', cfg, init_variables=nan_variables(cfg))
  assert_close(forward(cfg, variables), expected)
  # configs/vtab.py drops the representation layer (vit_jax fine-tuning, timm, V-PETL):
  # the runner loads a copy of the file without it, the head then sits on timm's features.
  plain = models.preset('vit_b16_in21k_orig', **{**TINY, 'tuning': 'linear', 'pre_logits': 0})
  config = ml_collections.ConfigDict(dict(init_from=str(tmp_path / 'ViT-B_16.npz'), model=plain))
  stripped = runner.without_pre_logits(config, str(tmp_path))
  assert stripped == str(tmp_path / runner.BACKBONE)
  variables = pretrained.load(stripped, plain, init_variables=nan_variables(plain))
  assert_close(forward(plain, variables), features @ arrays['head/kernel'] + arrays['head/bias'])
  config.model = cfg  # a model with the layer keeps the file as it is
  assert runner.without_pre_logits(config, str(tmp_path)) == config.init_from
