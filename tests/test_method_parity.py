"""SSF, BitFit and Adapter+ against their authors' code, through the real loader.

References: tests/references/peft_reference.py, ports of the official SSF and Adapter+
models onto timm's ViT with the official state-dict keys (checked against the authors'
repositories once, see that file). Random non-zero method parameters, f32, eval.
"""
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from adaptformer_jax import models
from adaptformer_jax import peft
from adaptformer_jax import pretrained
from adaptformer_jax.errors import UserError

IMAGES = np.random.RandomState(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, image_size=32,
            num_classes=5)
TIMM_TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                 img_size=32, num_classes=5)
POOLS = {'cls': 'token', 'gap': 'avg'}  # ours: timm global_pool


@pytest.fixture(name='ref', scope='module')
def _ref():
  from references import timm_reference  # pylint: disable=g-import-not-at-top
  timm_reference.import_timm()
  from references import peft_reference  # pylint: disable=g-import-not-at-top
  peft_reference.timm = timm_reference
  return peft_reference


def reference(ref, add, seed=0, pool='cls', **kwargs):
  """The official method on a random tiny timm ViT, every parameter random, eval mode."""
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  model = add(vision_transformer.VisionTransformer(**TIMM_TINY, global_pool=POOLS[pool]),
              **kwargs)
  return ref.timm.randomize(model, seed)


def cfg(tuning, **overrides):
  return models.preset('vit_b16', **{**TINY, 'tuning': tuning, **overrides})


def numpy_state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def logits(model_cfg, variables):
  return np.asarray(models.build(model_cfg).apply(variables, IMAGES))


def assert_close(ours, expected, rtol=1e-5):
  err = np.max(np.abs(ours - expected)) / np.max(np.abs(expected))
  assert err <= rtol, f'relative error {err:.2e}'


def save_torch(state, path):
  import torch  # pylint: disable=g-import-not-at-top
  torch.save(state, path)
  return path


def method_keys(state, word):
  return {k: v for k, v in state.items() if word in k or k.startswith('head.')}


# ---------------------------------------------------------------- SSF


@pytest.mark.parametrize('pool', ['cls', 'gap'])
def test_ssf_state_dict_gives_the_official_logits(pool, ref, tmp_path):
  model = reference(ref, ref.add_ssf, seed=1, pool=pool)
  path = save_torch(model.state_dict(), tmp_path / 'ssf.pth')
  ours = cfg('ssf', pool=pool)
  assert_close(logits(ours, pretrained.load(path, ours)), ref.timm.logits(model, IMAGES))


def test_ssf_scales_and_head_alone_load_on_top_of_a_backbone(ref, tmp_path):
  model = reference(ref, ref.add_ssf, seed=2)
  state = model.state_dict()
  backbone = {k: v for k, v in state.items() if 'ssf_' not in k and not k.startswith('head.')}
  partial = tmp_path / 'ssf.safetensors'
  safetensors.numpy.save_file(method_keys(numpy_state(model), 'ssf_'), str(partial))
  ours = cfg('ssf')
  fresh = jax.jit(models.build(ours).init)(jax.random.key(0), IMAGES[:1])
  base = pretrained.load(save_torch(backbone, tmp_path / 'backbone.pth'), ours,
                         init_variables=fresh)
  variables = pretrained.load(partial, ours, init_variables=base)
  assert_close(logits(ours, variables), ref.timm.logits(model, IMAGES))
  with pytest.raises(UserError, match='holds no backbone'):
    pretrained.load(partial, ours)


def test_missing_or_unknown_ssf_keys_are_named(ref, tmp_path):
  state = reference(ref, ref.add_ssf, seed=3).state_dict()
  missing = {k: v for k, v in state.items() if k != 'blocks.1.mlp.ssf_shift_2'}
  with pytest.raises(UserError, match=r'missing.*block1/mlp/ssf_fc2/shift'):
    pretrained.load(save_torch(missing, tmp_path / 'missing.pth'), cfg('ssf'))
  unknown = {**state, 'blocks.0.attn.ssf_scale_3': state['blocks.0.attn.ssf_scale_2']}
  with pytest.raises(UserError, match=r'blocks\.0\.attn\.ssf_scale_3'):
    pretrained.load(save_torch(unknown, tmp_path / 'unknown.pth'), cfg('ssf'))


# ---------------------------------------------------------------- Adapter+


@pytest.mark.parametrize('placement', ['post', 'pre', 'intermediate', 'parallel'])
def test_adapter_plus_state_dict_gives_the_official_logits(placement, ref, tmp_path):
  model = reference(ref, ref.add_adapter_plus, seed=4, dim=4, placement=placement)
  path = save_torch(model.state_dict(), tmp_path / 'adapter_plus.pth')
  ours = cfg('adapter_plus', adapter_plus=dict(dim=4, placement=placement))
  assert_close(logits(ours, pretrained.load(path, ours)), ref.timm.logits(model, IMAGES))


