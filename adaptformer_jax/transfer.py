"""The offline transfer experiment behind `make demo`.

No pretrained weights can be downloaded everywhere, so the backbone is first
pre-trained on one half of the classes, then adapted to the other half with
each tuning method; the table compares accuracy and trainable parameters.
"""
import copy
import json
import logging
import os

from adaptformer_jax import train


def method_config(config, method):
  """The adaptation run for `method`: its own tuning and learning rate, the pre-trained init."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    del cfg.experiment, cfg.pretrain, cfg.methods
  cfg.model.tuning = method
  cfg.optimizer.base_lr = config.methods[method]
  return cfg


def pretrain_config(config):
  cfg = method_config(config, 'full')
  cfg.data.name = config.pretrain.data_name
  cfg.optimizer.base_lr = config.pretrain.base_lr
  cfg.num_train_steps = config.pretrain.num_train_steps
  cfg.warmup_steps = config.pretrain.warmup_steps
  return cfg


def run(config, workdir):
  """Pre-trains, adapts with every method, prints the table, writes summary.json."""
  pre_dir = os.path.join(workdir, 'pretrain')
  pre = train.train_and_evaluate(pretrain_config(config), pre_dir)
  backbone = os.path.join(os.path.abspath(pre_dir), 'checkpoints',
                          str(pretrain_config(config).num_train_steps))
  summary = {'pretrain': {'top1': pre['top1'], 'data': config.pretrain.data_name},
             'methods': {}}
  for method in config.methods:
    cfg = method_config(config, method)
    cfg.init_from = backbone
    result = train.train_and_evaluate(cfg, os.path.join(workdir, method))
    trainable, total = train.Run(cfg, 1).param_counts()
    summary['methods'][method] = {'top1': result['top1'], 'trainable_params': trainable,
                                  'total_params': total}
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  lines = [f"Backbone pre-trained on {config.pretrain.data_name}: top-1 {pre['top1']:.3f}",
           f"Adapted to {config.data.name}:",
           f"{'method':<14}{'trainable':>12}{'share':>9}{'top-1':>8}"]
  for method, r in summary['methods'].items():
    lines.append(f"{method:<14}{r['trainable_params']:>12,}"
                 f"{r['trainable_params'] / r['total_params']:>9.1%}{r['top1']:>8.3f}")
  print('\n'.join(lines))
  logging.info('Wrote %s', os.path.join(workdir, 'summary.json'))
  return summary
