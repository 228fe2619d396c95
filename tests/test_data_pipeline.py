"""Input pipelines: batch layout, exact resume, eval masking, sharding and user errors."""
import re
import socket
import textwrap

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from adaptformer_jax import data
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.errors import UserError
from conftest import mock_tfds_metadata
from conftest import run_on_host_devices

SHARDING = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',)), P('data'))


def _cfg(data_dir, **overrides):
  cfg = dict(name='sklearn_digits/all', data_dir=data_dir, train_split='train',
             eval_split='test', train_pp='random_resized_crop|flip',
             eval_pp='resize_center_crop', normalize='imagenet', shuffle_buffer=50_000)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('tfds'))
  for name in ('sklearn_digits/all', 'sklearn_digits/classes_0to4'):
    data.info(_cfg(root, name=name))  # builds it
  return root


def _take(iterator, n):
  return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(n)]


def _examples(images, labels):
  """Order-free multiset of (uint8 pixels, label), from normalize='none' images."""
  pixels = np.round(np.asarray(images) * 255).astype(np.uint8)
  return sorted((p.tobytes(), int(l)) for p, l in zip(pixels, labels))


def _raw(data_dir, name, split):
  raw = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, batch_size=-1))
  return _examples(np.tile(raw['image'], (1, 1, 1, 3)) / 255, raw['label'])


@pytest.mark.parametrize('name, num_classes', [('cifar10', 10), ('cifar100', 100)])
def test_mock_cifar_batches(tmp_path, name, num_classes):
  mock_tfds_metadata(str(tmp_path), name, 20)
  cfg = _cfg(str(tmp_path), name=name, normalize='cifar')
  with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path)):
    info = data.info(cfg)
    assert (info.num_classes, info.num_train, info.num_eval) == (num_classes, 20, 20)
    train = data.train_iterator(cfg, image_size=32, global_batch=8, sharding=SHARDING, seed=0)
    for batch in _take(train, 3):  # 24 examples: into the second epoch
      assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
      assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
      assert ((0 <= batch['label']) & (batch['label'] < num_classes)).all()
    batches = list(data.eval_iterator(cfg, image_size=32, global_batch=8, sharding=SHARDING))
  assert [b['image'].shape for b in batches] == [(8, 32, 32, 3)] * 3
  assert all(b['label'].dtype == np.int32 for b in batches)
  np.testing.assert_array_equal(batches[-1]['mask'], [1, 1, 1, 1, 0, 0, 0, 0])


def test_eval_counts_every_example_exactly_once(digits_dir):
  cfg = _cfg(digits_dir, eval_pp='resize', normalize='none')
  batches = data.eval_iterator(cfg, image_size=8, global_batch=64, sharding=SHARDING)
  assert len(batches) == 6  # 360 = 5 * 64 + 40
  expected = _raw(digits_dir, 'sklearn_digits/all', 'test')
  for _ in range(2):  # every iter() is a complete pass
    seen = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
    assert len(seen) == 6 and all(b['image'].shape == (64, 8, 8, 3) for b in seen)
    np.testing.assert_array_equal(seen[-1]['mask'], [1.0] * 40 + [0.0] * 24)
    real = np.concatenate([b['mask'] for b in seen]) > 0
    images = np.concatenate([b['image'] for b in seen])[real]
    labels = np.concatenate([b['label'] for b in seen])[real]
    assert _examples(images, labels) == expected


def test_each_epoch_is_a_new_permutation_of_the_split(digits_dir):
  cfg = _cfg(digits_dir, train_split='train[:70]', train_pp='resize', normalize='none')
  batches = _take(data.train_iterator(cfg, image_size=8, global_batch=7,
                                      sharding=SHARDING, seed=0), 20)
  expected = _raw(digits_dir, 'sklearn_digits/all', 'train[:70]')
  epochs = [batches[:10], batches[10:]]
  for epoch in epochs:
    assert _examples(np.concatenate([b['image'] for b in epoch]),
                     np.concatenate([b['label'] for b in epoch])) == expected
  assert not np.array_equal(epochs[0][0]['image'], epochs[1][0]['image'])


def test_resume_reproduces_the_uninterrupted_run(digits_dir):
  cfg = _cfg(digits_dir, name='sklearn_digits/classes_0to4')  # 721 train examples
  kwargs = dict(image_size=16, global_batch=32, sharding=SHARDING)
  full = _take(data.train_iterator(cfg, seed=3, **kwargs), 26)
  for start in (21, 23):  # before and after the epoch boundary (step 22.5)
    resumed = _take(data.train_iterator(cfg, seed=3, start_step=start, **kwargs), 26 - start)
    for expected, got in zip(full[start:], resumed):
      np.testing.assert_array_equal(got['image'], expected['image'])
      np.testing.assert_array_equal(got['label'], expected['label'])
  other_seed = _take(data.train_iterator(cfg, seed=4, **kwargs), 1)[0]
  assert not np.array_equal(other_seed['label'], full[0]['label'])


