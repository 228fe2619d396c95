"""Input pipelines (tfds, video lists, image folders) that yield globally sharded jax.Arrays.

Training data is a pure function of (seed, step): epoch e is the split shuffled
with a seed derived from (seed, e), and each example's augmentation is seeded by
its position in that stream. Resuming at step s therefore skips s * batch
undecoded records and reproduces the uninterrupted run exactly. Nothing here
ever downloads: an unprepared dataset is a UserError that says how to prepare
it, except the embedded `sklearn_digits`, `glyphs` and `moving_digits`, which
build themselves offline. Video datasets (a tfds `video` feature, e.g. ucf101, or
data.name='video_list': official `<path> <label>` lists, see video_lists.py)
take the same path with `num_frames` set; batches hold the model input under
'image' either way: (B, H, W, 3) images or (B, T, H, W, 3) clips.

A source (data/sources.py) -- a prepared tfds builder, a video list or `folder:PATH`
(data/folder.py) -- only provides (encoded image/video or file path, label)
records in file order, split sizes and a decoder; shuffling, splitting across
processes, augmentation and batching are the same for all.
"""
import collections
import contextlib
import dataclasses
import itertools
import os
from collections.abc import Iterator
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding
import ml_collections
import numpy as np
import tensorflow as tf

from adaptformer_jax import sharding as sharding_lib
from adaptformer_jax.data import folder
from adaptformer_jax.data import preprocess
from adaptformer_jax.data import sources
from adaptformer_jax.errors import UserError

# TF only feeds the host pipeline; keep it off any accelerator JAX wants.
with contextlib.suppress(RuntimeError):  # TF devices already initialised
  tf.config.set_visible_devices([], 'GPU')

