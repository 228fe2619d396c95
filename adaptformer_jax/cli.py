"""What the package's command lines share: mistakes as one `error:` line, signal stops as 128 + N.

Used by `main` (train / eval / export) and `demo`. Cheap to import: the jobs
import JAX themselves, so `--help` and flag mistakes answer at once.
"""
import logging as std_logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from adaptformer_jax import interrupts
from adaptformer_jax.errors import UserError

# Set before the jobs load TensorFlow: no C++ log lines or oneDNN notice on the console.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

VERBOSE = flags.DEFINE_bool('verbose', False, 'Show full tracebacks for user errors, and '
                            'library warnings.')
_HELP = ('--help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')
_EXAMPLE = 'configs/cifar100.py:adaptformer'


def fail(message: object) -> NoReturn:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _innermost_user_error(error: BaseException) -> UserError | None:
  """The UserError a config file raised, under the flag errors that wrap it (or None)."""
  found = None
  while error is not None:
    if isinstance(error, UserError):
      found = error
    error = error.__cause__ or error.__context__
  return found


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing; a config file's mistake is one `error:` line, and --help exits 0."""
  verbose = '--verbose' in argv
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl's help flags print the usage and exit 1
    sys.exit(0 if e.code == 1 and any(a in _HELP for a in argv) else e.code)
  except (AttributeError, KeyError) as e:  # an override of a field the config lacks
    if verbose:
      raise
    unknown_field(e)
  except (flags.Error, UserError) as e:
    if verbose:
      raise
    # config_flags re-raises get_config's errors with a traceback in the text; the
    # original exception stays chained below it.
    fail(_innermost_user_error(e) or str(e).strip().splitlines()[0])


def unknown_field(error: AttributeError | KeyError) -> NoReturn:
  """Fails with one line for a --config.* override of a field the config lacks."""
  # ml_collections nests its "'name'\nDid you mean ...?" text in the exception's args.
  text = error
  while isinstance(text, BaseException) and text.args:
    text = text.args[0]
  field, _, hint = str(text).partition('\n')
  hint = f' ({hint.strip()})' if hint.strip() else ''
  fail(f'unknown config field {field} in a --config.* override{hint}; see the config '
       'file for the fields it has.')


def loaded_config(flag: flags.FlagHolder) -> ml_collections.ConfigDict | None:
  """A config file flag's value, or None if not given; an unreadable file is a UserError."""
  config = flag.value
  if config is None or isinstance(config, ml_collections.ConfigDict):
    return config
  # config_flags defers an I/O error of the file to an object that raises it on use.
  path = config_flags.get_config_filename(flags.FLAGS[flag.name])
  try:
    with open(path):
      reason = 'an I/O error while loading it'
  except OSError as e:
    reason = e
  raise UserError(f'--config {path}: cannot load it ({reason}); pass a file from configs/, '
                  f'e.g. {_EXAMPLE}.')


def run(job: Callable[[], Any]) -> None:
  """Runs `job` with the console kept to our own messages (unless --verbose).

  A UserError ends in one line and exit status 2; a training run stopped by
  SIGTERM/SIGINT (checkpointed) exits with 128 + the signal number, as if killed;
  Ctrl-C anywhere else (eval, export, start-up) exits 130 without a traceback.
  Library ERROR records are hidden too: they carry tracebacks (orbax logging a
  failed save) that our one-line errors already sum up.
  """
  logging.set_verbosity(logging.INFO)
  std_logging.captureWarnings(True)
  if not VERBOSE.value:
    logging.get_absl_handler().addFilter(lambda r: 'adaptformer_jax' in r.pathname)
  try:
    with interrupts.exit_on_sigint('interrupted: SIGINT received; stopped before the job '
                                   'finished (no checkpoint was changed).'):
      job()
  except UserError as e:
    if VERBOSE.value:
      raise
    fail(e)
  except interrupts.Interrupted as e:
    print(f'interrupted: {e}', file=sys.stderr)
    sys.exit(128 + e.signum)


def run_app(job: Callable[[], Any]) -> None:
  """`app.run` of a command that takes no positional arguments: its flags through
  `parse_flags`, `job` under `run`."""

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    run(job)

  app.run(main, flags_parser=parse_flags)
