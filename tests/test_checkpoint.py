"""checkpoint: orbax train-state checkpoints and adapter export / swap-in."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from adaptformer_jax import workdirs
from adaptformer_jax.errors import UserError
from adaptformer_jax.weights import checkpoints
from adaptformer_jax.weights import exports
from conftest import tiny_cfg
from conftest import tiny_run_config

STATE = {'step': jnp.array(3), 'params': {'w': jnp.arange(6.0).reshape(2, 3)}}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_save_restore_as_a_context_manager(tmp_path):
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() is None
    ckpt.save(3, STATE)
  assert checkpoints.latest_step(str(tmp_path)) == 3
  with checkpoints.Checkpointer(str(tmp_path), read_only=True) as ckpt:
    restored = ckpt.restore(_abstract(STATE))
  np.testing.assert_array_equal(restored['params']['w'], STATE['params']['w'])
  path = os.path.join(tmp_path, 'checkpoints', '3')
  restored = checkpoints.restore_path(path, _abstract(STATE))
  assert int(restored['step']) == 3


def test_reading_creates_nothing(tmp_path):
  assert checkpoints.latest_step(str(tmp_path / 'absent')) is None
  assert not (tmp_path / 'absent').exists()


def test_restore_path_must_be_a_step_directory(tmp_path):
  with pytest.raises(UserError, match='not a checkpoint step directory'):
    checkpoints.restore_path(str(tmp_path), _abstract(STATE))


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
  tensors = exports.export_adapters(str(tmp_path), variables, mask, cfg, ['a', 'b'])
  assert sorted(tensors) == ['params/block0/adapter/up', 'params/head/linear/kernel']
  saved = json.loads((tmp_path / exports.ADAPTER_CONFIG).read_text())
  assert saved['class_names'] == ['a', 'b'] and saved['model'] == json.loads(cfg.to_json())
  blank = jax.tree.map(np.zeros_like, variables)
  swapped = exports.swap_in_adapters(str(tmp_path), blank, mask, cfg)
  np.testing.assert_array_equal(swapped['params']['block0']['adapter']['up'], 1.0)
  np.testing.assert_array_equal(swapped['params']['head']['linear']['kernel'], 2.0)
  np.testing.assert_array_equal(swapped['params']['block0']['mlp']['fc1'], 0.0)  # frozen


def test_adapters_of_another_architecture_are_refused(tmp_path):
  variables, mask = _variables_and_mask()
  exports.export_adapters(str(tmp_path), variables, mask, tiny_cfg(), [])
  with pytest.raises(UserError, match='trained for another model.*depth: adapters 2'):
    exports.swap_in_adapters(str(tmp_path), variables, mask, tiny_cfg(depth=3))


def _export_trained_on(out, config):
  variables, mask = _variables_and_mask()
  exports.export_adapters(str(out), variables, mask, tiny_cfg(), [],
                             backbone=exports.backbone_record(config))


def test_adapters_go_back_onto_the_backbone_they_were_trained_on(tmp_path, caplog):
  """Once any frozen weights of the right shapes took them, silently (a chance-level eval)."""
  backbone, copy, other = (tmp_path / n for n in ('b.safetensors', 'c.safetensors', 'o.npz'))
  backbone.write_bytes(b'weights')
  copy.write_bytes(b'weights')
  other.write_bytes(b'other weights')
  config = lambda init_from='', seed=0: ml_collections.ConfigDict(
      {'init_from': str(init_from), 'seed': seed})
  on_file, on_seed = tmp_path / 'on_file', tmp_path / 'on_seed'
  _export_trained_on(on_file, config(backbone))
  _export_trained_on(on_seed, config(seed=3))
  assert json.loads((on_file / exports.ADAPTER_CONFIG).read_text())['backbone'] == {
      'init_from': str(backbone), 'seed': 0,
      'sha256': '9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c'}
  exports.check_backbone(str(on_file), config(copy, seed=7))  # same bytes: any seed
  exports.check_backbone(str(on_seed), config(seed=3))
  assert not caplog.records
  with pytest.raises(UserError, match=f'trained on the backbone {backbone}; pass it with '
                     f'--config.init_from={backbone}'):
    exports.check_backbone(str(on_file), config())
  with pytest.raises(UserError, match='randomly initialised backbone \\(seed 3\\), not on'):
    exports.check_backbone(str(on_seed), config(backbone, seed=3))
  with pytest.raises(UserError, match='from seed 3; pass --config.seed=3'):
    exports.check_backbone(str(on_seed), config(seed=0))
  exports.check_backbone(str(on_file), config(other))  # may be the same weights: warned
  assert 'differs' in caplog.text and 'the results are wrong' in caplog.text


def test_exports_and_run_configs_from_before_a_method_existed_still_load(tmp_path):
  """Fields added later (a new method's options) take their defaults when absent."""
  variables, mask = _variables_and_mask()
  cfg = tiny_cfg()
  exports.export_adapters(str(tmp_path), variables, mask, cfg, ['a', 'b'])
  path = tmp_path / exports.ADAPTER_CONFIG
  saved = json.loads(path.read_text())
  del saved['model']['adapter_plus'], saved['model']['adapter']['init']
  path.write_text(json.dumps(saved))
  swapped = exports.swap_in_adapters(str(tmp_path), variables, mask, cfg)
  np.testing.assert_array_equal(swapped['params']['block0']['adapter']['up'], 1.0)
  saved['model']['adapter']['bottleneck'] = 4  # a real difference is still one
  path.write_text(json.dumps(saved))
  with pytest.raises(UserError, match='adapter.bottleneck: adapters 4 vs config 8'):
    exports.swap_in_adapters(str(tmp_path), variables, mask, cfg)

  config = tiny_run_config()
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  old = json.loads(config.to_json())
  del old['model']['adapter_plus']
  (run_dir / workdirs.CONFIG_FILE).write_text(json.dumps(old))
  assert json.loads(workdirs.load_config(str(run_dir)).to_json()) == json.loads(config.to_json())
