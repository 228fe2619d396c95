"""The preset table, each preset's default model config and the module it builds.

A model is described entirely by a ConfigDict, so the same dict drives building,
checkpoint loading, the trainable mask and the workdir's saved config.
"""
from typing import Any

import flax.linen as nn
import ml_collections

from adaptformer_jax.errors import ConfigError
from adaptformer_jax.errors import did_you_mean
from adaptformer_jax.models import mae
from adaptformer_jax.models import vit

# name: (patch, width, depth, heads, mlp_dim) -- ViT (Dosovitskiy et al.) and
# "Scaling Vision Transformers" (Zhai et al.) Table 2.
PRESETS = {
    'vit_ti16': (16, 192, 12, 3, 768),
    'vit_s16': (16, 384, 12, 6, 1536),
    'vit_b16': (16, 768, 12, 12, 3072),
    'vit_l16': (16, 1024, 24, 16, 4096),
    'vit_h14': (14, 1280, 32, 16, 5120),
    'vit_g14': (14, 1408, 40, 16, 6144),
    'vit_G14': (14, 1664, 48, 16, 8192),
    # Public checkpoint families (FAMILIES below); same table, same shapes.
    'vit_ti16_augreg': (16, 192, 12, 3, 768),
    'vit_s16_augreg': (16, 384, 12, 6, 1536),
    'vit_b16_augreg': (16, 768, 12, 12, 3072),
    'vit_l16_augreg': (16, 1024, 24, 16, 4096),
    # The original ViT-B/16 ImageNet-21k file (vit_jax imagenet21k/ViT-B_16.npz): VTAB's backbone.
    'vit_b16_in21k_orig': (16, 768, 12, 12, 3072),
    'vit_s14_dinov2': (14, 384, 12, 6, 1536),
    'vit_b14_dinov2': (14, 768, 12, 12, 3072),
    'vit_l14_dinov2': (14, 1024, 24, 16, 4096),
    'vit_s14_dinov2_reg4': (14, 384, 12, 6, 1536),
    'vit_b14_dinov2_reg4': (14, 768, 12, 12, 3072),
    'vit_l14_dinov2_reg4': (14, 1024, 24, 16, 4096),
    'vit_b16_clip': (16, 768, 12, 12, 3072),
    'vit_l14_clip': (14, 1024, 24, 16, 4096),
    'vit_b16_openclip': (16, 768, 12, 12, 3072),
    'vit_b16_siglip': (16, 768, 12, 12, 3072),
    'vit_l16_siglip': (16, 1024, 24, 16, 4096),
    # VideoMAE (Tong et al. 2022): the same ViTs on 2x16x16 tubelets, see FAMILIES.
    'videomae_s16': (16, 384, 12, 6, 1536),
    'videomae_b16': (16, 768, 12, 12, 3072),
    'videomae_l16': (16, 1024, 24, 16, 4096),
}

# What each checkpoint family needs beyond the MAE/AdaptFormer recipe (the
# defaults). A preset belongs to the family its name names (`family`).
_CLIP = dict(ln_pre=True, norm_eps=1e-5)  # torch LayerNorm's eps
FAMILIES = {
    'augreg': dict(gelu='tanh', posemb_resample='bilinear'),  # big_vision: flax's GELU
    # vit_jax (Dosovitskiy et al.): flax's GELU, scipy-zoom resampling, and the file's
    # 768-wide tanh representation layer (pre_logits) before the head.
    'in21k_orig': dict(gelu='tanh', posemb_resample='bilinear', pre_logits=768),
    'dinov2': dict(layerscale=1e-5),
    'dinov2_reg4': dict(layerscale=1e-5, num_registers=4),
    'clip': dict(_CLIP, gelu='quick'),  # OpenAI CLIP trained with QuickGELU
    'openclip': _CLIP,  # OpenCLIP's LAION models: exact GELU
    'siglip': dict(class_token=False, pool='map', gelu='tanh', posemb_resample='bilinear'),
    # What the VideoMAE presets change in the image ViT, as the official video
    # AdaptFormer (models/vit_video.py) computes it: 3-D patches, a fixed sinusoidal
    # table, no class token, mean pooling + fc_norm, q and v biases only, and
    # adapters with the blocks' dropout (0.0) instead of the image code's 0.1.
    'videomae': dict(patch_embed='tubelet', num_frames=16, tubelet=2, posemb='sincos',
                     class_token=False, pool='gap', qkv_bias='qv',
                     adapter=dict(dropout=0.0)),
}


