"""Runs the VTAB-1k protocol under one root: `<root>/<task>/<run>/` per run, resumable.

A run is finished when its `result.json` exists (written atomically after its
evaluation); a restarted runner skips finished runs and resumes an interrupted one
from its latest checkpoint (train.train_and_evaluate). Before any training, every
dataset that is not prepared is named in one UserError (or skipped with skip_missing).
"""
import copy
import json
import os
import re
import sys
import time
from collections.abc import Callable

import ml_collections
import numpy as np

from adaptformer_jax import files
from adaptformer_jax import runtime
from adaptformer_jax import train
from adaptformer_jax import workdirs
from adaptformer_jax.errors import UserError
from adaptformer_jax.vtab import datasets
from adaptformer_jax.vtab import protocol
from adaptformer_jax.vtab import report
from adaptformer_jax.weights import formats

BACKBONE = 'backbone_without_pre_logits.npz'
TRAIN_SIZES = {'train800': 800, 'train800val200': 1000}


def without_pre_logits(config: ml_collections.ConfigDict, root: str) -> str:
  """`config.init_from`, or for a model without a representation layer (model.pre_logits
  0) and a big_vision/vit_jax .npz that has one, a copy of it in `root` without it: the
  ImageNet-21k ViT-B/16 file is fine-tuned so by vit_jax (its drop-head variant), timm
  and V-PETL Bench. The strict loader would refuse the file's extra keys otherwise."""
  path = config.init_from
  if not path or config.model.pre_logits or not str(path).endswith('.npz'):
    return path
  flat, _ = formats.read(path)
  kept = {k: v for k, v in flat.items() if not re.match(r'(.*/)?pre_logits/', k)}
  if len(kept) == len(flat):
    return path
  out = os.path.join(root, BACKBONE)
  if not os.path.exists(out):
    with open(out + '.tmp', 'wb') as f:
      np.savez(f, **kept)
    os.replace(out + '.tmp', out)
  return out


def _steps(cfg: ml_collections.ConfigDict) -> int:
  return train.make_plan(cfg, TRAIN_SIZES[cfg.data.train_split]).total_steps


def _execute(cfg: ml_collections.ConfigDict, run: protocol.Run, run_dir: str) -> dict:
  """Trains and evaluates one run (resuming its checkpoint), then records its result."""
  start = time.perf_counter()
  metrics = train.train_and_evaluate(cfg, run_dir)
  trainable, total = runtime.Run(cfg).param_counts()
  result = dict(task=run.task, stage=run.stage, seed=run.seed, hparams=run.hparams,
                train_split=cfg.data.train_split, eval_split=cfg.data.eval_split,
                top1=float(metrics['top1']), steps=_steps(cfg),
                seconds=time.perf_counter() - start, trainable_params=trainable,
                total_params=total, normalization=cfg.data.normalize)
  files.write_atomic(os.path.join(run_dir, report.RESULT), json.dumps(result, indent=1))
  return result


class Progress:
  """'task i of n, run j of m, ETA' lines, the ETA from the step time measured so far."""

  def __init__(self, total_steps: int, log: Callable[[str], None]):
    self.left, self.log = total_steps, log
    self.seconds = self.steps = 0.0

  def start(self, i: int, n: int, task: str, run: protocol.Run, j: int, m: int) -> None:
    rate = self.seconds / self.steps if self.steps else None
    eta = (f'ETA {_duration(self.left * rate)} ({rate:.3g} s/step)' if rate
           else 'ETA after the first run')
    self.log(f'[vtab] task {i}/{n} {task}: run {j}/{m} {run.name} ({run.stage}) · '
             f'{self.left} steps left · {eta}')

  def done(self, steps: int, seconds: float | None) -> None:
    self.left -= steps
    if seconds is not None:
      self.seconds, self.steps = self.seconds + seconds, self.steps + steps


def _duration(seconds: float) -> str:
  hours, rest = divmod(int(seconds), 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'


def _check_protocol(config: ml_collections.ConfigDict, root: str) -> None:
  """Writes the protocol of this root, or refuses another one than a previous run's."""
  mine = json.loads(json.dumps(protocol.summary(config)))
  path = os.path.join(root, report.PROTOCOL)
  previous = files.read_json(path)
  if previous is not None and previous != mine:
    changed = sorted(k for k in set(mine) | set(previous) if mine.get(k) != previous.get(k))
    raise UserError(f'--workdir {root} holds a VTAB run of another protocol (changed: '
                    f"{', '.join(changed)}); use a new --workdir, or the same config.")
  files.write_atomic(path, json.dumps(mine, indent=1))


def run_all(config: ml_collections.ConfigDict, root: str, names: list[str],
            skip_missing: bool = False, log: Callable[[str], None] | None = None) -> dict:
  """Selection and seeds of every task in `names` under `root`; returns the report."""
  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  absent = datasets.missing(names, config.data.data_dir)
  if absent and not skip_missing:
    raise UserError(datasets.missing_message(absent, config.data.data_dir))
  if absent:
    log(f"[vtab] skipping {len(absent)} unprepared task(s): {', '.join(t.name for t in absent)}")
  names = [n for n in names if n not in {t.name for t in absent}]
  os.makedirs(root, exist_ok=True)
  with workdirs.Lock(root):
    _check_protocol(config, root)
    config = copy.deepcopy(config)
    config.init_from = without_pre_logits(config, root)
    plans = {n: protocol.selection_runs(config, n) for n in names}
    count = lambda n: len(plans[n]) + len(config.vtab.seeds)
    steps = lambda n, stage: _steps(protocol.run_config(
        config, protocol.Run(n, stage, 0, protocol.grid(config)[0])))
    todo = [(n, r.stage) for n in names for r in plans[n]] + [
        (n, 'final') for n in names for _ in config.vtab.seeds]
    progress = Progress(sum(steps(n, stage) for n, stage in todo), log)
    for i, name in enumerate(names, 1):
      scored, j = [], 0
      for run in plans[name]:
        j += 1
        scored.append((run, _run(config, run, root, progress, (i, len(names), name, j,
                                                                count(name)))['top1']))
      chosen = protocol.choose(scored) if scored else protocol.fixed(config, name)
      for run in protocol.final_runs(config, name, chosen):
        j += 1
        _run(config, run, root, progress, (i, len(names), name, j, count(name)))
  return report.write(root)


def _run(config, run, root, progress, where):
  run_dir = os.path.join(root, run.task, run.name)
  cfg = protocol.run_config(config, run)
  done = files.read_json(os.path.join(run_dir, report.RESULT))
  if done is None:
    progress.start(*where[:3], run, *where[3:])
    done = _execute(cfg, run, run_dir)
    progress.done(done['steps'], done['seconds'])
  else:
    progress.done(done['steps'], None)
  return done
