"""The offline transfer experiment behind `make demo` and the notebook.

A small ViT pre-trained on rendered characters (the `glyphs` corpus, no digits;
adaptformer_jax/assets/demo_backbone.md) is adapted to scikit-learn's
handwritten digits with each tuning method over several seeds; the table
compares mean top-1 and trainable parameters.

  python -m adaptformer_jax.demo                    # the table (configs/demo.py)
  python -m adaptformer_jax.demo --sweep            # learning rates on a validation split
  python -m adaptformer_jax.demo --config.seeds='(0,)'
"""
import copy
import json
import os
import statistics
import sys
import time
from typing import Any

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from adaptformer_jax import cli
from adaptformer_jax import runtime
from adaptformer_jax import train
from adaptformer_jax.errors import UserError
from adaptformer_jax.models import tuning


def method_config(config: ml_collections.ConfigDict, method: str, seed: int,
                  base_lr: float | None = None) -> ml_collections.ConfigDict:
  """One adaptation run: `method` with its learning rate (or `base_lr`) and `seed`."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    del cfg.methods, cfg.seeds, cfg.sweep
  cfg.model.tuning = method
  cfg.optimizer.base_lr = config.methods[method] if base_lr is None else base_lr
  cfg.seed = seed
  return cfg


def choose_methods(config: ml_collections.ConfigDict,
                   spec: list[str] | None) -> ml_collections.ConfigDict:
  """`config` with the methods of `--methods NAME[=LR],...` (any tuning method, or a
  combination) in place of config.methods; a name without a rate takes the config's."""
  if not spec:
    return config
  rates = {}
  for item in spec:
    name, _, rate = item.partition('=')
    tuning.parse(name)  # a ConfigError naming an unknown method
    if rate:
      try:
        rates[name] = float(rate)
      except ValueError:
        raise UserError(f'--methods {item}: {rate!r} is not a learning rate; write '
                        f'{name}=0.1.') from None
    elif name in config.methods:
      rates[name] = config.methods[name]
    else:
      raise UserError(f'--methods {name}: the config has no learning rate for it (it has '
                      f"{', '.join(config.methods)}); give one, e.g. --methods {name}=0.1.")
  config = copy.deepcopy(config)
  with config.unlocked():
    config.methods = ml_collections.ConfigDict(rates)
  return config


def _train(cfg: ml_collections.ConfigDict, workdir: str) -> float:
  start = time.perf_counter()
  top1 = train.train_and_evaluate(cfg, workdir)['top1']
  print(f'  {cfg.model.tuning:<12} lr {cfg.optimizer.base_lr:<6g} seed {cfg.seed}: '
        f'top-1 {top1:.4f}  ({time.perf_counter() - start:.0f} s)', flush=True)
  return top1


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Adapts the backbone with every method and seed; prints the table, writes summary.json."""
  summary = {'backbone': config.init_from, 'data': config.data.name, 'methods': {}}
  for method in config.methods:
    scores = [_train(method_config(config, method, seed),
                     os.path.join(workdir, method, f'seed{seed}')) for seed in config.seeds]
    trainable, total = runtime.Run(method_config(config, method, 0)).param_counts()
    summary['methods'][method] = {
        'top1': statistics.mean(scores),
        'top1_std': statistics.stdev(scores) if len(scores) > 1 else 0.0,
        'top1_seeds': scores, 'trainable_params': trainable, 'total_params': total}
  _write(workdir, 'summary.json', summary)
  print(table(summary, len(config.seeds)))
  return summary


def table(summary: dict[str, Any], num_seeds: int) -> str:
  """The methods, smallest first: trainable parameters, share, mean top-1 ± std."""
  lines = [f"Adapted to {summary['data']} ({num_seeds} seed{'s' * (num_seeds > 1)}):",
           f"{'method':<14}{'trainable':>12}{'share':>9}{'top-1 (mean ± std)':>22}"]
  by_size = sorted(summary['methods'].items(), key=lambda item: item[1]['trainable_params'])
  for method, r in by_size:
    lines.append(f"{method:<14}{r['trainable_params']:>12,}"
                 f"{r['trainable_params'] / r['total_params']:>9.1%}"
                 f"{100 * r['top1']:>14.2f} ± {100 * r['top1_std']:.2f}")
  return '\n'.join(lines)


def sweep(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Mean validation top-1 over config.sweep.seeds of every (method, learning rate) in
  config.sweep; never the test split. Several seeds, so that a rate at the edge of
  stability, which one seed may survive, is not chosen."""
  results = {}
  for method, rates in config.sweep.base_lrs.items():
    results[method] = {}
    for lr in rates:
      scores = []
      for seed in config.sweep.seeds:
        cfg = method_config(config, method, seed, base_lr=lr)
        cfg.data.train_split = config.sweep.train_split
        cfg.data.eval_split = config.sweep.val_split
        scores.append(_train(cfg, os.path.join(workdir, method, f'lr{lr}', f'seed{seed}')))
      results[method][str(lr)] = statistics.mean(scores)
    best = max(results[method], key=results[method].get)
    print(f'{method}: best base_lr {best} (mean validation top-1 {results[method][best]:.4f})')
  _write(workdir, 'sweep.json', results)
  return results


def _write(workdir: str, name: str, obj: Any) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, name), 'w') as f:
    json.dump(obj, f, indent=2)


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  job = sweep if SWEEP.value else run
  cli.run(lambda: job(choose_methods(cli.loaded_config(CONFIG), METHODS.value), WORKDIR.value))


if __name__ == '__main__':
  # Defined here, not on import, so that tests can import this module beside `main`.
  # A default config file is loaded, overrides included, as the flag is defined.
  try:
    CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py',
                                             'The experiment config.')
  except (AttributeError, KeyError) as e:
    if '--verbose' in sys.argv:
      raise
    cli.unknown_field(e)
  WORKDIR = flags.DEFINE_string('workdir', 'runs/demo',
                                'Directory for the runs and summary.json (sweep.json).')
  METHODS = flags.DEFINE_list(
      'methods', None, 'NAME[=LR],...: run these tuning methods (any, e.g. ssf,fact_tt=0.5) '
      'instead of the config\'s; a name without a rate takes the config\'s rate.')
  SWEEP = flags.DEFINE_bool('sweep', False, "Pick each method's learning rate on a "
                            'validation split carved from the training data (config.sweep) '
                            'instead of running the table.')
  app.run(_main, flags_parser=cli.parse_flags)
