"""The VTAB-1k runner end to end on tfds mock data with a tiny ViT: select on val200, fit
on train800val200, test once per seed after selection, report; killed mid-run, resumed;
missing datasets named before any training; the aggregator against V-PETL Bench."""
import json
import logging
import os

import numpy as np
import pytest

from adaptformer_jax import models
from adaptformer_jax.data import vtab as tasks
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.errors import UserError
from adaptformer_jax.vtab import protocol
from adaptformer_jax.vtab import references
from adaptformer_jax.vtab import report
from adaptformer_jax.vtab import runner
from adaptformer_jax.weights import checkpoints
from conftest import shipped_config
import vtab_mock

TASKS = ('dtd', 'clevr_count')


def _examples(builder, split):
  """8 examples whose class is their brightness, so a tiny ViT can learn something."""
  del split
  rng = np.random.RandomState(0)
  shape = tuple(8 if d is None else d for d in builder.info.features['image'].shape)
  rows = []
  for i in range(8):
    k = i % 2
    pixels = np.clip(60 + 120 * k + rng.normal(0, 10, shape), 0, 255)
    row = {'image': vtab_mock.png(pixels)}
    if builder.name == 'clevr':
      row['objects'] = {'size': np.zeros(3 + k, np.int64),
                        'pixel_coords': np.zeros((3 + k, 3), np.float32)}
    else:
      row['label'] = np.int64(k)
    rows.append(row)
  return rows


def tiny_vtab_config(data_dir, hparams_file=''):
  config = shipped_config('vtab', 'adaptformer,vit_ti16')
  config.model = models.preset('vit_ti16', width=16, depth=1, num_heads=2, mlp_dim=32,
                               patch_size=4, image_size=8, num_classes=0,
                               tuning='adaptformer', head='linear', adapter=dict(bottleneck=4))
  config.data.data_dir = data_dir
  config.batch_size = 8
  config.eval_batch_size = 200
  config.num_train_steps = 3
  config.warmup_steps = 1
  config.checkpoint_every_steps = 2
  config.progress = False
  config.vtab.learning_rates = (1e-3, 3e-2)
  config.vtab.seeds = (0,)
  config.vtab.hparams_file = hparams_file
  return config


class Killed(Exception):
  """Stands in for a kill: raised right after a checkpoint is written."""


