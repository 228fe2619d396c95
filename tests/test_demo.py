"""The offline transfer experiment behind `make demo` (adaptformer_jax.demo), at a few steps."""
import json

import ml_collections

from adaptformer_jax import demo
from conftest import shipped_config


def test_pretrains_adapts_each_method_and_writes_the_summary(tmp_path, data_dir, capsys):
  config = shipped_config('demo')
  config.data.data_dir = data_dir
  config.progress = False
  config.num_train_steps = 6
  config.warmup_steps = 1
  config.pretrain.num_train_steps = 8
  config.methods = ml_collections.ConfigDict(dict(adaptformer=2.0, linear=2.0))
  summary = demo.run(config, str(tmp_path))

  with open(tmp_path / 'summary.json') as f:
    assert json.load(f) == summary
  methods = summary['methods']
  assert set(methods) == {'adaptformer', 'linear'}
  # The adapted runs start from the pre-trained backbone, with fresh heads.
  assert all(0.0 <= m['top1'] <= 1.0 for m in methods.values())
  assert methods['linear']['trainable_params'] == 64 * 5 + 5
  assert methods['linear']['trainable_params'] < methods['adaptformer']['trainable_params']
  assert methods['adaptformer']['trainable_params'] < 0.05 * methods['adaptformer']['total_params']
  table = capsys.readouterr().out.splitlines()
  assert table[-2].startswith('linear') and table[-1].startswith('adaptformer')


def test_adaptation_runs_start_from_the_backbone_with_their_own_learning_rate():
  config = shipped_config('demo')
  cfg = demo.method_config(config, 'vpt_deep')
  assert cfg.model.tuning == 'vpt_deep'
  assert cfg.optimizer.base_lr == config.methods.vpt_deep
  assert 'pretrain' not in cfg and 'methods' not in cfg
  pre = demo.pretrain_config(config)
  assert pre.model.tuning == 'full' and pre.data.name == config.pretrain.data_name
