"""End to end on the embedded dataset: train, evaluate, resume, restore, export, swap in."""
import os
import shutil

import flax.traverse_util
import jax
import numpy as np
import pytest
import safetensors.numpy

from adaptformer_jax import jobs
from adaptformer_jax import metrics
from adaptformer_jax import runtime
from adaptformer_jax import train
from adaptformer_jax.errors import UserError
from adaptformer_jax.weights import checkpoints
from adaptformer_jax.weights import exports
from conftest import tiny_run_config


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_run_config(data_dir=data_dir)
  result = train.train_and_evaluate(config, workdir)
  return config, workdir, result


def restore(config, workdir, step=None):
  trainer = train.Trainer(runtime.Run(config))
  ckpt = checkpoints.Checkpointer(workdir)
  try:
    return ckpt.restore(trainer.abstract_state(), step)
  finally:
    ckpt.close()


def test_loss_falls_and_accuracy_beats_chance(trained):
  _, workdir, result = trained
  losses = [m['train/loss'] for m in metrics.read(workdir) if 'train/loss' in m]
  assert len(losses) == 4
  assert losses[-1] < losses[0]
  assert result['top1'] > 0.2  # 10 classes: chance is 0.1
  assert result['count'] == 360  # every test image exactly once
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert any(f.startswith('events.out.tfevents')
             for f in os.listdir(os.path.join(workdir, 'tensorboard')))


def test_restored_checkpoint_gives_identical_eval(trained):
  config, workdir, result = trained
  assert jobs.evaluate_workdir(config, workdir) == result


def test_resume_reproduces_the_uninterrupted_run_bit_exactly(trained, tmp_path):
  config, workdir, _ = trained
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '40'))  # "killed" after step 20
  train.train_and_evaluate(config, resumed)
  a = flax.traverse_util.flatten_dict(restore(config, workdir).params)
  b = flax.traverse_util.flatten_dict(restore(config, resumed).params)
  for k in a:
    assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), k


def test_frozen_backbone_is_untouched_by_training(trained):
  config, workdir, _ = trained
  run = runtime.Run(config)
  first = restore(config, workdir, 20).params
  last = restore(config, workdir, 40).params
  flat_mask = flax.traverse_util.flatten_dict(run.mask)
  for k, trains in flat_mask.items():
    same = np.array_equal(flax.traverse_util.flatten_dict(first)[k],
                          flax.traverse_util.flatten_dict(last)[k])
    assert same != trains, k


def test_export_holds_exactly_the_trainable_leaves_and_swaps_in(trained, tmp_path):
  config, workdir, result = trained
  out = str(tmp_path / 'adapters')
  jobs.export(config, workdir, out)
  tensors = safetensors.numpy.load_file(os.path.join(out, exports.ADAPTER_WEIGHTS))
  run = runtime.Run(config)
  trainable = {'params/' + '/'.join(k) for k, m in
               flax.traverse_util.flatten_dict(run.mask).items() if m}
  assert set(tensors) == trainable
  assert sum(v.size for v in tensors.values()) == run.param_counts()[0]
  # The same random-init backbone (same seed) with the adapters swapped in.
  assert jobs.evaluate_workdir(config, str(tmp_path / 'eval'), adapters=out) == result


def test_adapters_from_another_model_are_refused(trained, tmp_path):
  config, workdir, _ = trained
  out = str(tmp_path / 'adapters')
  jobs.export(config, workdir, out)
  other = tiny_run_config(data_dir=config.data.data_dir)
  other.model.width = 64
  with pytest.raises(UserError, match='trained for another model.*width: adapters 32'):
    jobs.evaluate_workdir(other, str(tmp_path / 'eval'), adapters=out)


def test_adapters_refuse_another_backbone_and_are_no_backbone_themselves(trained, tmp_path):
  """Swapped into the wrong frozen weights, or passed as init_from, an export once gave
  a chance-level model without a word."""
  config, workdir, _ = trained
  out = str(tmp_path / 'adapters')
  jobs.export(config, workdir, out)
  reseeded = tiny_run_config(data_dir=config.data.data_dir, seed=config.seed + 1)
  with pytest.raises(UserError, match=f'pass --config.seed={config.seed}'):
    jobs.evaluate_workdir(reseeded, str(tmp_path / 'eval'), adapters=out)
  from_export = tiny_run_config(data_dir=config.data.data_dir,
                                init_from=os.path.join(out, exports.ADAPTER_WEIGHTS))
  with pytest.raises(UserError, match='holds no backbone, only adapters and a head'):
    runtime.init_variables(from_export, runtime.Run(from_export).model, jax.random.key(0))


def test_a_run_scheduled_in_epochs_is_evaluated_exported_and_loaded(tmp_path, data_dir):
  """Read-back jobs once asked for num_train_steps and warmup_steps, which every shipped
  recipe leaves to epochs (-1)."""
  config = tiny_run_config(data_dir=data_dir, num_train_steps=-1, num_epochs=1,
                           warmup_steps=-1, warmup_epochs=0)
  config.data.train_split = 'train[:160]'  # 5 steps
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir)
  assert checkpoints.latest_step(workdir) == 5
  assert jobs.evaluate_workdir(config, workdir) == result
  jobs.export(config, workdir, str(tmp_path / 'export'))
  _, variables = jobs.load_variables(config, workdir)
  assert 'params' in variables


