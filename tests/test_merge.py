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


@pytest.mark.parametrize('method', ['lora', 'linear', 'full', 'ssf', 'bitfit', 'ssf+lora'])
def test_merged_model_is_a_plain_vit_with_the_same_logits(method):
  cfg = tiny_cfg(tuning=method, num_classes=5)
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  merged, unmerged, without_method = merged_and_unmerged_logits(cfg, images)
  np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5 * np.abs(unmerged).max())
  if method in ('lora', 'ssf', 'ssf+lora'):  # the method's contribution is not negligible, so merging mattered
    assert np.abs(without_method - unmerged).max() > 1e-2 * np.abs(unmerged).max()


@pytest.mark.parametrize('method', sorted(merge.NOT_LINEAR))
def test_a_method_that_is_not_linear_is_refused_saying_why(method):
  cfg = tiny_cfg(tuning=method)
  with pytest.raises(ConfigError, match=f"tuning='{method}' cannot be merged.*not|{method}"):
    merge.merge_tuning({'params': {}}, cfg)


def test_every_method_is_mergeable_or_says_why_not():
  assert set(tuning.METHODS) == set(merge.RULES) | set(merge.NOT_LINEAR)
  assert not set(merge.RULES) & set(merge.NOT_LINEAR)


def test_ssf_without_a_final_norm_or_a_fused_qkv_bias_is_refused_saying_why():
  for overrides in (dict(pool='gap'), dict(qkv_bias='qv')):
    cfg = tiny_cfg(tuning='ssf', **overrides)
    variables = models.build(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3)))
    with pytest.raises(ConfigError, match="fc_norm would normalise.*this model has"):
      merge.merge_tuning(variables, cfg)
