"""Your own images end to end: train on a folder, class names everywhere, eval, export, predict."""
import csv
import json
import os
import shutil

from conftest import make_image_folder
from conftest import tiny_run_config
from conftest import write_image
import flax.traverse_util
import numpy as np
import pytest

from adaptformer_jax import class_names
from adaptformer_jax import jobs
from adaptformer_jax import runtime
from adaptformer_jax import train
from adaptformer_jax.errors import UserError
from adaptformer_jax.weights import checkpoints
from adaptformer_jax.weights import exports

NAMES = ['blue', 'green', 'red']


def folder_run_config(root, **overrides):
  """conftest's tiny run on `folder:root`; model.num_classes=0 takes it from the folder."""
  config = tiny_run_config(**overrides)
  config.model.num_classes = 0
  config.data.update(dict(name=f'folder:{root}', eval_split='val', train_pp='resize|flip',
                          val_fraction=0.25, max_unreadable_fraction=0.05))
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('photos'))
  make_image_folder(root, per_class=16, mixed=False)
  with open(os.path.join(root, 'red', 'broken.jpg'), 'wb') as f:
    f.write(b'\xff\xd8 not really a jpeg')  # skipped: 1 of 49 is under 5%
  workdir = str(tmp_path_factory.mktemp('run'))
  config = folder_run_config(root)
  result = train.train_and_evaluate(config, workdir)
  return root, config, workdir, result


def test_training_on_a_folder_beats_chance_and_records_the_classes(trained):
  _, config, workdir, result = trained
  assert result['count'] == 12  # 4 of each class's 16 held out
  assert result['top1'] >= 0.75  # chance is 1/3
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['num_classes'] == 3
  assert class_names.read_workdir(workdir) == NAMES
  with checkpoints.Checkpointer(workdir, read_only=True) as ckpt:
    for step in (20, 40):
      assert ckpt.metadata(step)['class_names'] == NAMES
  assert os.path.getsize(os.path.join(workdir, runtime.CONFUSION_FILE)) > 0
  assert config.model.num_classes == 0  # the caller's config is left as it was


def test_resume_on_a_folder_is_bit_exact(trained, tmp_path):
  _, config, workdir, _ = trained
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '40'))
  train.train_and_evaluate(config, resumed)
  a, b = (flax.traverse_util.flatten_dict(jobs.load_variables(config, w)[1]['params'])
          for w in (workdir, resumed))
  for k in a:
    assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), k


def test_eval_prints_per_class_accuracy_and_refuses_other_classes(trained, tmp_path, capsys):
  root, config, workdir, result = trained
  assert jobs.evaluate_workdir(config, workdir, per_class=True) == result
  header, *lines = capsys.readouterr().out.splitlines()
  assert header.split() == ['class', 'top-1', 'images']
  assert [line.split()[0] for line in lines] == NAMES and all(
      line.split()[2] == '4' for line in lines)
  other = tmp_path / 'other'
  for name in ('blue', 'green', 'purple'):
    write_image(str(other / name / '0.png'), (1, 2, 3))
    write_image(str(other / name / '1.png'), (1, 2, 3))
  with pytest.raises(UserError, match='trained on 3 classes, the data has 3: the data lacks '
                     'red; the data adds purple'):
    jobs.evaluate_workdir(folder_run_config(str(other)), workdir)


def test_predict_from_workdir_and_from_adapters_agree(trained, tmp_path, capsys):
  root, config, workdir, _ = trained
  adapters = str(tmp_path / 'adapters')
  jobs.export(config, workdir, adapters)
  assert exports.read_adapter_config(adapters)['class_names'] == NAMES
  out_a, out_b = str(tmp_path / 'a'), str(tmp_path / 'b')
  paths, from_workdir = jobs.predict_files(config, workdir, [root], out=out_a, top_k=2)
  _, from_adapters = jobs.predict_files(config, None, [root], out=out_b, top_k=2,
                                         adapters=adapters)
  np.testing.assert_array_equal(from_workdir, from_adapters)
  assert len(paths) == 49
  for out in (out_a, out_b):
    with open(os.path.join(out, jobs.PREDICTIONS_FILE)) as f:
      rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['path', 'label', 'prob', 'label_2', 'prob_2']
    assert [r['path'] for r in rows] == paths
  broken = [r for r in rows if r['path'].endswith('broken.jpg')]
  assert [r['label'] for r in broken] == ['<unreadable>']
  correct = [r['label'] == os.path.basename(os.path.dirname(r['path'])) for r in rows
             if r is not broken[0]]
  assert np.mean(correct) >= 0.75
  final = capsys.readouterr().out.strip().splitlines()[-1]
  assert final.startswith('Predicted 48 images (1 unreadable) in ') and 'images/s' in final


def test_predict_bad_input(trained, tmp_path):
  root, config, workdir, _ = trained
  with pytest.raises(UserError, match='--images .*/missing.jpg: no such file'):
    jobs.predict_files(config, workdir, [str(tmp_path / 'missing.jpg')])
  with pytest.raises(UserError, match='--top_k=0: must be at least 1'):
    jobs.predict_files(config, workdir, [root], top_k=0)
  assert not os.path.exists(os.path.join(workdir, jobs.PREDICTIONS_FILE))


def test_resuming_with_other_classes_is_refused(trained, tmp_path):
  _, _, workdir, _ = trained
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  with pytest.raises(UserError, match='holds a run of 3 classes, the data has 3: the same '
                     'classes in another order'):
    class_names.record(copy, ['red', 'green', 'blue'])
  fresh = str(tmp_path / 'fresh')  # no checkpoint yet: a restart may change the data
  os.makedirs(fresh)
  class_names.record(fresh, ['a', 'b'])
  class_names.record(fresh, ['a', 'b', 'c'])
  assert class_names.read_workdir(fresh) == ['a', 'b', 'c']
