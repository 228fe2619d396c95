"""How much memory does a train step need? Adapter vs full tuning, and the giant presets.

Nothing is allocated: our jitted train step (`train.Trainer(...).jit_train_step()`) is
lowered for ShapeDtypeStructs and compiled, and XLA's buffer assignment
(`compiled.memory_analysis()`) gives the per-device peak as arguments + outputs +
temporaries - aliased (the donated state is updated in place). Part 1: ViT-B/16
at batch 32 under each model.remat policy, with XLA:CPU's default scheduler and
its memory-optimised one. Part 2 (a subprocess with 8 simulated CPU devices):
ViT-g/14 and ViT-G/14 on ('data', 'model') meshes, per device, against an 80 GB
accelerator. The last line is adapter (remat='dots') / full tuning (no remat),
memory-optimised scheduler.

  python benchmarks/memory.py [--batch 32] [--giant_batch 32] [--skip_giant]
"""
import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from adaptformer_jax import models  # noqa: E402
from adaptformer_jax import recipes  # noqa: E402
from adaptformer_jax import sharding  # noqa: E402
from adaptformer_jax import train  # noqa: E402

GIB = 2**30
ACCELERATOR_BYTES = 80e9
SCHEDULERS = {'default': None, 'memory': {
    'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}}
# Part 2: (preset, tuning, remat, model_parallel) on 8 devices.
GIANT = [('vit_g14', 'adaptformer', 'none', 1), ('vit_g14', 'adaptformer', 'none', 4),
         ('vit_g14', 'full', 'none', 4), ('vit_G14', 'adaptformer', 'none', 1),
         ('vit_G14', 'adaptformer', 'none', 4), ('vit_G14', 'adaptformer', 'dots', 4),
         ('vit_G14', 'adaptformer', 'none', 8), ('vit_G14', 'full', 'none', 4)]


def step_memory(name, tuning, remat, batch, model_parallel=1, compiler_options=None):
  """(peak bytes per device, memory_analysis, GFLOPs) of one compiled train step."""
  model = models.preset(name, num_classes=1000, tuning=tuning, remat=remat)
  config = recipes.base(model, 'synthetic')
  config.batch_size = batch
  config.warmup_steps = 0
  config.num_train_steps = 1000
  config.model_parallel = model_parallel
  trainer = train.Trainer(train.Run(config))
  data_sharding = sharding.batch_sharding(trainer.run.mesh)
  size = model.image_size
  data = {'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32,
                                        sharding=data_sharding),
          'label': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data_sharding)}
  compiled = trainer.jit_train_step().lower(trainer.abstract_state(), data).compile(
      compiler_options)
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)
  return peak, m, compiled.cost_analysis()['flops'] / 1e9


def row(label, peak, m, gflops, seconds):
  return (f'{label:44s} {m.argument_size_in_bytes / GIB:6.2f} {m.output_size_in_bytes / GIB:6.2f} '
          f'{m.temp_size_in_bytes / GIB:6.2f} {m.alias_size_in_bytes / GIB:6.2f} '
          f'{peak / GIB:7.2f} {gflops:8.0f}  ({seconds:.0f} s to compile)')


HEADER = (f'{"":44s} {"args":>6s} {"out":>6s} {"temp":>6s} {"alias":>6s} {"peak":>7s} '
          f'{"GFLOP":>8s}   (GiB, GFLOP per device)')


def vit_b16(batch):
  """Part 1; returns the peaks by (tuning, remat, scheduler)."""
  print(f'ViT-B/16 train step, batch {batch}, 224 px, float32, 1 device:\n{HEADER}')
  peaks = {}
  for scheduler, options in SCHEDULERS.items():
    for tuning, remat in (('full', 'none'), ('full', 'dots'), ('adaptformer', 'none'),
                          ('adaptformer', 'block'), ('adaptformer', 'dots')):
      start = time.perf_counter()
      peak, m, gflops = step_memory('vit_b16', tuning, remat, batch, compiler_options=options)
      peaks[tuning, remat, scheduler] = peak
      print(row(f'{tuning} remat={remat} scheduler={scheduler}', peak, m, gflops,
                time.perf_counter() - start), flush=True)
  return peaks


def giant(batch):
  """Part 2, run in a process that sees 8 CPU devices."""
  print(f'\nGiant presets, batch {batch} (global), 224 px, float32, '
        f'{jax.device_count()} simulated devices:\n{HEADER}')
  for name, tuning, remat, mp in GIANT:
    start = time.perf_counter()
    peak, m, gflops = step_memory(name, tuning, remat, batch, mp, SCHEDULERS['memory'])
    mesh = f'{jax.device_count() // mp}x{mp}'
    print(row(f'{name} {tuning} remat={remat} mesh={mesh}', peak, m, gflops,
              time.perf_counter() - start)
          + f'  {peak / ACCELERATOR_BYTES:.0%} of 80 GB', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--giant_batch', type=int, default=32)
  parser.add_argument('--skip_giant', action='store_true')
  parser.add_argument('--giant_only', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.giant_only:
    giant(args.giant_batch)
    return
  peaks = vit_b16(args.batch)
  if not args.skip_giant:
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
               JAX_PLATFORMS='cpu')
    subprocess.run([sys.executable, __file__, '--giant_only',
                    f'--giant_batch={args.giant_batch}'], env=env, check=True)
  for scheduler in SCHEDULERS:
    full = peaks['full', 'none', scheduler]
    print(f'adapter/full, scheduler={scheduler}: '
          + ', '.join(f'remat={r} {peaks["adaptformer", r, scheduler] / full:.2f}'
                      for r in ('none', 'block', 'dots')))
  print(f'ratio: {peaks["adaptformer", "dots", "memory"] / peaks["full", "none", "memory"]:.2f}')


if __name__ == '__main__':
  main()
