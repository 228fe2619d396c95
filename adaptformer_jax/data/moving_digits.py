"""`moving_digits`: a tiny video-classification dataset that builds offline.

scikit-learn's handwritten digits (upscaled to 16 px) cross a 32 px canvas in 8
frames, 2 px a frame. Any single frame is ambiguous about the direction (a
digit on the left may be arriving or leaving), so the `direction` label needs
time, while the `digit` label needs one frame: pre-training on `digit` and
adapting to `direction` is the offline video transfer experiment
(configs/video_demo.py), through the same tfds video path as UCF101.
Clip `i` of a split is a pure function of (config, split, i).
"""
import numpy as np
import tensorflow_datasets as tfds

from adaptformer_jax.data import embedded

NAME = 'moving_digits'
FRAMES, SIZE, DIGIT, SPEED = 8, 32, 16, 2
# Where the digit goes, as a (row, column) step per frame.
DIRECTIONS = {'right': (0, 1), 'left': (0, -1), 'down': (1, 0), 'up': (-1, 0)}


class MovingDigitsConfig(tfds.core.BuilderConfig):
  """What the label is: the digit (`digit`) or the direction of motion (`direction`)."""

  def __init__(self, *, label, **kwargs):
    super().__init__(**kwargs)
    self.label = label


class MovingDigits(tfds.core.GeneratorBasedBuilder):
  """(8, 32, 32, 1) uint8 clips of one moving digit; train digits never appear in test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  NUM_EXAMPLES = {'train': 2048, 'test': 512}
  BUILDER_CONFIGS = [
      MovingDigitsConfig(name='digit', label='digit',
                         description='Label: which digit moves (10 classes).'),
      MovingDigitsConfig(name='direction', label='direction',
                         description='Label: where it moves (right, left, down, up).'),
  ]

  def _info(self):
    names = ([str(d) for d in range(10)] if self.builder_config.label == 'digit'
             else list(DIRECTIONS))
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'video': tfds.features.Video(shape=(FRAMES, SIZE, SIZE, 1)),
            'label': tfds.features.ClassLabel(names=names),
        }),
        supervised_keys=('video', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships with scikit-learn
    return {split: self._generate_examples(split) for split in self.NUM_EXAMPLES}

  def _generate_examples(self, split):
    images, targets, index = embedded.digits_split(split)
    config = [c.name for c in self.BUILDER_CONFIGS].index(self.builder_config.name)
    for i in range(self.NUM_EXAMPLES[split]):
      rng = np.random.default_rng([config, list(self.NUM_EXAMPLES).index(split), i])
      source = index[rng.integers(len(index))]
      direction = int(rng.integers(len(DIRECTIONS)))
      video = clip(images[source], list(DIRECTIONS.values())[direction], rng)
      label = targets[source] if self.builder_config.label == 'digit' else direction
      yield i, {'video': video, 'label': int(label)}


def clip(image: np.ndarray, step: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
  """(FRAMES, SIZE, SIZE, 1) uint8: the (8, 8, 1) `image` moving `step` * SPEED px a
  frame, from a random start that keeps it on the canvas."""
  digit = np.kron(image[..., 0], np.ones((DIGIT // 8, DIGIT // 8), np.uint8))
  travel, free = SPEED * (FRAMES - 1), SIZE - DIGIT
  start = [rng.integers(0, free - travel + 1) + (travel if s < 0 else 0) if s
           else rng.integers(0, free + 1) for s in step]
  out = np.zeros((FRAMES, SIZE, SIZE, 1), np.uint8)
  for t in range(FRAMES):
    r, c = (p + s * SPEED * t for p, s in zip(start, step))
    out[t, r:r + DIGIT, c:c + DIGIT, 0] = digit
  return out
