"""The shipped demo backbones: their bytes match their cards, and they still read glyphs
(image) and moving digits (video) as documented."""
import hashlib
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from adaptformer_jax import assets
from adaptformer_jax import models
from adaptformer_jax import pretrained
from adaptformer_jax.data import glyphs
from adaptformer_jax.data import moving_digits
from adaptformer_jax.data import preprocess
from conftest import shipped_config


def _card(pattern, weights=assets.DEMO_BACKBONE):
  card = os.path.splitext(weights)[0] + '.md'
  with open(card) as f:
    match = re.search(pattern, f.read())
  assert match, f'{card} has no line matching {pattern!r}'
  return match.group(1)


@pytest.mark.parametrize('weights', [assets.DEMO_BACKBONE, assets.VIDEO_BACKBONE])
def test_weights_match_the_hash_on_the_card(weights):
  with open(weights, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert digest == _card(r'SHA-256\W*`([0-9a-f]{64})`', weights)
  assert os.path.getsize(weights) <= 10 * 2**20


def _glyph_images(split, count, image_size):
  pp = preprocess.make('resize', image_size=image_size, normalize='none')
  seed = tf.zeros((2,), tf.int64)
  examples = [glyphs.render(split, i) for i in range(count)]
  images = np.stack([pp(tf.constant(image[..., None]), seed).numpy() for image, _ in examples])
  return images, np.array([label for _, label in examples])


def test_backbone_features_tell_glyphs_apart_as_documented():
  """The encoder's features, pooled as the demo pools them (mean of the patch tokens,
  fc_norm at its fresh identity), label each of the first test glyphs by its nearest
  training glyph (cosine): the card's number, on another CPU within an image or two."""
  cfg = shipped_config('demo').model
  variables = pretrained.load(assets.DEMO_BACKBONE, cfg)  # every backbone leaf from the file
  n_train = int(_card(r'first (\d+) training glyphs'))
  n_test = int(_card(r'first (\d+) test glyphs'))
  documented = float(_card(r'first \d+ test glyphs[^:]*: top-1 ([0-9.]+)'))
  model = models.build(cfg)

  def features(split, count):
    images, labels = _glyph_images(split, count, cfg.image_size)
    _, state = model.apply(variables, images, capture_intermediates=True,
                           mutable=['intermediates'])
    f = np.asarray(state['intermediates']['fc_norm']['__call__'][0], np.float64)
    return f / np.linalg.norm(f, axis=1, keepdims=True), labels

  train, train_labels = features('train', n_train)
  test, test_labels = features('test', n_test)
  nearest = np.argmax(test @ train.T, axis=1)
  top1 = np.mean(train_labels[nearest] == test_labels)
  assert abs(top1 - documented) <= 2 / n_test, (top1, documented)


def test_video_backbone_names_the_moving_digit_as_documented():
  """The shipped video backbone with its own 10-class digit head, on the first test clips
  of moving_digits/digit (drawn straight from the generator, the demo's eval frames):
  the card's top-1, on another CPU within a clip or two."""
  cfg = shipped_config('video_demo', 'backbone')
  variables = pretrained.load(assets.VIDEO_BACKBONE, cfg.model)  # every leaf, head included
  count = int(_card(r'first (\d+)\s+test\s+clips', assets.VIDEO_BACKBONE))
  documented = float(_card(r'first \d+\s+test\s+clips[^:]*: top-1 ([0-9.]+)',
                           assets.VIDEO_BACKBONE))
  pp = preprocess.make(cfg.data.eval_pp, image_size=cfg.model.image_size,
                       normalize=cfg.data.normalize, num_frames=cfg.model.num_frames,
                       frame_sampling=cfg.data.frame_sampling,
                       frame_stride=cfg.data.frame_stride, train=False)
  seed = tf.zeros((2,), tf.int64)
  clips, labels = zip(*moving_digits.examples('digit', 'test', count))
  videos = np.stack([pp(tf.constant(video), seed).numpy() for video in clips])
  logits = models.build(cfg.model).apply(variables, videos, train=False)
  top1 = np.mean(np.argmax(logits, -1) == np.array(labels))
  assert abs(top1 - documented) <= 2 / count, (top1, documented)
