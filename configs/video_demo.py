"""Offline video transfer on `moving_digits`: which digit moves -> where it moves.

A 4-block VideoMAE-style ViT on 8-frame 32 px clips is pre-trained to name the
moving digit, a task one frame answers, then adapted to the direction of motion,
which no single frame shows. A linear probe must read the direction off frozen
features trained to ignore it; AdaptFormer's adapters (and full fine-tuning) can
re-route the blocks' attention across time. No flips: a flip would swap 'left'
and 'right' (the SSv2 rule).

  python -m adaptformer_jax.main --config configs/video_demo.py:backbone \
      --workdir runs/video_demo/backbone
  python -m adaptformer_jax.demo --config configs/video_demo.py --workdir runs/video_demo
"""
import ml_collections

from adaptformer_jax import models
from adaptformer_jax import recipes

BACKBONE_STEPS = 400
BACKBONE = f'runs/video_demo/backbone/checkpoints/{BACKBONE_STEPS}'


def get_config(arg=None) -> ml_collections.ConfigDict:
  # 16 px patches of 2-frame tubelets: 4 x 2 x 2 = 16 tokens a clip, cheap on a CPU.
  model = models.preset('videomae_s16', width=64, depth=4, num_heads=4, mlp_dim=256,
                        patch_size=16, image_size=32, num_frames=8, tubelet=2,
                        num_classes=4, tuning='adaptformer', adapter=dict(bottleneck=16))
  config = recipes.base(model, 'moving_digits/direction', train_pp='resize',
                        eval_pp='resize', normalize='none', shuffle_buffer=2048)
  config.batch_size = 64
  config.eval_batch_size = 128
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 1
  config.log_every_steps = 50
  config.progress = False
  if arg == 'backbone':
    # Every parameter trains on the digit labels; base_lr 0.4 and 1.5 stay at
    # chance for 400 steps, 0.1 learns.
    config.model.tuning = 'full'
    config.model.num_classes = 10
    config.data.name = 'moving_digits/digit'
    config.num_train_steps = BACKBONE_STEPS
    config.warmup_steps = 40
    config.optimizer.base_lr = 0.1
    return config
  config.init_from = BACKBONE
  config.init_dont_load = ('head/.*',)  # a new task: the 4-class head starts fresh
  config.num_train_steps = 200
  config.warmup_steps = 20
  config.seeds = (0,)
  # SGD learning rate per 256 clips for each method (not swept).
  config.methods = ml_collections.ConfigDict(dict(linear=2.0, adaptformer=2.0, full=0.2))
  config.sweep = ml_collections.ConfigDict(dict(
      seed=0, train_split='train[:80%]', val_split='train[80%:]',
      base_lrs=dict(linear=(0.5, 2.0, 8.0), adaptformer=(0.5, 2.0, 8.0),
                    full=(0.05, 0.2, 0.8))))
  return config
