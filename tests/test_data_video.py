"""Video input: the offline moving_digits dataset, frame sampling, clip transforms, the
video path through the same tfds pipeline (exact resume, eval padding), and a video run."""
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from adaptformer_jax import assets
from adaptformer_jax import data
from adaptformer_jax import jobs
from adaptformer_jax import models
from adaptformer_jax import recipes
from adaptformer_jax import train
from adaptformer_jax.data import moving_digits
from adaptformer_jax.data import preprocess
from adaptformer_jax.errors import UserError
from conftest import shipped_config

SHARDING = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',)), P('data'))


def _cfg(data_dir, **overrides):
  cfg = dict(name='moving_digits/direction', data_dir=data_dir, train_split='train',
             eval_split='test', train_pp='pad_crop', eval_pp='resize',
             normalize='none', shuffle_buffer=4096)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _centres(video):
  """(T, 2) centre of mass of each frame's pixels."""
  rows, cols = np.indices(video.shape[1:3])
  weight = video[..., 0].astype(np.float64)
  total = weight.sum((1, 2))
  return np.stack([(weight * rows).sum((1, 2)) / total,
                   (weight * cols).sum((1, 2)) / total], -1)


def test_moving_digits_move_where_the_label_says_and_build_deterministically(video_dir):
  ds = tfds.as_numpy(tfds.load('moving_digits/direction', split='train[:64]',
                               data_dir=video_dir, batch_size=-1))
  assert ds['video'].shape == (64, 8, 32, 32, 1) and set(ds['label']) == {0, 1, 2, 3}
  for video, label in zip(ds['video'], ds['label']):
    step = np.diff(_centres(video), axis=0)
    want = np.array(list(moving_digits.DIRECTIONS.values())[label]) * moving_digits.SPEED
    np.testing.assert_allclose(step, np.broadcast_to(want, step.shape), atol=1e-9)
  # Time-reversed, a clip is a clip of the opposite direction: one frame cannot tell.
  rng = np.random.default_rng(0)
  right = moving_digits.clip(np.full((8, 8, 1), 255, np.uint8), (0, 1), rng)
  assert np.diff(_centres(right[::-1]), axis=0)[0, 1] == -moving_digits.SPEED
  again = tfds.as_numpy(tfds.load('moving_digits/direction', split='train[:64]',
                                  data_dir=str(video_dir), batch_size=-1))
  np.testing.assert_array_equal(again['video'], ds['video'])


@pytest.mark.parametrize('sampling,train,length,expected', [
    ('dense', False, 20, [4, 6, 8, 10, 12, 14]),   # the centred window, stride 2
    ('dense', False, 7, [0, 2, 4, 6, 6, 6]),       # short: the last frame repeats
    ('segments', False, 12, [1, 3, 5, 7, 9, 11]),  # each segment's middle frame
    ('segments', False, 3, [0, 0, 1, 1, 2, 2]),    # short: frames repeat
])
def test_frame_sampling(sampling, train, length, expected):
  video = tf.reshape(tf.cast(tf.range(length), tf.uint8), (length, 1, 1, 1))
  pp = preprocess.make('resize', image_size=1, normalize='none', num_frames=6,
                       frame_sampling=sampling, frame_stride=2, train=train)
  clip = pp(tf.tile(video, (1, 1, 1, 3)), tf.constant([0, 1], tf.int64)).numpy()
  np.testing.assert_array_equal(np.round(clip[:, 0, 0, 0] * 255), expected)


def test_random_frames_stay_in_order_inside_the_video():
  video = tf.tile(tf.reshape(tf.cast(tf.range(40), tf.uint8), (40, 1, 1, 1)), (1, 1, 1, 3))
  for sampling in preprocess.FRAME_SAMPLING:
    pp = preprocess.make('resize', image_size=1, normalize='none', num_frames=8,
                         frame_sampling=sampling, frame_stride=4, train=True)
    seen = set()
    for s in range(5):
      frames = np.round(pp(video, tf.constant([s, 0], tf.int64)).numpy()[:, 0, 0, 0] * 255)
      assert np.all(np.diff(frames) > 0) and frames.max() <= 39
      seen.add(tuple(frames))
    assert len(seen) > 1


