"""Your own images: a folder of class folders, with the official ViT-B/16 AdaptFormer recipe;
the argument picks the tuning method, or METHOD,PRESET also another backbone preset.

  python -m adaptformer_jax.main --config configs/folder.py:adaptformer \
      --config.data.name=folder:PATH --config.init_from=mae_pretrain_vit_base.pth \
      --workdir runs/my_images

PATH holds PATH/<class>/<image> (or PATH/train/<class>/... and PATH/val/<class>/...,
else PATH/test/<class>/...); the class names are the folder names, sorted. Without
PATH/val or PATH/test, `data.val_fraction` of each class is held out.
model.num_classes = 0 takes the number of class folders.
"""
from adaptformer_jax import models
from adaptformer_jax import recipes


def get_config(arg=None):
  method, backbone = recipes.method_and_backbone(arg, 'folder')
  model = models.preset(
      backbone, num_classes=1, image_size=224, head='bn_linear', tuning=method,
      adapter=dict(bottleneck=64, scale=0.1, dropout=0.1, placement='parallel'),
      vpt=dict(num_tokens=1), lora=dict(rank=8, alpha=8.0))
  model.num_classes = 0  # from the data: one output per class folder
  config = recipes.base(
      model, data_name='folder:', train_split='train', eval_split='val',
      train_pp='random_resized_crop|flip', eval_pp='resize_center_crop', normalize='imagenet',
      val_fraction=0.1, max_unreadable_fraction=0.01)
  # Folders are usually far smaller than CIFAR: a batch of 1024 could be the whole epoch.
  config.batch_size = 128
  config.eval_batch_size = 128
  config.num_epochs = 100
  config.warmup_epochs = 10
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.0
  # lr = base_lr * batch_size / 256. Full fine-tuning diverges at the adapters' rate.
  config.optimizer.base_lr = 0.001 if method == 'full' else 0.1
  return config
