"""Is the input pipeline fast enough? Images/s of the pipeline alone vs. a train step.

Feeds the offline `sklearn_digits` dataset through the official train
preprocessing (random_resized_crop|flip to 224 px) and times it, then times the
training loop's own jitted ViT-Ti/16 AdaptFormer step at the same batch size.
A last-line `ratio` below 1 means training on this host would wait for data.

  python benchmarks/input_pipeline.py [--batch 32] [--data_dir DIR]
"""
import argparse
import tempfile
import time

import jax

from adaptformer_jax import data
from adaptformer_jax import models
from adaptformer_jax import recipes
from adaptformer_jax import sharding
from adaptformer_jax import train
import machine


def images_per_second(step, batch, warmup, iters):
  """Calls `step()` (which blocks on its result) warmup + iters times."""
  for _ in range(warmup):
    step()
  start = time.perf_counter()
  for _ in range(iters):
    step()
  return batch * iters / (time.perf_counter() - start)


def train_step_rate(trainer, batch, batch_size, iters):
  """Examples/s of the training loop's own jitted step (`trainer`'s) on `batch`."""
  step_fn, state = trainer.jit_train_step(), trainer.initial_state()

  def step():
    nonlocal state
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics['loss'])

  return images_per_second(step, batch_size, 1, iters)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--pipeline_batches', type=int, default=30)
  parser.add_argument('--train_steps', type=int, default=5)
  parser.add_argument('--data_dir', default=None,
                      help='tfds data_dir (default: a fresh temporary one)')
  args = parser.parse_args()
  data_dir = args.data_dir or tempfile.mkdtemp(prefix='tfds_')
  print(machine.describe())

  model = models.preset('vit_ti16', num_classes=10, tuning='adaptformer',
                        image_size=args.image_size)
  config = recipes.base(model, 'sklearn_digits/all', data_dir=data_dir)
  config.batch_size = args.batch
  info = data.info(config.data)  # builds the dataset on first use
  trainer = train.Trainer(train.Run(config), info.num_train)
  batches = data.train_iterator(
      config.data, image_size=args.image_size, global_batch=args.batch,
      sharding=sharding.batch_sharding(trainer.run.mesh), seed=0)

  pipeline = images_per_second(
      lambda: jax.block_until_ready(next(batches)), args.batch, 5, args.pipeline_batches)
  print(f'pipeline: {pipeline:.1f} images/s ({jax.device_count()} {jax.default_backend()} '
        f'device(s), batch {args.batch}, {args.image_size} px, {config.data.train_pp})')

  stepping = train_step_rate(trainer, next(batches), args.batch, args.train_steps)
  print(f'train step: {stepping:.1f} images/s (ViT-Ti/16 adaptformer, train.Trainer)')
  print(f'ratio: {pipeline / stepping:.2f}')


if __name__ == '__main__':
  main()
