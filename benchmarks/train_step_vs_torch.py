"""Is our AdaptFormer train step as fast as a well-written PyTorch one?

ViT-B/16, 224 px, SGD with momentum, AdaptFormer (official defaults: bottleneck 64,
scale 0.1, dropout 0.1, parallel to the MLP) with a frozen backbone. Ours is the
training loop's own jitted step (`train.Trainer(runtime.Run(...)).jit_train_step()`); PyTorch's is
written as a performance-minded user would: fused qkv, F.scaled_dot_product_attention,
requires_grad=False on the backbone, momentum SGD on the trainable leaves only, and
torch.compile when it is faster than eager. The steps alternate, so all see the
same machine load; the last line is our median step time / PyTorch's best median.
For GPU figures (MFU, PyTorch on CUDA) see gpu_check.py.

  python benchmarks/train_step_vs_torch.py [--batch 8] [--repeats 7] [--dtype bfloat16]
"""
import argparse
import time

import machine
import steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--no_compile', action='store_true', help='skip torch.compile')
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  print(machine.describe())
  print(f'ViT-B/16 AdaptFormer train step, batch {args.batch}, 224 px, {args.dtype}; '
        f'torch {torch.__version__} ({torch.get_num_threads()} threads)', flush=True)
  ours, flops = steps.jax_step('adaptformer', args.batch, args.dtype)
  model_cfg = steps.model_config(dtype=args.dtype)
  timed = {'adaptformer_jax': ours, 'torch eager': steps.torch_step(model_cfg, args.batch)}
  if not args.no_compile:
    start = time.perf_counter()
    compiled = steps.torch_step(model_cfg, args.batch, compile_backend='inductor')
    compiled()
    print(f'torch.compile: first step {time.perf_counter() - start:.0f} s', flush=True)
    timed['torch compiled'] = compiled
  medians, samples = steps.interleaved_medians(timed, args.repeats)
  for name, seconds in medians.items():
    steps.report(name, seconds, args.batch, flops, samples[name])
  torch_best = min(v for k, v in medians.items() if k.startswith('torch'))
  print(f'XLA cost analysis: {flops / 1e9:.0f} GFLOP per step')
  print(f'ratio: {medians["adaptformer_jax"] / torch_best:.2f}')


if __name__ == '__main__':
  main()
