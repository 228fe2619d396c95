"""models/tuning: the table of tuning methods, the parsed `model.tuning`, the trainable
mask and freezing."""
import re

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaptformer_jax import models
from adaptformer_jax import peft
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.models import tuning
from conftest import tiny_cfg


def test_parse_gives_the_layers_each_combination_builds():
  t = tuning.parse(' adaptformer + vpt_deep ')
  assert t.methods == ('adaptformer', 'vpt_deep')
  assert ('adaptformer' in t, 'lora' in t, t.vpt) == (True, False, 'deep')
  assert tuning.parse('lora').vpt is None and tuning.parse('vpt_shallow').vpt == 'shallow'


def test_trainable_rules_are_the_union_in_order():
  assert tuning.parse('adaptformer+lora').trainable == (
      'head/.*', r'block\d+/adapter/.*', r'block\d+/attn/lora_.*')
  assert tuning.parse('full+linear').trainable == ('.*', 'head/.*')


@pytest.mark.parametrize('spec, message', [
    ('vpt_shallow+vpt_deep', "choose one of 'vpt_shallow' and 'vpt_deep'"),
    ('adaptformer+lorra', "unknown method 'lorra' \\(did you mean 'lora'\\?\\)"),
])
def test_bad_combinations_are_config_errors(spec, message):
  with pytest.raises(ConfigError, match=message):
    tuning.parse(spec)