def test_resuming_past_the_configured_steps_is_refused(trained, tmp_path):
  """It once logged '-20 steps' and reported the longer-trained model as this config's."""
  config, workdir, _ = trained
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  shorter = tiny_run_config(data_dir=config.data.data_dir, num_train_steps=20)
  with pytest.raises(UserError, match='already holds step 40, past the 20 steps'):
    train.train_and_evaluate(shorter, copy)
  assert checkpoints.latest_step(copy) == 40


def test_conflicting_config_on_resume_is_refused(trained):
  config, workdir, _ = trained
  changed = tiny_run_config(data_dir=config.data.data_dir)
  changed.model.adapter.bottleneck = 4
  with pytest.raises(UserError, match=r'model\.adapter\.bottleneck: 8 -> 4'):
    train.train_and_evaluate(changed, workdir)


def test_a_wrong_init_from_fails_before_the_data_is_read(tmp_path):
  """The checkpoint path is checked first: here the dataset is not prepared either,
  and the error must still be the path's (reading data and building the model take
  seconds; the path check a moment)."""
  config = tiny_run_config(data_dir=str(tmp_path / 'no_data'),
                           init_from=str(tmp_path / 'missing.pth'))
  with pytest.raises(UserError, match='missing.pth.*does not exist'):
    train.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists() and not (tmp_path / 'no_data').exists()


def test_nonfinite_loss_stops_naming_the_step(tmp_path, data_dir):
  config = tiny_run_config(data_dir=data_dir, num_train_steps=10, log_every_steps=5)
  config.optimizer.base_lr = 1e30
  with pytest.raises(train.TrainingDiverged, match='non-finite at step'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints', '10'))


def test_gradient_accumulation_matches_the_large_batch(data_dir):
  """Two micro-batches of 16 give the same update as one batch of 32 (no BN, no dropout)."""
  states = []
  for accum in (1, 2):
    config = tiny_run_config(data_dir=data_dir, accum_steps=accum)
    config.model.adapter.dropout = 0.0
    trainer = train.Trainer(runtime.Run(config))
    state = trainer.initial_state()
    step = trainer.jit_train_step()
    images = jax.random.normal(jax.random.key(0), (32, 16, 16, 3))
    labels = np.arange(32) % 10
    micro = 32 // accum
    for _ in range(2):  # two optimizer updates (the first has zero up-proj gradient effects)
      for i in range(accum):
        batch = {'image': images[i * micro:(i + 1) * micro],
                 'label': labels[i * micro:(i + 1) * micro]}
        state, _ = step(state, batch)
    states.append(state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *states)


def test_frozen_bfloat16_state_keeps_trainable_leaves_and_optimizer_in_float32():
  config = tiny_run_config()
  config.model.frozen_dtype = 'bfloat16'
  config.warmup_steps = 0
  trainer = train.Trainer(runtime.Run(config))
  state = trainer.initial_state()
  # What a restore builds matches what training holds.
  assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(lambda x: x.dtype,
                                                                 trainer.abstract_state())
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.opt_state)
             if jax.numpy.issubdtype(x.dtype, jax.numpy.floating))
  batch = {'image': jax.random.normal(jax.random.key(0), (32, 16, 16, 3)),
           'label': jax.numpy.arange(32) % 10}
  before = jax.device_get(state.params)
  step = trainer.jit_train_step()
  for _ in range(3):  # the zero-initialised up-projection lets the rest move from step 2
    state, _ = step(state, batch)
  after = flax.traverse_util.flatten_dict(jax.device_get(state.params), sep='/')
  before = flax.traverse_util.flatten_dict(before, sep='/')
  for path, trains in flax.traverse_util.flatten_dict(trainer.run.mask, sep='/').items():
    if trains:
      assert after[path].dtype == np.float32 and not np.array_equal(after[path], before[path])
    else:
      assert after[path].dtype == jax.numpy.bfloat16, path
      assert after[path].tobytes() == before[path].tobytes(), path


@pytest.mark.parametrize('tuning, modules', [
    ('ssf+bitfit+adapter_plus', {'adapter_plus', 'ssf_qkv', 'qkv', 'norm1'}),  # + BitFit's biases
    ('repadapter+fact_tt', {'down', 'up', 'u', 'v', 'q', 'fc1'}),  # scales other than 1
])
def test_new_methods_train_resume_and_export(tuning, modules, tmp_path, data_dir):
  """The methods in one short run each: only their leaves and the head move, a resumed
  run repeats the uninterrupted one bit for bit, the export swaps back in."""
  config = tiny_run_config(tuning, data_dir=data_dir, num_train_steps=4,
                           warmup_steps=1, log_every_steps=2, checkpoint_every_steps=2)
  config.model.update(repadapter=dict(scale=0.5), fact=dict(scale=2.0))
  workdir, resumed = str(tmp_path / 'run'), str(tmp_path / 'resumed')
  result = train.train_and_evaluate(config, workdir)
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))
  train.train_and_evaluate(config, resumed)
  first, last = (flax.traverse_util.flatten_dict(restore(config, workdir, s).params, sep='/')
                 for s in (2, 4))
  again = flax.traverse_util.flatten_dict(restore(config, resumed, 4).params, sep='/')
  mask = flax.traverse_util.flatten_dict(runtime.Run(config).mask, sep='/')
  for k, trains in mask.items():
    assert np.asarray(last[k]).tobytes() == np.asarray(again[k]).tobytes(), k
    assert np.array_equal(first[k], last[k]) != trains, k
  assert {k.split('/')[-2] for k, t in mask.items() if t and 'head' not in k} >= modules
  out = str(tmp_path / 'adapters')
  jobs.export(config, workdir, out)
  assert jobs.evaluate_workdir(config, str(tmp_path / 'eval'), adapters=out) == result
