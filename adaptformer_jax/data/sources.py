"""Where examples come from: a prepared tfds builder, official video lists or an image
folder, each as (encoded image/video or file path, label) records in file order, split
sizes and a decoder. Nothing here ever downloads: an unprepared dataset is a UserError
that says how to prepare it, except the embedded `sklearn_digits`, `glyphs` and
`moving_digits`, which build themselves offline.
"""
import dataclasses
import difflib
import functools
from collections.abc import Callable

from absl import logging
import jax
import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from adaptformer_jax.data import embedded
from adaptformer_jax.data import folder
from adaptformer_jax.data import glyphs
from adaptformer_jax.data import moving_digits
from adaptformer_jax.data import video_lists
from adaptformer_jax.data import vtab
from adaptformer_jax.errors import UserError

VIDEO_LIST = 'video_list'  # data.name of annotation-list datasets


@dataclasses.dataclass(frozen=True)
class Source:
  """Where examples come from: a prepared tfds builder, annotation lists or an image folder."""
  kind: str  # 'image' | 'video'
  class_names: list
  count: Callable[[str, str], int]               # (split, field) -> examples, all processes
  process_counts: Callable[[str, str], list]     # (split, field) -> examples per process
  records: Callable[[str], tf.data.Dataset]      # split -> this process's (encoded, label)
  decode: Callable[[tf.Tensor], tf.Tensor]

def source(data_cfg: ml_collections.ConfigDict) -> Source:
  """The source data.name names."""
  if data_cfg.name == VIDEO_LIST:
    return _list_source(data_cfg)
  if folder.is_folder(data_cfg.name):
    return _folder_source(data_cfg)
  if vtab.is_vtab(data_cfg.name):
    return _vtab_source(data_cfg)
  return _tfds_source(data_cfg)

def model_source(data_cfg: ml_collections.ConfigDict, num_frames: int | None) -> Source:
  """The data.name source, which must hold what the model takes: images when
  `num_frames` is None, else videos."""
  found = source(data_cfg)
  if (found.kind == 'video') != (num_frames is not None):
    raise UserError(
        f'data.name: {data_cfg.name!r} holds {found.kind}s but the model takes '
        f'{"clips" if num_frames else "images"}; use a '
        + ("video model (model.patch_embed='tubelet', e.g. a videomae_* preset)."
           if found.kind == 'video' else "model with model.patch_embed='2d', or a video dataset."))
  return found

def _tfds_source(data_cfg):
  builder = _builder(data_cfg)
  key = 'video' if 'video' in builder.info.features else 'image'

  def records(split):
    ds = builder.as_dataset(split=_process_split(split), shuffle_files=False,
                            decoders={key: tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: (ex[key], ex['label']))  # cheap to skip, decoded later

  count = lambda split, field: _count(builder.name, builder.info.splits, split, field)
  return Source(
      kind=key, class_names=list(builder.info.features['label'].names), count=count,
      process_counts=_process_counts(count), records=records,
      decode=builder.info.features[key].decode_example)

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

  return Source(
      kind='video', class_names=[str(i) for i in range(num_classes)],
      count=lambda split, field: len(read(split, field).paths),
      process_counts=process_counts, records=records, decode=decode)

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

  return Source(
      kind='image', class_names=list(images.class_names), count=count,
      process_counts=_process_counts(count), records=records, decode=folder.decode)

def _vtab_source(data_cfg):
  """'vtab:<task>': the task's tfds builder, its VTAB-1k split strings (data.train_split
  and eval_split name one of data/vtab.py SPLITS) and its label transformation."""
  task = vtab.task(data_cfg.name)
  builder = _prepared_builder(task.tfds_name, data_cfg.data_dir)
  vtab.check_sizes(task, {s: builder.info.splits[s].num_examples for s in builder.info.splits})
  image = builder.info.features['image']
  label = builder.info.features['label'] if 'label' in builder.info.features else None
  tfds_count = lambda split, field: _count(builder.name, builder.info.splits, split, field)
  count = lambda split, field: tfds_count(vtab.tfds_split(task, split, field), field)

  def records(split):
    ds = builder.as_dataset(split=_process_split(vtab.tfds_split(task, split, 'data split')),
                            shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: (ex['image'], task.label(ex)))

  return Source(
      kind='image', class_names=vtab.class_names(task, label and label.names), count=count,
      process_counts=lambda split, field: _process_counts(tfds_count)(
          vtab.tfds_split(task, split, field), field),
      records=records, decode=lambda encoded: vtab.scaled_image(
          image.decode_example(encoded), task))

def _process_counts(count):
  """Source.process_counts from `count(split, field)` of tfds split strings: the count of
  each process's part, as _process_split cuts it."""
  return lambda split, field: [count(s, field)
                               for s in tfds.even_splits(split, n=jax.process_count())]

def _process_split(split):
  return tfds.even_splits(split, n=jax.process_count())[jax.process_index()]

def _builder(data_cfg):
  """The prepared tfds classification builder of data.name, or a UserError saying what to do."""
  name = str(data_cfg.name)
  builder = _prepared_builder(name, data_cfg.data_dir)
  features = dict(builder.info.features)
  if not ((isinstance(features.get('image'), tfds.features.Image)
           or isinstance(features.get('video'), tfds.features.Video))
          and isinstance(features.get('label'), tfds.features.ClassLabel)):
    raise UserError(
        f"data.name: {name!r} is not an image or video classification dataset: it "
        f"needs an 'image' Image or a 'video' Video and a 'label' ClassLabel feature, "
        f'it has {features}.')
  return builder

def _prepared_builder(name, data_dir):
  """The prepared tfds builder `name` ('name[/config][:version]'), building only the
  embedded datasets offline; else a UserError saying how to prepare it."""
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
