"""Preemption and damage: kill -9 / SIGTERM and resume, unreadable checkpoints, the NaN guard.

Every interrupted run must end bit-identical to one uninterrupted reference run.
"""
import glob
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from adaptformer_jax import runtime
from adaptformer_jax import train
from adaptformer_jax.weights import checkpoints
from conftest import tiny_run_config
from test_cli import REPO, cli, cli_env, write_config  # noqa: F401 (a fixture)

# Checkpoints every 5 of 70 steps: many chances to be killed mid-step and mid-save. The
# BatchNorm head adds running statistics to what must resume exactly.
RUN = dict(num_train_steps=70, log_every_steps=5, checkpoint_every_steps=5,
           model=dict(head='bn_linear'))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
  """(config file, config, workdir) of the uninterrupted run, trained in-process."""
  root = tmp_path_factory.mktemp('reliability')
  config = tiny_run_config(data_dir=data_dir, **RUN)
  workdir = str(root / 'reference')
  train.train_and_evaluate(config, workdir)
  return write_config(root / 'tiny.py', data_dir, **RUN), config, workdir


def final_state(config, workdir):
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  try:
    assert ckpt.latest_step() == RUN['num_train_steps']
    return ckpt.restore(train.Trainer(runtime.Run(config)).abstract_state())
  finally:
    ckpt.close()


def assert_bit_identical(config, workdir, reference_dir):
  """The whole train state: parameters, BatchNorm statistics, optimizer state, step."""
  a, _ = jax.tree_util.tree_flatten_with_path(final_state(config, reference_dir))
  b, _ = jax.tree_util.tree_flatten_with_path(final_state(config, workdir))
  assert [path for path, _ in a] == [path for path, _ in b]
  assert any('batch_stats' in jax.tree_util.keystr(path) for path, _ in a)
  for (path, x), (_, y) in zip(a, b):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)


def saved_steps(workdir):
  """Finished steps, as orbax names them (in-progress saves carry a tmp suffix)."""
  names = os.listdir(os.path.join(workdir, 'checkpoints')) \
      if os.path.isdir(os.path.join(workdir, 'checkpoints')) else []
  return sorted(int(n) for n in names if n.isdigit())


