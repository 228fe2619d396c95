"""Food-101 with the official AdaptFormer recipe; the argument picks the tuning method.

  python -m adaptformer_jax.main --config configs/food101.py:adaptformer \
      --config.init_from=mae_pretrain_vit_b.pth --workdir runs/food101_adaptformer
"""
from adaptformer_jax import recipes


def get_config(arg=None):
  return recipes.official('food101', 'food101', 101, arg, eval_split='validation')
