"""`sklearn_digits`: a tiny image-classification dataset that builds offline.

It wraps scikit-learn's bundled handwritten digits (1797 8x8 images, no
download) as an ordinary tfds dataset, so demos, tests and the transfer recipe
(pre-train on digits 0-4, adapt on 5-9) run on machines without network access
through exactly the same tfds code path as CIFAR or ImageNet.
"""
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

NAME = 'sklearn_digits'


class SklearnDigitsConfig(tfds.core.BuilderConfig):
  """A subset of the digits (labels are the digits minus the first one) and the
  share of them held out as the test split."""

  def __init__(self, *, digits: Sequence[int], test_size: float = 0.2, **kwargs: Any):
    super().__init__(**kwargs)
    self.digits = tuple(digits)
    self.test_size = test_size


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits as (8, 8, 1) uint8 images in 0..255."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      SklearnDigitsConfig(name='all', digits=range(10),
                          description='All ten digits.'),
      SklearnDigitsConfig(name='classes_0to4', digits=range(5),
                          description='Digits 0-4, labels 0-4.'),
      SklearnDigitsConfig(name='classes_5to9', digits=range(5, 10),
                          description='Digits 5-9, labels 0-4.'),
      SklearnDigitsConfig(name='half', digits=range(10), test_size=0.5,
                          description='All ten digits, half of them held out '
                          '(899 test images: one image is 0.11 point).'),
  ]

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(
                names=[str(d) for d in self.builder_config.digits]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships with scikit-learn
    return {'train': self._generate_examples('train'),
            'test': self._generate_examples('test')}

  def _generate_examples(self, split):
    images, targets, index = digits_split(split, self.builder_config.test_size)
    first = self.builder_config.digits[0]
    for i in index:
      if targets[i] in self.builder_config.digits:
        yield int(i), {'image': images[i], 'label': int(targets[i]) - first}


def digits_split(split: str,
                 test_size: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(uint8 (1797, 8, 8, 1) images in 0..255, their digits, sorted indices of `split`).

  One stratified split of all digits, so that the 80/20 configs' train and test
  sets are subsets of the `all` config's, and `moving_digits` never moves a test
  digit in training.
  """
  # Imported here: scikit-learn is only needed while building.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  train, test = model_selection.train_test_split(
      np.arange(len(images)), test_size=test_size, stratify=digits.target, random_state=0)
  return images, digits.target, sorted(train if split == 'train' else test)
