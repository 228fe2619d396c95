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
  import torch_video_reference  # pylint: disable=g-import-not-at-top
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
