"""predict(): files and arrays alike, unreadable files as NaN rows, the CSV layout."""
import csv
import os

from conftest import folder_data_cfg
from conftest import make_image_folder
from conftest import tiny_cfg
from conftest import tiny_video_cfg
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from adaptformer_jax import models
from adaptformer_jax import predict
from adaptformer_jax.data import folder
from adaptformer_jax.errors import UserError


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('images'))
  readable = make_image_folder(root)
  return root, readable


def _model(num_classes=3):
  config = ml_collections.ConfigDict({
      'model': tiny_cfg(num_classes=num_classes, image_size=16, patch_size=4),
      'data': folder_data_cfg('unused'), 'eval_batch_size': 4})
  variables = models.build(config.model).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  return config, variables


def test_files_and_arrays_give_the_same_probabilities(images):
  config, variables = _model()
  paths = sorted(p for p in images[1] if p.endswith(('.png', '.bmp')))[:10]  # lossless
  arrays = []
  for p in paths:
    with Image.open(p) as image:
      arrays.append(np.asarray(image.convert('RGB')))
  from_files = predict.predict(variables, config, paths)
  assert from_files.shape == (len(paths), 3) and len(paths) == 10  # batches of 4: padded last
  np.testing.assert_allclose(from_files.sum(axis=1), 1, rtol=1e-5)
  np.testing.assert_allclose(predict.predict(variables, config, arrays), from_files, atol=1e-6)
  alone = predict.predict(variables, config, paths[5:6], batch_size=1)
  np.testing.assert_allclose(alone[0], from_files[5], atol=1e-6)  # batching does not leak


def test_unreadable_files_are_nan_rows_and_the_rest_go_on(images):
  config, variables = _model()
  paths = folder.list_images([images[0]])
  assert len(paths) == 26  # the 24 readable, the corrupt JPEG and the text .png
  got = predict.predict(variables, config, paths)
  bad = {p for p, row in zip(paths, got) if np.isnan(row).any()}
  assert {os.path.basename(p) for p in bad} == {'corrupt.jpg', 'not_an_image.png'}
  assert np.isfinite(got[[p not in bad for p in paths]]).all()


def test_csv_columns_rows_and_order(tmp_path):
  probabilities = np.array([[0.1, 0.7, 0.2], [np.nan] * 3, [0.5, 0.2, 0.3]])
  path = str(tmp_path / 'predictions.csv')
  predict.write_csv(path, ['a.png', 'b.jpg', 'c.png'], probabilities, ['x', 'y', 'z'], top_k=2)
  with open(path) as f:
    rows = list(csv.reader(f))
  assert rows == [['path', 'label', 'prob', 'label_2', 'prob_2'],
                  ['a.png', 'y', '0.700000', 'z', '0.200000'],
                  ['b.jpg', predict.UNREADABLE, '', '', ''],
                  ['c.png', 'x', '0.500000', 'z', '0.300000']]
  predict.write_csv(path, ['a.png'], probabilities[:1], ['x', 'y', 'z'], top_k=9)
  with open(path) as f:
    assert next(csv.reader(f))[-2:] == ['label_3', 'prob_3']  # k is capped at the classes
  assert os.listdir(tmp_path) == ['predictions.csv']


def test_list_images_takes_files_directories_and_globs(images, tmp_path):
  images = images[0]
  blue = sorted(os.path.join(images, 'blue', f) for f in os.listdir(os.path.join(images, 'blue')))
  assert folder.list_images([os.path.join(images, 'blue')]) == blue
  assert folder.list_images([os.path.join(images, '*', '0[01].png')]) == [
      os.path.join(images, c, '00.png') for c in ('blue', 'green', 'red')]
  assert folder.list_images([blue[1], blue[1], blue[0]]) == blue[:2]  # sorted, no repeats
  with pytest.raises(UserError, match=f'--images {tmp_path}/nope.png: no such file'):
    folder.list_images([blue[0], str(tmp_path / 'nope.png')])
  with pytest.raises(UserError, match='the glob matches nothing'):
    folder.list_images([str(tmp_path / '*.jpg')])
  with pytest.raises(UserError, match='no images'):
    folder.list_images([str(tmp_path)])


def test_arrays_must_be_uint8_images():
  config, variables = _model()
  with pytest.raises(UserError, match=r'images\[1\]: expected a file path or a uint8'):
    predict.predict(variables, config, [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3))])


def test_a_mix_of_paths_and_arrays_says_so(images):
  config, variables = _model()
  path = sorted(images[1])[0]
  with pytest.raises(UserError, match=r'images\[0\] is a file path but images\[1\] is not; '
                     'pass all file paths or all uint8 arrays'):
    predict.predict(variables, config, [path, np.zeros((8, 8, 3), np.uint8)])


def test_a_config_with_classes_from_the_data_names_run_config():
  config, variables = _model()
  config.model.num_classes = 0  # configs/folder.py before the data is read
  with pytest.raises(UserError, match=r'num_classes is 0 .*pass run.config of `run, '
                     r'variables = jobs.load_variables'):
    predict.predict(variables, config, [np.zeros((16, 16, 3), np.uint8)])


def test_a_video_model_is_refused():
  config, variables = _model()
  config.model = tiny_video_cfg(num_classes=3, image_size=16, patch_size=4)
  with pytest.raises(UserError, match='the model takes video clips'):
    predict.predict(variables, config, [np.zeros((16, 16, 3), np.uint8)])
