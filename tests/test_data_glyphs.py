"""The offline `glyphs` pre-training corpus: deterministic, no digits, builds offline."""
import socket
import unicodedata

import numpy as np
import pytest
import tensorflow_datasets as tfds

from adaptformer_jax.data import glyphs


def test_examples_are_a_pure_function_of_split_and_index():
  first = [glyphs.render('train', i) for i in (0, 1, 977)]
  again = [glyphs.render('train', i) for i in (977, 1, 0)][::-1]
  for (a, la), (b, lb) in zip(first, again):
    assert la == lb and np.array_equal(a, b)
  assert a.shape == (32, 32) and a.dtype == np.uint8
  # Another index or split is another image.
  assert not np.array_equal(glyphs.render('train', 0)[0], glyphs.render('train', 1)[0])
  assert not np.array_equal(glyphs.render('train', 0)[0], glyphs.render('test', 0)[0])


def test_classes_hold_no_digit_and_no_digit_look_alike():
  assert len(glyphs.CLASSES) == len(set(glyphs.CLASSES)) >= 100
  assert not [c for c in glyphs.CLASSES if unicodedata.category(c) == 'Nd']
  assert not set(glyphs.CLASSES) & set('0123456789OoIlЗзбΟο')


def test_every_font_draws_every_class():
  for font in glyphs.FONTS:
    for char in glyphs.CLASSES:
      assert glyphs._glyph(char, font, 0).getbbox() is not None, (font, char)


def test_builds_offline_and_matches_the_renderer(tmp_path):
  with pytest.MonkeyPatch.context() as mp:
    def no_network(*args, **kwargs):
      raise AssertionError(f'network access attempted: {args}')
    mp.setattr(socket.socket, 'connect', no_network)
    mp.setattr(socket, 'create_connection', no_network)
    builder = tfds.builder(f'{glyphs.NAME}/small', data_dir=str(tmp_path))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  assert builder.info.features['label'].names == list(glyphs.CLASSES)
  assert builder.info.splits['train'].num_examples == 1000
  # Stored losslessly: the test split is exactly the renderer's first 200 test examples.
  stored = tfds.as_numpy(builder.as_dataset(split='test', batch_size=-1))
  rendered = {glyphs.render('test', i)[0].tobytes(): glyphs.render('test', i)[1]
              for i in range(200)}
  assert len(rendered) == 200
  assert {image[..., 0].tobytes(): int(label) for image, label in
          zip(stored['image'], stored['label'])} == rendered
  labels = tfds.as_numpy(builder.as_dataset(split='train', batch_size=-1))['label']
  assert len(np.unique(labels)) == len(glyphs.CLASSES)  # 1000 draws reach every class
