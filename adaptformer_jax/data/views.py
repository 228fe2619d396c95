"""Which views of an example evaluation takes: clips x crops, and the ops that crop.

TensorFlow-free, so the config schema can check views without loading the pipeline.
"""
from typing import Any

from adaptformer_jax.errors import ConfigError


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


# The preprocessing ops that take `crop=(j, n)`: what data.eval_crops moves.
CROP_OPS = ('center_crop', 'short_side_center_crop', 'resize_center_crop')


def check_views(clips: int, crops: int, ops: Any, *, video: bool, train: bool = False,
                field: str = 'data.eval_pp') -> None:
  """A ConfigError unless `clips` x `crops` eval views can be taken: positive
  counts, a video model for more than one, evaluation, and a crop among the
  `ops` (an op string or its op names) when crops > 1."""
  for name, value in (('eval_clips', clips), ('eval_crops', crops)):
    if not _is_int(value) or value < 1:
      raise ConfigError(f'data.{name}: must be an integer >= 1, got {value!r}.')
  if clips * crops == 1:
    return
  if not video:
    raise ConfigError(f'data.eval_clips={clips}, data.eval_crops={crops}: several views '
                      'of an example are a video evaluation; set both to 1 for an image model.')
  if train:
    raise ConfigError('data.eval_clips/eval_crops: several views are for evaluation only.')
  names = [op.strip() for op in ops.split('|')] if isinstance(ops, str) else list(ops)
  if crops > 1 and not set(names) & set(CROP_OPS):
    raise ConfigError(
        f'data.eval_crops={crops}: {field}={"|".join(names)!r} has no crop to move, so '
        f"every crop would be the same view; use one of {', '.join(CROP_OPS)} (e.g. "
        "'short_side_center_crop', the official video eval) or data.eval_crops=1.")
