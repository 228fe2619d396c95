"""The video ViT against an independent PyTorch port of the official video AdaptFormer forward.

Weights reach Flax through `pretrained.load`, so these also test the official
video layout (Conv3d tubelets, q_proj/k_proj/v_proj + q_bias/v_bias, gamma_1/2).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptformer_jax import models
from adaptformer_jax import pretrained
from adaptformer_jax.errors import UserError
from conftest import tiny_video_cfg

CLIPS = np.random.RandomState(0).standard_normal((2, 4, 32, 32, 3)).astype(np.float32)

CASES = {
    'parallel': {},
    'sequential_ln_in': dict(adapter=dict(placement='sequential', layernorm='in')),
    'learnable_scale_bn_head': dict(adapter=dict(scale='learnable'), head='bn_linear'),
    'layerscale': dict(layerscale=0.1),
    'vpt_deep': dict(tuning='adaptformer+vpt_deep', vpt=dict(num_tokens=2)),
    'tubelet_1_eight_frames': dict(tubelet=1, num_frames=8),
}


@pytest.fixture(name='ref')
def _ref():
  pytest.importorskip('torch')
  from references import torch_video_reference  # pylint: disable=g-import-not-at-top
  return torch_video_reference


def nan_variables(cfg):
  """A full variable tree of NaNs: any leaf the checkpoint fails to fill poisons the logits."""
  shapes = jax.eval_shape(models.build(cfg).init, jax.random.key(0),
                          jnp.zeros((1, *models.input_shape(cfg))))
  return jax.tree.map(lambda s: np.full(s.shape, np.nan, s.dtype), shapes)


def clips(cfg):
  return CLIPS[:, :cfg.num_frames] if cfg.num_frames <= 4 else np.concatenate([CLIPS] * 2, 1)


def relative_error(ours, theirs):
  return np.abs(ours - theirs).max() / np.abs(theirs).max()


@pytest.mark.parametrize('case', CASES)
def test_logits_match_official_video_forward(case, ref, tmp_path):
  cfg = tiny_video_cfg(**CASES[case])
  torch_model = ref.randomized(cfg, seed=len(case))
  path = tmp_path / 'official_video.pth'
  ref.torch.save({'model': torch_model.state_dict()}, path)
  variables = pretrained.load(path, cfg, init_variables=nan_variables(cfg))
  x = clips(cfg)
  ours = np.asarray(models.build(cfg).apply(variables, x, train=False))
  assert relative_error(ours, ref.logits(torch_model, x)) <= 1e-5


def test_sinusoid_table_is_videomaes(ref):
  from adaptformer_jax.models import vit  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(vit.sinusoid_table(50, 48),
                                ref.get_sinusoid_encoding_table(50, 48).numpy())


def backbone_nan(variables):
  """`variables` with every backbone leaf NaN: only adapters, head and fc_norm survive."""
  def poison(path, x):
    keep = any(getattr(k, 'key', None) in ('adapter', 'head', 'fc_norm') for k in path)
    return x if keep else np.full(x.shape, np.nan, x.dtype)
  return jax.tree_util.tree_map_with_path(poison, variables)


def test_videomae_pretraining_file_loads_exactly(ref, tmp_path):
  """encoder. keys, decoder dropped, encoder.norm dropped: fc_norm starts fresh (identity)."""
  cfg = tiny_video_cfg()
  torch_model = ref.randomized(cfg, seed=3)
  with ref.torch.no_grad():
    torch_model.fc_norm.weight.fill_(1.0)
    torch_model.fc_norm.bias.zero_()
  # Adapters and head come from init_variables, as they would from a fresh init.
  ref.torch.save(torch_model.state_dict(), tmp_path / 'official.pth')
  init = backbone_nan(pretrained.load(tmp_path / 'official.pth', cfg,
                                      init_variables=nan_variables(cfg)))
  init['params']['fc_norm'] = jax.tree.map(
      np.asarray, models.build(cfg).init(jax.random.key(0), CLIPS[:1])['params']['fc_norm'])
  ref.torch.save(ref.videomae_layout(torch_model.state_dict(), pretrain=True),
                 tmp_path / 'pretrain_videomae.pth')
  variables = pretrained.load(tmp_path / 'pretrain_videomae.pth', cfg, init_variables=init)
  ours = np.asarray(models.build(cfg).apply(variables, CLIPS))
  assert relative_error(ours, ref.logits(torch_model, CLIPS)) <= 1e-5


def test_videomae_finetuned_file_under_module_loads_exactly(ref, tmp_path):
  cfg = tiny_video_cfg(tuning='linear')
  torch_model = ref.randomized(cfg, seed=4)
  path = tmp_path / 'finetuned_videomae.pth'
  ref.torch.save(ref.videomae_layout(torch_model.state_dict(), pretrain=False), path)
  variables = pretrained.load(path, cfg, init_variables=nan_variables(cfg))
  ours = np.asarray(models.build(cfg).apply(variables, CLIPS))
  assert relative_error(ours, ref.logits(torch_model, CLIPS)) <= 1e-5
  # The same file into 8-frame clips: the sinusoid table is recomputed, nothing to resample.
  longer = tiny_video_cfg(tuning='linear', num_frames=8)
  moved = pretrained.load(path, longer, init_variables=nan_variables(longer))
  jax.tree.map(np.testing.assert_array_equal, moved, variables)


def test_learned_video_table_is_resampled_in_time_and_space(ref, tmp_path):
  cfg = tiny_video_cfg(tuning='linear', posemb='learned', num_frames=8, image_size=64)
  state = ref.videomae_layout(ref.randomized(tiny_video_cfg(tuning='linear'), seed=5)
                              .state_dict(), pretrain=False)['module']
  # A checkpoint table on a 2 x 4 x 4 grid that changes only along time.
  per_frame = ref.torch.randn(2, 1, 1, 32).expand(2, 4, 4, 32)
  state['pos_embed'] = per_frame.reshape(1, 32, 32)
  ref.torch.save(state, tmp_path / 'learned.pth')
  table = pretrained.load(tmp_path / 'learned.pth', cfg)['params']['pos_embedding']
  table = table.reshape(4, 8, 8, 32)  # the model grid: 8 frames / 2, 64 px / 8
  np.testing.assert_allclose(table, table[:, :1, :1].repeat(8, 1).repeat(8, 2), atol=1e-6)
  first, last = per_frame[0, 0, 0].numpy(), per_frame[1, 0, 0].numpy()
  np.testing.assert_allclose(table[0, 0, 0], first, atol=1e-6)  # edges kept, as
  np.testing.assert_allclose(table[-1, 0, 0], last, atol=1e-6)  # half-pixel resizing does
  np.testing.assert_allclose(table[1, 0, 0], 0.75 * first + 0.25 * last, atol=1e-6)


@pytest.mark.parametrize('model,message', [
    (dict(preset='vit_ti16'), r"patch_embed='tubelet'.*qkv_bias='qv'|qkv_bias='qv'.*tubelet"),
    (dict(qkv_bias='qkv'), r"set model\.qkv_bias='qv'"),
    (dict(tubelet=1), r"model\.tubelet = its first size"),
])
def test_video_checkpoint_into_the_wrong_model_is_one_clear_error(model, message, ref, tmp_path):
  path = tmp_path / 'pretrain_videomae.pth'
  ref.torch.save(ref.videomae_layout(ref.randomized(tiny_video_cfg(), seed=6).state_dict(),
                                     pretrain=True), path)
  model = dict(model)
  if model.pop('preset', None):
    from conftest import tiny_cfg  # pylint: disable=g-import-not-at-top
    cfg = tiny_cfg(**model)
  else:
    cfg = tiny_video_cfg(**model)
  with pytest.raises(UserError, match=message) as e:
    pretrained.load(path, cfg)
  assert '\n' not in str(e.value)
