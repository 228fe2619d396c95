"""The 19 VTAB-1k tasks exactly as the official code defines them, and their labels.

Every row follows google-research/task_adaptation at d7630d3 (2021-03-22),
`task_adaptation/data/<file>.py` (cited per task), with the task list and order of
`scripts/run_all_tasks.sh`: the tfds builder and version pin, the label feature and
its transformation, the class count, and the tfds split strings of VTAB-1k's four
splits. `train800`, `val200` and `train800val200` are carved out of the tfds splits
differently per task, several at an offset computed from the train split's size
(e.g. CIFAR's val200 is `train[45000:45200]`, 90% of 50,000); those sizes are
recorded in `assumes` and checked against the prepared dataset, so another version
with other sizes is refused instead of silently shifting the splits.

A task is used as `data.name='vtab:<task>'` with `data.train_split` / `eval_split`
one of SPLITS; data/sources.py turns it into (encoded image, label) records.
"""
import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from adaptformer_jax.errors import UserError

PREFIX = 'vtab:'
SPLITS = ('train800', 'val200', 'train800val200', 'test')
GROUPS = ('natural', 'specialized', 'structured')
SOURCE = 'https://github.com/google-research/task_adaptation/blob/d7630d3/task_adaptation/data/'


def _native(ex: dict) -> tf.Tensor:
  return ex['label']


def _feature(key: str) -> Callable[[dict], tf.Tensor]:
  return lambda ex: ex[key]


def bin_index(value: tf.Tensor, thresholds: tuple[float, ...]) -> tf.Tensor:
  """The official binning, `reduce_max(where(thresholds - value < 0))`: the index of
  the last threshold strictly below `value` (thresholds ascending). A value at a
  threshold belongs to the bin below it."""
  below = tf.cast(tf.constant(thresholds, tf.float32) < tf.cast(value, tf.float32), tf.int64)
  return tf.reduce_sum(below) - 1


CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_VEHICLE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)


def clevr_count(ex: dict) -> tf.Tensor:
  """clevr.py `_count_preprocess_fn`: objects in the scene minus 3 (3..10 -> 0..7)."""
  return tf.cast(tf.size(ex['objects']['size']), tf.int64) - 3


def clevr_distance(ex: dict) -> tf.Tensor:
  """clevr.py `_closest_object_preprocess_fn`: the closest object's depth
  (pixel_coords[:, 2]) in 6 bins with edges 8, 8.5, 9, 9.5, 10."""
  return bin_index(tf.reduce_min(ex['objects']['pixel_coords'][:, 2]),
                   CLEVR_DISTANCE_THRESHOLDS)


def kitti_closest_vehicle(ex: dict) -> tf.Tensor:
  """kitti.py `_closest_vehicle_distance_pp`: depth (location[:, 2]) of the closest
  Car/Van/Truck (type < 3): <= 8 m, <= 20 m, <= 999 m, or 3 = no vehicle."""
  objects = ex['objects']
  vehicle_z = tf.boolean_mask(tf.cast(objects['location'][:, 2], tf.float32),
                              objects['type'] < 3)
  return bin_index(tf.reduce_min(tf.concat([vehicle_z, [1000.0]], 0)),
                   KITTI_VEHICLE_THRESHOLDS)


def binned(key: str, num_original: int, num_classes: int) -> Callable[[dict], tf.Tensor]:
  """dsprites.py: nearby values grouped, floor(value / (num_original / num_classes))."""
  factor = float(num_original) / num_classes
  return lambda ex: tf.cast(tf.math.floordiv(tf.cast(ex[key], tf.float32), factor), tf.int64)


@dataclasses.dataclass(frozen=True)
class Task:
  """One VTAB-1k task: where its examples come from and what their label is."""
  name: str
  group: str
  tfds_name: str          # what this project loads (tfds.builder name and version)
  official: str           # the pin of the official code
  num_classes: int
  splits: dict            # SPLITS -> tfds split string
  source_file: str        # task_adaptation/data/<file>.py
  label: Callable[[dict], tf.Tensor] = _native
  label_doc: str = "the 'label' feature"
  binary_image: bool = False  # dsprites: 0/1 pixels, scaled to 0/255 as the official code
  assumes: tuple = ()     # ((tfds split, examples), ...) the split strings were computed from
  manual: str = ''        # what `tfds build` needs by hand, if anything
  note: str = ''

  @property
  def builder(self) -> str:
    """The tfds builder name without the version."""
    return self.tfds_name.partition(':')[0]


