"""models/merge: linear methods folded into plain ViT weights give the same logits."""
import flax.traverse_util
import jax
import numpy as np
import pytest

from adaptformer_jax import models
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.models import merge
from adaptformer_jax.models import tuning
from conftest import tiny_cfg


def randomized(variables, seed=0, std=0.2):
  """Every leaf perturbed: zero-initialised method parameters would merge trivially."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def merged_and_unmerged_logits(cfg, images):
  """(merged logits, unmerged logits, plain-ViT logits of the unmerged backbone leaves)."""
  model = models.build(cfg)
  variables = randomized(model.init(jax.random.key(0), images))
  plain_vars, plain_cfg = merge.merge_tuning(variables, cfg)
  plain = models.build(plain_cfg)
  assert plain_cfg.tuning == 'full'
  assert jax.tree.structure(plain_vars) == jax.tree.structure(
      plain.init(jax.random.key(1), images)), 'method parameters left after merging'
  unmerged = flax.traverse_util.flatten_dict(variables)
  backbone = flax.traverse_util.unflatten_dict(
      {k: unmerged[k] for k in flax.traverse_util.flatten_dict(plain_vars)})
  return (plain.apply(plain_vars, images), model.apply(variables, images),
          plain.apply(backbone, images))


# Scales other than 1 (a misplaced scale is invisible at 1); RepAdapter with q/v biases
# only, 4 groups, before the attention only; RepAdapter folded after FacT's updates.
OPTIONS = {
    'repadapter': dict(repadapter=dict(scale=0.7)),
    'repadapter_attn_qv': dict(tuning='repadapter', qkv_bias='qv',
                               repadapter=dict(scale=3.0, placement='attn', groups=4)),
    'fact_tt': dict(fact=dict(scale=2.5)),
    'fact_tk': dict(fact=dict(scale=0.3, rank=4)),
    'repadapter+fact_tt': dict(repadapter=dict(scale=0.5), fact=dict(scale=1.5)),
}


@pytest.mark.parametrize('method', ['lora', 'linear', 'full', *OPTIONS])
def test_merged_model_is_a_plain_vit_with_the_same_logits(method):
  cfg = tiny_cfg(**{'tuning': method, 'num_classes': 5, **OPTIONS.get(method, {})})
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  merged, unmerged, without_method = merged_and_unmerged_logits(cfg, images)
  np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5 * np.abs(unmerged).max())
  if method not in ('linear', 'full'):  # the method's contribution matters, so merging did
    assert np.abs(without_method - unmerged).max() > 1e-2 * np.abs(unmerged).max()


def test_a_repadapter_bias_without_a_qkv_bias_to_fold_into_is_refused():
  cfg = tiny_cfg(tuning='repadapter', qkv_bias='none')
  variables = randomized(models.build(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3))))
  with pytest.raises(ConfigError, match="qkv_bias='none'.*no qkv bias to fold into"):
    merge.merge_tuning(variables, cfg)


@pytest.mark.parametrize('method', sorted(merge.NOT_LINEAR))
def test_a_method_that_is_not_linear_is_refused_saying_why(method):
  cfg = tiny_cfg(tuning=method)
  with pytest.raises(ConfigError, match=f"tuning='{method}' cannot be merged.*not|{method}"):
    merge.merge_tuning({'params': {}}, cfg)


def test_every_method_is_mergeable_or_says_why_not():
  assert set(tuning.METHODS) == set(merge.RULES) | set(merge.NOT_LINEAR)
  assert not set(merge.RULES) & set(merge.NOT_LINEAR)
