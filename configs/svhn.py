"""svhn_cropped with the official AdaptFormer recipe; the argument picks the tuning method.

  python -m adaptformer_jax.main --config configs/svhn.py:adaptformer \
      --config.init_from=mae_pretrain_vit_b.pth --workdir runs/svhn_adaptformer
"""
from adaptformer_jax import recipes


def get_config(arg=None):
  return recipes.official('svhn', 'svhn_cropped', 10, arg)
