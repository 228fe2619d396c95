"""Command line: `python -m adaptformer_jax.main --config configs/X.py:METHOD --workdir DIR`.

Parses flags and runs one job: train, eval, export, merge or predict. User mistakes end in one
line on stderr and exit status 2 (`--verbose` shows the traceback). SIGTERM or
SIGINT during training checkpoints the current step and exits with 128 + signal.
"""
from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from adaptformer_jax import cli
from adaptformer_jax.errors import UserError

FLAGS = flags.FLAGS
CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and method, e.g. configs/cifar100.py:adaptformer. '
    'Optional for eval/export: defaults to the workdir\'s config.json.')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the config.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'export', 'merge', 'predict'],
                  'Job to run.')
flags.DEFINE_string('checkpoint', None,
                    'eval/export/merge/predict: a <workdir>/checkpoints/<step>.')
flags.DEFINE_string('adapters', None, 'eval/merge/predict: an export to swap into the backbone.')
flags.DEFINE_string('out', None, 'export/merge: output dir; predict: for predictions.csv '
                    '(default: the workdir).')
flags.DEFINE_multi_string('images', [], 'predict: files, dirs or globs (more may follow).')
flags.DEFINE_integer('top_k', 5, 'predict: classes per image.')
flags.DEFINE_bool('per_class', False, 'eval: also print the accuracy of each class.')
flags.DEFINE_bool('overwrite', False, 'export/merge: replace what --out already holds.')
flags.DEFINE_string('coordinator_address', '', 'Multi-host: host:port of process 0.')
flags.DEFINE_integer('num_processes', 0, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', -1, 'Multi-host: index of this process.')
# The flags only some modes read: given to another mode, one is a mistake, not a no-op.
MODE_FLAGS = {'checkpoint': ('eval', 'export', 'merge', 'predict'),
              'adapters': ('eval', 'merge', 'predict'), 'out': ('export', 'merge', 'predict'),
              'images': ('predict',), 'top_k': ('predict',), 'per_class': ('eval',),
              'overwrite': ('export', 'merge')}


def check_mode_flags(mode: str) -> None:
  """A UserError naming the first flag given that `mode` does not read."""
  for name, modes in MODE_FLAGS.items():
    if mode not in modes and FLAGS[name].present:
      why = (' (training resumes from the latest checkpoint of --workdir)'
             if mode == 'train' and name == 'checkpoint' else '')
      raise UserError(f'--{name} is for --mode {"/".join(modes)}, not --mode {mode}{why}; '
                      'drop it.')


def job(config: ml_collections.ConfigDict | None, images: list[str]) -> None:
  """The --mode job on `config` (None: the workdir's saved config, for eval/export/merge/predict)."""
  check_mode_flags(FLAGS.mode)
  # pylint: disable=g-import-not-at-top  # JAX and TF load only once the flags are good
  from adaptformer_jax import evaluate
  from adaptformer_jax import jobs
  from adaptformer_jax import sharding
  from adaptformer_jax import train
  from adaptformer_jax import workdirs
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  # Predicting or merging from an export or a checkpoint step needs no workdir (with --out).
  workdir_free = FLAGS.mode in ('predict', 'merge') and (FLAGS.adapters or FLAGS.checkpoint)
  if not FLAGS.workdir and not workdir_free:
    raise UserError('--workdir is required: the directory for checkpoints and metrics.')
  if config is None:
    if FLAGS.mode == 'train':
      raise UserError('--config is required for training, e.g. '
                      '--config configs/cifar100.py:adaptformer.')
    if not FLAGS.workdir:
      raise UserError('--config is required without --workdir: the config the model was '
                      'trained with (its data and init_from).')
    config = workdirs.load_config(FLAGS.workdir)
  if FLAGS.mode == 'train':
    train.train_and_evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == 'eval':
    result = jobs.evaluate_workdir(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.adapters,
                                   FLAGS.per_class)
    print(evaluate.describe(result))
  elif FLAGS.mode == 'predict':
    jobs.predict_files(config, FLAGS.workdir, images, out=FLAGS.out, top_k=FLAGS.top_k,
                       checkpoint_path=FLAGS.checkpoint, adapters=FLAGS.adapters)
  elif not FLAGS.out:
    raise UserError(f'--mode {FLAGS.mode} needs --out DIR.')
  elif FLAGS.mode == 'merge':
    written = jobs.merge(config, FLAGS.workdir, FLAGS.out, FLAGS.checkpoint, FLAGS.adapters,
                         FLAGS.overwrite)
    print(f"Merged into plain weights: {', '.join(written)} in {FLAGS.out}.")
  else:
    tensors = jobs.export(config, FLAGS.workdir, FLAGS.out, FLAGS.checkpoint, FLAGS.overwrite)
    print(f'Exported {len(tensors)} tensors to {FLAGS.out}.')


def main(argv: list[str]) -> None:
  if len(argv) > 1 and not FLAGS.images:  # `--images *.jpg`: the shell's expansion follows
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  cli.run(lambda: job(cli.loaded_config(CONFIG), FLAGS.images + argv[1:]))


def run() -> None:
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
