"""Which VTAB datasets are prepared, the message that says how to prepare the others, and
the task listing of `--list`. Reads only tfds metadata: never a record, never a download."""
import json

import tensorflow_datasets as tfds

from adaptformer_jax.data import vtab as tasks


def missing(names: list[str], data_dir: str | None) -> list[tasks.Task]:
  """The tasks whose tfds dataset is not prepared in `data_dir` (nothing is read or fetched)."""
  found = []
  for name in names:
    t = tasks.task(name)
    try:
      prepared = tfds.builder(t.tfds_name, data_dir=data_dir).is_prepared()
    except (tfds.core.DatasetNotFoundError, ValueError, AssertionError):
      prepared = False
    if not prepared:
      found.append(t)
  return found


def missing_message(found: list[tasks.Task], data_dir: str | None) -> str:
  """One message naming every missing task, the `tfds build` that prepares them (with the
  version pins) and what needs a manual download."""
  root = data_dir or tfds.core.constants.DATA_DIR
  names = ', '.join(f'{t.name} ({t.tfds_name})' for t in found)
  builds = ' '.join(dict.fromkeys(f"'{t.tfds_name}'" for t in found))  # with the version pin
  manual = [f"{t.name} needs {t.manual.replace('DATA_DIR', root)}" for t in found if t.manual]
  return (f'{len(found)} VTAB dataset(s) not prepared in data.data_dir {root}: {names}. '
          f'Nothing is downloaded here: on a machine with network access run `tfds build '
          f'{builds} --data_dir {root}` and copy the folders into {root}'
          + (f" ({'; '.join(manual)})" if manual else '')
          + '; or pass --skip_missing to run the other tasks.')


def listing(fmt: str, data_dir: str | None) -> str:
  """The task table: JSON (name, group, tfds_name, num_classes, splits), or readable with
  which tasks are prepared in `data_dir`."""
  if fmt == 'json':
    return json.dumps([dict(name=t.name, group=t.group, tfds_name=t.tfds_name,
                            num_classes=t.num_classes, splits=dict(t.splits))
                       for t in tasks.TASKS], indent=1)
  absent = {t.name for t in missing([t.name for t in tasks.TASKS], data_dir)}
  lines = [f"{'task':<21}{'group':<12}{'tfds':<52}{'classes':>7}  {'prepared':<9}"
           'val200 / test']
  for t in tasks.TASKS:
    lines.append(f"{t.name:<21}{t.group:<12}{t.tfds_name:<52}{t.num_classes:>7}  "
                 f"{'no' if t.name in absent else 'yes':<9}{t.splits['val200']} / "
                 f"{t.splits['test']}")
  lines.append(f'{len(tasks.TASKS) - len(absent)} of {len(tasks.TASKS)} prepared in '
               f'{data_dir or tfds.core.constants.DATA_DIR}; labels and sources: docs/vtab.md.')
  return '\n'.join(lines)
