"""Our Flax ViT against an independent PyTorch port of the official AdaptFormer forward.

The torch weights reach Flax through `pretrained.load`, so these also test the
official-layout converter. The step-0 test needs no torch.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptformer_jax import models
from adaptformer_jax import pretrained
from conftest import IMAGES
from conftest import tiny_cfg

CASES = {
    'parallel': {},
    'learnable_scale': dict(adapter=dict(scale='learnable')),
    'ln_in': dict(adapter=dict(layernorm='in')),
    'ln_out_learnable_scale': dict(adapter=dict(layernorm='out', scale='learnable')),
    'sequential': dict(adapter=dict(placement='sequential')),
    'sequential_ln_in': dict(adapter=dict(placement='sequential', layernorm='in', scale=0.5)),
    'vpt_deep': dict(tuning='adaptformer+vpt_deep', vpt=dict(num_tokens=3)),
    'gap': dict(pool='gap'),
    'bn_linear': dict(head='bn_linear'),
    'linear_probe_gap_bn': dict(tuning='linear', pool='gap', head='bn_linear'),
}


def nan_variables(cfg):
  """A full variable tree of NaNs: any leaf the checkpoint fails to fill poisons the logits."""
  shapes = jax.eval_shape(models.build(cfg).init, jax.random.key(0), IMAGES[:1])
  return jax.tree.map(lambda s: np.full(s.shape, np.nan, s.dtype), shapes)


@pytest.mark.parametrize('case', CASES)
def test_logits_match_official_forward(case, ref, tmp_path):
  cfg = tiny_cfg(**CASES[case])
  torch_model = ref.randomized(cfg, seed=len(case))
  path = tmp_path / 'official.pth'
  ref.torch.save(torch_model.state_dict(), path)
  variables = pretrained.load(path, cfg, init_variables=nan_variables(cfg))
  ours = models.build(cfg).apply(variables, IMAGES)
  np.testing.assert_allclose(ours, ref.logits(torch_model, IMAGES), atol=1e-5, rtol=0)


@pytest.mark.parametrize('adapter', [
    {}, dict(layernorm='in'),
    dict(placement='sequential', layernorm='out', scale='learnable')])
def test_fresh_adapters_leave_the_backbone_exact(adapter):
  """Zero-initialised up projections: step 0 of AdaptFormer is the frozen model, bit for bit."""
  cfg = tiny_cfg(adapter=adapter)
  variables = models.build(cfg).init(jax.random.key(1), jnp.asarray(IMAGES[:1]))
  backbone = jax.tree.map(lambda x: x, variables['params'])
  for i in range(cfg.depth):
    del backbone[f'block{i}']['adapter']
  linear = models.build(tiny_cfg(tuning='linear')).apply({'params': backbone}, IMAGES)
  np.testing.assert_array_equal(models.build(cfg).apply(variables, IMAGES), linear)
