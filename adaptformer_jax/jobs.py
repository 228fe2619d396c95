"""The jobs that read a trained run: evaluate it, export its adapters, load its variables."""
import json
import os
from typing import Any

import jax
import ml_collections

from adaptformer_jax import checkpoint
from adaptformer_jax import data
from adaptformer_jax import evaluate
from adaptformer_jax import train
from adaptformer_jax.errors import UserError


def _restore(config: ml_collections.ConfigDict, workdir: str | None,
             checkpoint_path: str | None = None) -> tuple[Any, train.Run, train.TrainState]:
  """The dataset info, run and trained state of a workdir (latest, or `checkpoint_path`)."""
  info, trainer = train.setup(config)
  if checkpoint_path:
    return info, trainer.run, checkpoint.restore_path(checkpoint_path,
                                                      trainer.abstract_state())
  if checkpoint.latest_step(workdir) is None:
    raise UserError(f'--workdir {workdir} has no checkpoint; train first, or pass '
                    '--checkpoint PATH.')
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    return info, trainer.run, ckpt.restore(trainer.abstract_state())


def load_variables(config: ml_collections.ConfigDict, workdir: str | None = None,
                   checkpoint_path: str | None = None,
                   adapters: str | None = None) -> tuple[train.Run, dict[str, Any]]:
  """(run, variables) of a trained model, ready for `run.model.apply`.

  From the latest checkpoint of `workdir` (or `checkpoint_path`), or -- with
  `adapters` -- the frozen backbone of `config.init_from` with the exported
  adapters swapped in.
  """
  if not adapters:
    _, run, state = _restore(config, workdir, checkpoint_path)
    return run, run.variables(state)
  data.check_num_classes(data.info(config.data), config.model.num_classes)
  run = train.Run(config)
  variables = train.init_variables(config, run.model, jax.random.key(config.seed))
  variables = checkpoint.swap_in_adapters(adapters, variables, run.mask, config.model)
  return run, run.place(run.stored(variables))


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str,
                     checkpoint_path: str | None = None,
                     adapters: str | None = None) -> dict[str, float]:
  """Eval job: top-1/top-5 of `load_variables(...)`, also written to <workdir>/eval.json."""
  run, variables = load_variables(config, workdir, checkpoint_path, adapters)
  result = evaluate.evaluate(run.model, variables, train.eval_dataset(config, run))
  if jax.process_index() == 0 and os.path.isdir(workdir):
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump(result, f)
  return result


def export(config: ml_collections.ConfigDict, workdir: str, out_dir: str,
           checkpoint_path: str | None = None) -> dict[str, Any]:
  """Export job: writes the trainable leaves of the latest checkpoint to out_dir."""
  info, run, state = _restore(config, workdir, checkpoint_path)
  return checkpoint.export_adapters(out_dir, run.variables(state), run.mask,
                                    config.model, info.class_names)
