"""What `configs/*.py` share: the tuning-method argument, the training loop's defaults,
and the official AdaptFormer recipes (image and video) that several configs run on
their own datasets.
"""
from typing import Any

import ml_collections

from adaptformer_jax import models
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.models import tuning


def method_arg(arg: str | None, config_name: str) -> str:
  """The tuning method named by a config file's argument (`configs/NAME.py:METHOD`)."""
  if not arg:
    raise ConfigError(f'configs/{config_name}.py needs a tuning method: '
                      f'configs/{config_name}.py:METHOD with METHOD one of '
                      f"{', '.join(tuning.METHODS)} (or a '+' combination).")
  if ',' in arg:  # METHOD,PRESET of a config that fixes its backbone
    raise ConfigError(f'configs/{config_name}.py:{arg}: this config takes no backbone '
                      f'preset; pass configs/{config_name}.py:METHOD.')
  tuning.parse(arg)
  return arg


def method_and_backbone(arg: str | None, config_name: str,
                        default: str = 'vit_b16') -> tuple[str, str]:
  """`configs/NAME.py:METHOD` or `:METHOD,PRESET`: the tuning method and the backbone
  preset, so a recipe runs on another family's backbone (`adaptformer,vit_b14_dinov2`)."""
  method, _, backbone = (arg or '').partition(',')
  return method_arg(method, config_name), backbone or default


def base(model_cfg: ml_collections.ConfigDict, data_name: str,
         **data: Any) -> ml_collections.ConfigDict:
  """Everything a run needs, with the training loop's defaults."""
  config = ml_collections.ConfigDict()
  config.model = model_cfg
  config.data = ml_collections.ConfigDict(dict(
      name=data_name, data_dir=ml_collections.FieldReference(None, field_type=str),
      train_split='train', eval_split='test',
      train_pp='random_resized_crop|flip', eval_pp='resize_center_crop',
      normalize='imagenet', shuffle_buffer=50_000,
      # folder:PATH only: the share of each class held out when PATH has no val/ folder,
      # and the share of undecodable images that is skipped (more is an error).
      val_fraction=0.1, max_unreadable_fraction=0.01,
      # Video models: temporal clips x spatial crops per eval video, logits averaged
      # (the official test_num_segment x test_num_crop); 1 x 1 is one central view.
      eval_clips=1, eval_crops=1))
  config.data.update(data)
  # Path of pretrained weights (.pth/.npz/.safetensors/orbax dir); '' = random init.
  config.init_from = ''
  # Parameter regexes that keep their fresh init even when init_from has them.
  config.init_dont_load = ()
  config.seed = 0
  config.batch_size = 1024        # effective batch per optimizer update
  config.accum_steps = 1          # micro-batches per update (optax.MultiSteps)
  config.model_parallel = 1       # devices sharing each replica's big kernels (sharding.PARTITION_RULES)
  config.eval_batch_size = 256
  config.num_epochs = 100
  config.num_train_steps = -1     # optimizer updates; > 0 overrides num_epochs
  config.warmup_epochs = 20
  config.warmup_steps = -1        # >= 0 overrides warmup_epochs
  config.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', momentum=0.9, weight_decay=0.0,
      base_lr=0.1,                # lr = base_lr * batch_size / 256 (official scaling)
      label_smoothing=0.0))
  config.nonfinite = 'stop'       # 'stop' | 'skip': what a NaN/Inf loss or gradient does
  config.log_every_steps = 20
  config.eval_every_steps = 0     # 0: evaluate once, at the end
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.progress = True
  return config


