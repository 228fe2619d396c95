"""Image and video preprocessing: '|'-separated op strings compiled to pure tf functions.

Every random op draws from an explicit stateless seed, so an example's
augmentation is a function of (seed, example position) and resuming a run
reproduces it exactly. Ops follow the torchvision recipes of the official
AdaptFormer code (bicubic, PIL-like antialiasing), on float32 images in [0, 1].
A video clip is first sampled in time (FRAME_SAMPLING), then its frames are
stacked along the channels, so every op crops, flips and resizes all frames of
a clip alike, as the official video transforms do.
"""
import math
from collections.abc import Callable

import tensorflow as tf

from adaptformer_jax.data.views import check_views
from adaptformer_jax.data.views import CROP_OPS  # the ops that take `crop=(j, n)`
from adaptformer_jax.errors import ConfigError

NORMALIZE = {
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # The CIFAR recipe of the AdaptFormer notebooks.
    'cifar': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'none': ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    # [-1, 1]: the Google ViTs (vit_jax, AugReg / big_vision, SigLIP).
    'inception': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # OpenAI CLIP's (and OpenCLIP's) statistics.
    'clip': ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def _resize(image, height, width):
  """Bicubic resize (antialiased like PIL); a no-op at the target size."""
  def resize():
    out = tf.image.resize(image, (height, width), method='bicubic', antialias=True)
    return tf.clip_by_value(out, 0.0, 1.0)  # bicubic overshoots; PIL clamps too
  shape = tf.shape(image)
  return tf.cond((shape[0] == height) & (shape[1] == width), lambda: image, resize)


def random_resized_crop_box(height: tf.Tensor, width: tf.Tensor,
                           seed: tf.Tensor) -> tuple[tf.Tensor, ...]:
  """torchvision RandomResizedCrop's window (top, left, height, width), defaults
  scale=(0.08, 1), ratio=(3/4, 4/3): 10 tries, then a ratio-clamped center crop.
  """
  scale, log_ratio, attempts = (0.08, 1.0), (math.log(3 / 4), math.log(4 / 3)), 10
  area_seed, ratio_seed, i_seed, j_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  area = tf.cast(height * width, tf.float32)
  target_area = area * tf.random.stateless_uniform([attempts], area_seed, *scale)
  aspect = tf.exp(tf.random.stateless_uniform([attempts], ratio_seed, *log_ratio))
  ws = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  hs = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  valid = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  found = tf.reduce_any(valid)
  first = tf.argmax(tf.cast(valid, tf.int32))
  in_ratio = tf.cast(width, tf.float32) / tf.cast(height, tf.float32)
  fallback_w = tf.where(
      in_ratio > 4 / 3, tf.cast(tf.round(tf.cast(height, tf.float32) * 4 / 3), tf.int32), width)
  fallback_h = tf.where(
      in_ratio < 3 / 4, tf.cast(tf.round(tf.cast(width, tf.float32) * 4 / 3), tf.int32), height)
  w = tf.where(found, ws[first], fallback_w)
  h = tf.where(found, hs[first], fallback_h)
  top = tf.where(found, tf.random.stateless_uniform(
      [], i_seed, 0, height - h + 1, dtype=tf.int32), (height - h) // 2)
  left = tf.where(found, tf.random.stateless_uniform(
      [], j_seed, 0, width - w + 1, dtype=tf.int32), (width - w) // 2)
  return top, left, h, w


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision RandomResizedCrop(size) with bicubic interpolation."""
  shape = tf.shape(image)
  top, left, h, w = random_resized_crop_box(shape[0], shape[1], seed)
  return _resize(image[top:top + h, left:left + w], size, size)


def flip(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """Horizontal flip with probability 1/2."""
  del size
  return tf.image.stateless_random_flip_left_right(image, seed)


def pad_crop(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """The CIFAR recipe: zero-pad 4 pixels, random crop back (resized to size first)."""
  image = tf.pad(_resize(image, size, size), [[4, 4], [4, 4], [0, 0]])
  return tf.image.stateless_random_crop(image, (size, size, tf.shape(image)[-1]), seed)


def resize(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """Bicubic to size x size, ignoring the aspect ratio."""
  del seed
  return _resize(image, size, size)


def resize_center_crop(image: tf.Tensor, seed: tf.Tensor, size: int,
                       crop: tuple[int, int] | None = None) -> tf.Tensor:
  """Official eval: shorter side to size*256/224 (256 for 224), center crop size
  (or crop `crop`, see center_crop)."""
  del seed
  short = int(size * 256 / 224)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  # torchvision Resize(int): the longer side is int(short * long / shorter).
  scaled_h = tf.where(height <= width, short, short * height // width)
  scaled_w = tf.where(height <= width, short * width // height, short)
  return center_crop(_resize(image, scaled_h, scaled_w), None, size, crop)


# (w, h) multiples of the free space / 4 where GroupMultiScaleCrop may put a crop.
_FIXED_OFFSETS = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
                  (1, 1), (3, 1), (1, 3), (3, 3))
_MULTI_SCALES = (1.0, 0.875, 0.75, 0.66)


def multi_scale_crop(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """TSN/VideoMAE GroupMultiScaleCrop(size, [1, .875, .75, .66]): the short side
  times one scale by a neighbouring one (max_distort 1), at one of 13 fixed
  offsets, bilinear to size. The official video AdaptFormer's training crop
  (SSv2 and HMDB51 alike, no flip)."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  sizes = tf.cast(tf.cast(tf.minimum(height, width), tf.float32) * _MULTI_SCALES, tf.int32)
  sizes = tf.where(tf.abs(sizes - size) < 3, size, sizes)
  pairs = [(i, j) for i in range(len(_MULTI_SCALES)) for j in range(len(_MULTI_SCALES))
           if abs(i - j) <= 1]
  pair_seed, offset_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  pair = tf.gather(pairs, tf.random.stateless_uniform([], pair_seed, 0, len(pairs), tf.int32))
  crop_h, crop_w = tf.gather(sizes, pair[0]), tf.gather(sizes, pair[1])
  offset = tf.gather(_FIXED_OFFSETS, tf.random.stateless_uniform(
      [], offset_seed, 0, len(_FIXED_OFFSETS), tf.int32))
  left, top = offset[0] * ((width - crop_w) // 4), offset[1] * ((height - crop_h) // 4)
  crop = image[top:top + crop_h, left:left + crop_w]
  return tf.image.resize(crop, (size, size), method='bilinear', antialias=True)


def short_side_center_crop(image: tf.Tensor, seed: tf.Tensor, size: int,
                           crop: tuple[int, int] | None = None) -> tf.Tensor:
  """Official video eval: shorter side bilinear to size, center crop size (or
  crop `crop`: VideoMAE's test crops, which slide along the longer side)."""
  del seed
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  scaled_h = tf.where(height <= width, size, size * height // width)
  scaled_w = tf.where(height <= width, size * width // height, size)
  image = tf.image.resize(image, (scaled_h, scaled_w), method='bilinear', antialias=True)
  return center_crop(image, None, size, crop)


def shuffle_frames(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """A clip's frames in a random order (a video's frames are stacked along the
  channels, 3 each; an image is one frame, left as it is): pre-training on it
  keeps a backbone from learning anything from the order of frames."""
  del size
  shape = tf.shape(image)
  frames = tf.reshape(image, [shape[0], shape[1], -1, 3])
  order = tf.argsort(tf.random.stateless_uniform([tf.shape(frames)[2]], seed))
  return tf.reshape(tf.gather(frames, order, axis=2), shape)


def center_crop(image: tf.Tensor, seed: tf.Tensor, size: int,
                crop: tuple[int, int] | None = None) -> tf.Tensor:
  """torchvision CenterCrop: crops, or zero-pads an image smaller than size.

  `crop=(j, n)` (n > 1) takes crop j of n spread evenly along the longer side
  (rows when height >= width), centred on the other, as the official video test
  (VideoMAE's `test_num_crop`): window start int(j * (long - size) / (n - 1)).
  """
  del seed
  if crop is None or crop[1] == 1:
    return tf.image.resize_with_crop_or_pad(image, size, size)
  j, n = crop
  shape = tf.shape(image)
  image = tf.image.resize_with_crop_or_pad(
      image, tf.maximum(shape[0], size), tf.maximum(shape[1], size))
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  slide = lambda length: tf.cast(j * tf.cast(length - size, tf.float64) / (n - 1), tf.int32)
  rows = height >= width
  top = tf.where(rows, slide(height), (height - size) // 2)
  left = tf.where(rows, (width - size) // 2, slide(width))
  return image[top:top + size, left:left + size]


OPS = {op.__name__: op for op in (random_resized_crop, flip, pad_crop, resize,
                                  resize_center_crop, center_crop, multi_scale_crop,
                                  short_side_center_crop, shuffle_frames)}
SIZING_OPS = ('random_resized_crop', 'pad_crop', 'resize', 'resize_center_crop',
              'center_crop', 'multi_scale_crop', 'short_side_center_crop')


def dense_frames(length: tf.Tensor, num_frames: int, stride: int, seed: tf.Tensor,
                 train: bool, clip: tuple[int, int] = (0, 1)) -> tf.Tensor:
  """Kinetics/HMDB51: `num_frames` frames `stride` apart from a random start
  (train) or the middle (eval).

  `clip=(k, n)`, n > 1 (eval only): clip k of n, as the official test
  (`test_num_segment`): the video's frames `stride` apart, L of them, and clip k
  starts at int(k * max(L - num_frames, 0) / (n - 1)) of those; a short one
  repeats its last strided frame.
  """
  k, n = clip
  if n > 1:
    strided = (length + stride - 1) // stride
    step = tf.maximum(tf.cast(strided - num_frames, tf.float64) / (n - 1), 0.0)
    start = tf.cast(k * step, tf.int32)
    return tf.minimum(start + tf.range(num_frames), strided - 1) * stride
  max_start = tf.maximum(length - (num_frames - 1) * stride, 1)
  start = (tf.random.stateless_uniform([], seed, 0, max_start, dtype=tf.int32)
           if train else (max_start - 1) // 2)
  return start + tf.range(num_frames) * stride


def segment_frames(length: tf.Tensor, num_frames: int, stride: int, seed: tf.Tensor,
                   train: bool, clip: tuple[int, int] = (0, 1)) -> tf.Tensor:
  """SSv2 (TSN): one frame from each of `num_frames` equal segments, at random
  (train) or each segment's middle (eval); `stride` is unused.

  `clip=(k, n)`, n > 1 (eval only): frame k/n of the way into each segment, as
  VideoMAE's SSv2 test (2 clips: the segments' first and middle frames).
  """
  del stride
  k, n = clip
  offset = (tf.random.stateless_uniform([num_frames], seed) if train
            else tf.fill([num_frames], 0.5 if n == 1 else k / n))
  segment = tf.cast(length, tf.float32) / num_frames
  return tf.cast((tf.range(num_frames, dtype=tf.float32) + offset) * segment, tf.int32)


FRAME_SAMPLING = {'dense': dense_frames, 'segments': segment_frames}


def parse(pp: str, field: str = 'data.train_pp') -> list[str]:
  """The op names of an op string, validated: each op known, at least one sizing op."""
  ops = tuple(op.strip() for op in str(pp).split('|') if op.strip())
  for op in ops:
    if op not in OPS:
      raise ConfigError(f"{field}: unknown preprocessing op {op!r}; allowed ops: "
                        f"{', '.join(OPS)} (joined with '|').")
  if not any(op in SIZING_OPS for op in ops):
    raise ConfigError(
        f'{field}: {pp!r} never sizes images to the model resolution; add one of '
        f"{', '.join(SIZING_OPS)}, e.g. 'random_resized_crop|flip'.")
  return ops


def make(pp: str, *, image_size: int, normalize: str, field: str = 'data.train_pp',
         num_frames: int | None = None, frame_sampling: str = 'dense', frame_stride: int = 1,
         train: bool = True, clips: int = 1, crops: int = 1
         ) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """`fn(image, seed) -> float32 (image_size, image_size, 3)`, normalised, or
  with `num_frames`, `fn(video, seed) -> float32 (num_frames, size, size, 3)`.

  `image` is a decoded uint8 (H, W, C) tensor with any number of channels (1 is
  tiled to RGB, alpha dropped), `video` a (T, H, W, C) one; `seed` a stateless
  seed, shape (2,) int64. A video shorter than its sample repeats its last
  frame, as the official loaders clamp frame indices. `train` picks random
  (True) or central (False) frames.

  `clips` x `crops` > 1 (video eval: data.eval_clips, data.eval_crops) gives
  every view of the official multi-view test instead, float32 (clips * crops,
  num_frames, size, size, 3), clip-major: view k * crops + j is temporal clip k
  (see dense_frames, segment_frames) at spatial crop j (see center_crop).
  """
  ops = parse(pp, field)
  if normalize not in NORMALIZE:
    raise ConfigError(f'data.normalize: {normalize!r} is not one of '
                      f"{', '.join(map(repr, NORMALIZE))}.")
  if frame_sampling not in FRAME_SAMPLING:
    raise ConfigError(f'data.frame_sampling: {frame_sampling!r} is not one of '
                      f"{', '.join(map(repr, FRAME_SAMPLING))}.")
  check_views(clips, crops, ops, video=num_frames is not None, train=train, field=field)
  mean, std = NORMALIZE[normalize]

  def rgb(image):
    image = tf.cond(tf.shape(image)[-1] < 3,
                    lambda: tf.repeat(image[..., :1], 3, axis=-1),
                    lambda: image[..., :3])
    return tf.image.convert_image_dtype(image, tf.float32)

  def transform(image, seed, crop=None):
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, len(ops)))
    for op, op_seed in zip(ops, seeds):
      extra = {'crop': crop} if crop is not None and op in CROP_OPS else {}
      image = OPS[op](image, op_seed, image_size, **extra)
    return image

  def image_fn(image, seed):
    image = rgb(image)
    image.set_shape((None, None, 3))
    image = tf.ensure_shape(transform(image, seed), (image_size, image_size, 3))
    return (image - mean) / std

  def clip_fn(video, seed, temporal=(0, 1), crop=None):
    frames_seed, ops_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    length = tf.shape(video)[0]
    index = FRAME_SAMPLING[frame_sampling](length, num_frames, frame_stride,
                                           frames_seed, train, temporal)
    clip = rgb(tf.gather(video, tf.minimum(index, length - 1)))
    shape = tf.shape(clip)
    stacked = tf.reshape(tf.transpose(clip, [1, 2, 0, 3]),
                         [shape[1], shape[2], num_frames * 3])
    clip = tf.transpose(tf.reshape(transform(stacked, ops_seed, crop),
                                   [image_size, image_size, num_frames, 3]), [2, 0, 1, 3])
    return (clip - mean) / std

  def views_fn(video, seed):
    return tf.stack([clip_fn(video, seed, (k, clips), (j, crops))
                     for k in range(clips) for j in range(crops)])

  if num_frames is None:
    return image_fn
  return views_fn if clips * crops > 1 else clip_fn
