"""Your own images: a folder of class folders, with the official ViT-B/16 AdaptFormer recipe.

  python -m adaptformer_jax.main --config configs/folder.py:adaptformer \
      --config.data.name=folder:PATH --config.init_from=mae_pretrain_vit_base.pth \
      --workdir runs/my_images

PATH holds PATH/<class>/<image> (or PATH/train/<class>/... and PATH/val/<class>/...);
the class names are the folder names, sorted. Without PATH/val, `data.val_fraction` of
each class is held out. `model.num_classes` = 0 takes the number of class folders.
"""
from adaptformer_jax import recipes


def get_config(arg=None):
  config = recipes.official('folder', 'folder:', 1000, arg, eval_split='val')
  config.model.num_classes = 0   # from the data: one output per class folder
  # Folders are usually far smaller than CIFAR: a batch of 1024 could be the whole
  # epoch. lr = base_lr * 128 / 256 keeps the official scaling.
  config.batch_size = 128
  config.eval_batch_size = 128
  config.num_epochs = 100
  config.warmup_epochs = 10
  return config
