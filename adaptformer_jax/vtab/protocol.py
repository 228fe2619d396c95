"""The VTAB-1k protocol as data: the runs of each task and the config of each run.

Per task, first the selection runs (one per point of the declared grid: train on
train800, score on val200), then, with the point of best val200 top-1, one final run
per seed (train on train800val200, test once after the last step). `test` appears in
no selection config, and the final configs exist only once a point is chosen.
"""
import copy
import dataclasses
import itertools
import json
from typing import Any

import ml_collections

from adaptformer_jax.data import vtab as tasks
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.errors import UserError
from adaptformer_jax.models import presets

# The normalisation each backbone family was trained with (data/preprocess.py NORMALIZE):
# MAE/timm/DINOv2 ImageNet statistics, [-1, 1] for the Google (vit_jax, big_vision) ones.
NORMALIZATION = {None: 'imagenet', 'dinov2': 'imagenet', 'dinov2_reg4': 'imagenet',
                 'augreg': 'inception', 'in21k_orig': 'inception', 'siglip': 'inception',
                 'clip': 'clip', 'openclip': 'clip'}


def normalization(preset: str) -> str:
  """The normalisation of image preset `preset`'s family (a UserError for video)."""
  family = presets.family(preset)
  if family not in NORMALIZATION:
    raise ConfigError(f'configs/vtab.py: {preset!r} is not an image backbone preset; VTAB-1k '
                      f"takes images (e.g. vit_b16_in21k_orig, vit_b16, vit_b14_dinov2).")
  return NORMALIZATION[family]


def defaults() -> ml_collections.ConfigDict:
  """The `config.vtab` section: the selection grid, the seeds, the tasks."""
  return ml_collections.ConfigDict(dict(
      # Effective AdamW learning rates (base_lr = lr * 256 / batch_size) and weight decays.
      learning_rates=(1e-4, 1e-3, 1e-2), weight_decays=(1e-4,),
      # JSON {task: {"learning_rate": x, "weight_decay": y}}: those tasks skip selection.
      hparams_file='',
      selection_seed=0, seeds=(0, 1, 2),
      tasks=','.join(t.name for t in tasks.TASKS)))


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the protocol."""
  task: str
  stage: str          # 'select' (train800 -> val200) | 'final' (train800val200 -> test)
  seed: int
  hparams: dict

  @property
  def name(self) -> str:
    point = '_'.join(f'{k[0]}{v:g}' for k, v in sorted(self.hparams.items()))
    return f'select_{point}' if self.stage == 'select' else f'seed{self.seed}'


def grid(config: ml_collections.ConfigDict) -> list[dict]:
  """The declared grid's points, in order; a ConfigError names any bad vtab field."""
  v = config.vtab
  number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
  problems = [f'config.vtab.{name}: must be a non-empty list of {want}, got {values!r}'
              for name, values, want, ok in (
                  ('learning_rates', v.learning_rates, 'numbers > 0', lambda x: number(x) and x > 0),
                  ('weight_decays', v.weight_decays, 'numbers >= 0', lambda x: number(x) and x >= 0),
                  ('seeds', v.seeds, 'integers', lambda x: isinstance(x, int) and not isinstance(
                      x, bool)))
              if not isinstance(values, (list, tuple)) or not values or not all(map(ok, values))]
  if problems:
    raise ConfigError('; '.join(problems) + '.')
  return [dict(learning_rate=float(lr), weight_decay=float(wd))
          for lr, wd in itertools.product(v.learning_rates, v.weight_decays)]


def fixed(config: ml_collections.ConfigDict, task: str) -> dict | None:
  """The task's hyperparameters in config.vtab.hparams_file (None: not there, so
  selected on val200 over the grid)."""
  path = config.vtab.hparams_file
  if not path:
    return None
  try:
    with open(path) as f:
      table = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'config.vtab.hparams_file: cannot read {path} ({e}).') from None
  if not isinstance(table, dict) or task not in table:
    return None
  found = table[task]
  if not isinstance(found, dict) or set(found) != {'learning_rate', 'weight_decay'} or not all(
      isinstance(v, (int, float)) for v in found.values()):
    raise UserError(f'config.vtab.hparams_file: {path}: {task!r} needs {{"learning_rate": '
                    f'LR, "weight_decay": WD}} (numbers), got {found!r}.')
  return {k: float(v) for k, v in found.items()}


def selection_runs(config: ml_collections.ConfigDict, task: str) -> list[Run]:
  """The task's selection runs ([] when its hyperparameters are fixed by a file)."""
  if fixed(config, task) is not None:
    return []
  return [Run(task, 'select', int(config.vtab.selection_seed), p) for p in grid(config)]


def final_runs(config: ml_collections.ConfigDict, task: str, chosen: dict) -> list[Run]:
  return [Run(task, 'final', int(s), dict(chosen)) for s in config.vtab.seeds]


def choose(scored: list[tuple[Run, float]]) -> dict:
  """The grid point of the best val200 top-1 (the first in grid order on a tie)."""
  best = max(range(len(scored)), key=lambda i: (scored[i][1], -i))
  return dict(scored[best][0].hparams)


def run_config(config: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """The training config of `run`: the protocol's splits, seed and hyperparameters."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    del cfg.vtab
  cfg.data.name = tasks.PREFIX + run.task
  cfg.data.train_split, cfg.data.eval_split = (
      ('train800', 'val200') if run.stage == 'select' else ('train800val200', 'test'))
  cfg.model.num_classes = tasks.task(run.task).num_classes
  cfg.seed = run.seed
  cfg.optimizer.base_lr = run.hparams['learning_rate'] * 256 / cfg.batch_size
  cfg.optimizer.weight_decay = run.hparams['weight_decay']
  cfg.eval_every_steps = 0  # one evaluation, after the last step
  return cfg


def task_names(config: ml_collections.ConfigDict, override: str | None = None) -> list[str]:
  """The tasks to run, in the standard order (`override`: --tasks)."""
  names = [n.strip() for n in (override or config.vtab.tasks).split(',') if n.strip()]
  unknown = [n for n in names if n not in tasks.BY_NAME]
  if unknown or not names:
    raise UserError(f"--tasks: unknown task {', '.join(map(repr, unknown)) or '(none given)'}; "
                    f"the tasks: {', '.join(tasks.BY_NAME)}.")
  return [t.name for t in tasks.TASKS if t.name in names]


def summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a report records of the protocol."""
  return dict(method=config.model.tuning, backbone=config.model.name,
              init_from=config.init_from, pre_logits=config.model.pre_logits,
              normalization=config.data.normalize,
              image_size=config.model.image_size, train_pp=config.data.train_pp,
              optimizer=config.optimizer.name, batch_size=config.batch_size,
              num_epochs=config.num_epochs, warmup_epochs=config.warmup_epochs,
              grid=grid(config), hparams_file=config.vtab.hparams_file,
              seeds=list(config.vtab.seeds))
