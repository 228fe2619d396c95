"""CIFAR-10 with the official AdaptFormer recipe;
the argument picks the tuning method, or METHOD,PRESET also another backbone preset.

  python -m adaptformer_jax.main --config configs/cifar10.py:adaptformer \
      --config.init_from=mae_pretrain_vit_b.pth --workdir runs/cifar10_adaptformer

The recipe of the official code (and the paper's image tables): MAE ViT-B/16 with
its BatchNorm + linear head, 224 px, SGD on a warmup-cosine schedule.
"""
from adaptformer_jax import models
from adaptformer_jax import recipes


def get_config(arg=None):
  method, backbone = recipes.method_and_backbone(arg, 'cifar10')
  model = models.preset(
      backbone, num_classes=10, image_size=224, head='bn_linear', tuning=method,
      adapter=dict(bottleneck=64, scale=0.1, dropout=0.1, placement='parallel'),
      vpt=dict(num_tokens=1), lora=dict(rank=8, alpha=8.0))
  config = recipes.base(
      model, data_name='cifar10', train_split='train', eval_split='test',
      train_pp='random_resized_crop|flip', eval_pp='resize_center_crop', normalize='imagenet')
  config.batch_size = 1024  # the official 8 GPUs x 128
  config.num_epochs = 100
  config.warmup_epochs = 20
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.0
  # lr = base_lr * batch_size / 256. Full fine-tuning diverges at the adapters' rate;
  # MAE's fine-tuning recipe uses a far lower one.
  config.optimizer.base_lr = 0.001 if method == 'full' else 0.1
  return config
