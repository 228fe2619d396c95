"""cifar100 with the official AdaptFormer recipe; the argument picks the tuning method.

  python -m adaptformer_jax.main --config configs/cifar100.py:adaptformer \
      --config.init_from=mae_pretrain_vit_b.pth --workdir runs/cifar100_adaptformer
"""
from adaptformer_jax import recipes


def get_config(arg=None):
  return recipes.official('cifar100', 'cifar100', 100, arg)
