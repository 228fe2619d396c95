"""Preemption and damage: kill -9 / SIGTERM and resume, unreadable checkpoints, the NaN guard.

Every interrupted run must end bit-identical to one uninterrupted reference run.
"""
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
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

# The CLI with one fault at a fixed point of training, so that a failure reproduces. The
# package has no fault hook: this wraps two of its functions inside the CLI's process.
# FAULT (JSON) names the signal and where it strikes:
#   at 'step' N: as the batch after N trained steps is drawn, once the checkpoint directory
#     `committed` is complete (so what a resume finds does not hang on timing);
#   at 'seal' N: in orbax's writer thread, with step N's files written into its temporary
#     directory, before the rename that completes the step (Checkpointer._seal).
FAULTY_CLI = f"""
import json, os, signal, time
from adaptformer_jax import data, main
import {checkpoints.__name__} as checkpoints

fault = json.loads(os.environ['FAULT'])
sig = getattr(signal, fault['signal'])
if fault['at'] == 'step':
  train_iterator = data.train_iterator
  def faulty_train_iterator(*args, **kwargs):
    for trained, batch in enumerate(train_iterator(*args, **kwargs), kwargs['start_step']):
      if trained == fault['step']:
        while not os.path.isdir(fault['committed']):
          time.sleep(0.01)
        signal.raise_signal(sig)
      yield batch
  data.train_iterator = faulty_train_iterator
else:
  seal = checkpoints.Checkpointer._seal
  def faulty_seal(self):
    if self._saving == fault['step']:
      os.kill(os.getpid(), sig)
      time.sleep(60)
    seal(self)
  checkpoints.Checkpointer._seal = faulty_seal
main.run()
"""


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


def start_cli(config_file, workdir, log, env, fault=None):
  """The CLI training `workdir`; with `fault` (see FAULTY_CLI), struck by it."""
  argv = cli(f'--config={config_file}', f'--workdir={workdir}')
  if fault:
    argv = [sys.executable, '-c', FAULTY_CLI, *argv[3:]]  # argv[3:]: the CLI's arguments
    env = {**env, 'FAULT': json.dumps(fault)}
  return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def unfinished_saves(workdir):
  return sorted(os.path.basename(p) for p in
                glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*')))


@pytest.mark.slow
def test_kill_9_at_fixed_steps_then_resume_is_bit_exact(reference, tmp_path, cli_env):
  config_file, config, reference_dir = reference
  workdir = str(tmp_path / 'killed')
  committed_10 = os.path.join(workdir, 'checkpoints', '10')
  # (where SIGKILL strikes, the latest complete step then, the step of the save cut short)
  kills = [(dict(at='step', step=12, committed=committed_10), 10, None),  # between saves
           (dict(at='seal', step=35), 30, 35),  # mid-save
           (dict(at='seal', step=70), 65, 70)]  # the last step's save, before the final eval
  with open(tmp_path / 'log.txt', 'w') as log:
    for fault, latest, cut_short in kills:
      proc = start_cli(config_file, workdir, log, cli_env, dict(signal='SIGKILL', **fault))
      assert proc.wait(timeout=300) == -signal.SIGKILL, \
          (tmp_path / 'log.txt').read_text()[-3000:]
      assert saved_steps(workdir)[-1] == latest, (fault, saved_steps(workdir))
      # Only this kill's save is unfinished: the one before was saved again on resuming.
      assert [n.split('.')[0] for n in unfinished_saves(workdir)] == (
          [str(cut_short)] if cut_short else []), fault
    final = start_cli(config_file, workdir, log, cli_env)
    assert final.wait(timeout=300) == 0, (tmp_path / 'log.txt').read_text()[-3000:]
  assert not unfinished_saves(workdir)
  assert_bit_identical(config, workdir, reference_dir)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_is_bit_exact(reference, tmp_path, cli_env):
  config_file, config, reference_dir = reference
  workdir = str(tmp_path / 'terminated')
  # SIGTERM as the 13th step starts, after 12 trained steps: it finishes that step, saves
  # it though no checkpoint is due (every 5) and stops.
  fault = dict(signal='SIGTERM', at='step', step=12,
               committed=os.path.join(workdir, 'checkpoints', '10'))
  with open(tmp_path / 'log.txt', 'w+') as log:
    proc = start_cli(config_file, workdir, log, cli_env, fault)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    log.seek(0)
    last_line = log.read().strip().splitlines()[-1]
  assert last_line.startswith('interrupted: SIGTERM received: saved step 13 in '), last_line
  assert saved_steps(workdir) == [5, 10, 13] and not unfinished_saves(workdir)
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