def test_unprepared_dataset_fails_without_downloading(tmp_path, monkeypatch):
  """Refused before any download or connection is tried (either would hang offline)."""
  def no_network(*args, **kwargs):
    raise AssertionError('a download or a connection was attempted')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_network)
  monkeypatch.setattr(socket.socket, 'connect', no_network)
  cfg = _cfg(str(tmp_path), name='cifar10')
  with pytest.raises(UserError, match="'cifar10' is not prepared.*" + re.escape(
      f'tfds build cifar10 --data_dir {tmp_path}')):
    data.info(cfg)
  with pytest.raises(UserError, match='not prepared'):
    data.train_iterator(cfg, image_size=32, global_batch=8, sharding=SHARDING, seed=0)
  assert not list(tmp_path.iterdir())  # nothing was downloaded or created


def test_unknown_dataset_suggests_close_names(tmp_path):
  with pytest.raises(UserError, match="unknown dataset 'cifar1000' \\(did you mean 'cifar100'"):
    data.info(_cfg(str(tmp_path), name='cifar1000'))
  with pytest.raises(UserError, match="did you mean 'sklearn_digits'"):
    data.info(_cfg(str(tmp_path), name='sklearn_digit'))


@pytest.mark.parametrize('name, message', [
    ('huggingface:mnist', 'namespaced .* fetches over the network'),
    ('cifar 10', "'cifar 10' is not a dataset name"),
])
def test_names_tfds_cannot_load_offline(tmp_path, name, message):
  with pytest.raises(UserError, match=f'data.name: .*{message}'):
    data.info(_cfg(str(tmp_path), name=name))


def test_unknown_config_lists_the_configs(tmp_path):
  with pytest.raises(UserError, match='configs of .sklearn_digits.: all, classes_0to4, '
                     'classes_5to9'):
    data.info(_cfg(str(tmp_path), name='sklearn_digits/classes_0to5'))


@pytest.mark.parametrize('field, split, message', [
    ('train_split', 'validation', "invalid split 'validation'"),
    ('eval_split', 'test[:50%', "invalid split 'test\\[:50%'"),
    ('train_split', 'train[5:5]', "split 'train\\[5:5\\]' of sklearn_digits selects no"),
])
def test_bad_split_names_the_field_and_the_splits(digits_dir, field, split, message):
  with pytest.raises(UserError, match=f'data.{field}: {message}.*train \\(1437\\), '
                     'test \\(360\\)'):
    data.info(_cfg(digits_dir, **{field: split}))


def test_bad_preprocessing_is_a_config_error(digits_dir):
  with pytest.raises(ConfigError, match="data.train_pp: unknown preprocessing op 'crop'"):
    data.train_iterator(_cfg(digits_dir, train_pp='crop|flip'), image_size=8,
                        global_batch=8, sharding=SHARDING, seed=0)


MULTI_DEVICE = textwrap.dedent("""
    import os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
    import jax, ml_collections
    from jax.sharding import NamedSharding, PartitionSpec as P
    from adaptformer_jax import data
    from adaptformer_jax.errors import UserError
    assert jax.device_count() == 8, jax.devices()
    sharding = NamedSharding(jax.make_mesh((8,), ('data',)), P('data'))
    cfg = ml_collections.ConfigDict(dict(
        name='sklearn_digits/all', data_dir=sys.argv[1], train_split='train',
        eval_split='test', train_pp='random_resized_crop|flip', eval_pp='resize',
        normalize='imagenet', shuffle_buffer=1000))
    batch = next(data.train_iterator(cfg, image_size=8, global_batch=16,
                                     sharding=sharding, seed=0))
    evals = list(data.eval_iterator(cfg, image_size=8, global_batch=64, sharding=sharding))
    for array in (batch['image'], batch['label'], evals[-1]['mask']):
      assert array.sharding.spec == P('data'), array.sharding
      shards = array.addressable_shards
      assert len({s.device for s in shards}) == 8
      assert all(s.data.shape[0] == array.shape[0] // 8 for s in shards)
    assert batch['image'].shape == (16, 8, 8, 3)
    assert sum(float(b['mask'].sum()) for b in evals) == 360
    try:
      data.train_iterator(cfg, image_size=8, global_batch=12, sharding=sharding, seed=0)
      raise AssertionError('no error for a batch of 12 on 8 devices')
    except UserError as e:
      assert 'not divisible by the 8 devices' in str(e), e
    print('MULTI_DEVICE_OK')
""")


def test_global_batch_is_sharded_over_8_devices(digits_dir):
  result = run_on_host_devices(8, MULTI_DEVICE, digits_dir, timeout=120)
  assert 'MULTI_DEVICE_OK' in result.stdout, result.stderr[-3000:]
