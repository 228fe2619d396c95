"""Model presets, parameter counts, tuning variants and config validation."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptformer_jax import models
from adaptformer_jax import peft
from adaptformer_jax.models import attention as attention_lib
from adaptformer_jax.models import presets
from adaptformer_jax.models import vit
from conftest import shipped_config
from conftest import tiny_cfg
from conftest import tiny_video_cfg


def shapes(cfg):
  model = models.build(cfg)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *models.input_shape(cfg)))))


def test_vit_b16_adaptformer_trains_the_papers_parameter_count():
  cfg = models.preset('vit_b16', num_classes=100, head='bn_linear', tuning='adaptformer')
  params = shapes(cfg)['params']
  mask = peft.trainable_mask(params, cfg)
  adapters = sum(peft.count(params[f'block{i}']['adapter']) for i in range(12))
  assert adapters == 1_189_632
  assert peft.count(params['head']) == 76_900
  assert peft.count(params, mask) == 1_266_532


# timm's exact counts at 224 px with a 1000-class head.
TIMM_TOTALS = {
    'vit_ti16': 5_717_416, 'vit_s16': 22_050_664, 'vit_b16': 86_567_656,
    'vit_l16': 304_326_632, 'vit_h14': 632_045_800,
}
# "Scaling Vision Transformers" Table 2: backbone parameters (no head), millions.
SCALING_PAPER_MILLIONS = {'vit_g14': 1011, 'vit_G14': 1843}


@pytest.mark.parametrize('name', sorted(n for n in models.PRESETS if presets.family(n) is None))
def test_preset_totals_match_published(name):
  params = shapes(models.preset(name, tuning='full'))['params']
  if name in TIMM_TOTALS:
    assert peft.count(params) == TIMM_TOTALS[name]
  else:
    backbone = peft.count(params) - peft.count(params['head'])
    assert round(backbone / 1e6) == SCALING_PAPER_MILLIONS[name]


def test_videomae_b16_adaptformer_ssv2_count_against_the_arithmetic():
  cfg = models.preset('videomae_b16', num_classes=174, tuning='adaptformer')
  params = shapes(cfg)['params']
  d, bottleneck, depth = 768, 64, 12
  adapters = depth * ((d * bottleneck + bottleneck) + (bottleneck * d + d))
  head = d * 174 + 174
  assert adapters == 1_189_632  # the paper's "1.19 M"
  assert peft.count(params, peft.trainable_mask(params, cfg)) == adapters + head == 1_323_438
  # The backbone is timm's ViT-B/16 less its class token, learned position table
  # (197 rows) and k biases, with a patch kernel twice as deep (2-frame tubelets).
  vit_b16_backbone = TIMM_TOTALS['vit_b16'] - (d * 1000 + 1000)
  videomae_backbone = vit_b16_backbone - d - 197 * d - depth * d + 16 * 16 * 3 * d
  assert peft.count(params) == videomae_backbone + adapters + head


def test_video_model_shapes_and_fixed_position_table():
  cfg = tiny_video_cfg()
  assert models.input_shape(cfg) == (4, 32, 32, 3)
  model = models.build(cfg)
  clips = jax.random.normal(jax.random.key(1), (3, 4, 32, 32, 3))
  variables = model.init(jax.random.key(0), clips)
  params = variables['params']
  assert params['embedding']['kernel'].shape == (2, 8, 8, 3, 32)
  assert 'pos_embedding' not in params and 'cls' not in params  # sincos, no class token
  assert set(params['block0']['attn']) == {'qkv', 'q_bias', 'v_bias', 'out'}
  assert 'bias' not in params['block0']['attn']['qkv']
  assert model.apply(variables, clips).shape == (3, 5)
  # Another clip length: the same parameters, a recomputed table.
  longer = models.build(tiny_video_cfg(num_frames=8))
  assert longer.apply(variables, jnp.concatenate([clips, clips], 1)).shape == (3, 5)


def test_fresh_video_adapters_leave_the_backbone_exact():
  cfg = tiny_video_cfg()
  clips = jax.random.normal(jax.random.key(1), (2, 4, 32, 32, 3))
  variables = models.build(cfg).init(jax.random.key(0), clips)
  backbone = jax.tree.map(lambda x: x, variables['params'])
  for i in range(cfg.depth):
    del backbone[f'block{i}']['adapter']
  linear = models.build(tiny_video_cfg(tuning='linear')).apply({'params': backbone}, clips)
  np.testing.assert_array_equal(models.build(cfg).apply(variables, clips), linear)


def test_official_video_adapter_init_is_a_nonzero_normal():
  cfg = tiny_video_cfg(width=64, adapter=dict(init='trunc_normal', bottleneck=64))
  params = models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 4, 32, 32, 3)))['params']
  adapter = params['block0']['adapter']
  for proj in ('down', 'up'):
    kernel = np.asarray(adapter[proj]['kernel'])
    assert abs(kernel.std() - 0.02) < 0.002 and np.abs(kernel).max() > 0.04  # not cut at 2σ
    assert not np.any(adapter[proj]['bias'])
  assert cfg.adapter.dropout == 0.0  # the video blocks' drop rate, not the image 0.1


def test_layerscale_and_qkv_bias_options_shape_the_tree():
  params = shapes(tiny_cfg(layerscale=1e-5, qkv_bias='none'))['params']['block0']
  assert params['ls1'].shape == params['ls2'].shape == (32,)
  assert set(params['attn']['qkv']) == {'kernel'}
  assert 'ls1' not in shapes(tiny_cfg())['params']['block0']


@pytest.mark.parametrize('tuning,pool,head', [
    ('adaptformer', 'cls', 'linear'),
    ('adaptformer+vpt_deep', 'gap', 'bn_linear'),
    ('vpt_shallow+lora', 'cls', 'bn_linear'),
    ('full', 'gap', 'linear'),
])
def test_forward_shapes_and_variants(tuning, pool, head):
  cfg = tiny_cfg(tuning=tuning, pool=pool, head=head)
  model = models.build(cfg)
  images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  variables = model.init(jax.random.key(0), images)
  logits = model.apply(variables, images)
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  assert ('batch_stats' in variables) == (head == 'bn_linear')
  names = tuning.split('+')
  params = variables['params']
  assert ('prompts' in params) == any(m.startswith('vpt') for m in names)
  assert ('adapter' in params['block0']) == ('adaptformer' in names)
  assert ('lora_q' in params['block0']['attn']) == ('lora' in names)


def test_vpt_prompt_shapes():
  deep = shapes(tiny_cfg(tuning='vpt_deep', vpt=dict(num_tokens=3)))['params']
  shallow = shapes(tiny_cfg(tuning='vpt_shallow', vpt=dict(num_tokens=3)))['params']
  assert deep['prompts'].shape == (2, 3, 32)
  assert shallow['prompts'].shape == (1, 3, 32)


def test_prompts_change_the_output():
  cfg = tiny_cfg(tuning='vpt_deep', vpt=dict(num_tokens=2))
  model = models.build(cfg)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), images)
  moved = jax.tree.map(lambda x: x, variables)
  moved['params']['prompts'] = variables['params']['prompts'] + 1.0
  assert not np.allclose(model.apply(variables, images), model.apply(moved, images))


def test_batchnorm_head_updates_running_stats_in_training():
  cfg = tiny_cfg(head='bn_linear')
  model = models.build(cfg)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), images)
  _, updates = model.apply(variables, images, train=True, mutable=['batch_stats'],
                           rngs={'dropout': jax.random.key(2)})
  before = variables['batch_stats']['head']['bn']['mean']
  after = updates['batch_stats']['head']['bn']['mean']
  assert not np.allclose(before, after)


@pytest.mark.parametrize('remat', ['block', 'dots'])
def test_remat_gives_the_same_logits_and_gradients(remat):
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  plain, rematted = models.build(tiny_cfg()), models.build(tiny_cfg(remat=remat))
  variables = plain.init(jax.random.key(0), images)
  loss = lambda m: lambda p: m.apply({'params': p}, images).sum()
  np.testing.assert_allclose(plain.apply(variables, images),
                             rematted.apply(variables, images), atol=1e-6)
  g1 = jax.grad(loss(plain))(variables['params'])
  g2 = jax.grad(loss(rematted))(variables['params'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g2)


@pytest.mark.parametrize('value', ['dot', 'True'])  # 'True': what --config.model.remat=True gives
def test_bad_remat_names_the_choices(value):
  with pytest.raises(ValueError, match=rf"model\.remat: must be one of 'none', 'block', 'dots', "
                     rf"got '{value}'"):
    tiny_cfg(remat=value)


def test_bfloat16_compute_keeps_float32_params():
  cfg = tiny_cfg(dtype='bfloat16')
  model = models.build(cfg)
  images = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  assert model.apply(variables, images).dtype == jnp.float32


@pytest.mark.parametrize('overrides,field', [
    (dict(image_size=30), 'model.image_size'),
    (dict(tuning='adaptformr'), 'model.tuning'),
    (dict(adapter=dict(bottleneck=0)), 'model.adapter.bottleneck'),
    (dict(num_heads=3), 'model.num_heads'),
    (dict(pool='max'), 'model.pool'),
    (dict(adapter=dict(layernorm='pre')), 'model.adapter.layernorm'),
    (dict(adapter=dict(scale='big')), 'model.adapter.scale'),
    (dict(adapter=dict(init='zero')), 'model.adapter.init'),
    (dict(qkv_bias='k'), 'model.qkv_bias'),
    (dict(posemb='rope'), 'model.posemb'),
    (dict(class_token=False), 'model.pool'),
    (dict(num_frames=8), 'model.num_frames'),
    (dict(layerscale=-1.0), 'model.layerscale'),
])
def test_bad_configs_raise_one_clear_value_error(overrides, field):
  with pytest.raises(ValueError, match=field.replace('.', r'\.')) as e:
    tiny_cfg(**overrides)
  assert '\n' not in str(e.value)


def test_video_clip_length_must_fit_the_tubelet():
  with pytest.raises(ValueError, match=r'model\.num_frames: 5 is not a positive multiple '
                     r'of model\.tubelet 2'):
    tiny_video_cfg(num_frames=5)


def test_unknown_preset_suggests_the_close_name():
  with pytest.raises(ValueError, match=r"model\.name.*did you mean 'vit_b16'.*allowed"):
    models.preset('vit_b61')


def test_unknown_tuning_names_the_allowed_methods():
  with pytest.raises(ValueError, match="did you mean 'adaptformer'.*allowed: full, linear"):
    tiny_cfg(tuning='adaptformr')


BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)  # 2**-7: the spacing of bf16 numbers at 1


def reference_attention(q, k, v, heads, pad=0):
  """Softmax attention written out in float64 NumPy: softmax(q.k / sqrt(d)) v per head of
  (B, N, heads * d) inputs, the last `pad` keys masked out."""
  q, k, v = (np.asarray(t, np.float64).reshape(*t.shape[:2], heads, -1) for t in (q, k, v))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  if pad:
    logits[..., -pad:] = -np.inf
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('bhqk,bkhd->bqhd', weights, v)
  return out.reshape(*out.shape[:2], -1)


@pytest.mark.parametrize('pad', [0, 1])
@pytest.mark.parametrize('attention', ['xla', 'auto'])
def test_attention_matches_a_plain_softmax_reference(attention, pad):
  """The model's attention (2 heads of 16, 17 tokens, `pad` of them masked padding)
  against reference_attention: f32 to float rounding, bf16 to bf16's."""
  cfg = tiny_cfg(attention=attention)
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 17, 32)) for i in range(3))
  real = slice(0, 17 - pad)  # the padding's own outputs are never read
  got = attention_lib.multi_head_attention(q, k, v, cfg, jnp.float32, pad)
  np.testing.assert_allclose(got[:, real], reference_attention(q, k, v, 2, pad)[:, real],
                             rtol=0, atol=1e-5)
  # bf16 inputs (the reference takes the same rounded values): the outputs are weighted
  # means of v, so their error is a few bf16 roundings of numbers of v's scale. Observed
  # 0.008 (about eps * max|v| / 4); a wrong scale, mask or head split errs by > 0.1.
  q, k, v = (t.astype(jnp.bfloat16) for t in (q, k, v))
  got = attention_lib.multi_head_attention(q, k, v, cfg, jnp.bfloat16, pad)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(got[:, real]),
                             reference_attention(q, k, v, 2, pad)[:, real],
                             rtol=0, atol=BF16_EPS * float(jnp.abs(v).max()))


