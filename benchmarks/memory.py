"""How much memory does a train step need? Adapter vs full tuning, and the giant presets.

Nothing is allocated: our jitted train step (`train.Trainer(...).jit_train_step()`) is
lowered for ShapeDtypeStructs and compiled, and XLA's buffer assignment
(`compiled.memory_analysis()`) gives the per-device peak as arguments + outputs +
temporaries - aliased (the donated state is updated in place). Part 1: ViT-B/16
at batch 32 under each model.remat policy, and with the frozen backbone stored
in bfloat16 (model.frozen_dtype), with XLA:CPU's default scheduler and its
memory-optimised one; then the parameter bytes of ViT-B/16 and ViT-G/14 adapter
tuning with the frozen backbone in float32 and bfloat16. Part 2 (a subprocess with 8 simulated CPU devices):
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

from adaptformer_jax import models  # noqa: E402
import machine  # noqa: E402
import steps  # noqa: E402

GIB = 2**30
ACCELERATOR_BYTES = 80e9
SCHEDULERS = {'default': None, 'memory': {
    'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}}
# Part 1: (tuning, remat, frozen_dtype) of ViT-B/16.
VIT_B16 = [('full', 'none', 'float32'), ('full', 'dots', 'float32'),
           ('adaptformer', 'none', 'float32'), ('adaptformer', 'block', 'float32'),
           ('adaptformer', 'dots', 'float32'), ('adaptformer', 'dots', 'bfloat16')]
# Part 2: (preset, tuning, remat, model_parallel, frozen_dtype) on 8 devices.
GIANT = [('vit_g14', 'adaptformer', 'none', 1, 'float32'),
         ('vit_g14', 'adaptformer', 'none', 4, 'float32'),
         ('vit_g14', 'full', 'none', 4, 'float32'),
         ('vit_G14', 'adaptformer', 'none', 1, 'float32'),
         ('vit_G14', 'adaptformer', 'none', 1, 'bfloat16'),
         ('vit_G14', 'adaptformer', 'none', 4, 'float32'),
         ('vit_G14', 'adaptformer', 'dots', 4, 'float32'),
         ('vit_G14', 'adaptformer', 'none', 8, 'float32'),
         ('vit_G14', 'full', 'none', 4, 'float32')]


def step_memory(name, tuning, remat, batch, model_parallel=1, compiler_options=None,
                frozen_dtype='float32'):
  """(peak bytes per device, memory_analysis, GFLOPs) of one compiled train step."""
  model = models.preset(name, num_classes=1000, tuning=tuning, remat=remat,
                        frozen_dtype=frozen_dtype)
  trainer = steps.make_trainer(model, batch, model_parallel)
  compiled = steps.lower_step(trainer, batch).compile(compiler_options)
  return (steps.compiled_peak_bytes(compiled), compiled.memory_analysis(),
          compiled.cost_analysis()['flops'] / 1e9)


def row(label, peak, m, gflops, seconds):
  return (f'{label:52s} {m.argument_size_in_bytes / GIB:6.2f} {m.output_size_in_bytes / GIB:6.2f} '
          f'{m.temp_size_in_bytes / GIB:6.2f} {m.alias_size_in_bytes / GIB:6.2f} '
          f'{peak / GIB:7.2f} {gflops:8.0f}  ({seconds:.0f} s to compile)')


HEADER = (f'{"":52s} {"args":>6s} {"out":>6s} {"temp":>6s} {"alias":>6s} {"peak":>7s} '
          f'{"GFLOP":>8s}   (GiB, GFLOP per device)')


def vit_b16(batch):
  """Part 1; returns the peaks by (tuning, remat, scheduler)."""
  print(f'ViT-B/16 train step, batch {batch}, 224 px, float32, 1 device:\n{HEADER}')
  peaks = {}
  for scheduler, options in SCHEDULERS.items():
    for tuning, remat, frozen in VIT_B16:
      start = time.perf_counter()
      peak, m, gflops = step_memory('vit_b16', tuning, remat, batch, compiler_options=options,
                                    frozen_dtype=frozen)
      peaks[tuning, remat, frozen, scheduler] = peak
      frozen_label = ' frozen=bf16' if frozen == 'bfloat16' else ''
      print(row(f'{tuning} remat={remat}{frozen_label} scheduler={scheduler}', peak, m,
                gflops, time.perf_counter() - start), flush=True)
  return peaks


def frozen_weights(name):
  """Parameter bytes of adapter tuning's train state, frozen backbone in float32 vs bfloat16."""
  sizes = {}
  for frozen in ('float32', 'bfloat16'):
    model = models.preset(name, num_classes=1000, tuning='adaptformer', frozen_dtype=frozen)
    params = steps.make_trainer(model, 1).abstract_state().params
    sizes[frozen] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  print(f'{name} adaptformer parameters: {sizes["float32"] / GIB:.2f} GiB with frozen_dtype='
        f'float32 -> {sizes["bfloat16"] / GIB:.2f} GiB with bfloat16 '
        f'({sizes["bfloat16"] / sizes["float32"]:.2f})', flush=True)


def giant(batch):
  """Part 2, run in a process that sees 8 CPU devices."""
  print(f'\nGiant presets, batch {batch} (global), 224 px, float32, '
        f'{jax.device_count()} simulated devices:\n{HEADER}')
  for name, tuning, remat, mp, frozen in GIANT:
    start = time.perf_counter()
    peak, m, gflops = step_memory(name, tuning, remat, batch, mp, SCHEDULERS['memory'], frozen)
    mesh = f'{jax.device_count() // mp}x{mp}'
    frozen_label = ' frozen=bf16' if frozen == 'bfloat16' else ''
    print(row(f'{name} {tuning} remat={remat}{frozen_label} mesh={mesh}', peak, m, gflops,
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
  print(machine.describe())
  peaks = vit_b16(args.batch)
  for name in ('vit_b16', 'vit_G14'):
    frozen_weights(name)
  if not args.skip_giant:
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
               JAX_PLATFORMS='cpu')
    subprocess.run([sys.executable, __file__, '--giant_only',
                    f'--giant_batch={args.giant_batch}'], env=env, check=True)
  for scheduler in SCHEDULERS:
    full = peaks['full', 'none', 'float32', scheduler]
    ratios = [f'remat={r} {peaks["adaptformer", r, "float32", scheduler] / full:.2f}'
              for r in ('none', 'block', 'dots')]
    ratios.append('remat=dots frozen=bf16 '
                  f'{peaks["adaptformer", "dots", "bfloat16", scheduler] / full:.2f}')
    print(f'adapter/full, scheduler={scheduler}: ' + ', '.join(ratios))
  full = peaks['full', 'none', 'float32', 'memory']
  print(f'ratio: {peaks["adaptformer", "dots", "float32", "memory"] / full:.2f}')


if __name__ == '__main__':
  main()
