"""`glyphs`: an offline pre-training corpus of rendered characters, at any size.

No image corpus can be downloaded everywhere, but every machine that installs
matplotlib has its TrueType fonts (DejaVu Sans/Serif/Mono and STIX, each with
bold and italic faces). This builder renders 107 characters -- Latin, Greek,
Cyrillic and symbols, with no digits and no digit look-alikes (O, o, I, l, З, б),
and no two classes that are the same shape (Latin/Greek/Cyrillic twins and
lower-case letters that are small capitals) -- under random font, stroke,
rotation, shear, scale, position, resolution, blur, contrast and noise.

Example `i` of a split is a pure function of (split, i): the corpus is
deterministic, needs no storage to define, and its size is a config field.
Images are bright strokes on a dark ground, like scikit-learn's digits, which
the demo adapts to.
"""
import functools
import io
import os

import numpy as np
import tensorflow_datasets as tfds

NAME = 'glyphs'
IMAGE_SIZE = 32
CLASSES = (
    'ABCDEFGHJKLMNPQRSTUVWXYZ'            # Latin capitals without I, O
    'abdefghijkmnpqrtuy'                  # Latin small letters that are not small capitals
    'ΓΔΘΛΞΠΣΦΨΩ'                          # Greek capitals unlike Latin ones
    'αβγδεζηθικλμξπρσςτυφχψω'             # Greek small letters (no omicron, nu)
    'БДЖИЙЛЦЧШЩЪЫЬЭЮЯ'                    # Cyrillic capitals unlike Latin/Greek ones, no З
    '&@#$%?!+=<>*§¶©®')                   # symbols
FONTS = tuple(f'{family}{face}.ttf' for family, faces in (
    ('DejaVuSans', ('', '-Bold', '-Oblique', '-BoldOblique')),
    ('DejaVuSansMono', ('', '-Bold', '-Oblique', '-BoldOblique')),
    ('DejaVuSerif', ('', '-Bold', '-Italic', '-BoldItalic')),
    ('STIXGeneral', ('', 'Bol', 'Italic', 'BolIta'))) for face in faces)
_SPLIT_SEEDS = {'train': 0, 'test': 1}
_RENDER_SIZE = 48  # font size of the cached glyph bitmaps, before the affine warp


class GlyphsConfig(tfds.core.BuilderConfig):
  """How many examples each split renders."""

  def __init__(self, *, num_train, num_test, **kwargs):
    super().__init__(**kwargs)
    self.num_train, self.num_test = num_train, num_test


class Glyphs(tfds.core.GeneratorBasedBuilder):
  """Rendered characters as (32, 32, 1) uint8 images; 107 classes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      GlyphsConfig(name='default', num_train=300_000, num_test=10_000,
                   description='The demo backbone corpus.'),
      GlyphsConfig(name='small', num_train=1_000, num_test=200,
                   description='For tests and quick checks.'),
  ]

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
            'label': tfds.features.ClassLabel(names=list(CLASSES)),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://matplotlib.org/stable/users/explain/text/fonts.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the fonts ship with matplotlib
    config = self.builder_config
    return {'train': self._generate_examples('train', config.num_train),
            'test': self._generate_examples('test', config.num_test)}

  def _generate_examples(self, split, num):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    for i in range(num):
      image, label = render(split, i)
      png = io.BytesIO()  # PIL's encoder is many times faster than tfds' per-example TF op
      Image.fromarray(image).save(png, format='PNG')
      png.seek(0)
      yield i, {'image': png, 'label': label}


def render(split: str, index: int) -> tuple[np.ndarray, int]:
  """Example `index` of `split`: a (32, 32) uint8 image and its class index."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng([_SPLIT_SEEDS[split], index])
  label = int(rng.integers(len(CLASSES)))
  glyph = _glyph(CLASSES[label], FONTS[rng.integers(len(FONTS))], int(rng.integers(3)))
  # Output pixel -> glyph pixel: undo translation, scale/aspect, shear and rotation.
  w, h = glyph.size
  extent = rng.uniform(0.55, 0.95) * IMAGE_SIZE / max(w, h)
  aspect = np.exp(rng.uniform(-0.25, 0.25))
  angle = np.deg2rad(rng.uniform(-20, 20))
  shear = rng.uniform(-0.3, 0.3)
  rotate = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  forward = rotate @ np.array([[1, shear], [0, 1]]) @ np.diag([extent * aspect, extent / aspect])
  inverse = np.linalg.inv(forward)
  centre = IMAGE_SIZE / 2 + rng.uniform(-0.1, 0.1, 2) * IMAGE_SIZE
  offset = np.array([w / 2, h / 2]) - inverse @ centre
  coeffs = (*inverse[0], offset[0], *inverse[1], offset[1])
  image = glyph.transform((IMAGE_SIZE, IMAGE_SIZE), Image.Transform.AFFINE, coeffs,
                          resample=Image.Resampling.BILINEAR)
  if rng.random() < 0.5:  # coarse, like the 8x8 scans the demo adapts to
    low = int(rng.integers(8, 17))
    image = image.resize((low, low), Image.Resampling.BOX).resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
  x = np.asarray(image, np.float32) / 255
  sigma = rng.uniform(0, 0.8)
  if sigma > 0.3:
    x = _blur(x, sigma)
  ink, ground = rng.uniform(0.6, 1.0), rng.uniform(0.0, 0.2)
  x = ground + (ink - ground) * x + rng.normal(0, rng.uniform(0, 0.08), x.shape)
  return np.clip(np.round(x * 255), 0, 255).astype(np.uint8), label


@functools.lru_cache(maxsize=None)
def _glyph(char, font_file, stroke):
  """The character's bitmap (white on black), cropped to its ink."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  canvas = Image.new('L', (3 * _RENDER_SIZE, 3 * _RENDER_SIZE))
  ImageDraw.Draw(canvas).text(
      (1.5 * _RENDER_SIZE, 1.5 * _RENDER_SIZE), char, fill=255, anchor='mm',
      font=_font(font_file), stroke_width=stroke, stroke_fill=255)
  box = canvas.getbbox()
  if box is None:
    raise ValueError(f'font {font_file} draws nothing for {char!r}')
  return canvas.crop(box)


@functools.lru_cache(maxsize=None)
def _font(font_file):
  import matplotlib  # pylint: disable=g-import-not-at-top
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  path = os.path.join(matplotlib.get_data_path(), 'fonts', 'ttf', font_file)
  return ImageFont.truetype(path, _RENDER_SIZE)


def _blur(x, sigma):
  """Separable Gaussian blur (edge-padded)."""
  radius = int(np.ceil(2 * sigma))
  kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  kernel /= kernel.sum()
  for axis in (0, 1):
    padded = np.pad(x, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], 'edge')
    x = np.apply_along_axis(lambda v: np.convolve(v, kernel, 'valid'), axis, padded)
  return x
