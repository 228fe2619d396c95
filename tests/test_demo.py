"""The offline transfer experiment behind `make demo` (adaptformer_jax.demo), at a few steps."""
import json
import os
import statistics
import subprocess
import sys

import ml_collections
import pytest

from adaptformer_jax import assets
from adaptformer_jax import demo
from adaptformer_jax import train
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.errors import UserError
from conftest import shipped_config


def _short(config, data_dir, steps):
  config.data.data_dir = data_dir
  config.num_train_steps = steps
  config.warmup_steps = 1
  return config


@pytest.mark.slow
def test_adapts_the_shipped_backbone_over_seeds_and_writes_the_summary(tmp_path, data_dir,
                                                                       capsys):
  config = _short(shipped_config('demo'), data_dir, steps=30)
  assert config.init_from == assets.DEMO_BACKBONE
  config.seeds = (0, 1)
  config.methods = ml_collections.ConfigDict(dict(linear=4.0,
                                                 adaptformer=config.methods.adaptformer))
  summary = demo.run(config, str(tmp_path))

  with open(tmp_path / 'summary.json') as f:
    assert json.load(f) == summary
  methods = summary['methods']
  assert set(methods) == {'adaptformer', 'linear'}
  for m in methods.values():
    assert len(m['top1_seeds']) == 2 and m['top1_seeds'][0] != m['top1_seeds'][1]
    assert m['top1'] == pytest.approx(statistics.mean(m['top1_seeds']))
    assert m['top1_std'] == pytest.approx(statistics.stdev(m['top1_seeds']))
  # 30 steps of a linear probe on the pre-trained features already read most digits
  # (chance is 0.1): the runs start from the shipped backbone, not from random weights.
  assert methods['linear']['top1'] > 0.7
  assert methods['linear']['trainable_params'] == 128 * 10 + 10
  assert methods['adaptformer']['trainable_params'] < 0.05 * methods['adaptformer']['total_params']
  table = capsys.readouterr().out.splitlines()
  assert table[-2].startswith('linear') and table[-1].startswith('adaptformer')


def test_sweep_chooses_learning_rates_on_the_validation_split_only(tmp_path, monkeypatch):
  seen = []

  def fake_train(cfg, workdir):
    del workdir
    seen.append((cfg.data.train_split, cfg.data.eval_split, cfg.seed))
    return {'top1': {0.5: 0.8, 1.0: 0.9, 2.0: 0.7}[cfg.optimizer.base_lr]}

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  config = shipped_config('demo')
  config.sweep.base_lrs = ml_collections.ConfigDict(dict(adaptformer=(0.5, 1.0, 2.0)))
  results = demo.sweep(config, str(tmp_path))
  assert results == {'adaptformer': {'0.5': 0.8, '1.0': 0.9, '2.0': 0.7}}
  assert sorted(seen) == sorted(3 * [('train[:50%]', 'train[50%:]', 0),
                                     ('train[:50%]', 'train[50%:]', 1)])
  with open(tmp_path / 'sweep.json') as f:
    assert json.load(f) == results


def test_each_run_gets_its_method_learning_rate_and_seed():
  config = shipped_config('demo')
  cfg = demo.method_config(config, 'vpt_deep', seed=2)
  assert (cfg.model.tuning, cfg.optimizer.base_lr, cfg.seed) == (
      'vpt_deep', config.methods.vpt_deep, 2)
  assert not {'methods', 'seeds', 'sweep'} & set(cfg.keys())
  assert demo.method_config(config, 'full', seed=0, base_lr=0.3).optimizer.base_lr == 0.3


def test_an_unknown_override_of_the_default_config_is_one_error_line():
  """The default config file loads as its flag is defined: a bad override is caught there."""
  result = subprocess.run([sys.executable, '-m', 'adaptformer_jax.demo', '--config.seedz=1'],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'},
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [
      'error: unknown config field \'seedz\' in a --config.* override (Did you mean "seed" '
      'instead of "seedz"?); see the config file for the fields it has.']


def test_methods_flag_picks_any_method_with_the_configs_rate_or_its_own():
  config = shipped_config('demo')
  chosen = demo.choose_methods(config, ['adaptformer', 'ssf=0.25', 'fact_tt+lora=0.5'])
  assert dict(chosen.methods) == {'adaptformer': config.methods.adaptformer, 'ssf': 0.25,
                                  'fact_tt+lora': 0.5}
  assert demo.method_config(chosen, 'ssf', seed=0).model.tuning == 'ssf'
  assert demo.choose_methods(config, None) is config
  with pytest.raises(UserError, match='no learning rate for it .*--methods repadapter=0.1'):
    demo.choose_methods(config, ['repadapter'])
  with pytest.raises(UserError, match="'fast' is not a learning rate"):
    demo.choose_methods(config, ['ssf=fast'])
  with pytest.raises(ConfigError, match="unknown method 'sff'"):
    demo.choose_methods(config, ['sff=0.1'])
