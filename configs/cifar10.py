"""CIFAR-10 with the official AdaptFormer image recipe (recipes.official_image);
the argument picks the tuning method, or METHOD,PRESET also another backbone preset.

  python -m adaptformer_jax.main --config configs/cifar10.py:adaptformer \
      --config.init_from=mae_pretrain_vit_b.pth --workdir runs/cifar10_adaptformer
"""
from adaptformer_jax import recipes


def get_config(arg=None):
  return recipes.official_image('cifar10', 10, arg, data_name='cifar10')