def official_image(config_name: str, num_classes: int, arg: str | None, *, data_name: str,
                   eval_split: str = 'test') -> ml_collections.ConfigDict:
  """The official image AdaptFormer recipe (the official code and the paper's image tables).

  MAE ViT-B/16 (or the preset of `configs/NAME.py:METHOD,PRESET`) with its
  BatchNorm + linear head, 224 px; the official method sizes: adapters of
  bottleneck 64, scale 0.1, dropout 0.1, parallel to the MLP; one VPT token;
  LoRA rank 8, alpha 8. RandomResizedCrop + flip, ImageNet normalization. SGD
  momentum 0.9, wd 0, lr = base_lr x batch/256 with base_lr 0.1 and batch 1024
  (the official 8 GPUs x 128), 100 epochs, 20 warmup, cosine. Full fine-tuning
  diverges at the adapters' rate; MAE's fine-tuning recipe uses a far lower one,
  base_lr 0.001.

  `data_name` is the tfds dataset (or 'folder:'), trained on its 'train' split and
  evaluated on `eval_split`.
  """
  method, backbone = method_and_backbone(arg, config_name)
  model = models.preset(
      backbone, num_classes=num_classes, image_size=224, head='bn_linear', tuning=method,
      adapter=dict(bottleneck=64, scale=0.1, dropout=0.1, placement='parallel'),
      vpt=dict(num_tokens=1), lora=dict(rank=8, alpha=8.0))
  config = base(model, data_name, train_split='train', eval_split=eval_split,
                train_pp='random_resized_crop|flip', eval_pp='resize_center_crop',
                normalize='imagenet')
  config.batch_size = 1024
  config.num_epochs = 100
  config.warmup_epochs = 20
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.0
  config.optimizer.base_lr = 0.001 if method == 'full' else 0.1
  return config


def official_video(config_name: str, num_classes: int, arg: str | None,
                   data_name: str = 'video_list') -> ml_collections.ConfigDict:
  """The official video AdaptFormer recipe (main_video.py and its README command).

  VideoMAE ViT-B/16 backbone, BN+linear head, and fc_norm trained too (the
  official script sets its requires_grad), SGD momentum 0.9, wd 0, lr 0.1 x
  batch/256 with batch 1024 (64 GPUs x 16), 90 epochs, 10 warmup, cosine. Clips
  are main_video.py's default 8 frames 4 apart (the paper's runs), though the
  VideoMAE backbones are pre-trained on 16: the fixed sinusoid table is
  recomputed for 4 x 14 x 14 tokens, and half the tokens halve the cost; set
  model.num_frames=16 to match pre-training. Training clips: dense sampling and
  GroupMultiScaleCrop without flip for both datasets (the official training set
  is VideoMAE's pre-training loader). Eval: short side 224, then main_video.py's
  default test views, 4 temporal clips (test_num_segment) x 3 crops along the
  longer side (test_num_crop), logits averaged per video as its `merge` does
  (VideoMAE's own scripts use 2 x 3 on SSv2, 5 x 3 on Kinetics and UCF101);
  eval_batch_size counts videos, 16 x 12 views a step.

  `data_name` 'video_list': data.train_split / eval_split are `<path> <label>`
  lists (train.csv, val.csv); else a prepared tfds video dataset (e.g.
  'ucf101/ucf101_1_256') with its 'train' and 'test' splits.
  """
  method = method_arg(arg, config_name)
  model = models.preset('videomae_b16', num_classes=num_classes, head='bn_linear',
                        tuning=method, num_frames=8, tubelet=2, image_size=224)
  with model.ignore_type():
    model.trainable = tuning.parse(method).trainable + ('fc_norm/.*',)
  config = base(model, data_name, train_pp='multi_scale_crop',
                eval_pp='short_side_center_crop', normalize='imagenet',
                shuffle_buffer=10_000)
  config.data.update(dict(frame_sampling='dense', frame_stride=4, eval_clips=4, eval_crops=3))
  if data_name == 'video_list':
    config.data.update(dict(num_classes=num_classes, video_root='',
                            train_split='train.csv', eval_split='val.csv'))
  config.num_epochs = 90
  config.warmup_epochs = 10
  config.eval_batch_size = 16
  return config
