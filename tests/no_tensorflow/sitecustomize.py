"""Makes TensorFlow and tfds absent in every Python started with this folder on PYTHONPATH.

Simulates an accelerator image without TensorFlow: a None entry in sys.modules
makes `import tensorflow` raise ModuleNotFoundError and importlib.util.find_spec
return None, as for a package that is not installed. Each attempted import is
appended to the file named by $TF_IMPORT_LOG (module and importing file), so a
test can tell "never tried" from "tried and tolerated the failure".
"""
import builtins
import importlib
import os
import sys
import traceback

BLOCKED = ('tensorflow', 'tensorflow_datasets')
for _name in BLOCKED:
  sys.modules[_name] = None


def _log(name):
  if name.split('.')[0] in BLOCKED and os.environ.get('TF_IMPORT_LOG'):
    caller = [f for f in traceback.extract_stack()
              if 'importlib' not in f.filename and f.filename != __file__][-1]
    with open(os.environ['TF_IMPORT_LOG'], 'a') as f:
      f.write(f'{name} from {caller.filename}:{caller.lineno}\n')


def _wrap(function, name_of):
  def wrapper(*args, **kwargs):
    _log(name_of(*args, **kwargs))
    return function(*args, **kwargs)
  return wrapper


def _absolute(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002
  del globals, locals, fromlist
  return name if level == 0 else ''  # relative imports never name tensorflow itself


builtins.__import__ = _wrap(builtins.__import__, _absolute)
importlib.import_module = _wrap(importlib.import_module, lambda name, package=None: name)
