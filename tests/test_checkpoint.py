"""checkpoint: orbax train-state checkpoints and adapter export / swap-in."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptformer_jax import checkpoint
from adaptformer_jax.errors import UserError
from conftest import tiny_cfg

STATE = {'step': jnp.array(3), 'params': {'w': jnp.arange(6.0).reshape(2, 3)}}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_save_restore_as_a_context_manager(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() is None
    ckpt.save(3, STATE)
  assert checkpoint.latest_step(str(tmp_path)) == 3
  with checkpoint.Checkpointer(str(tmp_path), read_only=True) as ckpt:
    restored = ckpt.restore(_abstract(STATE))
  np.testing.assert_array_equal(restored['params']['w'], STATE['params']['w'])
  path = os.path.join(tmp_path, 'checkpoints', '3')
  restored = checkpoint.restore_path(path, _abstract(STATE))
  assert int(restored['step']) == 3


def test_reading_creates_nothing(tmp_path):
  assert checkpoint.latest_step(str(tmp_path / 'absent')) is None
  assert not (tmp_path / 'absent').exists()


def test_restore_path_must_be_a_step_directory(tmp_path):
  with pytest.raises(UserError, match='not a checkpoint step directory'):
    checkpoint.restore_path(str(tmp_path), _abstract(STATE))


def _variables_and_mask():
  params = {'block0': {'adapter': {'up': np.ones((2, 2), np.float32)},
                       'mlp': {'fc1': np.zeros((2, 2), np.float32)}},
            'head': {'linear': {'kernel': np.full((2, 5), 2.0, np.float32)}}}
  mask = {'block0': {'adapter': {'up': True}, 'mlp': {'fc1': False}},
          'head': {'linear': {'kernel': True}}}
  return {'params': params}, mask


def test_export_holds_only_the_trainable_leaves_and_swaps_back_in(tmp_path):
  variables, mask = _variables_and_mask()
  cfg = tiny_cfg()
  tensors = checkpoint.export_adapters(str(tmp_path), variables, mask, cfg, ['a', 'b'])
  assert sorted(tensors) == ['params/block0/adapter/up', 'params/head/linear/kernel']
  saved = json.loads((tmp_path / checkpoint.ADAPTER_CONFIG).read_text())
  assert saved['class_names'] == ['a', 'b'] and saved['model'] == json.loads(cfg.to_json())
  blank = jax.tree.map(np.zeros_like, variables)
  swapped = checkpoint.swap_in_adapters(str(tmp_path), blank, mask, cfg)
  np.testing.assert_array_equal(swapped['params']['block0']['adapter']['up'], 1.0)
  np.testing.assert_array_equal(swapped['params']['head']['linear']['kernel'], 2.0)
  np.testing.assert_array_equal(swapped['params']['block0']['mlp']['fc1'], 0.0)  # frozen


def test_adapters_of_another_architecture_are_refused(tmp_path):
  variables, mask = _variables_and_mask()
  checkpoint.export_adapters(str(tmp_path), variables, mask, tiny_cfg(), [])
  with pytest.raises(UserError, match='trained for another model.*depth: adapters 2'):
    checkpoint.swap_in_adapters(str(tmp_path), variables, mask, tiny_cfg(depth=3))
