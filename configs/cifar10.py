"""cifar10 with the official AdaptFormer recipe; the argument picks the tuning method.

  python -m adaptformer_jax.main --config configs/cifar10.py:adaptformer \
      --config.init_from=mae_pretrain_vit_b.pth --workdir runs/cifar10_adaptformer
"""
from adaptformer_jax import recipes


def get_config(arg=None):
  return recipes.official('cifar10', 'cifar10', 10, arg)
