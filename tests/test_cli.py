"""The bad-input catalogue through the real CLI: one `error:` line, exit status 2, no traceback.

Each case is a subprocess (imports cost seconds), so they run a few at a time; every
case fails before anything is compiled. The helpers here also drive the CLI in
test_reliability.py.
"""
import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys

import pytest

from adaptformer_jax import data
from adaptformer_jax import runtime
from adaptformer_jax import train
from adaptformer_jax import workdirs
from adaptformer_jax.weights import checkpoints
from adaptformer_jax.weights import exports
from conftest import tiny_run_config
from conftest import write_image

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)


def write_config(path, data_dir, **overrides):
  """A `--config` file holding conftest's tiny run (tuning from `:METHOD`, default adaptformer)."""
  with open(path, 'w') as f:
    f.write(f'import sys\nsys.path.insert(0, {TESTS_DIR!r})\n'
            'from conftest import tiny_run_config\n\n\n'
            'def get_config(arg=None):\n'
            f"  return tiny_run_config(arg or 'adaptformer', {data_dir!r}, **{overrides!r})\n")
  return str(path)


def cli(*args):
  """argv running the CLI in this interpreter."""
  return [sys.executable, '-m', 'adaptformer_jax.main', *args]


@pytest.fixture(scope='session')
def cli_env():
  """The CLI subprocesses' environment. No persistent compilation cache: caching every
  program cost more than it saved (suite 706-733 s with one, 527 s without)."""
  return {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}


