"""Is video decoding fast enough? Clips/s of the video-list pipeline vs. a ViT-S video step.

Writes `--videos` mpeg4 files (`--frames` frames at 240x320, like SSv2's 240 px
height) and an official `<path> <label>` list, feeds them through the training
pipeline (PyAV decode, dense sampling of 16 frames 4 apart, GroupMultiScaleCrop)
and times it, then times the training loop's jitted `videomae_s16` AdaptFormer
step on the same clips. A last-line `ratio` below 1 means training would wait
for data on this host.

  python benchmarks/video_decode.py [--batch 4] [--image_size 224]
"""
import argparse
import os
import tempfile

import av
import jax
import numpy as np

from adaptformer_jax import data
from adaptformer_jax import models
from adaptformer_jax import recipes
from adaptformer_jax import runtime
from adaptformer_jax import sharding
from adaptformer_jax import train
from input_pipeline import images_per_second as clips_per_second  # benchmarks/ is on sys.path
from input_pipeline import train_step_rate


def write_videos(root, count, frames):
  """`count` noisy mpeg4 videos (noise keeps the decoder honest) and their list."""
  rng = np.random.default_rng(0)
  lines = []
  for i in range(count):
    path = os.path.join(root, f'{i}.mp4')
    with av.open(path, 'w') as container:
      stream = container.add_stream('mpeg4', rate=12)
      stream.height, stream.width, stream.pix_fmt = 240, 320, 'yuv420p'
      for _ in range(frames):
        frame = rng.integers(0, 255, (240, 320, 3), np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
          container.mux(packet)
      for packet in stream.encode():
        container.mux(packet)
    lines.append(f'{i}.mp4 {i % 2}')
  with open(os.path.join(root, 'train.csv'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--videos', type=int, default=16)
  parser.add_argument('--frames', type=int, default=64)
  parser.add_argument('--pipeline_batches', type=int, default=8)
  parser.add_argument('--train_steps', type=int, default=2)
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix='videos_')
  write_videos(root, args.videos, args.frames)

  model = models.preset('videomae_s16', num_classes=2, tuning='adaptformer',
                        image_size=args.image_size)
  config = recipes.base(model, 'video_list', train_pp='multi_scale_crop',
                        train_split=os.path.join(root, 'train.csv'),
                        eval_split=os.path.join(root, 'train.csv'), shuffle_buffer=64)
  config.data.update(dict(num_classes=2, video_root=root, frame_sampling='dense',
                          frame_stride=4))
  config.batch_size = args.batch
  info = data.info(config.data)
  trainer = train.Trainer(runtime.Run(config), info.num_train)
  batches = data.train_iterator(
      config.data, image_size=args.image_size, global_batch=args.batch,
      sharding=sharding.batch_sharding(trainer.run.mesh), seed=0,
      num_frames=model.num_frames)

  pipeline = clips_per_second(
      lambda: jax.block_until_ready(next(batches)), args.batch, 2, args.pipeline_batches)
  print(f'pipeline: {pipeline:.2f} clips/s ({os.cpu_count()} CPUs, batch {args.batch}, '
        f'{args.frames}-frame 240x320 mpeg4 -> {model.num_frames}x{args.image_size}px, '
        f'{config.data.train_pp})')

  stepping = train_step_rate(trainer, next(batches), args.batch, args.train_steps)
  print(f'train step: {stepping:.2f} clips/s (videomae_s16 adaptformer, '
        f'{jax.device_count()} {jax.default_backend()} device(s))')
  print(f'load: {os.getloadavg()[0]:.1f}')
  print(f'ratio: {pipeline / stepping:.2f}')


if __name__ == '__main__':
  main()
