"""Uploaded image bytes -> the model's input: checked decoding, then the eval preprocessing.

Pillow reads the header first, so an image over the pixel limit (a decompression
bomb: a few KB of PNG that inflates to gigabytes) is refused before its pixels are
decoded; empty, truncated or non-image files are refused with what is wrong. The
pixels then get exactly the preprocessing of `--mode predict` (`data.preprocess.make`
with the CONFIG's eval_pp and normalize, the same fixed seed), so a lossless image
gets the same model input here as there.
"""
import io
import warnings
from collections.abc import Callable

import ml_collections
import numpy as np
from PIL import Image

from adaptformer_jax.errors import UserError


class BadImage(UserError):
  """An upload that is not an image the server classifies; `status` is its HTTP status."""

  def __init__(self, message: str, status: int = 422):
    super().__init__(message)
    self.status = status


def decode(content: bytes, name: str, max_pixels: int) -> np.ndarray:
  """uint8 (H, W, 3) pixels of an uploaded file (first frame; gray and palette to RGB,
  alpha dropped, as tf.io.decode_image(channels=3) does for `--mode predict`)."""
  if not content:
    raise BadImage(f'image {name!r} is empty (0 bytes); upload an image file.')
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(content)) as image:
        width, height = image.size
        if width * height > max_pixels:
          raise BadImage(f'image {name!r} has {width}x{height} = {width * height:,} pixels, '
                         f'over the limit of {max_pixels:,}; send a smaller image.', 413)
        image.load()
        return np.asarray(image.convert('RGB'), np.uint8)
  except BadImage:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise BadImage(f'image {name!r} is too large to decode ({e}).', 413) from None
  except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's errors for bad files
    what = 'truncated or damaged' if 'truncated' in str(e) else 'not a decodable image'
    raise BadImage(f'image {name!r} is {what} ({e}); upload a JPEG, PNG, GIF, BMP or WebP '
                   'file.') from None


def preprocessor(data_cfg: ml_collections.ConfigDict,
                 image_size: int) -> Callable[[np.ndarray], np.ndarray]:
  """fn(uint8 (H, W, 3)) -> float32 (image_size, image_size, 3): the eval preprocessing of
  `data_cfg`, as `data.image_batches` applies it (one traced graph for every size)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # the server's only TF use
  from adaptformer_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  pp = preprocess.make(data_cfg.eval_pp, image_size=image_size, normalize=data_cfg.normalize,
                       field='data.eval_pp')
  key = tf.constant([0, 0], tf.int64)  # as image_batches: random ops stay fixed
  graph = tf.function(lambda image: pp(image, key),
                      input_signature=[tf.TensorSpec((None, None, 3), tf.uint8)])
  return lambda pixels: graph(pixels).numpy()