def test_auto_attention_is_xla_on_cpu_and_bfloat16_stays_near_float32():
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  xla = models.build(tiny_cfg(dtype='bfloat16', attention='xla'))
  auto = models.build(tiny_cfg(dtype='bfloat16', attention='auto'))
  f32 = models.build(tiny_cfg(attention='xla'))
  variables = xla.init(jax.random.key(0), images)
  logits = xla.apply(variables, images)
  if jax.default_backend() == 'cpu':  # no cuDNN: 'auto' is XLA's attention, the same program
    assert attention_lib.attention_implementation('auto', jnp.bfloat16, 16, (17, 17)) == 'xla'
    np.testing.assert_array_equal(auto.apply(variables, images), logits)
  # The bf16 model is the f32 one up to bf16 rounding: within 2 eps of the logits' scale
  # (0.09 here; observed 0.7 eps). The old check, atol 5e-2, was half that scale.
  want = f32.apply(variables, images)
  scale = float(np.abs(want).max())
  assert scale > 0.01  # logits that are not all ~0 (a zero head would pass anything)
  np.testing.assert_allclose(logits, want, rtol=0, atol=2 * BF16_EPS * scale)


@pytest.mark.parametrize('platform,kind,dtype,head_dim,lengths,expected', [
    ('gpu', 'NVIDIA H100 80GB HBM3', 'bfloat16', 64, (196, 196), 'cudnn'),
    # ViT-B/16's 197 tokens: jax 0.11.2 on an H100 could not differentiate cuDNN attention.
    ('gpu', 'NVIDIA H100 80GB HBM3', 'bfloat16', 64, (197, 197), 'xla'),
    ('gpu', 'NVIDIA H100 80GB HBM3', 'float32', 64, (196, 196), 'xla'),  # bf16/f16 kernel
    ('gpu', 'NVIDIA A100-SXM4-80GB', 'bfloat16', 12, (196, 196), 'xla'),  # head dim % 8
    ('gpu', 'AMD Instinct MI300X', 'bfloat16', 64, (196, 196), 'xla'),
    ('cpu', 'cpu', 'bfloat16', 64, (196, 196), 'xla'),
])
def test_auto_attention_picks_cudnn_only_where_it_applies(platform, kind, dtype, head_dim,
                                                          lengths, expected):
  device = types.SimpleNamespace(platform=platform, device_kind=kind)
  assert attention_lib.attention_implementation('auto', dtype, head_dim, lengths, device) == expected
  assert attention_lib.attention_implementation('xla', dtype, head_dim, lengths, device) == 'xla'


