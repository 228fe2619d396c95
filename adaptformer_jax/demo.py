"""The offline transfer experiment behind `make demo`: `python -m adaptformer_jax.demo`.

No pretrained weights can be downloaded everywhere, so the backbone is first
pre-trained on one half of the classes, then adapted to the other half with
each tuning method; the table compares accuracy and trainable parameters.
"""
import copy
import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from adaptformer_jax import cli
from adaptformer_jax import train


def _single_run(config: ml_collections.ConfigDict, tuning: str,
                base_lr: float) -> ml_collections.ConfigDict:
  """`config` without the experiment's own fields, for one run of `tuning`."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    del cfg.pretrain, cfg.methods
  cfg.model.tuning = tuning
  cfg.optimizer.base_lr = base_lr
  return cfg


def method_config(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """The adaptation run for `method`: its own tuning and learning rate."""
  return _single_run(config, method, config.methods[method])


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The backbone run: every parameter trains on the pre-training classes."""
  cfg = _single_run(config, 'full', config.pretrain.base_lr)
  cfg.data.name = config.pretrain.data_name
  cfg.num_train_steps = config.pretrain.num_train_steps
  cfg.warmup_steps = config.pretrain.warmup_steps
  return cfg


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pre-trains, adapts with every method, prints the table, writes summary.json."""
  pre_cfg, pre_dir = pretrain_config(config), os.path.join(workdir, 'pretrain')
  pre = train.train_and_evaluate(pre_cfg, pre_dir)
  backbone = os.path.join(os.path.abspath(pre_dir), 'checkpoints',
                          str(pre_cfg.num_train_steps))
  summary = {'pretrain': {'top1': pre['top1'], 'data': config.pretrain.data_name},
             'methods': {}}
  for method in config.methods:
    cfg = method_config(config, method)
    cfg.init_from = backbone
    result = train.train_and_evaluate(cfg, os.path.join(workdir, method))
    trainable, total = train.Run(cfg).param_counts()
    summary['methods'][method] = {'top1': result['top1'], 'trainable_params': trainable,
                                  'total_params': total}
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  lines = [f"Backbone pre-trained on {config.pretrain.data_name}: top-1 {pre['top1']:.3f}",
           f"Adapted to {config.data.name}:",
           f"{'method':<14}{'trainable':>12}{'share':>9}{'top-1':>8}"]
  by_size = sorted(summary['methods'].items(), key=lambda item: item[1]['trainable_params'])
  for method, r in by_size:
    lines.append(f"{method:<14}{r['trainable_params']:>12,}"
                 f"{r['trainable_params'] / r['total_params']:>9.1%}{r['top1']:>8.3f}")
  print('\n'.join(lines))
  logging.info('Wrote %s', os.path.join(workdir, 'summary.json'))
  return summary


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  cli.run(lambda: run(cli.loaded_config(CONFIG), WORKDIR.value))


if __name__ == '__main__':
  # Defined here, not on import, so that tests can import this module beside `main`.
  CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py',
                                           'The experiment config.')
  WORKDIR = flags.DEFINE_string('workdir', 'runs/demo',
                                'Directory for the runs and summary.json.')
  app.run(_main, flags_parser=cli.parse_flags)
