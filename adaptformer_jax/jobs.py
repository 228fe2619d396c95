"""The jobs that read a trained run: evaluate it, export its adapters, load its variables.

They take no workdir lock: a run being trained can be read, its checkpoints appear by
atomic rename. Every result names the checkpoint it came from.
"""
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from adaptformer_jax import checkpoint
from adaptformer_jax import evaluate
from adaptformer_jax import train
from adaptformer_jax.errors import UserError

EVAL_FILE = 'eval.json'


def _restore(config: ml_collections.ConfigDict, workdir: str | None,
             checkpoint_path: str | None = None
             ) -> tuple[Any, train.Run, train.TrainState, str]:
  """The dataset info, run and trained state of a workdir (latest, or `checkpoint_path`),
  and the checkpoint step directory it came from."""
  info, trainer = train.setup(config)
  if checkpoint_path:
    state = checkpoint.restore_path(checkpoint_path, trainer.abstract_state())
    return info, trainer.run, state, os.path.abspath(checkpoint_path)
  if checkpoint.latest_step(workdir) is None:
    raise UserError(f'--workdir {workdir} has no checkpoint; train first, or pass '
                    '--checkpoint PATH.')
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    state = ckpt.restore(trainer.abstract_state())
    return info, trainer.run, state, os.path.join(ckpt.directory, str(int(state.step)))


def load_variables(config: ml_collections.ConfigDict, workdir: str | None = None,
                   checkpoint_path: str | None = None,
                   adapters: str | None = None) -> tuple[train.Run, dict[str, Any]]:
  """(run, variables) of a trained model, ready for `run.model.apply`.

  From the latest checkpoint of `workdir` (or `checkpoint_path`), or -- with
  `adapters` -- the frozen backbone of `config.init_from` with the exported
  adapters swapped in.
  """
  if not adapters:
    _, run, state, _ = _restore(config, workdir, checkpoint_path)
    return run, run.variables(state)
  run = train.setup(config)[1].run
  variables = train.init_variables(config, run.model, jax.random.key(config.seed))
  variables = checkpoint.swap_in_adapters(adapters, variables, run.mask, config.model)
  return run, run.place(run.stored(variables))


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str,
                     checkpoint_path: str | None = None,
                     adapters: str | None = None) -> dict[str, float]:
  """Eval job: top-1/top-5 of `load_variables(...)`, recorded in <workdir>/eval.json.

  The record names the checkpoint (or adapters) measured. It is written only where
  it belongs: not over a training workdir's record with another run's checkpoint,
  and a workdir that cannot be written (read-only) loses the record with a warning,
  not the result.
  """
  if adapters:
    run, variables = load_variables(config, adapters=adapters)
    source = os.path.abspath(adapters)
  else:
    _, run, state, source = _restore(config, workdir, checkpoint_path)
    variables = run.variables(state)
  result = evaluate.evaluate(run.model, variables, train.eval_dataset(config, run))
  if jax.process_index() == 0 and os.path.isdir(workdir):
    _record(workdir, {**result, 'checkpoint': source})
  return result


def _record(workdir: str, record: dict[str, Any]) -> None:
  path = os.path.join(workdir, EVAL_FILE)
  own = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if os.path.isdir(own) and os.path.dirname(record['checkpoint']) != own:
    logging.warning('%s not written: it records the checkpoints of this workdir, and %s '
                    'is not one of them.', path, record['checkpoint'])
    return
  try:
    with open(path + '.tmp', 'w') as f:
      json.dump(record, f)
    os.replace(path + '.tmp', path)
  except OSError as e:
    logging.warning('%s not written (%s); the printed result is the only record.', path,
                    e.strerror)


def export(config: ml_collections.ConfigDict, workdir: str, out_dir: str,
           checkpoint_path: str | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Export job: writes the trainable leaves of the latest checkpoint to out_dir.

  A different export already in out_dir is replaced only with `overwrite`.
  """
  info, run, state, source = _restore(config, workdir, checkpoint_path)
  return checkpoint.export_adapters(out_dir, run.variables(state), run.mask, config.model,
                                    info.class_names, source=source, overwrite=overwrite)
