"""The VTAB-1k protocol (docs/vtab.md) for any tuning method and image backbone preset.

  python -m adaptformer_jax.vtab --config configs/vtab.py:adaptformer,vit_b16_in21k_orig \
      --config.init_from=ViT-B_16.npz --config.data.data_dir=~/tensorflow_datasets \
      --workdir runs/vtab_adaptformer

The argument is METHOD or METHOD,PRESET (default preset vit_b16_in21k_orig, the original
ViT-B/16 ImageNet-21k checkpoint the literature's tables use). Per task: 224 px by a
direct resize, no augmentation, the backbone's own normalisation; AdamW, cosine with
10 warmup epochs, 100 epochs of batch 64, a linear head. The learning rate and weight
decay are chosen on val200 (trained on train800) over `vtab.learning_rates` x
`vtab.weight_decays`, or read per task from `vtab.hparams_file`; then each of
`vtab.seeds` trains on train800val200 and is tested once, after its last step.
"""
from adaptformer_jax import models
from adaptformer_jax import recipes
from adaptformer_jax.vtab import protocol


def get_config(arg=None):
  method, backbone = recipes.method_and_backbone(arg, 'vtab', default='vit_b16_in21k_orig')
  # The method sizes of the V-PETL Bench runs the report compares with: AdaptFormer of
  # bottleneck 8 (its topN), scale 1.0, LayerNorm in, dropout 0.1
  # (ImageClassification/models/vision_transformer_adaptformer.py); LoRA rank 8 (its
  # 0.29 M parameters); 10 VPT tokens (VPT's per-task lengths vary: set yours).
  # pre_logits=0: the head sits on the final norm's class token, the representation layer
  # of the ImageNet-21k file is dropped (vit_jax fine-tuning, timm, V-PETL Bench).
  model = models.preset(
      backbone, num_classes=0, image_size=224, head='linear', tuning=method, pre_logits=0,
      adapter=dict(bottleneck=8, scale=1.0, layernorm='in', dropout=0.1, placement='parallel'),
      vpt=dict(num_tokens=10), lora=dict(rank=8, alpha=8.0))
  config = recipes.base(model, 'vtab:cifar', train_split='train800', eval_split='val200',
                        train_pp='resize', eval_pp='resize',
                        normalize=protocol.normalization(backbone), shuffle_buffer=1000)
  config.batch_size = 64
  config.eval_batch_size = 200
  config.num_epochs = 100
  config.warmup_epochs = 10
  config.optimizer.name = 'adamw'
  config.optimizer.momentum = 0.0
  config.optimizer.weight_decay = 1e-4   # set per run from the grid
  config.optimizer.base_lr = 4e-3        # set per run: base_lr = learning_rate * 256 / batch
  config.checkpoint_every_steps = 300
  config.keep_checkpoints = 1
  config.vtab = protocol.defaults()
  return config
