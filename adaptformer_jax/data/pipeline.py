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

A source -- a prepared tfds builder, a video list or `folder:PATH`
(data/folder.py) -- only provides (encoded image/video or file path, label)
records in file order, split sizes and a decoder; shuffling, splitting across
processes, augmentation and batching are the same for all.
"""
import collections
import contextlib
import copy
import dataclasses
import difflib
import functools
import itertools
import os
from collections.abc import Callable
from collections.abc import Iterator

from absl import logging
import jax
from jax.sharding import NamedSharding
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from adaptformer_jax import sharding as sharding_lib
from adaptformer_jax.data import embedded
from adaptformer_jax.data import folder
from adaptformer_jax.data import glyphs
from adaptformer_jax.data import moving_digits
from adaptformer_jax.data import preprocess
from adaptformer_jax.data import video_lists
from adaptformer_jax.errors import UserError

# TF only feeds the host pipeline; keep it off any accelerator JAX wants.
with contextlib.suppress(RuntimeError):  # TF devices already initialised
  tf.config.set_visible_devices([], 'GPU')

_ENDLESS = 2**62  # epochs (or positions) to iterate: effectively forever
VIDEO_LIST = 'video_list'  # data.name of annotation-list datasets


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the step plan need to know about a dataset."""
  num_classes: int
  class_names: list[str]
  num_train: int  # examples in data.train_split (all processes)
  num_eval: int   # examples in data.eval_split (all processes)
  name: str = ''


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where examples come from: a prepared tfds builder, annotation lists or an image folder."""
  kind: str  # 'image' | 'video'
  class_names: list
  count: Callable[[str, str], int]               # (split, field) -> examples, all processes
  process_counts: Callable[[str, str], list]     # (split, field) -> examples per process
  records: Callable[[str], tf.data.Dataset]      # split -> this process's (encoded, label)
  decode: Callable[[tf.Tensor], tf.Tensor]


def _source(data_cfg):
  if data_cfg.name == VIDEO_LIST:
    return _list_source(data_cfg)
  if folder.is_folder(data_cfg.name):
    return _folder_source(data_cfg)
  return _tfds_source(data_cfg)


def _model_source(data_cfg, num_frames):
  """The data.name source, which must hold what the model takes: images when
  `num_frames` is None, else videos."""
  source = _source(data_cfg)
  if (source.kind == 'video') != (num_frames is not None):
    raise UserError(
        f'data.name: {data_cfg.name!r} holds {source.kind}s but the model takes '
        f'{"clips" if num_frames else "images"}; use a '
        + ("video model (model.patch_embed='tubelet', e.g. a videomae_* preset)."
           if source.kind == 'video' else "model with model.patch_embed='2d', or a video dataset."))
  return source


def _tfds_source(data_cfg):
  builder = _builder(data_cfg)
  key = 'video' if 'video' in builder.info.features else 'image'

  def records(split):
    ds = builder.as_dataset(split=_process_split(split), shuffle_files=False,
                            decoders={key: tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: (ex[key], ex['label']))  # cheap to skip, decoded later

  return _Source(
      kind=key, class_names=list(builder.info.features['label'].names),
      count=lambda split, field: _count(builder.name, builder.info.splits, split, field),
      process_counts=lambda split, field: [
          _count(builder.name, builder.info.splits, s, field)
          for s in tfds.even_splits(split, n=jax.process_count())],
      records=records, decode=builder.info.features[key].decode_example)


def _list_source(data_cfg):
  """Official `<path> <label>` lists: data.train_split/eval_split are list files."""
  video_lists.require_decoder()
  num_classes = data_cfg.get('num_classes')
  if not num_classes:
    raise UserError("data.num_classes: set it for data.name='video_list' "
                    '(e.g. 174 for SSv2, 51 for HMDB51).')
  lists = {}

  def read(split, field):
    if split not in lists:
      lists[split] = video_lists.read(split, root=data_cfg.get('video_root', ''),
                                      num_classes=num_classes, field=field)
    return lists[split]

  def chunk(n, i):  # contiguous, as tfds.even_splits
    return slice(i * n // jax.process_count(), (i + 1) * n // jax.process_count())

  def records(split):
    entries = read(split, 'data split')
    mine = chunk(len(entries.paths), jax.process_index())
    return tf.data.Dataset.from_tensor_slices(
        (list(entries.paths[mine]), list(entries.labels[mine])))

  decoder = video_lists.Decoder()

  def decode(path):
    video = tf.numpy_function(decoder, [path], tf.uint8, stateful=False)
    return tf.ensure_shape(video, (None, None, None, 3))

  def process_counts(split, field):
    n = len(read(split, field).paths)
    return [len(range(n)[chunk(n, i)]) for i in range(jax.process_count())]

  return _Source(
      kind='video', class_names=[str(i) for i in range(num_classes)],
      count=lambda split, field: len(read(split, field).paths),
      process_counts=process_counts, records=records, decode=decode)


def info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  """Class names and split sizes; prepares the embedded dataset if needed."""
  source = _source(data_cfg)
  return DatasetInfo(
      num_classes=len(source.class_names), class_names=source.class_names,
      num_train=source.count(data_cfg.train_split, 'data.train_split'),
      num_eval=source.count(data_cfg.eval_split, 'data.eval_split'),
      name=str(data_cfg.name))


def check_num_classes(dataset_info: DatasetInfo, model_num_classes: int) -> None:
  """The model head must have one output per dataset class."""
  if dataset_info.num_classes != model_num_classes:
    raise UserError(
        f'model.num_classes={model_num_classes} but dataset '
        f'{dataset_info.name!r} has {dataset_info.num_classes} classes; set '
        f'model.num_classes={dataset_info.num_classes} (or 0: from the data).')


def with_num_classes(config, dataset_info):
  """`config` with model.num_classes taken from the data when it is 0 (a copy), else checked."""
  if config.model.num_classes == 0:
    config = copy.deepcopy(config)
    config.model.num_classes = dataset_info.num_classes
    return config
  check_num_classes(dataset_info, config.model.num_classes)
  return config


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
  source = _model_source(data_cfg, num_frames)
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
  source = _model_source(data_cfg, num_frames)
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


def image_batches(images, data_cfg, *, image_size, batch_size):
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


def _process_split(split):
  return tfds.even_splits(split, n=jax.process_count())[jax.process_index()]


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


def _folder_source(data_cfg):
  """`folder:PATH`: (file path, label) records; splits 'train' and 'val' take tfds slicing."""
  images = folder.read(data_cfg.name, val_fraction=data_cfg.val_fraction,
                       max_unreadable_fraction=data_cfg.max_unreadable_fraction)
  splits = tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[len(images.paths[s])], num_bytes=0,
                          filename_template=None) for s in folder.SPLITS])
  count = lambda split, field: _count(f'folder {images.root}', splits, split, field)

  def records(split):
    parts = []
    for part in tfds.core.ReadInstruction.from_spec(
        _process_split(split)).to_absolute(splits):
      window = slice(part.from_, part.to)
      parts.append(tf.data.Dataset.from_tensor_slices(
          (list(images.paths[part.splitname][window]),
           tf.constant(images.labels[part.splitname][window], tf.int64))))
    return functools.reduce(tf.data.Dataset.concatenate, parts)

  return _Source(
      kind='image', class_names=list(images.class_names), count=count,
      process_counts=lambda split, field: [
          count(s, field) for s in tfds.even_splits(split, n=jax.process_count())],
      records=records, decode=folder.decode)


def _builder(data_cfg):
  """The prepared tfds builder of data.name, or a UserError saying what to do."""
  name, data_dir = str(data_cfg.name), data_cfg.data_dir
  try:
    dataset, _ = tfds.core.naming.parse_builder_name_kwargs(name)
  except ValueError:
    raise UserError(f"data.name: {name!r} is not a dataset name; use 'name', "
                    "'name/config' or 'name/config:version', e.g. 'cifar100'.") from None
  if dataset.namespace:
    raise UserError(
        f'data.name: {name!r} is a namespaced (community / Hugging Face) dataset, '
        'which tfds fetches over the network; this pipeline never downloads. '
        'Prepare it as a tfds dataset on a connected machine and copy it into '
        'data.data_dir.')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    known = tfds.list_builders(with_community_datasets=False)  # no network
    known += [f'{cls.name}/{c.name}' for cls in (embedded.SklearnDigits, glyphs.Glyphs,
                                                  moving_digits.MovingDigits)
              for c in cls.BUILDER_CONFIGS]
    close = difflib.get_close_matches(dataset.name, known, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ''
    raise UserError(
        f'data.name: unknown dataset {name!r}{hint}; use a tfds image '
        f"classification dataset (tfds.list_builders()) or the offline "
        f"'{embedded.NAME}/all' (images) or '{moving_digits.NAME}/direction' (video).") from None
  except (ValueError, AssertionError) as e:  # e.g. an unknown config or version
    raise UserError(f'data.name: cannot load {name!r} ({_reason(e)}){_configs(dataset.name)}.') from None
  if not builder.is_prepared():
    if builder.name not in (embedded.NAME, glyphs.NAME, moving_digits.NAME):
      root = data_dir or tfds.core.constants.DATA_DIR
      raise UserError(
          f'data.name: dataset {name!r} is not prepared in data_dir {root!r} '
          f'(expected {builder.data_dir}). Nothing is downloaded here: run '
          f'`tfds build {name} --data_dir {root}` on a machine with network '
          f'access and copy {root}/{builder.name} here, or set data.data_dir to '
          'the folder that holds the prepared dataset.')
    logging.info('Building %s offline into %s.', name, builder.data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  features = dict(builder.info.features)
  if not ((isinstance(features.get('image'), tfds.features.Image)
           or isinstance(features.get('video'), tfds.features.Video))
          and isinstance(features.get('label'), tfds.features.ClassLabel)):
    raise UserError(
        f"data.name: {name!r} is not an image or video classification dataset: it "
        f"needs an 'image' Image or a 'video' Video and a 'label' ClassLabel feature, "
        f'it has {features}.')
  return builder


def _reason(error):
  """tfds's own explanation, without its wrapper and candidate lists."""
  return str(error).split('": ', 1)[-1].split(' Here are')[0].split('\n')[0].rstrip('.')


def _configs(dataset):
  try:
    configs = list(tfds.builder_cls(dataset).builder_configs)
  except tfds.core.DatasetNotFoundError:
    return ''
  if not configs:
    return f'; {dataset!r} has no configs, use data.name={dataset!r}'
  return f"; configs of {dataset!r}: {', '.join(configs)}"


def _count(name, splits, split, field):
  """Examples in `split` of a SplitDict, or a UserError naming the field and the splits."""
  available = ', '.join(f'{s} ({splits[s].num_examples})' for s in splits)
  try:
    num = sum((part.to if part.to is not None else splits[part.splitname].num_examples)
              - (part.from_ or 0)
              for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(splits))
  except (ValueError, KeyError, AssertionError) as e:
    reason = str(e).split('\n')[-1]
    raise UserError(
        f'{field}: invalid split {split!r} for {name} ({reason}); '
        f"available splits: {available}; slices look like 'train[:90%]'.") from None
  if num <= 0:
    raise UserError(f'{field}: split {split!r} of {name} selects no '
                    f'examples; available splits: {available}.')
  return num
