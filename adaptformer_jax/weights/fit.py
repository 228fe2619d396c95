"""Fitting checkpoint tensors to the model: shape checks and position-embedding resampling."""
import math
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from adaptformer_jax.errors import UserError

def match(converted: dict[str, tuple[Any, str]], target: dict[str, Any], grid: tuple[int, ...],
          method: str, fresh_why: dict[str, str]) -> tuple[dict[str, Any], dict[str, list]]:
  """Checkpoint leaves fitted to the target tree, and the (our path, text) problems.

  `grid` is the model's patch grid, (h, w) or (t, h, w) for video. Leaves left
  fresh on purpose (a head with another class count) go to `fresh_why`.
  """
  loaded, unexpected, mismatched = {}, [], []
  shape = lambda a: tuple(np.shape(a))
  for key, (value, src) in converted.items():
    if key not in target:
      unexpected.append((key, src))
      continue
    want = tuple(target[key].shape)
    if key == 'params/pos_embedding' and shape(value) != want and shape(value)[-1] == want[-1]:
      value = (_fit_posemb(value, want, method) if len(grid) == 2
               else _fit_video_posemb(value, want, src, grid))
    elif (key.startswith('params/head/linear/') and shape(value) != want
          and shape(value)[:-1] == want[:-1]):
      fresh_why[key] = f'head ({shape(value)[-1]} classes in the checkpoint, {want[-1]} in the model)'
      continue
    if shape(value) != want:
      mismatched.append((key, f'{src} vs model {key} {want}'))
      continue
    loaded[key] = value
  return loaded, {'unexpected in the checkpoint': unexpected,
                  'shape mismatches (checkpoint vs model)': mismatched}

def _class_rows(tokens: int) -> int:
  """1 if a position embedding of `tokens` rows has a class-token row, else 0."""
  return 0 if math.isqrt(tokens) ** 2 == tokens else 1

def _fit_posemb(value, want, method):
  """A position embedding resampled to the model's grid.

  A checkpoint without a class-token row (big_vision, timm no_embed_class, whose
  class token carries its own position) gives the model's class token zeros.
  """
  if _class_rows(value.shape[1]) < _class_rows(want[1]):
    value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
  rows = _class_rows(want[1])
  if _class_rows(value.shape[1]) == rows and value.shape[1] != want[1]:
    value = resample_posemb(value, math.isqrt(want[1] - rows), method)
  return value

def _fit_video_posemb(value, want, src, grid):
  """A learned video table (prefix rows kept) resampled trilinearly to the model's
  (t, h, w) grid. The checkpoint's grid is a t x h x h that fits its row count:
  the one with the model's t (VideoMAE's own assumption), else its h, else its
  t:h ratio."""
  prefix = want[1] - math.prod(grid)
  tokens = value.shape[1] - prefix
  fits = [(t, math.isqrt(tokens // t)) for t in range(1, tokens + 1)
          if tokens % t == 0 and math.isqrt(tokens // t) ** 2 == tokens // t]
  old = next((f for rule in (lambda t, h: t == grid[0], lambda t, h: h == grid[1],
                             lambda t, h: t * grid[1] == h * grid[0])
              for f in fits if rule(*f)), None)
  if old is None or grid[1] != grid[2]:
    raise UserError(f'{src}: {tokens} position rows do not form a frames x side x side '
                    f'grid to resample to the model grid {grid}; set model.num_frames '
                    'and model.image_size to the checkpoint\'s.')
  old_grid = (old[0], old[1], old[1])
  logging.info('%s: resampling the video position embedding from a %s to a %s grid.',
              src, 'x'.join(map(str, old_grid)), 'x'.join(map(str, grid)))
  table = jnp.asarray(value[0, prefix:], jnp.float32).reshape(*old_grid, -1)
  table = jax.image.resize(table, (*grid, table.shape[-1]), method='linear')
  return np.concatenate([value[:, :prefix], np.asarray(table).reshape(1, -1, want[-1])], 1)

def posemb_note(converted: dict[str, tuple[Any, str]], target: dict[str, Any], method: str) -> str:
  """'; position embedding 28x28 -> 4x4 (bicubic)' when it was resampled."""
  if 'params/pos_embedding' not in converted or 'params/pos_embedding' not in target:
    return ''
  old = np.shape(converted['params/pos_embedding'][0])[1]
  new = target['params/pos_embedding'].shape[1]
  old, new = (math.isqrt(n - _class_rows(n)) for n in (old, new))
  return f'; position embedding {old}x{old} -> {new}x{new} ({method})' if old != new else ''

def resample_posemb(posemb: np.ndarray, new_grid: int | tuple[int, int],
                    method: str = 'bicubic') -> np.ndarray:
  """Resizes the patch grid of a (1, [1 +] h*w, D) position embedding.

  A class-token row (when the token count is not a square) is kept as is; the
  old grid must be square. `new_grid` is a side length or an (h, w) pair.
  `method` follows the checkpoint family's own loader: 'bicubic' as timm
  (antialiased when shrinking, torch's F.interpolate(antialias=True)), 'bilinear'
  as big_vision (scipy.ndimage.zoom(order=1): corners aligned, no antialiasing).
  """
  new_h, new_w = (new_grid, new_grid) if np.ndim(new_grid) == 0 else new_grid
  tokens = posemb.shape[1]
  prefix = 0 if math.isqrt(tokens) ** 2 == tokens else 1
  head, grid = np.asarray(posemb[:, :prefix], np.float32), np.asarray(posemb[0, prefix:])
  side = math.isqrt(grid.shape[0])
  if side * side != grid.shape[0]:
    raise UserError(f'pos_embedding: {grid.shape[0]} patch positions do not form a '
                    'square grid, so they cannot be resampled to the model image size.')
  grid = grid.astype(np.float32).reshape(side, side, -1)
  if method == 'bicubic':
    grid = np.asarray(jax.image.resize(grid, (new_h, new_w, grid.shape[-1]), 'bicubic',
                                       antialias=True))
  elif method == 'bilinear':
    rows, cols = _aligned_linear(side, new_h), _aligned_linear(side, new_w)
    grid = np.einsum('ia,jb,abd->ijd', rows, cols, grid.astype(np.float64))
  else:
    raise ValueError(f'resample_posemb: unknown method {method!r}')
  return np.concatenate([head, grid.reshape(1, new_h * new_w, -1).astype(np.float32)], 1)

def _aligned_linear(old, new):
  """(new, old) linear-interpolation weights mapping first to first, last to last."""
  pos = np.arange(new) * ((old - 1) / (new - 1) if new > 1 else 0.0)
  lo = np.clip(np.floor(pos).astype(int), 0, max(old - 2, 0))
  frac = pos - lo
  weights = np.zeros((new, old))
  weights[np.arange(new), lo] = 1 - frac
  weights[np.arange(new), np.minimum(lo + 1, old - 1)] += frac
  return weights
