"""The 19 VTAB-1k tasks: the table, each label transformation at every bin edge, and every
builder read through the project's data sources (tfds mock data, hand-made examples)."""
import json

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from adaptformer_jax import data
from adaptformer_jax.data import sources
from adaptformer_jax.data import vtab
from adaptformer_jax.errors import UserError
from adaptformer_jax.vtab import datasets
import vtab_mock

NAMES = ('cifar caltech101 dtd oxford_flowers102 oxford_iiit_pet svhn sun397 patch_camelyon '
         'eurosat resisc45 diabetic_retinopathy clevr_count clevr_dist dmlab kitti '
         'dsprites_loc dsprites_ori smallnorb_azi smallnorb_ele').split()


def test_the_table_holds_the_19_tasks_in_the_standard_order():
  assert [t.name for t in vtab.TASKS] == NAMES
  assert [sum(t.group == g for t in vtab.TASKS) for g in vtab.GROUPS] == [7, 4, 8]
  for t in vtab.TASKS:
    assert set(t.splits) == set(vtab.SPLITS)
    train800, val200 = t.splits['train800'], t.splits['val200']
    assert t.splits['train800val200'] == f'{train800}+{val200}'
    assert t.splits['test'] not in (train800, val200)


def test_list_matches_the_table(tmp_path):
  """`--list --format=json`: one object per task, standard order; the table says which
  tasks are prepared."""
  rows = json.loads(datasets.listing('json', None))
  assert [r['name'] for r in rows] == NAMES
  for row, t in zip(rows, vtab.TASKS):
    assert set(row) == {'name', 'group', 'tfds_name', 'num_classes', 'splits'}
    assert (row['group'], row['tfds_name'], row['num_classes'], row['splits']) == (
        t.group, t.tfds_name, t.num_classes, t.splits)
    assert list(row['splits']) == list(vtab.SPLITS)
  vtab_mock.prepare(str(tmp_path), [vtab.task('clevr_count')])
  lines = {line.split()[0]: line.split() for line in
           datasets.listing('table', str(tmp_path)).splitlines()}
  assert [lines[n][4] for n in ('clevr_count', 'clevr_dist', 'cifar')] == ['yes', 'yes', 'no']
  assert lines['2'][:4] == ['2', 'of', '19', 'prepared']


def _objects(**rows):
  return {k: tf.constant(v) for k, v in rows.items()}


@pytest.mark.parametrize('count', range(3, 11))
def test_clevr_count_is_objects_minus_3(count):
  ex = {'objects': _objects(size=np.zeros(count, np.int64))}
  assert int(vtab.clevr_count(ex)) == count - 3


# The closest object's depth: a value at a threshold belongs to the bin below it.
CLEVR_DEPTHS = [(0.01, 0), (8.0, 0), (8.001, 1), (8.5, 1), (8.501, 2), (9.0, 2), (9.001, 3),
                (9.5, 3), (9.501, 4), (10.0, 4), (10.001, 5), (99.0, 5)]


@pytest.mark.parametrize('depth, label', CLEVR_DEPTHS)
def test_clevr_distance_bins(depth, label):
  coords = np.array([[1.0, 2.0, depth + 3.0], [5.0, 6.0, depth], [0.0, 0.0, 50.0]], np.float32)
  assert int(vtab.clevr_distance({'objects': _objects(pixel_coords=coords)})) == label


# (types, depths, label): type 0-2 Car/Van/Truck count, 3+ (Pedestrian, ...) never do.
KITTI = [([0], [8.0], 0), ([1], [8.001], 1), ([2], [20.0], 1), ([0], [20.001], 2),
         ([0], [999.0], 2), ([3, 0], [2.0, 15.0], 1), ([3, 7], [2.0, 3.0], 3), ([], [], 3),
         ([0, 2, 1], [30.0, 5.0, 12.0], 0)]


@pytest.mark.parametrize('types, depths, label', KITTI)
def test_kitti_closest_vehicle_distance_bins(types, depths, label):
  location = np.array([[0.0, 0.0, z] for z in depths], np.float32).reshape(-1, 3)
  ex = {'objects': _objects(type=np.array(types, np.int64), location=location)}
  assert int(vtab.kitti_closest_vehicle(ex)) == label