def test_explicit_cudnn_takes_odd_lengths_padded_and_padding_changes_nothing():
  h100 = types.SimpleNamespace(platform='gpu', device_kind='NVIDIA H100 80GB HBM3')
  assert attention_lib.attention_implementation('cudnn', 'bfloat16', 64, (197, 197), h100) == 'cudnn'
  # The padding and its masks, run through XLA here (cuDNN needs a GPU): odd query
  # and key lengths give the unpadded attention and its gradients.
  q, k, v = (jax.random.normal(jax.random.key(i), (2, n, 3, 8)) for i, n in enumerate((5, 7, 7)))
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation='xla')
  padded = lambda q, k, v: attention_lib.padded_attention(q, k, v, 'xla')
  # One compile each (op-by-op autodiff compiles every primitive: 10 s).
  value_and_grads = lambda f: jax.jit(jax.value_and_grad(lambda *a: (f(*a) ** 2).sum(),
                                                         (0, 1, 2)))
  np.testing.assert_allclose(jax.jit(padded)(q, k, v), plain(q, k, v), atol=1e-6)
  (got_loss, got), (want_loss, want) = (value_and_grads(f)(q, k, v) for f in (padded, plain))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_blocks_carry_one_pad_token_only_where_cudnn_then_takes_the_count():
  h100 = types.SimpleNamespace(platform='gpu', device_kind='NVIDIA H100 80GB HBM3')
  cpu = types.SimpleNamespace(platform='cpu', device_kind='cpu')
  auto = tiny_cfg(dtype='bfloat16', attention='auto')
  assert attention_lib.pad_tokens(auto, 'bfloat16', 197, h100) == 1  # ViT-B/16: 198 on cuDNN
  assert attention_lib.pad_tokens(auto, 'bfloat16', 196, h100) == 0
  assert attention_lib.pad_tokens(auto, 'bfloat16', 197, cpu) == 0
  assert attention_lib.pad_tokens(auto, 'float32', 197, h100) == 0  # f32: XLA attention, no pad
  assert attention_lib.pad_tokens(tiny_cfg(dtype='bfloat16', attention='xla'), 'bfloat16', 197, h100) == 0


