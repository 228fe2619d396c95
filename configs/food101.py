"""Food-101 with the official AdaptFormer image recipe (recipes.official_image);
the argument picks the tuning method, or METHOD,PRESET also another backbone preset.

  python -m adaptformer_jax.main --config configs/food101.py:adaptformer \
      --config.init_from=mae_pretrain_vit_b.pth --workdir runs/food101_adaptformer
"""
from adaptformer_jax import recipes


def get_config(arg=None):
  return recipes.official_image('food101', 101, arg, data_name='food101',
                                eval_split='validation')  # tfds food101 has no 'test'
