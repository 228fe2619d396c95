"""How much cheaper is an AdaptFormer step than a full fine-tuning step?

Both are the training loop's own jitted step (ViT-B/16, batch 8, 224 px, SGD with
momentum), timed in alternation so they see the same machine load. With a frozen
backbone autodiff skips every weight gradient but the adapters' and the head's,
so the FLOP ratio is about 2/3 (XLA's cost analysis prints both); the last line is
the measured step-time ratio, adapter / full (no remat). `--remat` also times
the model.remat policies.

  python benchmarks/adapter_vs_full.py [--batch 8] [--repeats 7] [--remat]
"""
import argparse

import machine
import steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--remat', action='store_true',
                      help="also time remat='dots' (both) and remat='block' (adapters)")
  args = parser.parse_args()
  variants = [('full', 'none'), ('adaptformer', 'none')]
  if args.remat:
    variants += [('full', 'dots'), ('adaptformer', 'dots'), ('adaptformer', 'block')]
  timed, flops = {}, {}
  for tuning, remat in variants:
    name = f'{tuning} remat={remat}'
    timed[name], flops[name] = steps.jax_step(tuning, args.batch, args.dtype, remat)
  print(machine.describe())
  print(f'ViT-B/16 train step, batch {args.batch}, 224 px, {args.dtype}, SGD momentum')
  medians, samples = steps.interleaved_medians(timed, args.repeats)
  for name, seconds in medians.items():
    steps.report(name, seconds, args.batch, flops[name], samples[name])
  full, adapter = 'full remat=none', 'adaptformer remat=none'
  print(f'XLA cost analysis: {flops[adapter] / 1e9:.0f} / {flops[full] / 1e9:.0f} GFLOP '
        f'= {flops[adapter] / flops[full]:.2f}')
  if args.remat:
    print(f"with remat='dots' on both: "
          f"{medians['adaptformer remat=dots'] / medians['full remat=dots']:.2f}")
  print(f'ratio: {medians[adapter] / medians[full]:.2f}')


if __name__ == '__main__':
  main()