@pytest.mark.parametrize('tuning,tokens', [('adaptformer', 17), ('adaptformer+vpt_deep', 19),
                                           ('vpt_shallow', 19)])
def test_a_padded_stack_gives_the_unpadded_logits_and_gradients(monkeypatch, tuning, tokens):
  """The pad token goes behind the patches (prompts go in front), is masked out as a key
  and cut off before pooling: through XLA's masks here, cuDNN's on a GPU."""
  model = models.build(tiny_cfg(tuning=tuning, vpt=dict(num_tokens=2)))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), images)
  loss = lambda params: (model.apply({**variables, 'params': params}, images) ** 2).sum()
  want_loss, want = jax.jit(jax.value_and_grad(loss))(variables['params'])
  seen = []
  monkeypatch.setattr(attention_lib, 'pad_tokens', lambda cfg, dtype, n: seen.append(n) or n % 2)
  got_loss, got = jax.jit(jax.value_and_grad(loss))(variables['params'])
  assert seen == [tokens]  # odd: one pad token was carried
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), got, want)


@pytest.mark.parametrize('patch,shape', [((8, 8), (2, 32, 32, 3)),
                                         ((8, 8), (2, 36, 33, 3)),  # VALID drops the rest
                                         ((2, 8, 8), (2, 4, 16, 24, 3))])  # a video tubelet