@pytest.mark.slow
def test_select_fit_test_report_killed_and_resumed(tmp_path, monkeypatch, caplog):
  data_dir, root = str(tmp_path / 'tfds'), str(tmp_path / 'vtab')
  vtab_mock.prepare(data_dir, [tasks.task(n) for n in TASKS])
  hparams = tmp_path / 'hparams.json'  # clevr_count's point is fixed: no selection runs
  hparams.write_text(json.dumps({'clevr_count': {'learning_rate': 0.01, 'weight_decay': 0}}))
  config = tiny_vtab_config(data_dir, str(hparams))
  # All but clevr_dist asked (its builder is clevr_count's), 2 prepared: --skip_missing.
  names = [t.name for t in tasks.TASKS if t.name != 'clevr_dist']
  reads, calls, lines = [], [], []
  train_and_evaluate = runner.train.train_and_evaluate
  monkeypatch.setattr(runner.train, 'train_and_evaluate',
                      lambda cfg, workdir: calls.append(workdir) or train_and_evaluate(cfg, workdir))
  save = checkpoints.Checkpointer.save
  victim = os.path.join(root, 'dtd', 'seed0')  # the first final run: killed after step 2

  def save_then_die(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if self.directory == os.path.join(victim, 'checkpoints') and step == 2 and len(calls) == 3:
      raise Killed()  # the loop's `finally` completes the save, as a kill after it would

  monkeypatch.setattr(checkpoints.Checkpointer, 'save', save_then_die)
  with vtab_mock.serving(_examples, reads, data_dir):
    with pytest.raises(UserError, match=r'16 VTAB dataset\(s\) not prepared.*cifar .*'
                       r"resisc45 needs NWPU-RESISC45.rar.*--skip_missing"):
      runner.run_all(config, root, names)
    assert not calls and not reads  # refused before any training or read
    with pytest.raises(Killed):
      runner.run_all(config, root, names, skip_missing=True, log=lines.append)
    first = list(calls)
    with caplog.at_level(logging.INFO):
      results = runner.run_all(config, root, names, skip_missing=True, log=lines.append)

  # Nothing finished was redone; the killed run resumed from its step-2 checkpoint.
  assert first == [os.path.join(root, 'dtd', r) for r in ('select_l0.001_w0.0001',
                                                         'select_l0.03_w0.0001', 'seed0')]
  assert calls[3:] == [victim, os.path.join(root, 'clevr_count', 'seed0')]
  assert f'Resumed from step 2 in {victim}' in caplog.text
  assert any('task 2/2 clevr_count: run 1/1 seed0 (final)' in line and 'ETA' in line
             for line in lines)

  # test is read once per seed, only after every selection read, never by selection.
  for t in map(tasks.task, TASKS):
    mine = [split for builder, split in reads if builder == t.builder.split('/')[0]
            and split in t.splits.values()]
    tests = [i for i, s in enumerate(mine) if s == t.splits['test']]
    selection = [i for i, s in enumerate(mine) if s in (t.splits['train800'], t.splits['val200'])]
    assert len(tests) == 1, (t.name, mine)
    assert len(selection) == (4 if t.name == 'dtd' else 0), (t.name, mine)
    assert min(tests) > max(selection, default=-1), (t.name, mine)

  # The report: the chosen point is the best val200 score; both averages labelled.
  saved = json.load(open(os.path.join(root, 'results.json')))
  assert saved == json.loads(json.dumps(results))
  assert set(saved['tasks']) == set(TASKS)
  for name in TASKS:
    row = saved['tasks'][name]
    best = max(row['selection'], key=lambda s: s['val200_top1'], default={
        'hparams': {'learning_rate': 0.01, 'weight_decay': 0.0}})  # clevr_count: the file's
    assert row['chosen'] == best['hparams'] and row['seeds'] == [0]
    assert row['mean'] == pytest.approx(np.mean(row['top1']))
    assert row['normalization'] == 'imagenet' and row['trainable_params'] > 0  # vit_ti16's
  text = open(os.path.join(root, 'report.md')).read()
  assert '**mean over the 19 tasks**' in text and '**mean of the 3 group means**' in text
  assert text.index('| dtd |') < text.index('| clevr_count |')
  assert os.path.getsize(os.path.join(root, 'report.png')) > 1000
  os.remove(os.path.join(root, 'report.md'))
  assert report.write(root) == saved  # --report DIR rebuilds it from the finished runs
  assert os.path.exists(os.path.join(root, 'report.md'))


def test_selection_configs_never_name_test():
  config = shipped_config('vtab', 'lora,vit_b16')
  for t in tasks.TASKS:
    for run in protocol.selection_runs(config, t.name):
      cfg = protocol.run_config(config, run)
      assert (cfg.data.train_split, cfg.data.eval_split) == ('train800', 'val200')
    chosen = protocol.grid(config)[1]
    finals = protocol.final_runs(config, t.name, chosen)
    assert [r.seed for r in finals] == [0, 1, 2]
    cfg = protocol.run_config(config, finals[0])
    assert (cfg.data.eval_split, cfg.eval_every_steps) == ('test', 0)
    assert cfg.optimizer.base_lr == pytest.approx(chosen['learning_rate'] * 256 / 64)
  assert protocol.choose([(r, s) for r, s in zip(
      protocol.selection_runs(config, 'dtd'), (0.5, 0.7, 0.7))]) == protocol.grid(config)[1]


def test_aggregator_reproduces_v_petl_bench():
  """The published AdaptFormer row: 72.32 over the 19 tasks, 74.75 over the group means."""
  rows = report.reference_rows()
  a = report.averages(rows['adaptformer'])
  assert round(a['mean_19_tasks'], 2) == 72.32
  assert round(a['mean_of_group_means'], 2) == 74.75
  for method, mean in references.V_PETL_MEANS.items():  # the transcription, row by row
    assert round(report.averages(rows[method])['mean_19_tasks'], 2) == mean, method
  partial = dict(rows['adaptformer'])
  del partial['kitti']
  assert report.averages(partial)['structured'] is None
  assert report.averages(partial)['natural'] == pytest.approx(563.9 / 7)


def test_bad_protocol_fields_are_one_config_error():
  config = shipped_config('vtab', 'adaptformer')
  config.vtab.learning_rates, config.vtab.seeds = (0.0, 1e-3), ()
  with pytest.raises(ConfigError, match=r'vtab.learning_rates: must be a non-empty list of '
                     r'numbers > 0, got \(0.0, 0.001\); config.vtab.seeds: .* got \(\)'):
    protocol.grid(config)