def _carved(train: str, count: int, percent: int) -> dict:
  """train800/val200 from a split that holds VTAB's train and val: val starts at
  `percent`% of `count` (cifar.py, caltech.py, svhn.py, oxford_iiit_pet.py, clevr.py)."""
  start = percent * count // 100
  val = f'{train}[{start}:{start + 200}]'
  return dict(train800=f'{train}[:800]', val200=val, train800val200=f'{train}[:800]+{val}')


def _validation(val: str = 'validation') -> dict:
  return dict(train800='train[:800]', val200=f'{val}[:200]',
              train800val200=f'train[:800]+{val}[:200]')


_DR_MANUAL = ('the Kaggle Diabetic Retinopathy Detection files, downloaded by hand into '
              'DATA_DIR/downloads/manual/ (tfds: MANUAL_DOWNLOAD_INSTRUCTIONS)')
_RESISC_MANUAL = ('NWPU-RESISC45.rar, downloaded by hand into DATA_DIR/downloads/manual/ '
                  '(tfds: MANUAL_DOWNLOAD_INSTRUCTIONS)')

TASKS = (
    Task('cifar', 'natural', 'cifar100:3.*.*', 'cifar100:3.*.*', 100,
         dict(_carved('train', 50_000, 90), test='test'), 'cifar.py',
         assumes=(('train', 50_000),)),
    Task('caltech101', 'natural', 'caltech101:3.*.*', 'caltech101:3.*.*', 102,
         dict(_carved('train', 3_060, 90), test='test'), 'caltech.py',
         label_doc="the 'label' feature: 101 categories and the background class "
                   "('background_google'), 102 classes",
         assumes=(('train', 3_060),)),
    Task('dtd', 'natural', 'dtd:3.*.*', 'dtd:3.*.*', 47,
         dict(_validation(), test='test'), 'dtd.py'),
    Task('oxford_flowers102', 'natural', 'oxford_flowers102:2.*.*',
         'oxford_flowers102:2.*.*', 102, dict(_validation(), test='test'),
         'oxford_flowers102.py'),
    Task('oxford_iiit_pet', 'natural', 'oxford_iiit_pet:4.*.*', 'oxford_iiit_pet:3.*.*', 37,
         dict(_carved('train', 3_680, 80), test='test'), 'oxford_iiit_pet.py',
         assumes=(('train', 3_680),),
         note='tfds 4.9.10 builds only 4.0.0 (the pin is 3.*.*); same images, labels '
              'and split sizes (3,680 / 3,669)'),
    Task('svhn', 'natural', 'svhn_cropped:3.*.*', 'svhn_cropped:3.*.*', 10,
         dict(_carved('train', 73_257, 90), test='test'), 'svhn.py',
         assumes=(('train', 73_257),)),
    Task('sun397', 'natural', 'sun397/tfds:4.*.*', 'sun397/tfds:4.*.*', 397,
         dict(_validation(), test='test'), 'sun397.py'),
    Task('patch_camelyon', 'specialized', 'patch_camelyon:2.*.*', 'patch_camelyon:2.*.*', 2,
         dict(_validation(), test='test'), 'patch_camelyon.py'),
    Task('eurosat', 'specialized', 'eurosat/rgb:2.*.*', 'eurosat/rgb:2.*.*', 10,
         dict(_carved('train', 27_000, 60), test='train[21600:]'), 'eurosat.py',
         assumes=(('train', 27_000),),
         note='train/val/test = 60/20/20% of the one tfds split'),
    Task('resisc45', 'specialized', 'resisc45:3.*.*', 'resisc45:3.*.*', 45,
         dict(_carved('train', 31_500, 60), test='train[25200:]'), 'resisc45.py',
         assumes=(('train', 31_500),), manual=_RESISC_MANUAL,
         note='train/val/test = 60/20/20% of the one tfds split'),
    Task('diabetic_retinopathy', 'specialized',
         'diabetic_retinopathy_detection/btgraham-300:3.*.*',
         'diabetic_retinopathy_detection/btgraham-300:3.*.*', 5,
         dict(_validation(), test='test'), 'diabetic_retinopathy.py', manual=_DR_MANUAL),
    Task('clevr_count', 'structured', 'clevr:3.*.*', 'clevr:3.*.*', 8,
         dict(_carved('train', 70_000, 90), test='validation'), 'clevr.py',
         label=clevr_count, label_doc='objects - 3 (task count_all)',
         assumes=(('train', 70_000),), note="test is tfds 'validation' (CLEVR's test has no labels)"),
    Task('clevr_dist', 'structured', 'clevr:3.*.*', 'clevr:3.*.*', 6,
         dict(_carved('train', 70_000, 90), test='validation'), 'clevr.py',
         label=clevr_distance,
         label_doc='closest object depth (pixel_coords z) binned at 8, 8.5, 9, 9.5, 10 '
                   '(task closest_object_distance)',
         assumes=(('train', 70_000),), note="test is tfds 'validation'"),
    Task('dmlab', 'structured', 'dmlab:2.0.1', 'dmlab:2.0.1', 6,
         dict(_validation(), test='test'), 'dmlab.py'),
    Task('kitti', 'structured', 'kitti:3.1.0', 'kitti:3.1.0', 4,
         dict(_validation(), test='test'), 'kitti.py', label=kitti_closest_vehicle,
         label_doc='closest Car/Van/Truck depth (location z) <= 8, <= 20, <= 999 m, '
                   'or no vehicle (task closest_vehicle_distance)',
         note='3.1.0 is a supported older version in tfds 4.9.10 (default 3.3.0)'),
    Task('dsprites_loc', 'structured', 'dsprites:2.*.*', 'dsprites:2.*.*', 16,
         dict(_carved('train', 737_280, 80), test='train[663552:]'), 'dsprites.py',
         label=binned('label_x_position', 32, 16), label_doc='label_x_position // 2 (32 -> 16)',
         binary_image=True, assumes=(('train', 737_280),),
         note='train/val/test = 80/10/10% of the one tfds split'),
    Task('dsprites_ori', 'structured', 'dsprites:2.*.*', 'dsprites:2.*.*', 16,
         dict(_carved('train', 737_280, 80), test='train[663552:]'), 'dsprites.py',
         label=binned('label_orientation', 40, 16),
         label_doc='floor(label_orientation / 2.5) (40 -> 16)',
         binary_image=True, assumes=(('train', 737_280),),
         note='train/val/test = 80/10/10% of the one tfds split'),
    Task('smallnorb_azi', 'structured', 'smallnorb:2.*.*', 'smallnorb:2.*.*', 18,
         dict(_validation('test'), test='test[50%:]'), 'smallnorb.py',
         label=_feature('label_azimuth'), label_doc='label_azimuth (18 classes)',
         note='val200 is test[:200]; test is the second half of tfds test'),
    Task('smallnorb_ele', 'structured', 'smallnorb:2.*.*', 'smallnorb:2.*.*', 9,
         dict(_validation('test'), test='test[50%:]'), 'smallnorb.py',
         label=_feature('label_elevation'), label_doc='label_elevation (9 classes)',
         note='val200 is test[:200]; test is the second half of tfds test'),
)

