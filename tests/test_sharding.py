"""Tensor-parallel ('data' x 'model') training reproduces data-parallel training.

The mesh needs several devices, and XLA fixes the CPU device count when the
backend starts, so the runs happen in a subprocess with 8 forced CPU devices:
this file is also that worker (`python tests/test_sharding.py ...`), shared
with test_multihost.py.
"""
import argparse
import functools
import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 4
GLOBAL_BATCH = 32
QKV = 'params/block0/attn/qkv/kernel'
FC2 = 'params/block0/mlp/fc2/kernel'
ADAPTER = 'params/block0/adapter/down/kernel'


@functools.cache  # test_multihost reuses the 8-device reference run
def launch(processes=1, devices_per_process=8, model_parallel=(1, 4), timeout=600):
  """Runs the worker in `processes` local processes; returns each one's results.

  Any failure (or the timeout) kills every process: a peer left waiting on a
  dead one would hang in the distributed runtime until its own timeout.
  """
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count='
             f'{devices_per_process}', JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  cmd = [sys.executable, os.path.abspath(__file__),
         '--model_parallel', ','.join(map(str, model_parallel))]
  if processes > 1:
    with socket.socket() as s:
      s.bind(('localhost', 0))
      port = s.getsockname()[1]
    cmd += ['--coordinator', f'localhost:{port}', '--num_processes', str(processes)]
  procs = [subprocess.Popen(cmd + (['--process_id', str(i)] if processes > 1 else []),
                            env=env, cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(processes)]
  try:
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, f'worker failed ({p.returncode}):\n{err[-3000:]}'
  return [[json.loads(line) for line in out.splitlines() if line.startswith('{')]
          for out, _ in outputs]


def test_tensor_parallel_matches_data_parallel_and_shards_kernels():
  replicated, tensor_parallel = launch()[0]
  assert tensor_parallel['mesh'] == {'data': 2, 'model': 4}
  assert max(map(abs, [a - b for a, b in zip(replicated['losses'],
                                              tensor_parallel['losses'])])) < 1e-5
  assert replicated['losses'][-1] < replicated['losses'][0]
  # width 32, qkv 96 features, mlp 64: each device holds a quarter of a kernel.
  assert tensor_parallel['shards'][QKV] == [32, 24]
  assert tensor_parallel['shards'][FC2] == [16, 32]
  assert tensor_parallel['shards'][ADAPTER] == [32, 8]
  assert replicated['shards'][QKV] == [32, 96]


def test_partition_rules():
  from jax.sharding import AbstractMesh  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from adaptformer_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = AbstractMesh((2, 4), ('data', 'model'))
  spec = lambda path, shape: sharding.partition_spec(path, shape, mesh)
  assert spec('params/block3/attn/qkv/kernel', (768, 2304)) == P(None, 'model')
  assert spec('params/block3/mlp/fc1/bias', (3072,)) == P('model')
  assert spec('params/block3/mlp/fc2/kernel', (3072, 768)) == P('model', None)
  # Momentum of full tuning lives under the optimizer state's own prefixes.
  assert spec('opt_state/inner_states/train/inner_state/0/trace/block0/attn/out/kernel',
              (768, 768)) == P('model', None)
  assert spec('params/block3/attn/qkv/kernel', (30, 90)) == P(None, None)  # 90 % 4
  for small in ('params/block3/adapter/down/kernel', 'params/head/linear/kernel',
                'params/block3/attn/out/bias', 'params/embedding/kernel', 'step'):
    assert spec(small, (768, 64)) == P()


def test_model_parallel_must_divide_local_devices():
  from adaptformer_jax import sharding  # pylint: disable=g-import-not-at-top
  with pytest.raises(sharding.UserError, match='model_parallel=3 must divide'):
    sharding.make_mesh(model_parallel=3)


def train_losses(model_parallel):
  """Losses of STEPS train steps of the tiny AdaptFormer on one synthetic batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from adaptformer_jax import runtime  # pylint: disable=g-import-not-at-top
  from adaptformer_jax import sharding  # pylint: disable=g-import-not-at-top
  from adaptformer_jax import train  # pylint: disable=g-import-not-at-top
  from conftest import tiny_run_config  # pylint: disable=g-import-not-at-top

  config = tiny_run_config(batch_size=GLOBAL_BATCH, warmup_steps=0,
                           model_parallel=model_parallel)
  trainer = train.Trainer(runtime.Run(config))
  run = trainer.run
  state, step = trainer.initial_state(), trainer.jit_train_step()
  batch_sharding = sharding.batch_sharding(run.mesh)
  rng = np.random.RandomState(0)
  batch = {'image': rng.rand(GLOBAL_BATCH, 16, 16, 3).astype(np.float32),
           'label': rng.randint(0, 10, GLOBAL_BATCH)}
  # This process's rows of the global batch, as the input pipeline would read them.
  rows = [range(*idx[0].indices(GLOBAL_BATCH)) for idx in
          batch_sharding.addressable_devices_indices_map((GLOBAL_BATCH,)).values()]
  local = slice(min(r.start for r in rows), max(r.stop for r in rows))
  batch = {k: jax.make_array_from_process_local_data(batch_sharding, v[local])
           for k, v in batch.items()}
  losses = []
  for _ in range(STEPS):  # one batch, fitted: the loss must fall
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  flat = {jax.tree_util.keystr(p, simple=True, separator='/'): leaf for p, leaf in
          jax.tree_util.tree_flatten_with_path(state)[0]}
  return {'mesh': dict(run.mesh.shape), 'losses': losses,
          'shards': {k: list(flat[k].addressable_shards[0].data.shape)
                     for k in (QKV, FC2, ADAPTER)}}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--model_parallel', default='1')
  parser.add_argument('--coordinator', default='')
  parser.add_argument('--num_processes', type=int, default=0)
  parser.add_argument('--process_id', type=int, default=-1)
  args = parser.parse_args()
  from adaptformer_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  for model_parallel in map(int, args.model_parallel.split(',')):
    print(json.dumps(train_losses(model_parallel)), flush=True)


if __name__ == '__main__':
  main()