def test_patch_embedding_is_the_strided_convolution(patch, shape):
  images = jax.random.normal(jax.random.key(0), shape)
  conv = nn.Conv(16, patch, strides=patch, padding='VALID', kernel_init=vit.dense_init)
  ours = vit.PatchEmbedding(16, patch, jnp.float32)
  variables = conv.init(jax.random.key(1), images)
  jax.tree.map(np.testing.assert_array_equal, variables,
               ours.init(jax.random.key(1), images))  # the same parameters, initialised alike
  variables = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), a.shape), variables)
  want = conv.apply(variables, images)
  np.testing.assert_allclose(ours.apply(variables, images),
                             want.reshape(shape[0], -1, 16), rtol=1e-5, atol=1e-5)


def test_cudnn_attention_where_it_cannot_run_is_a_clear_config_error():
  images = jnp.ones((1, 32, 32, 3))
  model = models.build(tiny_cfg(dtype='bfloat16', attention='cudnn'))
  with pytest.raises(ValueError, match=r"model\.attention='cudnn' needs an NVIDIA GPU.*"
                                       r"use 'auto' or 'xla'"):
    model.init(jax.random.key(0), images)
  with pytest.raises(ValueError, match=r"model\.attention: must be one of .*, got 'flash'"):
    tiny_cfg(attention='flash')


@pytest.mark.parametrize('config_name,num_classes', [('ssv2', 174), ('hmdb51', 51),
                                                     ('ucf101', 101)])
def test_official_video_configs_train_adapters_head_and_fc_norm(config_name, num_classes):
  config = shipped_config(config_name, 'adaptformer')
  assert models.input_shape(config.model) == (8, 224, 224, 3)
  if config_name == 'ucf101':  # tfds, its own class names
    assert (config.data.name, config.data.train_split) == ('ucf101/ucf101_1_256', 'train')
  else:
    assert (config.data.name, config.data.num_classes) == ('video_list', num_classes)
  assert (config.data.eval_clips, config.data.eval_crops) == (4, 3)  # main_video.py's test
  params = shapes(config.model)['params']
  d = 768
  # The official script also trains fc_norm (fresh in a VideoMAE pre-training file).
  assert peft.count(params, peft.trainable_mask(params, config.model)) == (
      1_189_632 + d * num_classes + num_classes + 2 * d)