def _variable_paths(spec):
  cfg = tiny_cfg(tuning=spec, head='bn_linear')
  variables = jax.eval_shape(models.build(cfg).init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  return set(flax.traverse_util.flatten_dict(variables, sep='/'))


def test_fresh_on_load_is_exactly_what_the_methods_add_and_the_head():
  """A backbone checkpoint lacks these leaves; every other leaf must come from it."""
  paths = _variable_paths('adaptformer+vpt_deep+lora')
  added = paths - _variable_paths('full')
  head = {p for p in paths if p.split('/')[1] == 'head'}
  assert added and head
  assert {p for p in paths if tuning.FRESH_ON_LOAD.fullmatch(p)} == added | head


def test_every_load_hint_matches_a_parameter_its_method_adds():
  plain = _variable_paths('full')
  added = set().union(*(_variable_paths(m) - plain for m in tuning.METHODS))
  assert tuning.LOAD_HINTS
  for pattern, hint in tuning.LOAD_HINTS:
    assert any(re.fullmatch(pattern, p) for p in added), hint


def test_fresh_labels_name_every_leaf_that_starts_fresh():
  """The load log line names each fresh leaf by what it is, never 'not in the checkpoint'."""
  paths = _variable_paths('adaptformer+vpt_deep+lora')
  fresh = {p for p in paths if tuning.FRESH_ON_LOAD.fullmatch(p)}
  labelled = {p: [label for pattern, label in tuning.FRESH_LABELS if re.fullmatch(pattern, p)]
              for p in fresh}
  assert all(len(labels) == 1 for labels in labelled.values()), labelled
  assert {labels[0] for labels in labelled.values()} == {'adapter', 'VPT prompts', 'LoRA',
                                                         'head'}


def test_peft_is_the_documented_entry_point_of_the_masks():
  assert peft.trainable_mask is tuning.trainable_mask and peft.freeze is tuning.freeze


def init(cfg):
  model = models.build(cfg)
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  return model, model.init(jax.random.key(0), images), images


def trained_paths(cfg):
  _, variables, _ = init(cfg)
  flat = flax.traverse_util.flatten_dict(
      tuning.trainable_mask(variables['params'], cfg), sep='/')
  return {k for k, v in flat.items() if v}


def test_masks_follow_the_tuning_method():
  assert trained_paths(tiny_cfg(tuning='linear')) == {'head/linear/kernel',
                                                     'head/linear/bias'}
  adapt = trained_paths(tiny_cfg(tuning='adaptformer'))
  assert adapt == {'head/linear/kernel', 'head/linear/bias'} | {
      f'block{i}/adapter/{l}/{p}' for i in range(2) for l in ('down', 'up')
      for p in ('kernel', 'bias')}
  combo = trained_paths(tiny_cfg(tuning='adaptformer+vpt_deep+lora'))
  assert 'prompts' in combo and 'block1/attn/lora_v/b' in combo
  assert 'block0/adapter/up/kernel' in combo and 'block0/attn/qkv/kernel' not in combo
  _, variables, _ = init(tiny_cfg(tuning='full'))
  assert len(trained_paths(tiny_cfg(tuning='full'))) == len(
      jax.tree.leaves(variables['params']))


def test_explicit_rules_override_the_method():
  paths = trained_paths(tiny_cfg(trainable=[r'block1/mlp/.*']))
  assert paths == {f'block1/mlp/{l}/{p}' for l in ('fc1', 'fc2') for p in ('kernel', 'bias')}


def test_a_rule_matching_nothing_is_an_error():
  with pytest.raises(ValueError, match=r"model\.trainable.*'blocks/adapter/\.\*'"):
    trained_paths(tiny_cfg(trainable=['blocks/adapter/.*']))


def test_learnable_scale_and_adapter_norm_train():
  paths = trained_paths(tiny_cfg(adapter=dict(scale='learnable', layernorm='in')))
  assert {'block0/adapter/scale', 'block0/adapter/norm/scale'} <= paths


def test_frozen_leaves_stay_bit_identical_and_trainable_leaves_move():
  cfg = tiny_cfg(tuning='adaptformer+vpt_deep', head='bn_linear')
  model, variables, images = init(cfg)
  labels = jnp.arange(8) % 5
  params = variables['params']
  mask = tuning.trainable_mask(params, cfg)
  tx = tuning.freeze(optax.sgd(0.5, momentum=0.9), mask)
  opt_state = tx.init(params)
  # Frozen parameters cost no optimizer state.
  assert tuning.count(opt_state) == tuning.count(params, mask)

  @jax.jit
  def step(params, batch_stats, opt_state, rng):
    def loss_fn(p):
      logits, new_state = model.apply(
          {'params': tuning.stop_frozen_gradients(p, mask), 'batch_stats': batch_stats},
          images, train=True, mutable=['batch_stats'], rngs={'dropout': rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state
    grads, new_state = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return tuning.apply_updates(params, updates, mask), new_state['batch_stats'], opt_state

  new, batch_stats = params, variables['batch_stats']
  for i in range(4):
    new, batch_stats, opt_state = step(new, batch_stats, opt_state, jax.random.key(i))

  flat_old = flax.traverse_util.flatten_dict(params, sep='/')
  flat_new = flax.traverse_util.flatten_dict(new, sep='/')
  flat_mask = flax.traverse_util.flatten_dict(mask, sep='/')
  for path, trains in flat_mask.items():
    old, cur = np.asarray(flat_old[path]), np.asarray(flat_new[path])
    if trains:
      assert not np.array_equal(old, cur), f'{path} did not train'
    else:
      assert old.tobytes() == cur.tobytes(), f'{path} changed while frozen'


def test_frozen_parameters_get_no_weight_gradient_work():
  """The compiled step for adapter tuning must not contain the backbone's weight-gradient matmuls."""
  cfg = tiny_cfg()
  model, variables, images = init(cfg)
  params = variables['params']

  def grads(mask):
    def loss(p):
      return model.apply({'params': tuning.stop_frozen_gradients(p, mask)}, images).sum()
    return jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()['flops']

  all_train = jax.tree.map(lambda _: True, params)
  adapter_flops = grads(tuning.trainable_mask(params, cfg))
  full_flops = grads(all_train)
  assert adapter_flops < 0.8 * full_flops


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_frozen_weights_stored_in_bfloat16_halve_and_keep_the_logits(dtype):
  cfg = tiny_cfg(dtype=dtype)
  model, variables, images = init(cfg)
  params = variables['params']
  mask = tuning.trainable_mask(params, cfg)
  stored = tuning.store_frozen(params, mask, 'bfloat16')
  flat, flat_stored = (flax.traverse_util.flatten_dict(p, sep='/') for p in (params, stored))
  for path, trains in flax.traverse_util.flatten_dict(mask, sep='/').items():
    if trains:
      assert flat_stored[path] is flat[path]
    else:
      assert flat_stored[path].dtype == jnp.bfloat16, path
  frozen_bytes = lambda p: sum(x.nbytes for x, m in zip(jax.tree.leaves(p),
                                                        jax.tree.leaves(mask)) if not m)
  assert frozen_bytes(stored) * 2 == frozen_bytes(params)
  logits = model.apply({'params': params}, images)
  stored_logits = model.apply({'params': stored}, images)
  assert stored_logits.dtype == jnp.float32
  np.testing.assert_allclose(stored_logits, logits, atol=2e-2 * float(np.abs(logits).max()))


def test_ssf_bitfit_and_adapter_plus_train_what_their_authors_train():
  def trained(spec):  # shapes only: the masks need no values
    cfg = tiny_cfg(tuning=spec)
    params = jax.eval_shape(models.build(cfg).init, jax.random.key(0),
                            jnp.zeros((1, 32, 32, 3)))['params']
    flat = flax.traverse_util.flatten_dict(tuning.trainable_mask(params, cfg), sep='/')
    return {k for k, v in flat.items() if v}, set(flat)

  head = {'head/linear/kernel', 'head/linear/bias'}
  sites = ['ssf_embedding', 'ssf_norm'] + [f'block{i}/{s}' for i in range(2) for s in (
      'ssf_norm1', 'ssf_norm2', 'attn/ssf_qkv', 'attn/ssf_out', 'mlp/ssf_fc1', 'mlp/ssf_fc2')]
  assert trained('ssf')[0] == head | {f'{s}/{p}' for s in sites for p in ('scale', 'shift')}
  bitfit, paths = trained('bitfit')
  assert bitfit == head | {p for p in paths if p.endswith('/bias')}
  assert {'embedding/bias', 'block0/norm1/bias', 'block1/attn/qkv/bias', 'norm/bias'} <= paths
  assert trained('adapter_plus')[0] == head | {
      f'block{i}/adapter_plus/{p}' for i in range(2)
      for p in ('down/kernel', 'down/bias', 'up/kernel', 'up/bias', 'scale')}


def test_ssf_and_adapter_plus_leaves_start_fresh_on_load_with_their_labels():
  paths = _variable_paths('ssf+adapter_plus')
  added = paths - _variable_paths('full')
  fresh = {p for p in paths if tuning.FRESH_ON_LOAD.fullmatch(p)}
  assert fresh == added | {p for p in paths if p.split('/')[1] == 'head'}
  labels = {label for p in fresh for pattern, label in tuning.FRESH_LABELS
            if re.fullmatch(pattern, p)}
  assert labels == {'SSF', 'Adapter+', 'head'}


# ------------------------------------------------------------ RepAdapter and FacT


@pytest.mark.parametrize('spec, labels', [('repadapter+fact_tt', {'RepAdapter', 'FacT', 'head'}),
                                          ('fact_tk', {'FacT', 'head'})])
def test_repadapter_and_fact_leaves_start_fresh_labelled_with_their_load_hints(spec, labels):
  paths = _variable_paths(spec)
  added = paths - _variable_paths('full')
  head = {p for p in paths if p.split('/')[1] == 'head'}
  fresh = {p for p in paths if tuning.FRESH_ON_LOAD.fullmatch(p)}
  assert added and fresh == added | head
  found = {p: [label for pattern, label in tuning.FRESH_LABELS if re.fullmatch(pattern, p)]
           for p in fresh}
  assert all(len(f) == 1 for f in found.values()) and {f[0] for f in found.values()} == labels
  for m in tuning.parse(spec).methods:
    pattern = f'params/{tuning.METHODS[m].added[0]}'
    assert tuning.METHODS[m].load_hint and any(re.fullmatch(pattern, p) for p in added)


def abstract_trained_paths(cfg):
  params = jax.eval_shape(models.build(cfg).init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))['params']
  flat = flax.traverse_util.flatten_dict(tuning.trainable_mask(params, cfg), sep='/')
  return {k for k, v in flat.items() if v}


def test_repadapter_and_fact_train_their_parameters_and_the_head_only():
  head = {'head/linear/kernel', 'head/linear/bias'}
  assert abstract_trained_paths(tiny_cfg(tuning='fact_tk')) == head | {
      'fact/u/kernel', 'fact/v/kernel', 'fact/p', 'fact/c'}
  tt = abstract_trained_paths(tiny_cfg(tuning='fact_tt'))
  assert tt == head | {'fact/u/kernel', 'fact/v/kernel'} | {
      f'block{i}/fact/{n}/kernel' for i in range(2)
      for n in ('q', 'k', 'v', 'proj', 'fc1', 'fc2')}
  rep = abstract_trained_paths(tiny_cfg(tuning='repadapter', repadapter=dict(placement='attn')))
  assert rep == head | {f'block{i}/repadapter_attn/{l}/{p}' for i in range(2)
                        for l in ('down', 'up') for p in ('kernel', 'bias')}


@pytest.mark.parametrize('overrides, message', [
    (dict(tuning='fact_tt+fact_tk'), "choose one of 'fact_tt' and 'fact_tk'"),
    (dict(tuning='repadapter', repadapter=dict(groups=3)),
     'repadapter.groups: 3 must divide both model.repadapter.dim \\(8\\) and model.width'),
    (dict(tuning='fact_tk', mlp_dim=48), 'use an mlp_dim that is a multiple of the width'),
    (dict(tuning='fact_tt', fact=dict(scale=0.0)), 'fact.scale: must be a number > 0'),
    (dict(tuning='repadapter', repadapter=dict(placement='mlp')),
     "repadapter.placement: must be one of 'block', 'attn'"),
])
def test_repadapter_and_fact_options_are_checked(overrides, message):
  with pytest.raises(ConfigError, match=message):
    tiny_cfg(**overrides)
