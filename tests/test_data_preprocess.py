"""Preprocessing ops: sizes, geometry, stateless randomness, normalisation, errors."""
import numpy as np
import pytest
import tensorflow as tf

from adaptformer_jax.data import preprocess
from adaptformer_jax.errors import ConfigError


def _seed(i):
  return tf.constant([7, i], tf.int64)


def _ramp(height, width, channels=3):
  """uint8 image whose pixels encode their position (unique per pixel, mod 256)."""
  values = np.arange(height * width * channels).reshape(height, width, channels)
  return tf.constant((values % 251).astype(np.uint8))


def _unit(image):
  """uint8 -> float32 [0, 1] exactly as the pipeline converts."""
  return tf.image.convert_image_dtype(image, tf.float32).numpy()


def _run(pp, image, seed=0, size=16, normalize='none'):
  return preprocess.make(pp, image_size=size, normalize=normalize)(image, _seed(seed)).numpy()


@pytest.mark.parametrize('op', sorted(preprocess.SIZING_OPS))
@pytest.mark.parametrize('shape', [(20, 30, 3), (30, 12, 1), (8, 8, 4)])
def test_every_sizing_op_outputs_image_size_rgb_in_unit_range(op, shape):
  out = _run(f'{op}|flip', _ramp(*shape))
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  assert 0.0 <= out.min() and out.max() <= 1.0


def test_grayscale_is_tiled_to_rgb():
  out = _run('resize', _ramp(16, 16, 1))
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_resize_at_target_size_is_exact():
  image = _ramp(16, 16)
  np.testing.assert_array_equal(_run('resize', image), _unit(image))


def test_resize_center_crop_geometry():
  # For 32 px the shorter side goes to int(32 * 256 / 224) = 36: a 36x48 image
  # is already that size, so the result is exactly its central 32x32 window.
  image = _ramp(36, 48)
  np.testing.assert_array_equal(_run('resize_center_crop', image, size=32),
                                _unit(image)[2:34, 8:40])


def test_center_crop_pads_small_images_with_zeros():
  out = _run('center_crop', tf.fill((8, 8, 3), tf.constant(255, tf.uint8)))
  assert out[4:12, 4:12].min() == 1.0 and out[:4].max() == 0.0


def test_pad_crop_is_a_window_of_the_zero_padded_image():
  image = _ramp(16, 16)
  padded = np.pad(_unit(image), [(4, 4), (4, 4), (0, 0)])
  offsets = set()
  for seed in range(20):
    out = _run('pad_crop', image, seed)
    matches = [(dy, dx) for dy in range(9) for dx in range(9)
               if np.array_equal(out, padded[dy:dy + 16, dx:dx + 16])]
    assert matches
    offsets.add(matches[0])
  assert len(offsets) > 5  # the window really moves


def test_flip_is_random_and_horizontal():
  image = _ramp(16, 16)
  outs = [_run('resize|flip', image, seed) for seed in range(16)]
  plain = _unit(image)
  mirrored = plain[:, ::-1]
  assert all(np.array_equal(o, plain) or np.array_equal(o, mirrored) for o in outs)
  assert any(np.array_equal(o, plain) for o in outs)
  assert any(np.array_equal(o, mirrored) for o in outs)


def test_random_ops_are_pure_functions_of_the_seed():
  image = _ramp(40, 30)
  pp = 'random_resized_crop|flip'
  np.testing.assert_array_equal(_run(pp, image, 3), _run(pp, image, 3))
  assert not np.array_equal(_run(pp, image, 3), _run(pp, image, 4))


def test_random_resized_crop_box_matches_torchvision_ranges():
  boxes = np.array([[int(v) for v in preprocess.random_resized_crop_box(60, 80, _seed(s))]
                    for s in range(300)])
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 60).all() and (left + w <= 80).all()
  area = h * w / (60 * 80)
  ratio = w / h
  assert area.min() > 0.06 and area.max() <= 1.0 and area.mean() < 0.7
  assert ratio.min() > 0.7 and ratio.max() < 1.4
  assert len(set(map(tuple, boxes))) > 250


def test_random_resized_crop_falls_back_to_a_ratio_clamped_center_crop():
  # A 4x200 strip admits no crop with ratio <= 4/3 covering >= 8% of its area,
  # so torchvision takes the full height and a 4/3-ratio center crop.
  box = [int(v) for v in preprocess.random_resized_crop_box(4, 200, _seed(0))]
  assert box == [0, (200 - 5) // 2, 4, 5]


@pytest.mark.parametrize('normalize', sorted(preprocess.NORMALIZE))
def test_normalize_maps_the_mean_colour_to_zero(normalize):
  mean, std = preprocess.NORMALIZE[normalize]
  image = tf.constant(np.full((16, 16, 3), np.round(np.array(mean) * 255), np.uint8))
  out = _run('resize', image, normalize=normalize)
  expected = (np.round(np.array(mean) * 255) / 255 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(out[0, 0], expected, atol=1e-5)
  assert abs(out).max() < 0.02 or normalize == 'none'


def test_unknown_op_names_the_allowed_ops():
  with pytest.raises(ConfigError, match="unknown preprocessing op 'random_crop'.*allowed ops: "
                     'random_resized_crop, flip'):
    preprocess.make('random_crop|flip', image_size=16, normalize='none')


def test_pp_without_a_sizing_op_is_rejected():
  with pytest.raises(ConfigError, match='data.eval_pp.*never sizes images'):
    preprocess.make('flip', image_size=16, normalize='none', field='data.eval_pp')


def test_unknown_normalize_is_rejected():
  with pytest.raises(ConfigError, match="data.normalize: 'imagnet' is not one of"):
    preprocess.make('resize', image_size=16, normalize='imagnet')
