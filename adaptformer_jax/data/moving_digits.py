"""`moving_digits`: a tiny video-classification dataset that builds offline.

scikit-learn's handwritten digits (upscaled to 16 px) cross a 32 px canvas in 8
frames, 2 px a frame. Any single frame is ambiguous about the direction (a
digit on the left may be arriving or leaving), so the `direction` label needs
time, while the `digit` label needs one frame: pre-training on `digit` and
adapting to `direction` is the offline video transfer experiment
(configs/video_demo.py), through the same tfds video path as UCF101.
Clip `i` of a split is a pure function of (config, split, i) (`examples`).
"""
from collections.abc import Iterator
import numpy as np
import tensorflow_datasets as tfds

from adaptformer_jax.data import embedded

NAME = 'moving_digits'
FRAMES, SIZE, DIGIT, SPEED = 8, 32, 16, 2
# Where the digit goes, as a (row, column) step per frame.
DIRECTIONS = {'right': (0, 1), 'left': (0, -1), 'down': (1, 0), 'up': (-1, 0)}
LABELS = ('digit', 'direction')  # the configs, in the order that seeds their clips
NUM_EXAMPLES = {'train': 2048, 'test': 2048}


class MovingDigitsConfig(tfds.core.BuilderConfig):
  """What the label is: the digit (`digit`) or the direction of motion (`direction`)."""

  def __init__(self, *, label, **kwargs):
    super().__init__(**kwargs)
    self.label = label


class MovingDigits(tfds.core.GeneratorBasedBuilder):
  """(8, 32, 32, 1) uint8 clips of one moving digit; train digits never appear in test."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': '2048 test clips (one clip = 0.05 point), the first 512 as before.'}
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
    return {split: self._generate_examples(split) for split in NUM_EXAMPLES}

  def _generate_examples(self, split):
    for i, (video, label) in enumerate(examples(self.builder_config.label, split)):
      yield i, {'video': video, 'label': label}


def examples(label: str, split: str, count: int | None = None
             ) -> Iterator[tuple[np.ndarray, int]]:
  """The first `count` (default: all) (clip, label) pairs of `split` for the `label`
  config ('digit' or 'direction'), as the builder writes them: the shipped video
  backbone's test reads them without building the dataset."""
  images, targets, index = embedded.digits_split(split)
  config = LABELS.index(label)
  for i in range(NUM_EXAMPLES[split] if count is None else count):
    rng = np.random.default_rng([config, list(NUM_EXAMPLES).index(split), i])
    source = index[rng.integers(len(index))]
    direction = int(rng.integers(len(DIRECTIONS)))
    video = clip(images[source], list(DIRECTIONS.values())[direction], rng)
    yield video, int(targets[source] if label == 'digit' else direction)


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
