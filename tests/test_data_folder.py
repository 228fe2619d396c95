"""Folder datasets: class names, formats, the stratified split, exact resume and bad folders."""
import logging
import os

from conftest import folder_data_cfg
from conftest import make_image_folder
from conftest import write_image
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from adaptformer_jax import data
from adaptformer_jax.data import folder
from adaptformer_jax.data import sources
from adaptformer_jax.errors import UserError

SHARDING = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',)), P('data'))


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('mixed'))
  return root, make_image_folder(root)


def _read(root, **kwargs):
  kwargs = {'val_fraction': 0.25, 'max_unreadable_fraction': 0.1, **kwargs}
  return folder.read(f'folder:{root}', **kwargs)


def test_class_names_counts_and_unreadable_files(mixed, caplog):
  root, images = mixed
  folder._checked.clear()
  with caplog.at_level(logging.INFO):
    info = data.info(folder_data_cfg(root))
  assert info.class_names == ['blue', 'green', 'red'] and info.num_classes == 3
  assert (info.num_train, info.num_eval) == (18, 6)  # 24 readable: 2 of 8 per class held out
  assert 'Skipping 2 of 26 images' in caplog.text
  assert 'blue/corrupt.jpg' in caplog.text and 'green/not_an_image.png' in caplog.text
  assert 'Ignoring 1 files without an image extension' in caplog.text
  got = _read(root)
  labelled = {p: got.class_names[c] for s in folder.SPLITS
              for p, c in zip(got.paths[s], got.labels[s])}
  assert labelled == images


def test_every_format_and_mode_decodes_to_rgb(mixed):
  _, images = mixed
  for path in images:
    with Image.open(path) as image:
      expected = np.asarray(image.convert('RGB'))
      lossy = image.format in ('JPEG', 'WEBP')
    got = folder.decode(tf.constant(path)).numpy()
    assert got.shape == expected.shape and got.dtype == np.uint8, path
    if lossy:  # decoder implementations may differ by a few levels
      assert np.abs(got.astype(int) - expected).mean() < 3, path
    else:
      np.testing.assert_array_equal(got, expected, err_msg=path)
  rgba = [p for p in images if os.path.basename(p) == '00.png' and '/blue/' in p][0]
  with Image.open(rgba) as image:
    assert image.mode == 'RGBA'  # the fixture really wrote an alpha channel


def test_stratified_split_is_deterministic_and_disjoint(tmp_path):
  for name, n in (('a', 10), ('b', 7), ('c', 2)):
    for i in range(n):
      write_image(str(tmp_path / name / f'{i}.png'), (100, 100, 100), size=(4, 4), seed=i)
  first, again = _read(tmp_path, val_fraction=0.3), _read(tmp_path, val_fraction=0.3)
  assert first.paths == again.paths and first.labels == again.labels
  train, val = set(first.paths['train']), set(first.paths['val'])
  assert not train & val and len(train | val) == 19
  per_class = [first.labels['val'].count(c) for c in range(3)]
  assert per_class == [3, 2, 1]  # round(30%), and at least one of a class of two
  assert {first.labels['train'].count(c) for c in range(3)} == {7, 5, 1}
  assert _read(tmp_path, val_fraction=0.5).paths['val'] != first.paths['val']
  assert not _read(tmp_path, val_fraction=0.0).paths['val']


def test_train_and_val_folders_are_the_splits(tmp_path):
  for split, n in (('train', 3), ('val', 1)):
    for name in ('x', 'y'):
      for i in range(n):
        write_image(str(tmp_path / split / name / f'{i}.jpg'), (50, 50, 50), seed=i)
  got = _read(tmp_path)
  assert got.class_names == ('x', 'y')
  assert [len(got.paths[s]) for s in folder.SPLITS] == [6, 2]
  assert all('/val/' in p for p in got.paths['val'])


def test_a_class_named_train_beside_other_classes_is_refused(tmp_path):
  # train/ with class folders of its own would make steam vs electric of bus/car/train
  for path in ('bus', 'car', 'train/steam', 'train/electric'):
    write_image(str(tmp_path / path / '0.png'), (50, 50, 50))
  with pytest.raises(UserError, match=r'has train/ beside bus/, car/: .*rename the class '
                     r'folder train/'):
    _read(tmp_path)
  for name in ('bus', 'car', 'train'):  # train/ holding images, not classes
    write_image(str(tmp_path / 'flat' / name / '0.png'), (50, 50, 50))
  with pytest.raises(UserError, match='has train/ beside bus/, car/'):
    _read(tmp_path / 'flat')