def test_clip_transforms_crop_and_flip_every_frame_alike():
  frames = np.random.RandomState(0).randint(0, 255, (4, 24, 24, 3)).astype(np.uint8)
  pp = preprocess.make('random_resized_crop|flip', image_size=16, normalize='none',
                       num_frames=4)
  for s in range(6):
    seed = tf.constant([s, 7], tf.int64)
    clip = pp(tf.constant(frames), seed).numpy()
    assert clip.shape == (4, 16, 16, 3)
    # The same op on a clip of four copies of frame 0 gives four copies of clip[0].
    copies = pp(tf.constant(np.repeat(frames[:1], 4, 0)), seed).numpy()
    np.testing.assert_allclose(copies, np.repeat(clip[:1], 4, 0), atol=1e-6)


def test_video_batches_resume_exactly_and_pad_the_eval(video_dir):
  cfg = _cfg(video_dir)
  kwargs = dict(image_size=16, global_batch=32, sharding=SHARDING, num_frames=8)
  full = [{k: np.asarray(v) for k, v in b.items()}
          for _, b in zip(range(5), data.train_iterator(cfg, seed=1, **kwargs))]
  assert full[0]['image'].shape == (32, 8, 16, 16, 3)
  resumed = data.train_iterator(cfg, seed=1, start_step=3, **kwargs)
  for expected in full[3:]:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], expected['image'])
    np.testing.assert_array_equal(got['label'], expected['label'])
  batches = list(data.eval_iterator(_cfg(video_dir, eval_split='test[:40]'), image_size=16,
                                    global_batch=32, sharding=SHARDING, num_frames=8))
  assert [b['image'].shape for b in batches] == [(32, 8, 16, 16, 3)] * 2
  assert sum(float(np.sum(b['mask'])) for b in batches) == 40


def test_video_data_and_image_models_do_not_mix(video_dir, data_dir):
  with pytest.raises(UserError, match="holds videos but the model takes images; use a "
                     "video model"):
    data.train_iterator(_cfg(video_dir), image_size=16, global_batch=8,
                        sharding=SHARDING, seed=0)
  with pytest.raises(UserError, match='holds images but the model takes clips'):
    data.eval_iterator(_cfg(data_dir, name='sklearn_digits/all'), image_size=16,
                       global_batch=8, sharding=SHARDING, num_frames=8)


def test_a_video_model_trains_on_moving_digits(video_dir, tmp_path):
  model = models.preset('videomae_s16', width=32, depth=1, num_heads=2, mlp_dim=64,
                        patch_size=8, image_size=16, num_frames=8, num_classes=4,
                        tuning='adaptformer', adapter=dict(bottleneck=8))
  config = recipes.base(model, 'moving_digits/direction', data_dir=video_dir,
                        train_pp='resize', eval_pp='resize', normalize='none')
  config.update(dict(batch_size=32, eval_batch_size=128, num_train_steps=6,
                     warmup_steps=1, checkpoint_every_steps=6, progress=False))
  config.data.eval_split = 'test[:128]'
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir)
  # Recounted apart from evaluate.evaluate: the saved model's logits for the same clips,
  # each clip once (the mask); top-1 and the loss in NumPy.
  run, variables = jobs.load_variables(config, workdir)
  logits, labels = [], []
  for batch in data.eval_iterator(config.data, image_size=16, global_batch=128,
                                  sharding=SHARDING, num_frames=8):
    real = np.asarray(batch['mask']) > 0
    logits.append(np.asarray(run.model.apply(variables, batch['image'], train=False))[real])
    labels.append(np.asarray(batch['label'])[real])
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  top_two = np.sort(logits, -1)[:, -2:]
  assert np.all(top_two[:, 1] - top_two[:, 0] > 1e-4)  # no near-tie that rounding could flip
  assert result['count'] == len(labels) == 128
  assert result['top1'] == np.sum(logits.argmax(-1) == labels) / 128
  z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  cross_entropy = np.log(np.exp(z).sum(-1)) - z[np.arange(128), labels]
  np.testing.assert_allclose(result['loss'], cross_entropy.mean(), rtol=1e-5)
  assert result['top5'] == 1.0  # 4 classes: the top 5 hold every label
  # The confusion matrix's rows count the split's own labels (read straight from tfds).
  split = tfds.as_numpy(tfds.load('moving_digits/direction', split='test[:128]',
                                  data_dir=video_dir, batch_size=-1))
  np.testing.assert_array_equal(np.sum(result['confusion'], axis=1),
                                np.bincount(split['label'], minlength=4))
  np.testing.assert_array_equal(np.bincount(labels, minlength=4),
                                np.bincount(split['label'], minlength=4))


