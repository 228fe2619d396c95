"""Trainable masks from regex rules, and the optimizer that freezes the rest."""
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaptformer_jax import models
from adaptformer_jax import peft
from conftest import tiny_cfg


def init(cfg):
  model = models.build(cfg)
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  return model, model.init(jax.random.key(0), images), images


def trained_paths(cfg):
  _, variables, _ = init(cfg)
  flat = flax.traverse_util.flatten_dict(
      peft.trainable_mask(variables['params'], cfg), sep='/')
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
  mask = peft.trainable_mask(params, cfg)
  tx = peft.freeze(optax.sgd(0.5, momentum=0.9), mask)
  opt_state = tx.init(params)
  # Frozen parameters cost no optimizer state.
  assert peft.count(opt_state) == peft.count(params, mask)

  @jax.jit
  def step(params, batch_stats, opt_state, rng):
    def loss_fn(p):
      logits, new_state = model.apply(
          {'params': peft.stop_frozen_gradients(p, mask), 'batch_stats': batch_stats},
          images, train=True, mutable=['batch_stats'], rngs={'dropout': rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state
    grads, new_state = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return peft.apply_updates(params, updates, mask), new_state['batch_stats'], opt_state

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
      return model.apply({'params': peft.stop_frozen_gradients(p, mask)}, images).sum()
    return jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()['flops']

  all_train = jax.tree.map(lambda _: True, params)
  adapter_flops = grads(peft.trainable_mask(params, cfg))
  full_flops = grads(all_train)
  assert adapter_flops < 0.8 * full_flops


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_frozen_weights_stored_in_bfloat16_halve_and_keep_the_logits(dtype):
  cfg = tiny_cfg(dtype=dtype)
  model, variables, images = init(cfg)
  params = variables['params']
  mask = peft.trainable_mask(params, cfg)
  stored = peft.store_frozen(params, mask, 'bfloat16')
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