def test_test_folder_is_the_validation_split_without_val(tmp_path, caplog):
  for split in ('train', 'test'):
    for name in ('x', 'y'):
      write_image(str(tmp_path / split / name / '0.png'), (50, 50, 50))
  got = _read(tmp_path)
  assert [len(got.paths[s]) for s in folder.SPLITS] == [2, 2]
  assert all('/test/' in p for p in got.paths['val'])
  for name in ('x', 'y'):
    write_image(str(tmp_path / 'val' / name / '0.png'), (50, 50, 50))
  with caplog.at_level(logging.WARNING):
    got = _read(tmp_path)
  assert all('/val/' in p for p in got.paths['val'])
  assert f'Not reading {tmp_path}/test: the validation split is {tmp_path}/val' in caplog.text


def _take(iterator, n):
  return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(n)]


def test_resume_on_a_folder_is_bit_exact(mixed):
  root, _ = mixed
  cfg = folder_data_cfg(root, train_pp='random_resized_crop|flip', normalize='imagenet')
  kwargs = dict(image_size=16, global_batch=4, sharding=SHARDING)  # 18 images: epoch at 4.5
  full = _take(data.train_iterator(cfg, seed=1, **kwargs), 8)
  for start in (3, 5):
    resumed = _take(data.train_iterator(cfg, seed=1, start_step=start, **kwargs), 8 - start)
    for expected, got in zip(full[start:], resumed):
      np.testing.assert_array_equal(got['image'], expected['image'])
      np.testing.assert_array_equal(got['label'], expected['label'])
  epoch = np.concatenate([b['label'] for b in full[:4]] + [full[4]['label'][:2]])
  assert sorted(epoch.tolist()) == [0] * 6 + [1] * 6 + [2] * 6  # one epoch: each image once


def test_process_shards_partition_the_split(mixed):
  root, _ = mixed
  source = sources.source(folder_data_cfg(root))
  whole = [p for p, _ in source.records('train').as_numpy_iterator()]
  shards = [[p for p, _ in source.records(s).as_numpy_iterator()]
            for s in tfds.even_splits('train', n=4)]
  assert [len(s) for s in shards] == [5, 5, 4, 4] and sum(shards, []) == whole


def test_eval_batches_hold_every_val_image(mixed):
  root, _ = mixed
  batches = list(data.eval_iterator(folder_data_cfg(root), image_size=16, global_batch=4,
                                    sharding=SHARDING))
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])[mask > 0]
  assert len(batches) == 2 and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize('layout, message', [
    ({'only': 2}, "has only the class folder 'only'; a classifier needs at least two"),
    ({'a': 2, 'b': 0}, 'class folder .*/b has no images'),
    ({}, 'has no class folders'),
])
def test_bad_folders(tmp_path, layout, message):
  for name, n in layout.items():
    os.makedirs(tmp_path / name, exist_ok=True)
    for i in range(n):
      write_image(str(tmp_path / name / f'{i}.png'), (10, 10, 10), seed=i)
  with pytest.raises(UserError, match=message):
    data.info(folder_data_cfg(tmp_path))


def test_missing_folder_and_file_instead_of_folder(tmp_path):
  with pytest.raises(UserError, match=f'folder:{tmp_path}/nope.*does not exist'):
    data.info(folder_data_cfg(tmp_path / 'nope'))
  (tmp_path / 'file').write_text('x')
  with pytest.raises(UserError, match='is not a directory'):
    data.info(folder_data_cfg(tmp_path / 'file'))


def test_too_many_unreadable_images_is_an_error(mixed):
  root, _ = mixed
  with pytest.raises(UserError, match=r'2 of 26 images .* cannot be decoded \(e.g. .*corrupt.jpg.*'
                     r'raise data.max_unreadable_fraction \(now 0.05\)'):
    data.info(folder_data_cfg(root, max_unreadable_fraction=0.05))


def test_class_of_unreadable_files_and_val_with_unknown_class(tmp_path):
  write_image(str(tmp_path / 'a' / '0.png'), (10, 10, 10))
  (tmp_path / 'b').mkdir()
  (tmp_path / 'b' / 'broken.jpg').write_bytes(b'not a jpeg')
  with pytest.raises(UserError, match='class folder .*/b has no readable image'):
    data.info(folder_data_cfg(tmp_path, max_unreadable_fraction=1.0))
  for split, name in (('train', 'a'), ('train', 'b'), ('val', 'a'), ('val', 'z')):
    write_image(str(tmp_path / 'split' / split / name / '0.png'), (10, 10, 10))
  with pytest.raises(UserError, match='val has class folders that .*/train lacks: z'):
    data.info(folder_data_cfg(tmp_path / 'split'))


def test_no_validation_images_names_the_fix(tmp_path):
  for name in ('a', 'b'):
    write_image(str(tmp_path / name / '0.png'), (10, 10, 10))
  with pytest.raises(UserError, match="data.eval_split: split 'val' of folder .* selects no"):
    data.info(folder_data_cfg(tmp_path, val_fraction=0.0))
  with pytest.raises(UserError, match="data.eval_split: invalid split 'test' .*val \\(0\\)"):
    data.info(folder_data_cfg(tmp_path, eval_split='test'))
