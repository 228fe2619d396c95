"""CIFAR-10 with the original AdaptFormer notebook's recipe, for people coming from it.

32 px inputs (pad-4 random crop + flip, CIFAR mean/std), SGD lr 0.001 with weight
decay 5e-4 and 2000 warmup steps, batch 128.
"""
from adaptformer_jax import models
from adaptformer_jax import recipes


def get_config(arg=None):
  method = recipes.method_arg(arg, 'cifar10_notebook')
  model = models.preset('vit_b16', num_classes=10, tuning=method, image_size=32)
  config = recipes.base(model, 'cifar10', train_pp='pad_crop|flip', eval_pp='resize',
                        normalize='cifar')
  config.batch_size = 128
  config.optimizer.base_lr = 0.001 * 256 / config.batch_size  # lr 0.001
  config.optimizer.weight_decay = 5e-4
  config.warmup_steps = 2000
  config.num_train_steps = 20_000
  return config
