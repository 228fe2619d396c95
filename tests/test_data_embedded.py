"""The offline `sklearn_digits` dataset: builds without network, sizes, labels, classes."""
import socket

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from adaptformer_jax import data
from adaptformer_jax.data import embedded

COUNTS = {'all': (1437, 360), 'classes_0to4': (721, 180), 'classes_5to9': (716, 180)}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """All three configs, built once with every network connection refused."""
  root = str(tmp_path_factory.mktemp('tfds'))
  with pytest.MonkeyPatch.context() as mp:
    def no_network(*args, **kwargs):
      raise AssertionError(f'network access attempted: {args}')
    mp.setattr(socket.socket, 'connect', no_network)
    mp.setattr(socket, 'create_connection', no_network)
    for config in COUNTS:
      builder = tfds.builder(f'{embedded.NAME}/{config}', data_dir=root)
      assert not builder.is_prepared()
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return root


def _load(data_dir, config, split):
  ds = tfds.load(f'{embedded.NAME}/{config}', split=split, data_dir=data_dir,
                 download=False, batch_size=-1)
  return tfds.as_numpy(ds)


@pytest.mark.parametrize('config', sorted(COUNTS))
def test_split_sizes_and_images(data_dir, config):
  builder = tfds.builder(f'{embedded.NAME}/{config}', data_dir=data_dir)
  assert builder.is_prepared()
  assert (builder.info.splits['train'].num_examples,
          builder.info.splits['test'].num_examples) == COUNTS[config]
  images = _load(data_dir, config, 'train')['image']
  assert images.shape == (COUNTS[config][0], 8, 8, 1) and images.dtype == np.uint8
  assert images.max() == 255 and images.min() == 0


def test_test_split_is_stratified(data_dir):
  train = np.bincount(_load(data_dir, 'all', 'train')['label'], minlength=10)
  test = np.bincount(_load(data_dir, 'all', 'test')['label'], minlength=10)
  assert train.sum() + test.sum() == 1797
  np.testing.assert_allclose(test / (train + test), 0.2, atol=0.01)


@pytest.mark.parametrize('config, digits', [('all', range(10)),
                                             ('classes_0to4', range(5)),
                                             ('classes_5to9', range(5, 10))])
def test_labels_and_class_names(data_dir, config, digits):
  builder = tfds.builder(f'{embedded.NAME}/{config}', data_dir=data_dir)
  assert builder.info.features['label'].names == [str(d) for d in digits]
  for split in ('train', 'test'):
    labels = _load(data_dir, config, split)['label']
    assert sorted(set(labels)) == list(range(len(digits)))


def test_subsets_remap_labels_of_the_same_images(data_dir):
  """classes_5to9 label k is the `all` config's digit k + 5, image for image."""
  everything = _load(data_dir, 'all', 'test')
  subset = _load(data_dir, 'classes_5to9', 'test')
  keep = everything['label'] >= 5
  expected = sorted((im.tobytes(), int(l) - 5) for im, l in
                    zip(everything['image'][keep], everything['label'][keep]))
  got = sorted((im.tobytes(), int(l)) for im, l in zip(subset['image'], subset['label']))
  assert got == expected


def test_info_builds_it_automatically(tmp_path):
  cfg = ml_collections.ConfigDict(dict(
      name='sklearn_digits/classes_0to4', data_dir=str(tmp_path),
      train_split='train[:50%]', eval_split='test'))
  info = data.info(cfg)
  assert info == data.DatasetInfo(num_classes=5, class_names=['0', '1', '2', '3', '4'],
                                  num_train=360, num_eval=180,
                                  name='sklearn_digits/classes_0to4')
  assert tfds.builder('sklearn_digits/classes_0to4', data_dir=str(tmp_path)).is_prepared()
