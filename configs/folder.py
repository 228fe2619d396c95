"""Your own images: a folder of class folders, with the official ViT-B/16 AdaptFormer recipe
(recipes.official_image) at a smaller batch; the argument picks the tuning method, or
METHOD,PRESET also another backbone preset.

  python -m adaptformer_jax.main --config configs/folder.py:adaptformer \
      --config.data.name=folder:PATH --config.init_from=mae_pretrain_vit_base.pth \
      --workdir runs/my_images

PATH holds PATH/<class>/<image> (or PATH/train/<class>/... and PATH/val/<class>/...,
else PATH/test/<class>/...); the class names are the folder names, sorted. Without
PATH/val or PATH/test, `data.val_fraction` of each class is held out.
model.num_classes = 0 takes the number of class folders.
"""
from adaptformer_jax import recipes


def get_config(arg=None):
  config = recipes.official_image('folder', 1, arg, data_name='folder:', eval_split='val')
  config.model.num_classes = 0  # from the data: one output per class folder
  # Folders are usually far smaller than CIFAR: a batch of 1024 could be the whole epoch.
  config.batch_size = 128
  config.eval_batch_size = 128
  config.warmup_epochs = 10
  return config
