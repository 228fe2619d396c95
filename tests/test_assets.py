"""The shipped demo backbone: its bytes match its card, and it still reads glyphs as documented."""
import hashlib
import os
import re

import numpy as np
import tensorflow as tf

from adaptformer_jax import assets
from adaptformer_jax import models
from adaptformer_jax import pretrained
from adaptformer_jax.data import glyphs
from adaptformer_jax.data import preprocess
from conftest import shipped_config

CARD = os.path.splitext(assets.DEMO_BACKBONE)[0] + '.md'


def _card(pattern):
  with open(CARD) as f:
    match = re.search(pattern, f.read())
  assert match, f'{CARD} has no line matching {pattern!r}'
  return match.group(1)


def test_weights_match_the_hash_on_the_card():
  with open(assets.DEMO_BACKBONE, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert digest == _card(r'SHA-256\W*`([0-9a-f]{64})`')
  assert os.path.getsize(assets.DEMO_BACKBONE) <= 10 * 2**20


def test_backbone_reads_the_first_test_glyphs_as_documented():
  cfg = shipped_config('backbone').model
  variables = pretrained.load(assets.DEMO_BACKBONE, cfg)  # strict: every leaf from the file
  count = int(_card(r'first (\d+) test glyphs'))
  documented = float(_card(r'first \d+ test glyphs[^:]*: top-1 ([0-9.]+)'))
  pp = preprocess.make('resize', image_size=cfg.image_size, normalize='none')
  seed = tf.zeros((2,), tf.int64)
  examples = [glyphs.render('test', i) for i in range(count)]
  images = np.stack([pp(tf.constant(image[..., None]), seed).numpy() for image, _ in examples])
  logits = models.build(cfg).apply(variables, images)
  top1 = np.mean(np.argmax(logits, -1) == np.array([label for _, label in examples]))
  # Another CPU's float kernels may flip an image or two, not more.
  assert abs(top1 - documented) <= 2 / count, (top1, documented)
