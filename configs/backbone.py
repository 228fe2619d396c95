"""Pre-trains the demo backbone on the offline `glyphs` corpus (`make backbone`).

107 rendered characters (no digits), 16 px, every parameter trains. The result
ships as adaptformer_jax/assets/demo_backbone.safetensors; `make demo` adapts it
to scikit-learn's handwritten digits.

  python -m adaptformer_jax.main --config configs/backbone.py --workdir runs/backbone
"""
import ml_collections

from adaptformer_jax import models
from adaptformer_jax import recipes


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  model = models.preset('vit_ti16', width=128, depth=6, num_heads=4, mlp_dim=512,
                        patch_size=4, image_size=16, num_classes=107, tuning='full')
  config = recipes.base(model, 'glyphs', train_pp='resize', eval_pp='resize',
                        normalize='none')
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_train_steps = 2500
  config.warmup_steps = 150
  config.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', momentum=0.9, weight_decay=0.05,
      base_lr=0.001,   # lr = base_lr * batch_size / 256
      label_smoothing=0.1))
  config.log_every_steps = 50
  config.checkpoint_every_steps = 250
  return config