class Hyperparameters(dict):
  """Stands for the OmegaConf config a Lightning checkpoint pickles next to its tensors."""


def test_adapter_plus_lightning_checkpoint_loads_on_top_of_a_backbone(ref, tmp_path):
  model = reference(ref, ref.add_adapter_plus, seed=5)
  backbone = {k: v for k, v in model.state_dict().items()
              if '.adapter.' not in k and not k.startswith('head.')}
  # The official on_save_checkpoint keeps only 'adapter' and 'head' keys, under `vit.`.
  lightning = {'epoch': 99, 'hyper_parameters': {'cfg': Hyperparameters(dim=8)},
               'state_dict': {f'vit.{k}': v for k, v in model.state_dict().items()
                              if '.adapter.' in k or k.startswith('head.')}}
  ours = cfg('adapter_plus')
  fresh = jax.jit(models.build(ours).init)(jax.random.key(0), IMAGES[:1])
  base = pretrained.load(save_torch(backbone, tmp_path / 'backbone.pth'), ours,
                         init_variables=fresh)
  variables = pretrained.load(save_torch(lightning, tmp_path / 'last.ckpt'), ours,
                              init_variables=base)
  assert_close(logits(ours, variables), ref.timm.logits(model, IMAGES))


# ---------------------------------------------------------------- BitFit and counts


def test_bitfit_trains_every_bias_and_the_head_as_vpts_bias_baseline(ref, tmp_path):
  """VPT's 'tinytl-bias': every torch parameter whose name holds 'bias' (LayerNorm,
  patch embedding, qkv, proj, fc1, fc2) + the head; the model is the plain ViT."""
  model = reference(ref, lambda m: m, seed=6)
  ours = cfg('bitfit')
  variables = pretrained.load(save_torch(model.state_dict(), tmp_path / 'vit.pth'), ours)
  assert_close(logits(ours, variables), ref.timm.logits(model, IMAGES))
  mask = peft.trainable_mask(variables['params'], ours)
  expected = sum(p.numel() for name, p in model.named_parameters()
                 if 'bias' in name or name.startswith('head.'))
  assert peft.count(variables['params'], mask) == expected


# Trainable parameters of ViT-B/16 (224 px) with a 100-class head, head included, as
# counted on the authors' models in torch (sum of numel over requires_grad parameters
# under their freezing rules): SSF's VisionTransformer(tuning_mode='ssf') 205,824 + head;
# Adapter+'s VisionTransformerAdapter with adapter_plus.yaml (dim 8) 165,984 + head;
# BitFit (VPT's tinytl-bias on timm's ViT-B/16) 102,912 + head. Head: 768 * 100 + 100.
OFFICIAL_COUNTS = {'ssf': 205_824 + 76_900, 'adapter_plus': 165_984 + 76_900,
                   'bitfit': 102_912 + 76_900}


@pytest.mark.parametrize('method', sorted(OFFICIAL_COUNTS))
def test_vit_b16_trains_the_official_parameter_count(method):
  model_cfg = models.preset('vit_b16', num_classes=100, tuning=method)
  params = jax.eval_shape(models.build(model_cfg).init, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)))['params']
  mask = peft.trainable_mask(params, model_cfg)
  assert peft.count(params, mask) == OFFICIAL_COUNTS[method]
  added = {k for k in flax.traverse_util.flatten_dict(params, sep='/')} - {
      k for k in flax.traverse_util.flatten_dict(jax.eval_shape(
          models.build(models.preset('vit_b16', num_classes=100)).init, jax.random.key(0),
          jnp.zeros((1, 224, 224, 3)))['params'], sep='/')}
  assert bool(added) == (method != 'bitfit')  # BitFit adds no parameter


def test_ssf_and_adapter_plus_initialise_as_their_authors_code():
  """SSF: scale N(1, .02), shift N(0, .02). Adapter+: Houlsby kernels N(0, .01) cut at
  +-.02, zero biases, channel scale 1 (so the branch starts small, not zero)."""
  from adaptformer_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jnp.ones((1, 4, 768))
  ssf = layers.SSF().init(jax.random.key(0), jnp.ones((1, 4096)))['params']
  np.testing.assert_allclose([ssf['scale'].mean(), ssf['scale'].std()], [1, .02], atol=2e-3)
  np.testing.assert_allclose([ssf['shift'].mean(), ssf['shift'].std()], [0, .02], atol=2e-3)
  plus = layers.AdapterPlus(8).init(jax.random.key(1), x)['params']
  for kernel in (plus['down']['kernel'], plus['up']['kernel']):
    # torch trunc_normal_(std=.01, a=-.02, b=.02) has std .01 * 0.8796 after the cut.
    np.testing.assert_allclose(kernel.std(), .01 * 0.8796, rtol=0.05)
    assert np.abs(kernel).max() <= .02
  assert not plus['down']['bias'].any() and not plus['up']['bias'].any()
  np.testing.assert_array_equal(plus['scale'], np.ones(768))
