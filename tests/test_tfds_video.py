"""tfds video datasets (ucf101) through the same pipeline as moving_digits and the
video lists: decoded from tfds' JPEG frame sequences, trained and evaluated over
several clips x crops, and never downloaded (tfds.testing.mock_data stands in)."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from adaptformer_jax import data
from adaptformer_jax import evaluate
from adaptformer_jax import runtime
from adaptformer_jax import sharding
from adaptformer_jax import train
from adaptformer_jax.errors import UserError
from conftest import mock_tfds_metadata
from conftest import shipped_config

UCF101 = 'ucf101/ucf101_1_256'


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
  """Any attempt to download or prepare fails the test."""
  def refuse(*args, **kwargs):
    raise AssertionError('something tried to download or prepare a dataset')
  for cls, name in ((tfds.download.DownloadManager, 'download'),
                    (tfds.download.DownloadManager, 'download_and_extract'),
                    (tfds.core.DatasetBuilder, 'download_and_prepare')):
    monkeypatch.setattr(cls, name, refuse)


def test_ucf101_features_are_what_the_pipeline_reads():
  """tfds' own ucf101 builder (its source, no data): a 'video' Video of RGB frames and a
  101-class 'label'."""
  features = tfds.builder_cls('ucf101')(config='ucf101_1_256').info.features
  assert isinstance(features['video'], tfds.features.Video)
  assert features['video'].shape == (None, 256, 256, 3)
  assert features['label'].num_classes == 101


def test_ucf101_config_trains_a_step_and_evaluates_every_view(tmp_path):
  config = shipped_config('ucf101', 'adaptformer')
  assert config.data.name == UCF101 and config.model.num_classes == 101
  config.model.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8,
                           image_size=16, num_frames=4))
  config.model.adapter.bottleneck = 8
  config.init_from = ''
  config.data.data_dir = str(tmp_path)
  config.batch_size = config.eval_batch_size = 2
  mock_tfds_metadata(config.data.data_dir, UCF101, 4)
  with tfds.testing.mock_data(num_examples=4, data_dir=config.data.data_dir):
    info, trainer = train.setup(config)
    assert (info.num_classes, info.num_train, info.num_eval) == (101, 4, 4)
    assert info.class_names[:2] == ['ApplyEyeMakeup', 'ApplyLipstick']
    run = trainer.run
    batch = next(data.train_iterator(
        config.data, image_size=16, global_batch=2, seed=0, num_frames=4,
        sharding=sharding.batch_sharding(run.mesh)))
    assert batch['image'].shape == (2, 4, 16, 16, 3)
    state, metrics = trainer.jit_train_step()(trainer.initial_state(), batch)
    evals = runtime.eval_dataset(config, run)
    assert next(iter(evals))['views'].shape == (2, 12, 4, 16, 16, 3)  # 4 clips x 3 crops
    result = evaluate.evaluate(run.model, run.variables(state), evals)
  assert int(state.step) == 1 and np.isfinite(float(metrics['loss']))
  assert result['count'] == 4 and np.isfinite(result['loss'])


def test_unprepared_ucf101_stops_with_the_build_command(tmp_path):
  config = shipped_config('ucf101', 'adaptformer')
  config.data.data_dir = str(tmp_path)
  with pytest.raises(UserError, match=r"dataset 'ucf101/ucf101_1_256' is not prepared in "
                     r".*Nothing is downloaded here: run `tfds build ucf101/ucf101_1_256"):
    data.info(config.data)