def tree_digest(path):
  """One hash of every file's relative path and bytes under `path`, but the workdir lock
  (a run refused after taking it leaves the empty lock file behind)."""
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(set(files) - {workdirs.LOCK_FILE}):
      full = os.path.join(root, name)
      digest.update(os.path.relpath(full, path).encode())
      with open(full, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


# name: (workdir, CLI arguments, what the error line must say). Workdirs: 'new' (absent),
# 'trained' (a run with a checkpoint), 'empty' (an existing empty dir), 'under_file'.
CASES = {
    'unknown_dataset': ('new', ['--config.data.name=cifar1000'], "unknown dataset 'cifar1000'"),
    'dataset_not_prepared': ('new', ['--config.data.name=cifar10',
                                     '--config.data.data_dir={empty}'], 'is not prepared'),
    'bad_split': ('new', ['--config.data.train_split=trian'], "invalid split 'trian'"),
    'image_size_vs_patch': ('new', ['--config.model.image_size=18'],
                            'not a positive multiple of the patch size 4'),
    'unknown_preset': ('new', ['--config.model.name=vit_x16'], "unknown preset 'vit_x16'"),
    'unknown_tuning_arg': ('new', ['--config={config}:adaptfromer'],
                           "unknown method 'adaptfromer' (did you mean 'adaptformer'?)"),
    'unknown_config_field': ('new', ['--config.model.widht=3'],
                             "unknown config field 'widht'"),
    'init_from_another_model': ('new', ['--config.init_from={other_model}'],
                                'does not fit the model'),
    'init_from_not_a_checkpoint': ('new', ['--config.init_from={notes}'],
                                   'not a checkpoint this loader knows'),
    'init_from_truncated': ('new', ['--config.init_from={truncated}'],
                            'could not read it as a .safetensors file'),
    'class_count': ('new', ['--config.model.num_classes=5'], 'has 10 classes'),
    'config_conflict_on_resume': ('trained', ['--config.model.adapter.bottleneck=4'],
                                  'model.adapter.bottleneck: 8 -> 4'),
    'batch_vs_devices': ('new', ['--config.batch_size=33'], 'not divisible by the 2 devices'),
    'eval_without_checkpoint': ('empty', ['--mode=eval'], 'has no checkpoint'),
    'adapters_from_another_model': ('new', ['--mode=eval', '--adapters={adapters}'],
                                    'trained for another model (width: adapters 64'),
    'workdir_not_writable': ('under_file', [], 'is not writable'),
    'folder_missing': ('new', ['--config.data.name=folder:{missing}'], 'missing does not exist'),
    'folder_one_class': ('new', ['--config.data.name=folder:{one_class}'],
                         "only the class folder 'cats'; a classifier needs at least two"),
    'predict_without_images': ('trained', ['--mode=predict'], 'needs --images PATH'),
    'checkpoint_in_train': ('trained', ['--checkpoint={trained}/checkpoints/0'],
                            '--checkpoint is for --mode eval/export/merge/predict, not --mode train '
                            '(training resumes from the latest checkpoint of --workdir)'),
    'predict_missing_image': ('trained', ['--mode=predict', '--images={missing}'],
                              'missing: no such file or directory'),
    'merge_not_linear': ('trained', ['--mode=merge', '--out={missing}'],
                         "model.tuning='adaptformer' cannot be merged into plain weights: its "
                         'bottleneck has a ReLU'),
}
TWO_DEVICES = {'batch_vs_devices'}


@pytest.fixture(scope='module')
def inputs(tmp_path_factory, data_dir):
  """The files the cases point at: a trained workdir, another model's checkpoint, junk."""
  root = tmp_path_factory.mktemp('cli')
  config = tiny_run_config(data_dir=data_dir)
  data.info(config.data)  # prepares the embedded dataset once, before the subprocesses
  paths = {k: str(root / k) for k in ('trained', 'other', 'empty', 'adapters', 'notes')}
  paths['config'] = write_config(root / 'tiny.py', data_dir)
  paths['truncated'] = str(root / 'truncated.safetensors')
  paths['file'] = str(root / 'a_file')
  paths['missing'] = str(root / 'missing')
  paths['one_class'] = str(root / 'one')
  write_image(str(root / 'one' / 'cats' / '0.png'), (9, 9, 9))
  trainer = train.Trainer(runtime.Run(config))
  workdirs.prepare(config, paths['trained'])
  ckpt = checkpoints.Checkpointer(paths['trained'])
  ckpt.save(0, trainer.initial_state())
  ckpt.close()
  other = tiny_run_config(data_dir=data_dir)
  other.model.width = 64
  ckpt = checkpoints.Checkpointer(paths['other'])
  ckpt.save(0, train.Trainer(runtime.Run(other)).initial_state())
  ckpt.close()
  paths['other_model'] = os.path.join(paths['other'], 'checkpoints', '0')
  os.makedirs(paths['empty'])
  os.makedirs(paths['adapters'])
  with open(os.path.join(paths['adapters'], exports.ADAPTER_CONFIG), 'w') as f:
    json.dump({'format': 'adaptformer_jax.adapters/1', 'model': other.model.to_dict()}, f)
  with open(paths['notes'], 'w') as f:
    f.write('not weights\n')
  with open(paths['truncated'], 'wb') as f:
    f.write(b'\x40\x00\x00\x00\x00\x00\x00\x00{"params/cls": {"dtype": "F32"')
  with open(paths['file'], 'w') as f:
    f.write('x')
  return root, paths


@pytest.fixture(scope='module')
def outcomes(inputs, cli_env):
  """Every case's (exit status, stdout, stderr, workdir digest before, after), run 3 at a time."""
  root, paths = inputs

  def run_case(name):
    kind, args, _ = CASES[name]
    workdir = {'new': str(root / f'new_{name}'), 'under_file': os.path.join(paths['file'], 'sub'),
               'trained': paths['trained'], 'empty': paths['empty']}[kind]
    args = [a.format(**paths) for a in args]
    if not any(a.startswith('--config=') for a in args):
      args.insert(0, f'--config={paths["config"]}')
    before = tree_digest(workdir) if kind in ('trained', 'empty') else None
    env = {**cli_env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'} \
        if name in TWO_DEVICES else cli_env
    proc = subprocess.run(cli(*args, f'--workdir={workdir}'), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)  # a hang guard
    after = tree_digest(workdir) if before else None
    return proc.returncode, proc.stdout, proc.stderr, before, after

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    return dict(zip(CASES, pool.map(run_case, CASES)))


@pytest.mark.parametrize('name', CASES)
def test_bad_input_is_one_error_line(name, outcomes, inputs):
  returncode, stdout, stderr, before, after = outcomes[name]
  lines = stderr.strip().splitlines()
  assert returncode == 2, stderr
  assert len(lines) == 1 and lines[0].startswith('error: '), stderr
  assert CASES[name][2] in lines[0]
  assert 'Traceback' not in stdout + stderr
  assert before == after, 'the workdir changed'
  if CASES[name][0] == 'new' and 'init_from' not in name:  # refused before touching it
    assert not os.path.exists(inputs[0] / f'new_{name}')


def test_predict_from_a_checkpoint_step_needs_no_workdir(inputs, cli_env, tmp_path):
  root, paths = inputs
  out = tmp_path / 'out'
  proc = subprocess.run(cli(f'--config={paths["config"]}', '--mode=predict',
                            f'--checkpoint={paths["trained"]}/checkpoints/0',
                            f'--images={root / "one"}', f'--out={out}'),
                        cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr
  assert (out / 'predictions.csv').read_text().count('cats/0.png') == 1


def test_a_failed_start_does_not_lock_the_workdir(tmp_path, data_dir):
  """Until its first checkpoint a workdir holds no run, so a corrected restart is accepted."""
  workdir = str(tmp_path)
  workdirs.prepare(tiny_run_config(data_dir=data_dir, init_from='wrong.pth'), workdir)
  workdirs.prepare(tiny_run_config(data_dir=data_dir), workdir)
  assert workdirs.load_config(workdir).init_from == ''
