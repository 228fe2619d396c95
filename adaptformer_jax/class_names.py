"""Class names travel with the model: the workdir, every checkpoint step and adapter exports
record them, so predictions say 'cat' rather than 3, and evaluating on data whose
classes differ from the model's is refused instead of scored as nonsense.
"""
import json
import os
from typing import Sequence

import jax

from adaptformer_jax import files
from adaptformer_jax.errors import UserError
from adaptformer_jax.weights import checkpoints
from adaptformer_jax.weights import exports

FILE = 'class_names.json'


def metadata(class_names: Sequence[str]) -> dict:
  """What a checkpoint step records about its classes."""
  return {'class_names': list(class_names)}


def record(workdir: str, class_names: Sequence[str]) -> None:
  """Writes `<workdir>/class_names.json`; a resumed run must have the same classes.

  As with config.json, only a checkpoint makes the workdir hold a run: before the
  first one, a restart may change the data and rewrites the file.
  """
  recorded = read_workdir(workdir)
  if recorded is not None and checkpoints.latest_step(workdir) is not None:
    check(recorded, class_names, f'--workdir {workdir} holds a run of')
    return
  if jax.process_index() == 0:
    files.write_atomic(os.path.join(workdir, FILE), json.dumps(list(class_names), indent=1))


def read_workdir(workdir: str | None) -> list | None:
  path = os.path.join(workdir or '', FILE)
  if not workdir or not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def of_model(workdir: str | None = None, checkpoint_path: str | None = None,
             adapters: str | None = None) -> list | None:
  """The class names a trained model records: in its adapter export, its checkpoint
  step (`checkpoint_path`, else the latest of `workdir`), or the workdir; None if none does.
  """
  if adapters:
    return exports.read_adapter_config(adapters).get('class_names')
  if checkpoint_path:
    names = checkpoints.step_metadata(checkpoint_path).get('class_names')
  elif workdir and checkpoints.latest_step(workdir) is not None:
    with checkpoints.Checkpointer(workdir, read_only=True) as ckpt:
      names = ckpt.metadata().get('class_names')
  else:
    names = None
  return names if names is not None else read_workdir(workdir)


def check(model_names: Sequence[str], data_names: Sequence[str], model: str) -> None:
  """A UserError unless the data has exactly the model's classes, in the same order."""
  model_names, data_names = list(model_names), list(data_names)
  if model_names == data_names:
    return
  missing = [n for n in model_names if n not in data_names]
  extra = [n for n in data_names if n not in model_names]
  if missing or extra:
    diff = '; '.join(part for part in (
        f"the data lacks {', '.join(missing)}" if missing else '',
        f"the data adds {', '.join(extra)}" if extra else '') if part)
  else:
    diff = 'the same classes in another order (labels would mean other classes)'
  raise UserError(f'{model} {len(model_names)} classes, the data has {len(data_names)}: '
                  f'{diff}. Use data with the classes the model was trained on.')