_ENDLESS = 2**62  # epochs (or positions) to iterate: effectively forever


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the step plan need to know about a dataset."""
  num_classes: int
  class_names: list[str]
  num_train: int  # examples in data.train_split (all processes)
  num_eval: int   # examples in data.eval_split (all processes)
  name: str = ''












def info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  """Class names and split sizes; prepares the embedded dataset if needed."""
  source = sources.source(data_cfg)
  return DatasetInfo(
      num_classes=len(source.class_names), class_names=source.class_names,
      num_train=source.count(data_cfg.train_split, 'data.train_split'),
      num_eval=source.count(data_cfg.eval_split, 'data.eval_split'),
      name=str(data_cfg.name))


def train_iterator(data_cfg: ml_collections.ConfigDict, *, image_size: int,
                   global_batch: int, sharding: NamedSharding, seed: int,
                   start_step: int = 0, num_frames: int | None = None
                   ) -> Iterator[dict[str, jax.Array]]:
  """Endless {'image', 'label'} global batches; from `start_step` on, exactly
  the batches an uninterrupted run sees at those steps.

  `sharding` is a NamedSharding that splits the batch axis, e.g. P('data').
  `num_frames` (video models) samples clips of that many frames.
  """
  local_batch = _local_batch(global_batch)
  source = sources.model_source(data_cfg, num_frames)
  source.count(data_cfg.train_split, 'data.train_split')
  num = source.process_counts(data_cfg.train_split, 'data.train_split')[jax.process_index()]
  pp = _preprocess(data_cfg, 'train_pp', image_size, num_frames, train=True)
  records = source.records(data_cfg.train_split)
  buffer = min(int(data_cfg.shuffle_buffer), num)
  shuffle_key = _fold(tf.constant([0, seed], tf.int64), 0)
  augment_key = _fold(_fold(tf.constant([0, seed], tf.int64), 1),
                      jax.process_index())

  def epoch(e):
    if buffer <= 1:
      return records
    epoch_seed = tf.random.stateless_uniform(
        [], _fold(shuffle_key, e), minval=None, maxval=None, dtype=tf.int64)
    return records.shuffle(buffer, seed=epoch_seed)

  def example(position, decoded, label):
    return {'image': pp(decoded, _fold(augment_key, position)),
            'label': tf.cast(label, tf.int32)}

  first = start_step * local_batch
  ds = tf.data.Dataset.range(first // num, _ENDLESS).flat_map(epoch)
  ds = ds.skip(first % num).enumerate(start=first)  # skips before decoding
  ds = _decoded(ds, source, example)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _device_batches(_deterministic(ds), sharding)


def eval_iterator(data_cfg: ml_collections.ConfigDict, *, image_size: int,
                  global_batch: int, sharding: NamedSharding,
                  num_frames: int | None = None) -> 'EvalBatches':
  """Re-iterable passes over the eval split: {'image', 'label', 'mask'} batches.

  The last batch is padded (mask 0.0) and every process yields the same number
  of batches, so masked metrics count each example exactly once. With
  data.eval_clips x data.eval_crops > 1 (video models: the official multi-view
  test) a batch holds every view of each video, (B, V, T, H, W, 3) under 'views'
  instead of 'image', which `evaluate` averages per video; `global_batch` counts
  videos.
  """
  local_batch = _local_batch(global_batch)
  source = sources.model_source(data_cfg, num_frames)
  source.count(data_cfg.eval_split, 'data.eval_split')
  num_batches = -(-max(source.process_counts(data_cfg.eval_split, 'data.eval_split'))
                  // local_batch)
  pp = _preprocess(data_cfg, 'eval_pp', image_size, num_frames, train=False)
  views = num_views(data_cfg)
  field = 'views' if views > 1 else 'image'
  key = tf.constant([0, 0], tf.int64)  # random eval ops stay deterministic

  def example(index, decoded, label):
    return {field: pp(decoded, _fold(key, index)),
            'label': tf.cast(label, tf.int32), 'mask': tf.constant(1.0)}

  shape = (((views,) if views > 1 else ()) + (() if num_frames is None else (num_frames,))
           + (image_size, image_size, 3))
  padding = tf.data.Dataset.from_tensors({
      field: tf.zeros(shape), 'label': tf.constant(0), 'mask': tf.constant(0.0)}).repeat()
  ds = _decoded(source.records(data_cfg.eval_split).enumerate(), source, example)
  ds = ds.concatenate(padding)
  ds = ds.take(num_batches * local_batch).batch(local_batch)
  return EvalBatches(_deterministic(ds.prefetch(tf.data.AUTOTUNE)), sharding,
                     num_batches)


def image_batches(images: Sequence, data_cfg: ml_collections.ConfigDict, *, image_size: int,
                  batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(indices, images) numpy batches of `images` with the eval preprocessing.

  `images` are all file paths or all uint8 (H, W[, C]) arrays. Files that do not decode
  are left out of the batches: their indices are missing, and the stream goes on.
  """
  pp = preprocess.make(data_cfg.eval_pp, image_size=image_size,
                       normalize=data_cfg.normalize, field='data.eval_pp')
  key = tf.constant([0, 0], tf.int64)  # as eval_iterator: random ops stay fixed
  is_path = [isinstance(x, (str, os.PathLike)) for x in images]
  if all(is_path):
    ds = tf.data.Dataset.from_tensor_slices(tf.constant([os.fspath(p) for p in images]))
    ds = ds.map(folder.decode, num_parallel_calls=tf.data.AUTOTUNE)
  elif any(is_path):  # files decode in the tf.data graph, arrays come from Python
    raise UserError(f'images[{is_path.index(True)}] is a file path but '
                    f'images[{is_path.index(False)}] is not; pass all file paths or all '
                    'uint8 arrays (one call for each kind).')
  else:
    arrays = [np.asarray(x) for x in images]
    for i, x in enumerate(arrays):
      if x.dtype != np.uint8 or x.ndim not in (2, 3):
        raise UserError(f'images[{i}]: expected a file path or a uint8 (H, W[, C]) array, '
                        f'got {x.dtype} of shape {x.shape}.')
    ds = tf.data.Dataset.from_generator(
        lambda: (x if x.ndim == 3 else x[..., None] for x in arrays),
        output_signature=tf.TensorSpec((None, None, None), tf.uint8))
  ds = ds.enumerate().map(lambda i, image: (i, pp(image, key)),
                          num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors().batch(batch_size).prefetch(tf.data.AUTOTUNE)
  return _deterministic(ds).as_numpy_iterator()


class EvalBatches:
  """Each `iter()` is a fresh pass; `len()` is the number of batches."""

  def __init__(self, ds: tf.data.Dataset, sharding: NamedSharding, num_batches: int):
    self._ds, self._sharding, self._num_batches = ds, sharding, num_batches

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return _device_batches(self._ds, self._sharding)

  def __len__(self) -> int:
    return self._num_batches


def _device_batches(ds, sharding, in_flight=2):
  """Host batches -> global jax.Arrays, with `in_flight` transfers queued ahead."""
  batches = ds.as_numpy_iterator()
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(batches, n):
      queue.append({k: jax.make_array_from_process_local_data(sharding, v)
                    for k, v in batch.items()})

  enqueue(in_flight)
  while queue:
    yield queue.popleft()
    enqueue(1)


def _local_batch(global_batch):
  sharding_lib.check_batch_divisible(global_batch, 'global batch size')
  return global_batch // jax.process_count()




def _fold(key, data):
  return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))


def _deterministic(ds):
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def num_views(data_cfg: ml_collections.ConfigDict) -> int:
  """Views per eval example: data.eval_clips x data.eval_crops (1 when unset)."""
  return data_cfg.get('eval_clips', 1) * data_cfg.get('eval_crops', 1)


def _preprocess(data_cfg, field, image_size, num_frames, train):
  views = {} if train else dict(clips=data_cfg.get('eval_clips', 1),
                                crops=data_cfg.get('eval_crops', 1))
  video = {} if num_frames is None else dict(
      num_frames=num_frames, frame_sampling=data_cfg.get('frame_sampling', 'dense'),
      frame_stride=data_cfg.get('frame_stride', 1), train=train)
  return preprocess.make(data_cfg[field], image_size=image_size,
                         normalize=data_cfg.normalize, field=f'data.{field}', **video, **views)


def _decoded(ds, source, example):
  """(position, (encoded, label)) -> example(position, decoded, label); videos
  that decode to no frames are dropped (video_lists.Decoder names and counts them)."""
  decode = lambda position, record: (position, source.decode(record[0]), record[1])
  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  if source.kind == 'video':
    ds = ds.filter(lambda position, video, label: tf.shape(video)[0] > 0)
  return ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)










