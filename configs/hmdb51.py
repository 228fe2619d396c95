"""HMDB51 with the official video AdaptFormer recipe (51 classes, split 1).

  python -m adaptformer_jax.main --config configs/hmdb51.py:adaptformer \
      --config.init_from=checkpoint.pth --config.data.video_root=/data/hmdb51 \
      --config.data.train_split=/data/hmdb51/train.csv \
      --config.data.eval_split=/data/hmdb51/val.csv --workdir runs/hmdb51_adaptformer

The paper reports 55.69 top-1 (VideoMAE ViT-B/16 pre-trained on Kinetics-400).
Training uses the official loader's crop without flip, as for SSv2.
"""
from adaptformer_jax import recipes


def get_config(arg=None):
  return recipes.official_video('hmdb51', 51, arg)
