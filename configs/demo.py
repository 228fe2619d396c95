"""Offline transfer demo on scikit-learn's digits: pre-train on 0-4, adapt to 5-9.

`make demo` runs it (`python -m adaptformer_jax.demo --config configs/demo.py`); every
method gets its own learning rate (tuned, not handicapped).
"""
import ml_collections

from adaptformer_jax import models
from adaptformer_jax import recipes


def get_config(arg=None):
  del arg
  model = models.preset('vit_ti16', width=64, depth=4, num_heads=4, mlp_dim=256,
                        patch_size=4, image_size=16, num_classes=5, tuning='full',
                        adapter=dict(bottleneck=8), vpt=dict(num_tokens=4))
  config = recipes.base(model, 'sklearn_digits/classes_5to9',
                        train_pp='pad_crop', eval_pp='resize', normalize='none')
  config.batch_size = 64
  config.eval_batch_size = 128
  config.num_train_steps = 300
  config.warmup_steps = 30
  config.checkpoint_every_steps = 1000
  config.log_every_steps = 50
  config.init_dont_load = ('head/.*',)
  config.pretrain = ml_collections.ConfigDict(dict(
      data_name='sklearn_digits/classes_0to4', num_train_steps=1500, warmup_steps=100,
      base_lr=0.4))
  # Adaptation learning rate (per 256 images) for each method, the best of a sweep:
  # full {0.05, 0.1, 0.2, 0.4}; adaptformer, vpt_deep {0.4, 1, 2, 4}; linear
  # {0.4, 2, 8}; lora {0.4, 1}.
  config.methods = ml_collections.ConfigDict(dict(
      adaptformer=2.0, vpt_deep=2.0, lora=1.0, linear=2.0, full=0.2))
  return config