def start_cli(config_file, workdir, log, env):
  return subprocess.Popen(cli(f'--config={config_file}', f'--workdir={workdir}'), cwd=REPO,
                          env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for_checkpoint_after(step, workdir, proc, timeout=240):
  """Polls until a step beyond `step` is saved; returns it."""
  deadline = time.monotonic() + timeout
  while not saved_steps(workdir) or saved_steps(workdir)[-1] <= step:
    assert proc.poll() is None, f'exited early with status {proc.returncode}'
    assert time.monotonic() < deadline, 'no checkpoint appeared'
    time.sleep(0.01)
  return saved_steps(workdir)[-1]


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bit_exact(reference, tmp_path, cli_env):
  config_file, config, reference_dir = reference
  workdir = str(tmp_path / 'killed')
  rng = random.Random(0)
  kills = []
  with open(tmp_path / 'log.txt', 'w') as log:
    for _ in range(3):
      resumed_from = (saved_steps(workdir) or [0])[-1]
      proc = start_cli(config_file, workdir, log, cli_env)
      # Once training runs, kill at a uniformly random moment of a checkpoint interval.
      step = wait_for_checkpoint_after(resumed_from, workdir, proc)
      start = time.monotonic()
      wait_for_checkpoint_after(step, workdir, proc)
      time.sleep(rng.uniform(0, time.monotonic() - start))
      assert proc.poll() is None, 'finished before it could be killed'
      proc.kill()
      proc.wait()
      leftovers = [os.path.basename(p) for p in
                   glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*'))]
      kills.append((resumed_from, saved_steps(workdir)[-1], leftovers))
    final = start_cli(config_file, workdir, log, cli_env)
    assert final.wait(timeout=300) == 0, (tmp_path / 'log.txt').read_text()[-3000:]
  print('kills (resumed from, latest saved at kill, unfinished saves):', kills)
  assert proc.returncode == -signal.SIGKILL
  assert not glob.glob(os.path.join(workdir, 'checkpoints', '*tmp*'))
  assert_bit_identical(config, workdir, reference_dir)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_is_bit_exact(reference, tmp_path, cli_env):
  config_file, config, reference_dir = reference
  workdir = str(tmp_path / 'terminated')
  with open(tmp_path / 'log.txt', 'w+') as log:
    proc = start_cli(config_file, workdir, log, cli_env)
    wait_for_checkpoint_after(0, workdir, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    log.seek(0)
    last_line = log.read().strip().splitlines()[-1]
  assert last_line.startswith('interrupted: SIGTERM received: saved step '), last_line
  step = int(last_line.split('saved step ')[1].split()[0])
  assert 5 <= step < RUN['num_train_steps'] and saved_steps(workdir)[-1] == step
  train.train_and_evaluate(config, workdir)
  assert_bit_identical(config, workdir, reference_dir)


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(
    reference, tmp_path, caplog):
  _, config, reference_dir = reference
  workdir = str(tmp_path / 'damaged')
  shutil.copytree(reference_dir, workdir)
  last, previous = saved_steps(workdir)[-1], saved_steps(workdir)[-2]
  for path in glob.glob(os.path.join(workdir, 'checkpoints', str(last), '**', 'd', '*'),
                        recursive=True):  # a disk that filled up: data files cut short
    os.truncate(path, os.path.getsize(path) // 2)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, workdir)
  assert f'Restored checkpoint step {previous} instead of the unreadable step {last}' \
      in caplog.text
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', f'{last}.unreadable'))
  assert_bit_identical(config, workdir, reference_dir)


def test_unfinished_save_is_ignored_and_cleaned_up(reference, tmp_path):
  _, _, reference_dir = reference
  workdir = str(tmp_path / 'unfinished')
  shutil.copytree(reference_dir, workdir)
  last = saved_steps(workdir)[-1]
  tmp = os.path.join(workdir, 'checkpoints', f'{last + 5}.orbax-checkpoint-tmp-1234')
  shutil.copytree(os.path.join(workdir, 'checkpoints', str(last)), tmp)
  assert checkpoints.latest_step(workdir) == last
  assert os.path.isdir(tmp)  # looking does not delete
  checkpoints.Checkpointer(workdir).close()  # a training run opening the directory does
  deadline = time.monotonic() + 10
  while os.path.exists(tmp) and time.monotonic() < deadline:  # orbax deletes in a thread
    time.sleep(0.05)
  assert not os.path.exists(tmp)


def test_nonfinite_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  config = tiny_run_config(data_dir=data_dir, num_train_steps=10, log_every_steps=1,
                           checkpoint_every_steps=1)
  config.optimizer.base_lr = 1e30
  workdir = str(tmp_path)
  with pytest.raises(train.TrainingDiverged, match='non-finite at step') as error:
    train.train_and_evaluate(config, workdir)
  bad = int(re.search(r'at step (\d+)', str(error.value)).group(1))
  assert saved_steps(workdir)[-1] == bad - 1
  assert f'checkpoint (step {bad - 1}) is kept' in str(error.value)
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  state = ckpt.restore(train.Trainer(runtime.Run(config)).abstract_state())
  ckpt.close()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_nonfinite_skip_counts_skipped_updates_and_finishes(tmp_path, data_dir):
  config = tiny_run_config(data_dir=data_dir, num_train_steps=10, log_every_steps=5,
                           checkpoint_every_steps=10, nonfinite='skip')
  config.optimizer.base_lr = 1e30
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    skipped = [r['skipped_nonfinite'] for r in map(json.loads, f) if 'skipped_nonfinite' in r]
  assert 0 < skipped[-1] < 10 and skipped == sorted(skipped)
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  state = ckpt.restore(train.Trainer(runtime.Run(config)).abstract_state())
  ckpt.close()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
