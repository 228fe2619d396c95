"""Multi-clip x multi-crop video evaluation (data.eval_clips x data.eval_crops): the
official test's views, each video scored on the mean of its views' logits; 1 x 1
is the single central view it always was; bad settings fail in schema."""
import json
import textwrap

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from adaptformer_jax import data
from adaptformer_jax import evaluate
from adaptformer_jax import models
from adaptformer_jax import schema
from adaptformer_jax import workdirs
from adaptformer_jax.data import preprocess
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.errors import UserError
from conftest import run_on_host_devices
from conftest import shipped_config
from conftest import tiny_run_config

SHARDING = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',)), P('data'))
SPLIT = 'test[:12]'


def _cfg(data_dir, **overrides):
  cfg = dict(name='moving_digits/direction', data_dir=data_dir, train_split='train',
             eval_split=SPLIT, train_pp='resize', eval_pp='center_crop',
             normalize='none', shuffle_buffer=16)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope='module')
def tiny_model():
  """A random 4-frame 16 px video model with non-zero weights everywhere (head included)."""
  cfg = models.preset('videomae_s16', width=32, depth=1, num_heads=2, mlp_dim=64,
                      patch_size=8, image_size=16, num_frames=4, num_classes=4,
                      tuning='adaptformer', adapter=dict(bottleneck=8))
  model = models.build(cfg)
  variables = model.init(jax.random.key(0), np.zeros((1, 4, 16, 16, 3), np.float32))
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return model, jax.tree.unflatten(tree, noisy)


def _raw(video_dir):
  raw = tfds.as_numpy(tfds.load('moving_digits/direction', split=SPLIT,
                                data_dir=video_dir, batch_size=-1))
  return np.tile(raw['video'], (1, 1, 1, 1, 3)).astype(np.float32) / 255, raw['label']


def _by_hand(model, variables, views, labels):
  """top-1 and mean loss of the per-video mean of each view's logits: (N, V, ...) views."""
  logits = np.mean([np.asarray(model.apply(variables, views[:, v], train=False))
                    for v in range(views.shape[1])], axis=0)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return float(np.mean(logits.argmax(-1) == labels)), float(np.mean(loss))


def test_views_average_the_logits_of_every_clip_and_crop(video_dir, tiny_model):
  """8-frame 32 px clips, 4-frame 16 px views: 2 clips x 3 crops, built and scored by hand."""
  model, variables = tiny_model
  batches = data.eval_iterator(_cfg(video_dir, eval_clips=2, eval_crops=3), image_size=16,
                               global_batch=8, sharding=SHARDING, num_frames=4)
  got = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
  assert [set(b) for b in got] == [{'views', 'label', 'mask'}] * 2
  assert got[0]['views'].shape == (8, 6, 4, 16, 16, 3)
  assert sum(b['mask'].sum() for b in got) == 12  # 12 videos padded to 16, counted once

  videos, labels = _raw(video_dir)
  # Clip k starts at int(k * (8 - 4) / (2 - 1)); square frames: crops slide down the
  # rows, int(j * (32 - 16) / (3 - 1)), centred across.
  hand = np.stack([videos[:, s:s + 4, top:top + 16, 8:24]
                   for s in (0, 4) for top in (0, 8, 16)], 1)
  np.testing.assert_allclose(np.concatenate([b['views'] for b in got])[:12], hand, atol=1e-6)
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in got])[:12], labels)
  assert len({hand[:, v].tobytes() for v in range(6)}) == 6  # six different views

  result = evaluate.evaluate(model, variables, batches)
  top1, loss = _by_hand(model, variables, hand, labels)
  assert result['count'] == 12
  np.testing.assert_allclose(result['top1'], top1)
  np.testing.assert_allclose(result['loss'], loss, rtol=1e-5)
  # Not what one view alone, or the central clip, would score.
  assert not np.isclose(result['loss'], _by_hand(model, variables, hand[:, :1], labels)[1])