@pytest.mark.parametrize('task, key, pairs', [
    ('dsprites_loc', 'label_x_position', [(0, 0), (1, 0), (2, 1), (3, 1), (30, 15), (31, 15)]),
    ('dsprites_ori', 'label_orientation',
     [(0, 0), (2, 0), (3, 1), (4, 1), (5, 2), (37, 14), (38, 15), (39, 15)]),
    ('smallnorb_azi', 'label_azimuth', [(0, 0), (17, 17)]),
    ('smallnorb_ele', 'label_elevation', [(0, 0), (8, 8)])])
def test_attribute_labels(task, key, pairs):
  t = vtab.task(task)
  for value, label in pairs:
    assert int(t.label({key: tf.constant(value, tf.int64)})) == label
  assert max(label for _, label in pairs) == t.num_classes - 1


def _examples(builder, split):
  """Hand-made examples of each builder, with the labels each task must produce."""
  del split
  image = lambda value=128: vtab_mock.image(builder, value)
  name = builder.name
  if name == 'clevr':
    return [{'image': image(), 'objects': {
        'size': np.zeros(n, np.int64),
        'pixel_coords': np.array([[0, 0, z]] * n, np.float32)}} for n, z in ((3, 8.0), (10, 9.2))]
  if name == 'kitti':
    return [{'image': image(), 'objects': {
        'type': np.array(t, np.int64), 'location': np.array([[0, 0, z]], np.float32)}}
            for t, z in (([0], 5.0), ([3], 5.0))]
  if name == 'dsprites':
    return [{'image': image(v), 'label_x_position': np.int64(x),
             'label_orientation': np.int64(o)} for v, x, o in ((1, 31, 39), (0, 2, 3))]
  if name == 'smallnorb':
    return [{'image': image(200), 'label_azimuth': np.int64(a),
             'label_elevation': np.int64(e)} for a, e in ((17, 8), (3, 0))]
  return [{'image': image(), 'label': np.int64(k)} for k in (0, 1)]


EXPECTED = {'clevr_count': [0, 7], 'clevr_dist': [0, 3], 'kitti': [0, 3],
            'dsprites_loc': [15, 1], 'dsprites_ori': [15, 1], 'smallnorb_azi': [17, 3],
            'smallnorb_ele': [8, 0]}


def test_every_builder_through_the_data_sources(tmp_path):
  """Each task's builder, split strings, labels and pixels, as the data sources read them."""
  vtab_mock.prepare(str(tmp_path))
  reads = []
  with vtab_mock.serving(_examples, reads, str(tmp_path)):
    for t in vtab.TASKS:
      cfg = ml_collections.ConfigDict(dict(
          name=f'vtab:{t.name}', data_dir=str(tmp_path), train_split='train800val200',
          eval_split='test'))
      found = sources.source(cfg)
      assert (len(found.class_names), found.count('train800val200', 'f')) == (
          t.num_classes, 1000), t.name
      records = list(found.records('test'))
      assert reads[-1] == (t.builder.split('/')[0], t.splits['test']), t.name
      assert [int(label) for _, label in records] == EXPECTED.get(t.name, [0, 1]), t.name
      pixels = found.decode(records[0][0]).numpy()
      assert pixels.dtype == np.uint8 and pixels.shape[-1] in (1, 3), t.name
      if t.binary_image:  # 0/1 pixels scaled to 0/255, as dsprites.py does
        assert (pixels.max(), found.decode(records[1][0]).numpy().max()) == (255, 0)


def test_other_split_sizes_are_refused(tmp_path):
  """A prepared CIFAR with another train size would shift val200: refused, naming why."""
  vtab_mock.SIZES['cifar100']['train'] = 49_000
  try:
    vtab_mock.prepare(str(tmp_path), [vtab.task('cifar')])
  finally:
    vtab_mock.SIZES['cifar100']['train'] = 50_000
  cfg = ml_collections.ConfigDict(dict(name='vtab:cifar', data_dir=str(tmp_path),
                                       train_split='train800', eval_split='val200'))
  with vtab_mock.serving(_examples, [], str(tmp_path)):
    with pytest.raises(UserError, match=r"49000 examples in 'train'.*computed from 50000"):
      data.info(cfg)
    cfg.update(dict(eval_split='validation'))
    vtab_mock.prepare(str(tmp_path), [vtab.task('cifar')])
    with pytest.raises(UserError, match=r"data.eval_split: 'validation' is not a VTAB-1k split"):
      data.info(cfg)