BY_NAME = {t.name: t for t in TASKS}


def is_vtab(name: str) -> bool:
  """Whether data.name names a VTAB task ('vtab:<task>')."""
  return str(name).startswith(PREFIX)


def task(name: str) -> Task:
  """The task of 'vtab:<task>' or '<task>', or a UserError listing the tasks."""
  key = str(name).removeprefix(PREFIX)
  if key not in BY_NAME:
    raise UserError(f"unknown VTAB task {key!r}; the tasks: {', '.join(BY_NAME)}.")
  return BY_NAME[key]


def tfds_split(t: Task, split: str, field: str) -> str:
  """The tfds split string of VTAB split `split`, or a UserError naming `field`."""
  if split not in t.splits:
    raise UserError(f"{field}: {split!r} is not a VTAB-1k split of vtab:{t.name}; use one "
                    f"of {', '.join(SPLITS)}.")
  return t.splits[split]


def check_sizes(t: Task, sizes: dict) -> None:
  """Refuses a prepared dataset whose split sizes differ from those the official split
  strings were computed from (`sizes`: tfds split -> examples)."""
  for split, expected in t.assumes:
    if split in sizes and sizes[split] != expected:
      raise UserError(
          f'vtab:{t.name}: {t.tfds_name} has {sizes[split]} examples in {split!r}, but '
          f'the official VTAB splits ({t.source_file}) were computed from {expected}; '
          f'prepare the version the table names ({t.official}).')


def class_names(t: Task, native: list[str] | None) -> list[str]:
  """The tfds class names for native labels, else the bins' own names."""
  if t.label is _native and native:
    return list(native)
  return [str(i) for i in range(t.num_classes)]


def scaled_image(image: tf.Tensor, t: Task) -> tf.Tensor:
  """dsprites.py: `tile(image, [1, 1, 3]) * 255` (its pixels are 0/1); tiling to RGB is
  the preprocessing's (1 channel -> 3), as for smallnorb's grey images."""
  return image * np.uint8(255) if t.binary_image else image