def test_one_clip_one_crop_is_the_single_central_view(video_dir, tiny_model):
  model, variables = tiny_model
  cfg = _cfg(video_dir)  # without the fields, as configs written before them
  kwargs = dict(image_size=16, global_batch=8, sharding=SHARDING, num_frames=4)
  ones = [{k: np.asarray(v) for k, v in b.items()} for b in data.eval_iterator(
      _cfg(video_dir, eval_clips=1, eval_crops=1), **kwargs)]
  plain = [{k: np.asarray(v) for k, v in b.items()} for b in data.eval_iterator(cfg, **kwargs)]
  assert [set(b) for b in ones] == [{'image', 'label', 'mask'}] * 2
  for a, b in zip(ones, plain):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  videos, labels = _raw(video_dir)
  central = videos[:, 2:6, 8:24, 8:24]  # the middle 4 of 8 frames, the centre crop
  np.testing.assert_allclose(np.concatenate([b['image'] for b in ones])[:12], central,
                             atol=1e-6)
  result = evaluate.evaluate(model, variables, data.eval_iterator(cfg, **kwargs))
  top1, loss = _by_hand(model, variables, central[:, None], labels)
  np.testing.assert_allclose(result['top1'], top1)
  np.testing.assert_allclose(result['loss'], loss, rtol=1e-5)


@pytest.mark.parametrize('sampling,clips,length,expected', [
    # 20 frames, stride 2: 10 strided frames; clip k starts at int(k * (10 - 6) / (n - 1)).
    ('dense', 3, 20, [[0, 2, 4, 6, 8, 10], [4, 6, 8, 10, 12, 14], [8, 10, 12, 14, 16, 18]]),
    # Short: 4 strided frames, every clip the same, repeating the last strided frame.
    ('dense', 2, 8, [[0, 2, 4, 6, 6, 6]] * 2),
    # SSv2 (VideoMAE): segments of 2 frames; clip 0 their first frames, clip 1 their middles.
    ('segments', 2, 12, [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]),
])
def test_temporal_clips_follow_the_official_test(sampling, clips, length, expected):
  video = tf.tile(tf.reshape(tf.cast(tf.range(length), tf.uint8), (length, 1, 1, 1)),
                  (1, 1, 1, 3))
  pp = preprocess.make('resize', image_size=1, normalize='none', num_frames=6,
                       frame_sampling=sampling, frame_stride=2, train=False, clips=clips)
  views = pp(video, tf.constant([0, 0], tf.int64)).numpy()
  assert views.shape == (clips, 6, 1, 1, 3)
  np.testing.assert_array_equal(np.round(views[:, :, 0, 0, 0] * 255), expected)


@pytest.mark.parametrize('op,shape,corners', [
    # Crop j of 3 slides along the longer side: int(j * (long - 10) / 2), centred across.
    ('center_crop', (20, 30), [(5, 0), (5, 10), (5, 20)]),
    ('center_crop', (30, 20), [(0, 5), (10, 5), (20, 5)]),
    # The official video eval: short side to 10 first (20 x 40 -> 10 x 20), then slide.
    ('short_side_center_crop', (20, 40), [(0, 0), (0, 5), (0, 10)]),
])
def test_spatial_crops_slide_along_the_longer_side(op, shape, corners):
  rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing='ij')
  scale = 10 / min(shape)  # short_side_center_crop resizes: coordinates scale with it
  image = tf.constant(np.stack([rows, cols, 0 * rows], -1) / 100, tf.float32)
  for j, (top, left) in enumerate(corners):
    crop = preprocess.OPS[op](image, None, 10, crop=(j, 3)).numpy() * 100
    assert crop.shape == (10, 10, 3)
    if op == 'center_crop':
      assert (round(crop[0, 0, 0]), round(crop[0, 0, 1])) == (top, left)
    else:
      np.testing.assert_allclose(crop[0, 0, :2], (np.array([top, left]) + 0.5) / scale - 0.5,
                                 atol=0.3)
  np.testing.assert_array_equal(  # crop=None and crop (0, 1): the plain centre crop
      preprocess.OPS[op](image, None, 10, crop=(0, 1)), preprocess.OPS[op](image, None, 10))


def _problems(config, **data_fields):
  """the schema's problems with `config` (as its config.json) with these data fields."""
  config = config.to_dict()
  config['data'].update(data_fields)
  return schema.problems(config)


