"""`python -m adaptformer_jax.vtab`: list the tasks, run the benchmark, or rebuild a report.

  python -m adaptformer_jax.vtab --list [--format=json]
  python -m adaptformer_jax.vtab --config configs/vtab.py:adaptformer,vit_b16_in21k_orig \
      --workdir runs/vtab [--tasks cifar,dtd] [--skip_missing]
  python -m adaptformer_jax.vtab --report runs/vtab
"""
import os

from absl import flags
from ml_collections import config_flags

from adaptformer_jax import cli
from adaptformer_jax.errors import UserError

CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/vtab.py:METHOD[,PRESET]',
                                         lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Root of the runs: <workdir>/<task>/<run>/.')
TASKS = flags.DEFINE_string('tasks', None, 'Comma-separated tasks (default: config.vtab.tasks).')
LIST = flags.DEFINE_bool('list', False, 'Print the 19 tasks and exit.')
FORMAT = flags.DEFINE_enum('format', 'table', ['table', 'json'], '--list output.')
DATA_DIR = flags.DEFINE_string('data_dir', None, '--list: where to look for prepared datasets '
                               '(default: config.data.data_dir, else the tfds default).')
SKIP_MISSING = flags.DEFINE_bool('skip_missing', False, 'Run the prepared tasks, skip the rest.')
REPORT = flags.DEFINE_string('report', None, 'Rebuild results.json, report.md, report.png of '
                             'this root from the runs that finished, and exit.')


def job() -> None:
  config = cli.loaded_config(CONFIG)
  data_dir = DATA_DIR.value or (config.data.data_dir if config is not None else None)
  if LIST.value:
    from adaptformer_jax.vtab import datasets  # pylint: disable=g-import-not-at-top
    print(datasets.listing(FORMAT.value, data_dir))
    return
  if REPORT.value:
    from adaptformer_jax.vtab import report  # pylint: disable=g-import-not-at-top
    if not os.path.isdir(REPORT.value):
      raise UserError(f'--report {REPORT.value}: no such directory (a --workdir of a VTAB run).')
    results = report.write(REPORT.value)
    print(f"{len(results['tasks'])} task(s) reported in {REPORT.value}/report.md")
    return
  if config is None or 'vtab' not in config:
    raise UserError('--config configs/vtab.py:METHOD[,PRESET] is required (or --list / '
                    '--report DIR).')
  if not WORKDIR.value:
    raise UserError('--workdir is required: the root for every run of the benchmark.')
  from adaptformer_jax.vtab import protocol  # pylint: disable=g-import-not-at-top
  from adaptformer_jax.vtab import runner  # pylint: disable=g-import-not-at-top
  names = protocol.task_names(config, TASKS.value)
  results = runner.run_all(config, WORKDIR.value, names, SKIP_MISSING.value)
  a = results['averages']
  print(f"Done: {len(results['tasks'])} task(s); report in {WORKDIR.value}/report.md"
        + (f"; mean over 19 tasks {a['mean_19_tasks']:.2f}, mean of group means "
           f"{a['mean_of_group_means']:.2f}" if a['mean_19_tasks'] is not None else ''))


if __name__ == '__main__':
  cli.run_app(job)
