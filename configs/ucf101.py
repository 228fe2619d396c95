"""UCF101 (split 1, 101 classes) from tfds, with the official video AdaptFormer recipe.

  tfds build ucf101/ucf101_1_256 --data_dir ~/tensorflow_datasets   # a connected machine
  python -m adaptformer_jax.main --config configs/ucf101.py:adaptformer \
      --config.init_from=checkpoint.pth --workdir runs/ucf101_adaptformer

The tfds dataset (features 'video': uint8 (T, 256, 256, 3) JPEG frames, 'label':
101 classes; splits 'train' and 'test', split 1's lists) goes through the same
pipeline as the annotation lists: dense 8-frame clips 4 apart, GroupMultiScaleCrop
without flip for training, 4 clips x 3 crops averaged for eval (main_video.py's
defaults, as configs/ssv2.py; VideoMAE's own UCF101 script tests 5 x 3: set
--config.data.eval_clips=5). Nothing is downloaded here: an unprepared dataset
stops with the `tfds build` command to run elsewhere. The AdaptFormer paper
reports no UCF101 number; its code supports the dataset with these settings.
"""
from adaptformer_jax import recipes


def get_config(arg=None):
  return recipes.official_video('ucf101', 101, arg, data_name='ucf101/ucf101_1_256')