def family(name: str) -> str | None:
  """The FAMILIES entry of preset `name`: 'vit_b16_augreg' -> 'augreg',
  'videomae_b16' -> 'videomae'; None for the plain ViTs ('vit_b16')."""
  prefix, _, rest = name.partition('_')
  found = rest.partition('_')[2] if prefix == 'vit' else prefix
  return found if found in FAMILIES else None


def unknown_preset(name: str) -> str | None:
  """What is wrong with preset name `name`, with suggestions; None for a known one."""
  if name in PRESETS:
    return None
  return (f'model.name: unknown preset {name!r}{did_you_mean(name, PRESETS)}; '
          f"allowed: {', '.join(PRESETS)}")


def defaults(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The model ConfigDict of preset `name` with top-level or nested overrides, not yet
  validated (`models.preset` validates it)."""
  if problem := unknown_preset(name):
    raise ConfigError(problem + '.')
  patch, width, depth, heads, mlp_dim = PRESETS[name]
  cfg = ml_collections.ConfigDict(dict(
      name=name, patch_size=patch, width=width, depth=depth, num_heads=heads,
      mlp_dim=mlp_dim, image_size=224, num_classes=1000, pool='cls',
      head='linear', head_init_std=0.01, tuning='adaptformer',
      # Architecture options of other checkpoint families (FAMILIES; values: schema.MODEL).
      gelu='exact', num_registers=0, ln_pre=False,
      pre_logits=0,  # 0: none, else the width of a tanh dense layer
      norm_eps=1e-6, posemb_resample='bicubic',
      # '2d' patches of images (B, H, W, 3), or 'tubelet': (tubelet, p, p)
      # patches of clips (B, num_frames, H, W, 3).
      patch_embed='2d', num_frames=1, tubelet=1,
      posemb='learned',  # a parameter, or 'sincos': fixed, recomputed per token count
      class_token=True,
      qkv_bias='qkv',    # 'qkv' | 'qv' (VideoMAE/BEiT: no k bias) | 'none'
      # LayerScale init value (CaiT), None = off.
      layerscale=ml_collections.FieldReference(None, field_type=float),
      # Official AdaptFormer defaults: ffn_num=64, fixed scale 0.1, no LN,
      # dropout 0.1, parallel to the MLP; init 'lora' (up projection zero).
      # scale is a number or 'learnable'; untyped, so both
      # `--config.model.adapter.scale=learnable` and `=0.5` parse.
      adapter=dict(bottleneck=64,
                   scale=ml_collections.FieldReference(0.1, field_type=object),
                   layernorm='none', dropout=0.1, placement='parallel', init='lora'),
      vpt=dict(num_tokens=1),  # official --vpt_num default
      lora=dict(rank=8, alpha=8.0),
      # Official Adapter+ (conf/adapter/adapter_plus.yaml over base_adapter.yaml): dim 8,
      # after the block ('post'), drop_path 0.1 on the adapter branch.
      adapter_plus=dict(dim=8, placement='post', drop_path=0.1),
      # Official RepAdapter (`RepAdapter` / `set_RepAdapter` defaults): hidden dim 8, 2 groups
      # in the up projection, scale 1 (its VTAB configs tune it per task); 'block' adapts
      # the attention's and the MLP's inputs (repblock), 'attn' only the attention's (repattn).
      repadapter=dict(dim=8, groups=2, scale=1.0, placement='block'),
      # Official FacT defaults (fact_tt.py/fact_tk.py `set_FacT(dim=8, s=1)`).
      fact=dict(rank=8, scale=1.0),
      # Regexes over parameter paths that train; empty = the tuning method's.
      trainable=(),
      dtype='float32',  # compute dtype; trainable parameters stay float32
      # Storage dtype of the frozen parameters: 'bfloat16' halves the backbone's
      # memory; trainable leaves and their optimizer state stay float32.
      frozen_dtype='float32',
      # jax.nn.dot_product_attention implementation: 'xla', 'cudnn' (fused, NVIDIA
      # GPUs, bf16) or 'auto' (cuDNN where it is known to apply, XLA elsewhere;
      # attention.attention_implementation; odd token counts carry a pad, attention.pad_tokens).
      attention='auto',
      # The MLP branch (LayerNorm, fc1, GELU, fc2): 'xla' ops, or 'pallas': fused kernels
      # (models/kernels.py; one NVIDIA GPU). 'xla' until a GPU run measures 'pallas' faster.
      kernels='xla',
      remat='none',  # 'none' | 'block' | 'dots': what each block keeps, see vit.REMAT
  ))
  _override(cfg, FAMILIES.get(family(name), {}))
  _override(cfg, overrides)
  return cfg


def upgrade(model: dict[str, Any]) -> dict[str, Any]:
  """A saved model config (a config.json's or an export's "model") with the fields that
  later versions added, at their defaults.

  A new field's default keeps the behaviour from before it existed (a new method's
  options are read only by that method), so runs and exports written earlier still
  resume, evaluate and swap in. An unknown preset name is left for the schema to report.
  """
  if not isinstance(model, dict) or unknown_preset(model.get('name')):
    return model
  return _filled(defaults(model['name']).to_dict(), model)


def _filled(default: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
  out = dict(saved)
  for key, value in default.items():
    if key not in saved:
      out[key] = value
    elif isinstance(value, dict) and isinstance(saved[key], dict):
      out[key] = _filled(value, saved[key])
  return out


def _override(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  for key, value in overrides.items():
    if key not in cfg:
      raise ConfigError(
          f'model: unknown field {key!r}{did_you_mean(key, cfg)}; '
          f"allowed: {', '.join(sorted(cfg.keys()))}.")
    if isinstance(cfg[key], ml_collections.ConfigDict):
      for sub, sub_value in dict(value).items():
        if sub not in cfg[key]:
          raise ConfigError(f'model.{key}: unknown field {sub!r}; '
                            f"allowed: {', '.join(cfg[key].keys())}.")
        _assign(cfg[key], sub, sub_value)
    else:
      _assign(cfg, key, value)


def _assign(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
  # ConfigDict locks a field's type on creation (adapter.scale is untyped instead).
  if key == 'trainable':
    with cfg.ignore_type():
      cfg[key] = value
  else:
    cfg[key] = value


def input_shape(model_cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """One example's shape: (H, W, 3) for images, (T, H, W, 3) for video clips."""
  image = (model_cfg.image_size, model_cfg.image_size, 3)
  return image if model_cfg.patch_embed == '2d' else (model_cfg.num_frames, *image)


def token_grid(model_cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The patch grid: (h, w) for images, (t, h, w) for video clips."""
  side = model_cfg.image_size // model_cfg.patch_size
  return (side, side) if model_cfg.patch_embed == '2d' else (
      model_cfg.num_frames // model_cfg.tubelet, side, side)


def module(model_cfg: ml_collections.ConfigDict) -> nn.Module:
  """The Flax module for a validated model ConfigDict (a job validates its config once):
  the ViT classifier, or with a `mae` section its masked-autoencoder pre-training."""
  if model_cfg.num_classes <= 0:
    raise ConfigError(f'model.num_classes: must be > 0 to build the model, got '
                      f'{model_cfg.num_classes} (0 takes the count from the data first).')
  frozen = ml_collections.FrozenConfigDict(model_cfg)
  if model_cfg.get('mae') is not None:
    return mae.MaskedAutoencoder(cfg=frozen)
  return vit.VisionTransformer(cfg=frozen)


def is_pretraining(model: nn.Module) -> bool:
  """Whether `model` returns each image's pre-training loss rather than logits."""
  return isinstance(model, mae.MaskedAutoencoder)

