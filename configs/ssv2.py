"""Something-Something-v2 with the official video AdaptFormer recipe (174 classes).

  python -m adaptformer_jax.main --config configs/ssv2.py:adaptformer \
      --config.init_from=checkpoint.pth --config.data.video_root=/data/ssv2 \
      --config.data.train_split=/data/ssv2/train.csv \
      --config.data.eval_split=/data/ssv2/val.csv --workdir runs/ssv2_adaptformer

The paper reports 59.02 top-1 with 1.19 M adapter parameters (VideoMAE ViT-B/16
pre-trained on Kinetics-400). Left/right matter in SSv2 labels, so no flip.
"""
from adaptformer_jax import recipes


def get_config(arg=None):
  return recipes.official_video('ssv2', 174, arg)
