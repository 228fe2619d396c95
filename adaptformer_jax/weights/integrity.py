"""What stored weights must satisfy before anything uses them.

* A checkpoint step's files are the ones saved: `manifest.sha256` in the step
  directory lists their SHA-256 in `sha256sum` format (`cd <step> && sha256sum
  -c manifest.sha256` checks it by hand). SHA-256 runs at over 1 GB/s on CPUs with
  SHA extensions, so hashing costs little next to writing the bytes
  (benchmarks/checkpoint_manifest.py).
* Loaded weights are finite floating-point numbers: NaN/Inf, integer or boolean
  values would load silently and fail later, far from their cause.
"""
import hashlib
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from adaptformer_jax.errors import UserError

MANIFEST = 'manifest.sha256'


class CorruptCheckpoint(UserError):
  """A checkpoint step whose files differ from its manifest."""


def sha256(path: str) -> str:
  """The file's SHA-256, hex."""
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def write_manifest(step_dir: str) -> None:
  """Records the SHA-256 of every file of the step's items in `step_dir/manifest.sha256`.

  Items are the step's subdirectories (tensor data and tree metadata); orbax's
  step-level files are bookkeeping it still updates while committing.
  """
  lines = []
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    if root == step_dir:
      continue
    for name in sorted(files):
      path = os.path.join(root, name)
      lines.append(f'{sha256(path)}  {os.path.relpath(path, step_dir)}\n')
  tmp = os.path.join(step_dir, MANIFEST + '.tmp')
  with open(tmp, 'w') as f:
    f.writelines(lines)
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_manifest(step_dir: str) -> bool:
  """Raises CorruptCheckpoint if a file listed in the step's manifest is missing or differs.

  Returns False for a step without a manifest (saved before manifests existed, or
  by other tools), which is restored unverified.
  """
  try:
    with open(os.path.join(step_dir, MANIFEST)) as f:
      entries = [line.rstrip('\n').split('  ', 1) for line in f if line.strip()]
  except FileNotFoundError:
    return False
  for digest, rel in entries:
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      raise CorruptCheckpoint(f'{path} is missing (listed in {MANIFEST}).')
    if sha256(path) != digest:
      raise CorruptCheckpoint(f'{path}: content differs from its SHA-256 in {MANIFEST} '
                              '(the file was damaged after it was saved).')
  return True


def check_values(source: str, tensors: dict[str, Any]) -> None:
  """Refuses weights that would load silently wrong: integer, boolean or complex
  dtypes, and NaN or Inf values (float64 is fine: it is cast to the model's dtype).

  `tensors` maps the names to show (checkpoint keys) to arrays.
  """
  problems = []
  for name, value in tensors.items():
    value = np.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating):
      problems.append(f'{name} holds {value.dtype} values, not floating point')
      continue
    if not np.isfinite(value).all():
      nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
      problems.append(f'{name} has ' + ' and '.join(
          f'{n} {what}' for n, what in ((nan, 'NaN'), (inf, 'Inf')) if n) + ' values')
  if problems:
    more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
    raise UserError(f'{source}: ' + '; '.join(problems[:3]) + more + '; weights must be '
                    'finite floating-point numbers: use a checkpoint of a healthy run.')
