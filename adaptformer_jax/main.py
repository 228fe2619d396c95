"""Command line: `python -m adaptformer_jax.main --config configs/X.py:METHOD --workdir DIR`.

Parses flags and dispatches to train / eval / export; user mistakes end in one
line on stderr and exit status 2 (`--verbose` shows the traceback). SIGTERM or
SIGINT during training checkpoints the current step and exits with 128 + signal.
"""
import logging as std_logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from adaptformer_jax.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file and method, e.g. configs/cifar100.py:adaptformer. '
    'Optional for eval/export: defaults to the workdir\'s config.json.')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the config.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'export'], 'Job to run.')
flags.DEFINE_string('checkpoint', None, 'eval/export: a <workdir>/checkpoints/<step> dir.')
flags.DEFINE_string('adapters', None, 'eval: an export dir to swap into the frozen backbone.')
flags.DEFINE_string('out', None, 'export: output directory.')
flags.DEFINE_string('coordinator_address', '', 'Multi-host: host:port of process 0.')
flags.DEFINE_integer('num_processes', 0, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', -1, 'Multi-host: index of this process.')
flags.DEFINE_bool('verbose', False, 'Show full tracebacks for user errors, and library '
                  'warnings.')


def _run(config):
  """The job, with a signal-stopped training run exiting as the signal would (128 + N)."""
  from adaptformer_jax import interrupts  # pylint: disable=g-import-not-at-top
  try:
    return _dispatch(config)
  except interrupts.Interrupted as e:
    print(f'interrupted: {e}', file=sys.stderr)
    sys.exit(128 + e.signum)


def _dispatch(config):
  from adaptformer_jax import jobs  # pylint: disable=g-import-not-at-top
  from adaptformer_jax import sharding  # pylint: disable=g-import-not-at-top
  from adaptformer_jax import train  # pylint: disable=g-import-not-at-top
  from adaptformer_jax import workdirs  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  if not FLAGS.workdir:
    raise UserError('--workdir is required: the directory for checkpoints and metrics.')
  if config is None:
    if FLAGS.mode == 'train':
      raise UserError('--config is required for training, e.g. '
                      '--config configs/cifar100.py:adaptformer.')
    config = workdirs.load_config(FLAGS.workdir)
  if FLAGS.mode == 'train' and config.get('experiment') == 'transfer':
    from adaptformer_jax import transfer  # pylint: disable=g-import-not-at-top
    return transfer.run(config, FLAGS.workdir)
  if FLAGS.mode == 'train':
    return train.train_and_evaluate(config, FLAGS.workdir)
  if FLAGS.mode == 'eval':
    result = jobs.evaluate_workdir(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.adapters)
    print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
          f"({result['count']} images)")
    return result
  if not FLAGS.out:
    raise UserError('--mode export needs --out DIR.')
  tensors = jobs.export(config, FLAGS.workdir, FLAGS.out, FLAGS.checkpoint)
  print(f'Exported {len(tensors)} tensors to {FLAGS.out}.')
  return tensors


def _fail(message):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl parsing, with config-file mistakes reported as one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    if '--verbose' in argv:
      raise
    # config_flags re-raises get_config's errors as text with a traceback: keep our line.
    lines = str(e).strip().splitlines()
    ours = [l for l in lines if l.startswith('adaptformer_jax.errors.')]
    _fail(ours[-1].split(': ', 1)[1] if ours else lines[0])
  except (AttributeError, KeyError) as e:  # an override of a field the config lacks
    if '--verbose' in argv:
      raise
    # ml_collections nests its "'name'\nDid you mean ...?" text in the exception's args.
    text = e
    while isinstance(text, BaseException) and text.args:
      text = text.args[0]
    field, _, hint = str(text).partition('\n')
    hint = f' ({hint.strip()})' if hint.strip() else ''
    _fail(f'unknown config field {field} in a --config.* override{hint}; see the config '
          'file for the fields it has.')


def _loaded_config():
  """The --config value, or None; an unreadable config file is a UserError."""
  if FLAGS['config'].value is None:
    return None
  try:
    FLAGS.config.get('model')
  except IOError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    raise UserError(f'--config {config_flags.get_config_filename(FLAGS["config"])}: cannot '
                    f'load it ({reason}); pass a file from configs/, e.g. '
                    'configs/cifar100.py:adaptformer.') from None
  return FLAGS.config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.INFO)
  # Libraries (tfds, orbax, jax, torch) narrate at INFO and warn about their internals;
  # keep the console to our own messages and library errors unless --verbose.
  std_logging.captureWarnings(True)
  if not FLAGS.verbose:
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= std_logging.ERROR or 'adaptformer_jax' in r.pathname)
  try:
    _run(_loaded_config())
  except UserError as e:
    if FLAGS.verbose:
      raise
    _fail(e)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
