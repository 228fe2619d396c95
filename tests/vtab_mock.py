"""Hand-made VTAB examples served through `tfds.testing.mock_data`, for every builder.

`prepare(data_dir, tasks)` writes each builder's dataset_info.json with its real split
sizes (so split strings like `train[45000:45200]` are valid and sizes are checked);
`serving(examples, reads)` mocks the reads: every `as_dataset` call appends (builder name,
split string) to `reads` and yields `examples(builder, split)`.
"""
import contextlib
import io
from unittest import mock

import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from adaptformer_jax.data import vtab

# Split sizes of the versions the table names (larger than any slice taken of them).
SIZES = {'cifar100': dict(train=50_000, test=10_000),
         'caltech101': dict(train=3_060, test=6_084),
         'oxford_iiit_pet': dict(train=3_680, test=3_669),
         'svhn_cropped': dict(train=73_257, test=26_032),
         'eurosat': dict(train=27_000), 'resisc45': dict(train=31_500),
         'clevr': dict(train=70_000, validation=15_000, test=15_000),
         'dsprites': dict(train=737_280), 'smallnorb': dict(train=24_300, test=24_300)}
DEFAULT_SIZES = dict(train=1_000, validation=1_000, test=1_000)


def prepare(data_dir, tasks=vtab.TASKS):
  """dataset_info.json for each task's builder: it reads as prepared, with these sizes."""
  for name in dict.fromkeys(t.tfds_name for t in tasks):
    builder = tfds.builder(name, data_dir=data_dir)
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_path, template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
        dataset_name=builder.name, filetype_suffix='tfrecord')
    sizes = SIZES.get(builder.name, DEFAULT_SIZES)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=template)
        for s, n in sizes.items()]))
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)


def png(pixels):
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(pixels, np.uint8).squeeze()).save(buffer, format='PNG')
  return buffer.getvalue()


def image(builder, value=128):
  """An encoded image of the shape `builder`'s image feature takes (8 px where it is free)."""
  shape = tuple(8 if d is None else d for d in builder.info.features['image'].shape)
  return png(np.full(shape, value, np.uint8))


def _signature(example):
  spec = lambda v: tf.TensorSpec(np.shape(v), tf.string if isinstance(v, bytes) else
                                 tf.as_dtype(np.asarray(v).dtype))
  out = {}
  for key, value in example.items():
    if isinstance(value, dict):  # objects: a variable number of rows
      out[key] = {k: tf.TensorSpec((None,) + np.shape(v)[1:], tf.as_dtype(np.asarray(v).dtype))
                  for k, v in value.items()}
    else:
      out[key] = spec(value)
  return out


@contextlib.contextmanager
def serving(examples, reads, data_dir):
  """mock_data whose reads yield `examples(builder, split_string)`.

  `as_dataset` itself is replaced: mock_data's own wrapper swaps the file system while
  it runs, which would catch the training loop's checkpoint writes in flight.
  """
  def as_dataset(self, split, **kwargs):
    del kwargs
    split = str(getattr(split, 'split', split))
    reads.append((self.name, split))
    rows = examples(self, split)
    return tf.data.Dataset.from_generator(lambda: iter(rows),
                                          output_signature=_signature(rows[0]))

  with tfds.testing.mock_data(data_dir=data_dir), mock.patch(
      'tensorflow_datasets.core.dataset_builder.DatasetBuilder.as_dataset', as_dataset):
    yield
