"""Does a merged model cost what the plain ViT costs?

For each mergeable tuning method: the eval forward pass of the model as trained
(method parameters and their extra ops), of the same model merged into plain weights
(`adaptformer_jax.merge_tuning`), and of the plain ViT, all jitted and timed in
alternation so they see the same machine load. The merged model is a plain ViT config,
so its program should be the plain ViT's: that is checked (StableHLO text equal)
and printed. The last line is the median ratio merged / plain over the methods.

  python benchmarks/merged_vs_plain.py [--preset vit_s16] [--batch 8] [--repeats 7]
"""
import argparse
import statistics

import jax
import numpy as np

import machine
import steps
from adaptformer_jax import merge_tuning
from adaptformer_jax import models
from adaptformer_jax.models import merge


def forward(model_cfg, variables, images):
  """(run(), its StableHLO without source locations) of the jitted eval forward pass."""
  model = models.build(model_cfg)
  lowered = jax.jit(model.apply).lower(variables, images)
  compiled = lowered.compile()

  def run():
    jax.block_until_ready(compiled(variables, images))

  return run, lowered.as_text(debug_info=False)


def randomized(variables, seed):
  """Non-zero method parameters (zero-initialised ones would merge trivially)."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='vit_s16')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args()
  methods = [m for m in merge.RULES if m not in ('full', 'linear')]
  images = jax.numpy.asarray(steps.synthetic_batch(args.batch)[0])
  plain_cfg = steps.model_config(args.preset, tuning='full')
  plain_vars = models.build(plain_cfg).init(jax.random.key(0), images[:1])
  timed = {}
  timed['plain'], plain_hlo = forward(plain_cfg, plain_vars, images)
  same_program = {}
  for m in methods:
    cfg = steps.model_config(args.preset, tuning=m)
    variables = randomized(models.build(cfg).init(jax.random.key(0), images[:1]), seed=1)
    timed[f'{m} as trained'], _ = forward(cfg, variables, images)
    merged_vars, merged_cfg = merge_tuning(variables, cfg)
    timed[f'{m} merged'], hlo = forward(merged_cfg, merged_vars, images)
    same_program[m] = hlo == plain_hlo
  print(machine.describe())
  print(f'{args.preset} eval forward, batch {args.batch}, 224 px, float32')
  medians, samples = steps.interleaved_medians(timed, args.repeats)
  for name, seconds in medians.items():
    spread = np.std(samples[name]) * 1e3
    print(f'{name:>24}: {seconds * 1e3:8.1f} ms (std {spread:.1f} ms, '
          f'{seconds / medians["plain"]:.2f}x plain)')
  for m in methods:
    print(f'{m}: merged program identical to the plain ViT\'s: {same_program[m]}')
  ratio = statistics.median(medians[f'{m} merged'] / medians['plain'] for m in methods)
  print(f'ratio: {ratio:.2f}')


if __name__ == '__main__':
  main()
