"""Pre-trains the demo backbone on the offline `glyphs` corpus (`make backbone`).

A masked autoencoder (He et al., 2022; adaptformer_jax/models/mae.py), as the
AdaptFormer paper's image backbone: 107 rendered characters (no digits), 16 px,
labels unused. The encoder ships as adaptformer_jax/assets/demo_backbone.safetensors;
`make demo` adapts it to scikit-learn's handwritten digits.

  python -m adaptformer_jax.main --config configs/backbone.py --workdir runs/backbone
"""
import ml_collections

from adaptformer_jax import models
from adaptformer_jax import recipes


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  model = models.preset('vit_ti16', width=128, depth=6, num_heads=4, mlp_dim=512,
                        patch_size=4, image_size=16, num_classes=107, tuning='full',
                        pool='gap')
  # MAE's recipe, scaled down: 75% of the 16 patches hidden, a narrow 2-block decoder.
  model.mae = ml_collections.ConfigDict(dict(
      mask_ratio=0.75, decoder_width=64, decoder_depth=2, decoder_heads=2))
  config = recipes.base(model, 'glyphs', train_pp='resize', eval_pp='resize',
                        normalize='none')
  config.batch_size = 256
  config.eval_batch_size = 500
  config.num_train_steps = 10_000
  config.warmup_steps = 500
  config.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', momentum=0.9, weight_decay=0.05,
      base_lr=0.0015,  # lr = base_lr * batch_size / 256
      label_smoothing=0.0))
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  return config