def test_bad_view_settings_are_one_clear_config_error():
  video = shipped_config('ssv2', 'adaptformer')
  assert _problems(video) == [] and (video.data.eval_clips, video.data.eval_crops) == (4, 3)
  assert _problems(shipped_config('ssv2', 'adaptformer'), eval_clips=0) == [
      'data.eval_clips: must be an integer >= 1, got 0']
  assert _problems(shipped_config('ssv2', 'adaptformer'), eval_crops=1.5) == [
      'data.eval_crops: must be an integer >= 1, got 1.5']
  [no_crop] = _problems(shipped_config('ssv2', 'adaptformer'), eval_pp='resize')
  assert no_crop.startswith("data.eval_crops=3: data.eval_pp='resize' has no crop to move")
  [image] = _problems(tiny_run_config(), eval_clips=2)
  assert 'several views of an example are a video evaluation' in image
  bad = tiny_run_config()
  bad.data.eval_clips = 0
  with pytest.raises(ConfigError, match='data.eval_clips: must be an integer >= 1, got 0'):
    schema.validate(bad)
  # Every run config has both fields (recipes.base sets them): none may be missing.
  old = tiny_run_config().to_dict()
  del old['data']['eval_clips'], old['data']['eval_crops']
  assert schema.problems(old) == ['data.eval_clips: missing', 'data.eval_crops: missing']


TWO_DEVICES = textwrap.dedent("""
    import sys
    import jax, ml_collections, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from adaptformer_jax import data, evaluate, models
    assert jax.device_count() == 2, jax.devices()
    cfg = ml_collections.ConfigDict(dict(
        name='moving_digits/direction', data_dir=sys.argv[1], train_split='train',
        eval_split='test[:10]', train_pp='resize', eval_pp='center_crop',
        normalize='none', shuffle_buffer=16, eval_clips=2, eval_crops=3))
    model = models.build(models.preset(
        'videomae_s16', width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8,
        image_size=16, num_frames=4, num_classes=4))
    variables = model.init(jax.random.key(0), np.zeros((1, 4, 16, 16, 3), np.float32))
    variables = jax.tree.map(lambda x: x + 0.3 * np.cos(np.arange(x.size)).reshape(x.shape),
                             variables)
    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
      sharding = NamedSharding(jax.sharding.Mesh(np.array(devices), ('data',)), P('data'))
      batches = data.eval_iterator(cfg, image_size=16, global_batch=4, sharding=sharding,
                                   num_frames=4)
      views = next(iter(batches))['views']
      assert views.shape == (4, 6, 4, 16, 16, 3) and views.sharding.spec == P('data')
      assert len({s.device for s in views.addressable_shards}) == len(devices)
      results.append(evaluate.evaluate(model, variables, batches))
    two, one = results
    assert two['count'] == one['count'] == 10, results
    assert two['top1'] == one['top1'] and two['confusion'] == one['confusion'], results
    np.testing.assert_allclose(two['loss'], one['loss'], rtol=1e-5)
    print('TWO_DEVICES_OK')
""")


def test_views_shard_over_devices_and_pad_as_single_views(video_dir):
  """10 videos in batches of 4 over 2 devices (the last padded): the same result as one."""
  result = run_on_host_devices(2, TWO_DEVICES, video_dir)
  assert 'TWO_DEVICES_OK' in result.stdout, result.stderr[-3000:]


def test_a_run_resumes_with_other_eval_views(tmp_path, monkeypatch):
  """Views are an eval setting: a run saved with other counts resumes with them
  changed; a model change still conflicts."""
  config = shipped_config('ssv2', 'adaptformer')
  saved = config.to_dict()
  saved['data'].update(eval_clips=1, eval_crops=1)
  (tmp_path / workdirs.CONFIG_FILE).write_text(json.dumps(saved))
  monkeypatch.setattr(workdirs.checkpoints, 'latest_step', lambda workdir: 1)
  workdirs.prepare(config, str(tmp_path))  # 4 x 3 where the saved run had 1 x 1
  config.data.eval_clips = 2
  workdirs.prepare(config, str(tmp_path))
  config.model.width = 384
  with pytest.raises(UserError, match=r'model.width: 768 -> 384'):
    workdirs.prepare(config, str(tmp_path))
