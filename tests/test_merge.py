"""models/merge: linear methods folded into plain ViT weights give the same logits."""
import json

import flax.traverse_util
import jax
import ml_collections
import numpy as np
import pytest

import adaptformer_jax
from adaptformer_jax import jobs
from adaptformer_jax import models
from adaptformer_jax import pretrained
from adaptformer_jax import runtime
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.errors import UserError
from adaptformer_jax.models import merge
from adaptformer_jax.models import tuning
from adaptformer_jax.weights import exports
from adaptformer_jax.weights import timm_layout
from conftest import tiny_cfg
from conftest import tiny_run_config


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
  plain_vars, plain_cfg = adaptformer_jax.merge_tuning(variables, cfg)
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
    # Every fold order at once: LoRA and FacT into kernels, SSF, then RepAdapter.
    'lora+fact_tk+ssf+repadapter': dict(repadapter=dict(scale=0.5), fact=dict(scale=1.5)),
}


@pytest.mark.parametrize('method', ['lora', 'linear', 'full', 'ssf', 'bitfit', 'ssf+lora',
                                    *OPTIONS])
def test_merged_model_is_a_plain_vit_with_the_same_logits(method):
  cfg = tiny_cfg(**{'tuning': method, 'num_classes': 5, **OPTIONS.get(method, {})})
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  merged, unmerged, without_method = merged_and_unmerged_logits(cfg, images)
  np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5 * np.abs(unmerged).max())
  if method not in ('linear', 'full', 'bitfit'):  # the method's contribution matters
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


@pytest.fixture(scope='module')
def lora_export(tmp_path_factory):
  """A LoRA adapter export with random non-zero LoRA and head leaves, on a seed backbone."""
  config = tiny_run_config('lora')
  run = runtime.Run(config)
  variables = runtime.init_variables(config, run.model, jax.random.key(config.seed))
  noise = randomized(variables, seed=3)
  variables = jax.tree.map(lambda v, n, m: n if m else v, variables,
                           noise, {'params': run.mask})
  out = str(tmp_path_factory.mktemp('lora_export'))
  exports.export_adapters(out, variables, run.mask, config.model, [str(i) for i in range(10)],
                          backbone=exports.backbone_record(config))
  images = np.random.RandomState(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  return config, out, run.model.apply(variables, images), images


def test_merge_job_writes_plain_weights_that_our_loader_and_timm_read_strictly(
    lora_export, tmp_path, capsys):
  config, export_dir, unmerged, images = lora_export
  written = jobs.merge(config, None, str(tmp_path), adapters=export_dir)
  assert written == sorted([jobs.MERGED_WEIGHTS, jobs.MERGED_CONFIG, jobs.TIMM_WEIGHTS,
                            jobs.TIMM_CONFIG])
  record = json.loads((tmp_path / jobs.MERGED_CONFIG).read_text())
  assert record['merged_from'] == 'lora' and record['model']['tuning'] == 'full'
  plain_cfg = ml_collections.ConfigDict(record['model'])
  ours = pretrained.load(tmp_path / jobs.MERGED_WEIGHTS, plain_cfg)
  tol = dict(rtol=1e-5, atol=1e-5 * np.abs(unmerged).max())
  np.testing.assert_allclose(models.build(plain_cfg).apply(ours, images), unmerged, **tol)

  torch = pytest.importorskip('torch')
  from references import timm_reference  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  timm = timm_reference.import_timm()
  kwargs = json.loads((tmp_path / jobs.TIMM_CONFIG).read_text())['kwargs']
  model = timm.models.vision_transformer.VisionTransformer(**kwargs)
  model.load_state_dict(load_file(tmp_path / jobs.TIMM_WEIGHTS), strict=True)
  with torch.no_grad():
    np.testing.assert_allclose(timm_reference.logits(model.eval(), images), unmerged, **tol)


def test_merge_job_refuses_to_write_over_files_without_overwrite(lora_export, tmp_path):
  config, export_dir, _, _ = lora_export
  (tmp_path / jobs.MERGED_WEIGHTS).write_bytes(b'other')
  with pytest.raises(UserError, match='already holds model.safetensors; pass --overwrite'):
    jobs.merge(config, None, str(tmp_path), adapters=export_dir)
  assert (tmp_path / jobs.MERGED_WEIGHTS).read_bytes() == b'other'
  jobs.merge(config, None, str(tmp_path), adapters=export_dir, overwrite=True)
  assert (tmp_path / jobs.MERGED_WEIGHTS).read_bytes() != b'other'


def test_a_model_timm_cannot_hold_is_named():
  cfg = tiny_cfg(tuning='full', head='bn_linear', pool='gap')
  assert timm_layout.unsupported(cfg) == ["model.head='bn_linear' (timm needs 'linear')"]
  with pytest.raises(UserError, match="cannot hold this model: model.head='bn_linear'"):
    timm_layout.state_dict({'params': {}}, cfg)


def test_ssf_without_a_final_norm_or_a_fused_qkv_bias_is_refused_saying_why():
  for overrides in (dict(pool='gap'), dict(qkv_bias='qv')):
    cfg = tiny_cfg(tuning='ssf', **overrides)
    variables = models.build(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3)))
    with pytest.raises(ConfigError, match="fc_norm would normalise.*this model has"):
      merge.merge_tuning(variables, cfg)
