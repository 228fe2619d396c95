"""Reading weight files: which container a path is, and its tensors as numpy arrays.

Formats are told apart by the file's first bytes (then its extension), so users never
name them. PyTorch files are read with `weights_only=True` (no pickle code runs); a
file whose other entries are objects torch's safe loader refuses (a Lightning
checkpoint's OmegaConf hyper-parameters) is read again with those objects left
opaque (`_opaque_pickle`), still running no code from the file.
"""
import argparse
import os
import pickle
import types
import zipfile

import flax.traverse_util
import jax
import numpy as np

from adaptformer_jax.errors import described
from adaptformer_jax.errors import UserError
from adaptformer_jax.weights import integrity

# State-dict wrappers: official/MAE/VideoMAE training scripts, VideoMAE's
# deepspeed `module`, timm/lightning `state_dict`.
_TORCH_WRAPPERS = ('model', 'module', 'state_dict')


def container(path: str | os.PathLike) -> str:
  """'orbax', 'torch', 'safetensors' or 'npz' from the path and the file's first bytes;
  a UserError for a missing path or an unknown format. Reads no weights, so a job
  can check `init_from` in a moment, before it prepares data or builds a model."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return 'orbax'
  if not os.path.isfile(path):
    raise UserError(f'pretrained checkpoint {path!r} does not exist; pass a .pth, '
                    '.safetensors or .npz file, or an orbax checkpoint directory.')
  kind = _sniff(path)
  if kind is None:
    ext = os.path.splitext(path)[1].lower()
    kind = {'.pth': 'torch', '.pt': 'torch', '.bin': 'torch', '.ckpt': 'torch',
            '.safetensors': 'safetensors', '.npz': 'npz'}.get(ext)
  if kind is None:
    raise UserError(f'{path}: not a checkpoint this loader knows; expected a PyTorch '
                    '.pth, a .safetensors, a big_vision .npz or an orbax directory.')
  return kind

def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
  """({name: np.ndarray}, file kind) for any supported container."""
  kind = container(path)
  reader = {'orbax': _read_orbax, 'torch': _read_torch, 'safetensors': _read_safetensors,
            'npz': _read_npz}
  return reader[kind](os.fspath(path)), kind

def _sniff(path):
  """The container format from the file's bytes, or None if unrecognised."""
  if zipfile.is_zipfile(path):
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except (zipfile.BadZipFile, OSError):
      return None
    if any(n.endswith('.npy') for n in names):
      return 'npz'
    if any(n.endswith('data.pkl') for n in names):
      return 'torch'
    return None
  with open(path, 'rb') as f:
    head = f.read(9)
  if len(head) == 9 and head[8:9] == b'{':
    return 'safetensors'
  if head[:1] == b'\x80':  # a pickle: torch's legacy (non-zip) format
    return 'torch'
  return None

def _unreadable(path, what, e):
  return UserError(f'{path}: could not read it as {what} ({described(e)}); '
                   'the file may be truncated or corrupt: download it again.')

def _read_torch(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"{path} is a PyTorch checkpoint; reading it needs torch: "
                    "pip install 'adaptformer_jax[torch]'.") from None
  try:
    try:
      # The official training script also saves its argparse Namespace.
      with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:  # other objects next to the tensors: leave them opaque
      obj = torch.load(path, map_location='cpu', weights_only=False,
                       pickle_module=_opaque_pickle())
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, 'a PyTorch checkpoint', e) from None
  for wrapper in _TORCH_WRAPPERS:
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
      break
  if not isinstance(obj, dict):
    raise UserError(f'{path}: holds a {type(obj).__name__}, not a state dict of tensors.')
  return {k: (v.detach().float() if v.is_floating_point() else v).numpy()
          for k, v in obj.items() if isinstance(v, torch.Tensor)}

class _Opaque:
  """Any object of a checkpoint other than tensors and plain containers: built from
  nothing, whatever the file says (it runs no code and keeps no state)."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __setitem__(self, key, value):
    del key, value

  def append(self, value):
    del value

  def extend(self, values):
    del values


# The only callables a file may name: torch's tensor rebuilders and OrderedDict (the
# storages torch's own unpickler resolves before asking).
_TENSOR_GLOBALS = {('torch._utils', '_rebuild_tensor_v2'), ('torch._utils', '_rebuild_parameter'),
                   ('collections', 'OrderedDict'), ('torch', 'Size')}


def _opaque_pickle():
  """A pickle module for torch.load whose unpickler builds tensors and plain containers
  and turns every other global of the file into `_Opaque`."""

  class Unpickler(pickle.Unpickler):

    def find_class(self, module, name):
      if (module, name) in _TENSOR_GLOBALS:
        return super().find_class(module, name)
      return _Opaque

  def load(file, **kwargs):
    return Unpickler(file, **kwargs).load()

  return types.SimpleNamespace(Unpickler=Unpickler, load=load, __name__='opaque_pickle')

def _read_safetensors(path):
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    # The flax framework reads bfloat16, which safetensors' numpy one cannot.
    with safe_open(path, framework='flax') as f:
      return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, 'a .safetensors file', e) from None

def _read_npz(path):
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, 'a .npz file', e) from None

def _orbax_item(path):
  """The directory holding the pytree: `path`, its only item (`<step>/default`), or
  that of its latest step (a `<workdir>/checkpoints` directory)."""
  if os.path.exists(os.path.join(path, '_METADATA')):
    return path
  subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
  steps = [d for d in subdirs if d.isdigit()]
  if steps:
    return _orbax_item(os.path.join(path, max(steps, key=int)))
  if len(subdirs) == 1 and os.path.exists(os.path.join(path, subdirs[0], '_METADATA')):
    return os.path.join(path, subdirs[0])
  raise UserError(f'{path}: a directory but not an orbax checkpoint (no _METADATA file); '
                  'pass a <workdir>/checkpoints/<step> directory.')

def _read_orbax(path):
  """params/batch_stats of an orbax pytree checkpoint, flattened to '/' keys."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(_orbax_item(path))
  integrity.verify_manifest(os.path.dirname(path))  # <step>/manifest.sha256, if any
  try:
    # Host numpy arrays: the saving run's devices and sharding do not matter here.
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree)
    tree = ocp.PyTreeCheckpointer().restore(path, restore_args=as_numpy)
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, 'an orbax checkpoint', e) from None
  if not isinstance(tree, dict) or 'params' not in tree:
    raise UserError(f'{path}: the orbax checkpoint has no top-level "params".')
  picked = {c: tree[c] for c in ('params', 'batch_stats') if tree.get(c)}
  return {k: np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(picked, sep='/').items()}
