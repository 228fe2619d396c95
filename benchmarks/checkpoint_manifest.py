"""What do the checkpoint manifest and the workdir lock cost?

Saves and restores the train state of a ViT-B/16 AdaptFormer run (the official
CIFAR-100 recipe: frozen backbone, adapters, BatchNorm head, SGD momentum for the
trainable leaves) through `weights.checkpoints.Checkpointer`, with the SHA-256 manifest
and without it (write_manifest / verify_manifest replaced by no-ops), timed in
alternation so both see the same machine load. The manifest is written in orbax's
background thread and verified before a restore; the lock is taken once per run.
The last line is (save + restore with the manifest) / (without).

  python benchmarks/checkpoint_manifest.py [--repeats 7] [--dir /tmp]
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from adaptformer_jax import models  # noqa: E402
from adaptformer_jax import workdirs  # noqa: E402
from adaptformer_jax.models import tuning  # noqa: E402
from adaptformer_jax.weights import checkpoints  # noqa: E402
from adaptformer_jax.weights import integrity  # noqa: E402


def train_state():
  cfg = models.preset('vit_b16', num_classes=100, head='bn_linear', tuning='adaptformer')
  variables = models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  mask = tuning.trainable_mask(variables['params'], cfg)
  tx = tuning.freeze(optax.sgd(0.1, momentum=0.9), mask)
  return {'step': jnp.zeros((), jnp.int32), 'params': variables['params'],
          'batch_stats': variables['batch_stats'],
          'opt_state': tx.init(variables['params'])}


def timed_save_restore(root, state, with_manifest):
  """(save seconds, restore seconds) of one step in a fresh workdir under `root`."""
  real_write, real_verify = integrity.write_manifest, integrity.verify_manifest
  if not with_manifest:
    integrity.write_manifest = lambda step_dir: None
    integrity.verify_manifest = lambda step_dir: False
  workdir = tempfile.mkdtemp(dir=root)
  try:
    start = time.perf_counter()
    ckpt = checkpoints.Checkpointer(workdir)
    ckpt.save(1, state)
    ckpt.close()  # waits for the background write (and the manifest)
    save = time.perf_counter() - start
    assert os.path.exists(os.path.join(workdir, 'checkpoints', '1',
                                       integrity.MANIFEST)) == with_manifest
    start = time.perf_counter()
    ckpt = checkpoints.Checkpointer(workdir, read_only=True)
    restored = ckpt.restore(jax.eval_shape(lambda: state))
    jax.block_until_ready(restored)
    ckpt.close()
    return save, time.perf_counter() - start
  finally:
    integrity.write_manifest, integrity.verify_manifest = real_write, real_verify
    shutil.rmtree(workdir)


def hashing_seconds(root, state, repeats):
  """Median seconds of write_manifest and verify_manifest alone, on one saved step."""
  workdir = tempfile.mkdtemp(dir=root)
  ckpt = checkpoints.Checkpointer(workdir)
  ckpt.save(1, state)
  ckpt.close()
  step_dir = os.path.join(workdir, 'checkpoints', '1')
  times = {'write': [], 'verify': []}
  for _ in range(repeats):
    for name, fn in (('write', integrity.write_manifest),
                     ('verify', integrity.verify_manifest)):
      start = time.perf_counter()
      fn(step_dir)
      times[name].append(time.perf_counter() - start)
  shutil.rmtree(workdir)
  return {name: statistics.median(t) for name, t in times.items()}


def lock_seconds(root, n=1000):
  workdir = tempfile.mkdtemp(dir=root)
  start = time.perf_counter()
  for _ in range(n):
    with workdirs.Lock(workdir):
      pass
  seconds = (time.perf_counter() - start) / n
  shutil.rmtree(workdir)
  return seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--dir', default=None, help='where to write (default: the temp dir)')
  args = parser.parse_args()
  root = tempfile.mkdtemp(dir=args.dir)
  state = train_state()
  size = sum(x.nbytes for x in jax.tree.leaves(state))
  print(f'ViT-B/16 AdaptFormer train state: {size / 2**20:.0f} MiB in {root}')
  timed_save_restore(root, state, True)  # warm up orbax, tensorstore and the page cache
  times = {True: [], False: []}
  load = os.getloadavg()[0]
  for _ in range(args.repeats):
    for with_manifest in (False, True):
      times[with_manifest].append(timed_save_restore(root, state, with_manifest))
  print(f'load average {load:.1f} -> {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)')
  medians = {}
  for with_manifest, samples in times.items():
    save = statistics.median(s for s, _ in samples)
    restore = statistics.median(r for _, r in samples)
    medians[with_manifest] = save + restore
    print(f'{"with" if with_manifest else "without":7s} manifest: save {save:6.2f} s  '
          f'restore {restore:6.2f} s')
  hashing = hashing_seconds(root, state, args.repeats)
  print(f"SHA-256 alone: write_manifest {hashing['write']:.2f} s (in orbax's background "
        f"thread), verify_manifest {hashing['verify']:.2f} s "
        f"({size / 2**20 / hashing['verify']:.0f} MiB/s)")
  print(f'workdir lock: {lock_seconds(root) * 1e6:.0f} us to take and release, once per run')
  shutil.rmtree(root)
  print(f'ratio: {medians[True] / medians[False]:.2f}')


if __name__ == '__main__':
  main()
