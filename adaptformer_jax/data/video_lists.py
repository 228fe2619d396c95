"""Video datasets given as annotation lists, the official AdaptFormer/VideoMAE format.

Each line of a list is `<path> <label>` (space- or comma-separated, as the
official DATASET.md writes SSv2 and HMDB51 `train.csv`/`val.csv`), paths
relative to `data.video_root` unless absolute. Videos are decoded with PyAV
(FFmpeg), all frames at native size; frame sampling and crops are the
pipeline's. A list is checked whole before training starts (every line
parses, every label fits, every file exists), so a bad list fails in seconds
with the line numbers, not hours into a run. A file that exists but cannot be
decoded (or holds no frames) is skipped and counted, with a warning naming it.
"""
import dataclasses
import os
import re
import threading

from absl import logging
import numpy as np

from adaptformer_jax.errors import UserError
from adaptformer_jax.errors import described

_SEPARATOR = re.compile(r'[\s,]+')
_SHOWN = 3  # offending lines quoted in an error


@dataclasses.dataclass(frozen=True)
class VideoList:
  """The (path, label) entries of one annotation list."""
  paths: tuple[str, ...]
  labels: tuple[int, ...]


def read(list_path: str, *, root: str, num_classes: int, field: str) -> VideoList:
  """The entries of `list_path`, or one UserError naming every kind of bad line."""
  if not os.path.isfile(list_path):
    raise UserError(f'{field}: video list {list_path!r} does not exist; write one '
                    "'<path> <label>' line per video (the official DATASET.md format).")
  paths, labels, malformed, out_of_range, missing = [], [], [], [], []
  with open(list_path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      *path, label = _SEPARATOR.split(line.strip())
      if not path or not re.fullmatch(r'-?\d+', label):
        malformed.append(f'line {number}: {line.strip()[:80]!r}')
        continue
      path = os.path.join(root, ' '.join(path)) if root else ' '.join(path)
      if not 0 <= int(label) < num_classes:
        out_of_range.append(f'line {number}: label {label}')
      elif not os.path.isfile(path):
        missing.append(f'line {number}: {path}')
      paths.append(path)
      labels.append(int(label))
  problems = [
      (malformed, "not '<path> <label>' with an integer label"),
      (out_of_range, f'labels outside 0..{num_classes - 1} (data.num_classes={num_classes})'),
      (missing, 'missing files (check data.video_root)'),
  ]
  found = [f'{len(items)} {what}: {"; ".join(items[:_SHOWN])}'
           + (f'; ... {len(items) - _SHOWN} more' if len(items) > _SHOWN else '')
           for items, what in problems if items]
  if found:
    raise UserError(f'{field}: {list_path} has ' + '. '.join(found) + '.')
  if not paths:
    raise UserError(f'{field}: video list {list_path} has no entries.')
  return VideoList(tuple(paths), tuple(labels))


class Decoder:
  """PyAV decoding for tf.numpy_function: path -> uint8 (T, H, W, 3) frames.

  An undecodable video gives (0, 1, 1, 3), which the pipeline drops; `skipped`
  counts them.
  """

  def __init__(self):
    self.skipped = 0
    self._lock = threading.Lock()

  def __call__(self, path: bytes) -> np.ndarray:
    import av  # pylint: disable=g-import-not-at-top
    path = path.decode() if isinstance(path, bytes) else str(path)
    try:
      with av.open(path) as container:
        frames = [f.to_ndarray(format='rgb24') for f in container.decode(video=0)]
      if frames:
        return np.stack(frames)
      reason = 'no video frames'
    except (av.error.FFmpegError, ValueError, OSError) as e:
      reason = described(e)
    with self._lock:
      self.skipped += 1
      logging.warning('Skipping unreadable video %s (%s); %d skipped so far.',
                      path, reason, self.skipped)
    return np.zeros((0, 1, 1, 3), np.uint8)


def require_decoder() -> None:
  """A UserError saying how to install PyAV, if it is missing."""
  try:
    import av  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise UserError("video lists are decoded with PyAV: pip install 'av==18.1.0'.") from None
