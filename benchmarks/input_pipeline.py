"""Is the input pipeline fast enough? Images/s of the pipeline alone vs. a train step.

Feeds two sources through the official train preprocessing
(random_resized_crop|flip to 224 px) and times them: the offline `sklearn_digits`
tfds dataset, and a folder of JPEG photos (`folder:PATH`, 500x375 like a typical
photo dataset, generated here) that is decoded from disk at every step. Then
times the training loop's own jitted ViT-Ti/16 AdaptFormer step at the same batch
size. Each row's ratio is its images/s over the step's; below 1 training would
wait for data. The last line is the smaller of the two ratios (goal >= 5).

  python benchmarks/input_pipeline.py [--batch 32] [--data_dir DIR]
"""
import argparse
import os
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from adaptformer_jax import data
from adaptformer_jax import models
from adaptformer_jax import recipes
from adaptformer_jax import runtime
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


def jpeg_folder(root, num_images, num_classes=10, size=(500, 375)):
  """root/<class>/<i>.jpg: smooth random photos-like images at JPEG quality 90."""
  rng = np.random.default_rng(0)
  w, h = size
  for i in range(num_images):
    c = i % num_classes
    path = os.path.join(root, f'class{c}', f'{i}.jpg')
    if os.path.exists(path):
      continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    low = rng.uniform(0, 255, (h // 25, w // 25, 3)).astype(np.uint8)
    image = Image.fromarray(low).resize(size, Image.BICUBIC)
    noisy = np.asarray(image, np.int16) + rng.integers(-8, 9, (h, w, 3))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
  return root


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--pipeline_batches', type=int, default=30)
  parser.add_argument('--train_steps', type=int, default=5)
  parser.add_argument('--folder_images', type=int, default=600)
  parser.add_argument('--data_dir', default=None,
                      help='tfds data_dir (default: a fresh temporary one)')
  parser.add_argument('--folder', default=None,
                      help='where to write the JPEG folder (default: a temporary one)')
  args = parser.parse_args()
  data_dir = args.data_dir or tempfile.mkdtemp(prefix='tfds_')
  folder = jpeg_folder(args.folder or tempfile.mkdtemp(prefix='jpegs_'), args.folder_images)
  print(machine.describe())

  model = models.preset('vit_ti16', num_classes=10, tuning='adaptformer',
                        image_size=args.image_size)
  config = recipes.base(model, 'sklearn_digits/all', data_dir=data_dir)
  config.batch_size = args.batch
  info = data.info(config.data)  # builds the dataset on first use
  trainer = train.Trainer(runtime.Run(config), info.num_train)
  batch_sharding = sharding.batch_sharding(trainer.run.mesh)

  rates = {}
  for source in ('sklearn_digits/all', f'folder:{folder}'):
    config.data.name = source
    batches = data.train_iterator(
        config.data, image_size=args.image_size, global_batch=args.batch,
        sharding=batch_sharding, seed=0)  # a folder's images are checked once, here
    rates[source] = images_per_second(
        lambda: jax.block_until_ready(next(batches)), args.batch, 5, args.pipeline_batches)
    print(f'pipeline {source.split(":")[0]}: {rates[source]:.1f} images/s '
          f'({jax.device_count()} {jax.default_backend()} device(s), batch {args.batch}, '
          f'{args.image_size} px, {config.data.train_pp})')

  stepping = train_step_rate(trainer, next(batches), args.batch, args.train_steps)
  print(f'train step: {stepping:.1f} images/s (ViT-Ti/16 adaptformer, train.Trainer)')
  for source, rate in rates.items():
    print(f'{source.split(":")[0]} / step: {rate / stepping:.2f}')
  print(f'load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)')
  print(f'ratio: {min(rates.values()) / stepping:.2f}')


if __name__ == '__main__':
  main()