def test_multi_scale_crop_takes_neighbouring_scales_at_fixed_offsets():
  """On a (60, 80) image whose pixels hold their own coordinates, each crop's
  corner and size must be one of GroupMultiScaleCrop's choices."""
  rows, cols = np.meshgrid(np.arange(60), np.arange(80), indexing='ij')
  image = tf.constant(np.stack([rows, cols, np.zeros_like(rows)], -1) / 100, tf.float32)
  sizes = [int(60 * s) for s in (1, .875, .75, .66)]
  seen = set()
  for s in range(40):
    crop = preprocess.OPS['multi_scale_crop'](image, tf.constant([s, 3], tf.int64), 60)
    crop = crop.numpy() * 100
    h = round(crop[-1, 0, 0] - crop[0, 0, 0]) + 1
    w = round(crop[0, -1, 1] - crop[0, 0, 1]) + 1
    top, left = round(crop[0, 0, 0]), round(crop[0, 0, 1])
    assert h in sizes and w in sizes and abs(sizes.index(h) - sizes.index(w)) <= 1
    assert left % ((80 - w) // 4 or 1) == 0 and top % ((60 - h) // 4 or 1) == 0
    seen.add((h, w, top, left))
  assert len(seen) > 10


def test_video_demo_adapts_the_shipped_backbone_its_backbone_config_trains():
  backbone, demo = shipped_config('video_demo', 'backbone'), shipped_config('video_demo')
  mismatched = {k for k in demo.model if demo.model[k] != backbone.model[k]}
  assert mismatched == {'tuning', 'num_classes'}
  assert demo.init_from == assets.VIDEO_BACKBONE and not backbone.init_from
  assert (backbone.data.name, demo.data.name) == ('moving_digits/digit',
                                                   'moving_digits/direction')
  assert 'flip' not in demo.data.train_pp  # a flip would swap left and right
  # Pre-trained order-blind on single-frame tokens; adapted on frames in order.
  assert backbone.data.train_pp == 'resize|shuffle_frames' and demo.data.train_pp == 'resize'
  assert demo.model.tubelet == 1
  assert len(demo.seeds) >= 3 and set(demo.methods) == set(demo.sweep.base_lrs)
  for method, lr in demo.methods.items():  # chosen on the sweep, never at its grid's edge
    grid = sorted(demo.sweep.base_lrs[method])
    assert lr in grid[1:-1], (method, lr, grid)
  # Scored on the whole test split: one clip is at most 0.1 point.
  assert demo.data.eval_split == 'test' and moving_digits.NUM_EXAMPLES['test'] >= 1000


def test_shuffle_frames_permutes_whole_frames_and_leaves_images_alone():
  video = tf.tile(tf.reshape(tf.cast(tf.range(6) * 40, tf.uint8), (6, 1, 1, 1)), (1, 4, 4, 3))
  pp = preprocess.make('resize|shuffle_frames', image_size=4, normalize='none', num_frames=6)
  orders = set()
  for s in range(8):
    clip = np.round(pp(video, tf.constant([s, 0], tf.int64)).numpy() * 255)
    # Every frame whole and uniform, each of the six exactly once.
    assert (clip == clip[:, :1, :1, :1]).all()
    assert sorted(clip[:, 0, 0, 0]) == list(range(0, 240, 40))
    orders.add(tuple(clip[:, 0, 0, 0]))
    again = np.round(pp(video, tf.constant([s, 0], tf.int64)).numpy() * 255)
    np.testing.assert_array_equal(again, clip)  # a function of the seed
  assert len(orders) > 4
  image = np.random.RandomState(0).rand(4, 4, 3).astype(np.float32)
  np.testing.assert_array_equal(
      preprocess.OPS['shuffle_frames'](tf.constant(image), tf.constant([1, 2], tf.int64), 4),
      image)
