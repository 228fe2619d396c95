"""Masked-autoencoder pre-training (He et al., 2022) of this project's ViT.

The encoder is the ViT's own patch embedding, class token, position embedding,
blocks and final norm, under the same parameter names, so its weights load
into `VisionTransformer` like any MAE checkpoint (pool='gap' starts fc_norm
fresh). It sees a random (1 - mask_ratio) of the patches; a narrow decoder
predicts the pixels of the rest, each patch normalised to zero mean and unit
variance (MAE's norm_pix_loss).
"""
import re
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections

from adaptformer_jax.models import vit


# What only pre-training needs; downstream models load the rest (the encoder).
DECODER = re.compile(r'decoder_.*|mask_token')


def encoder_mask(mask: Any) -> Any:
  """`mask` (a pytree of booleans over the params) with the decoder's leaves False."""
  flat = flax.traverse_util.flatten_dict(mask, sep='/')
  return flax.traverse_util.unflatten_dict(
      {k: v and not DECODER.match(k) for k, v in flat.items()}, sep='/')


def patchify(images: jax.Array, p: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/p * W/p, p * p * C), patches in row-major order."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class MaskedAutoencoder(nn.Module):
  """`__call__(images, train)` -> per-image loss: mean squared error on the masked patches.

  Needs a 'mask' RNG stream (which patches are hidden).
  """
  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    cfg, mae = self.cfg, self.cfg.mae
    dtype = jnp.dtype(cfg.dtype)
    p = cfg.patch_size
    x = vit.embed_patches(cfg, dtype, images)
    b, n = x.shape[:2]
    cls = self.param('cls', nn.initializers.normal(1e-6), (1, 1, cfg.width))
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, n + 1, cfg.width))
    x = x + pos[:, 1:].astype(x.dtype)

    # Each image keeps its own random subset of patches.
    keep = max(1, int(round(n * (1 - mae.mask_ratio))))
    order = jnp.argsort(jax.random.uniform(self.make_rng('mask'), (b, n)), axis=1)
    restore = jnp.argsort(order, axis=1)
    x = jnp.take_along_axis(x, order[:, :keep, None], axis=1)
    cls = jnp.broadcast_to(cls + pos[:, :1], (b, 1, cfg.width)).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1)
    for i in range(cfg.depth):
      x = vit.Block(cfg, dtype, name=f'block{i}')(x, train)
    x = vit.layer_norm(cfg, dtype, 'norm')(x)

    # Decoder: encoded patches + mask tokens, back in image order.
    dec = ml_collections.FrozenConfigDict({**cfg.to_dict(), 'num_heads': mae.decoder_heads,
                                          'mlp_dim': 4 * mae.decoder_width})
    y = nn.Dense(mae.decoder_width, dtype=dtype, kernel_init=vit.dense_init,
                 name='decoder_embed')(x)
    mask_token = self.param('mask_token', nn.initializers.normal(0.02),
                            (1, 1, mae.decoder_width))
    hidden = jnp.broadcast_to(mask_token, (b, n - keep, mae.decoder_width)).astype(y.dtype)
    y_patches = jnp.take_along_axis(jnp.concatenate([y[:, 1:], hidden], axis=1),
                                    restore[:, :, None], axis=1)
    y = jnp.concatenate([y[:, :1], y_patches], axis=1)
    y = y + self.param('decoder_pos_embedding', nn.initializers.normal(0.02),
                       (1, n + 1, mae.decoder_width)).astype(y.dtype)
    for i in range(mae.decoder_depth):
      y = vit.Block(dec, dtype, name=f'decoder_block{i}')(y, train)
    y = vit.layer_norm(cfg, dtype, 'decoder_norm')(y)
    pred = nn.Dense(p * p * images.shape[-1], kernel_init=vit.dense_init,
                    name='decoder_pred')(y[:, 1:].astype(jnp.float32))

    target = patchify(images.astype(jnp.float32), p)
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
    hidden_mask = (restore >= keep).astype(jnp.float32)   # 1 where the patch was hidden
    self.sow('intermediates', 'hidden_mask', hidden_mask)
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * hidden_mask).sum(1) / hidden_mask.sum(1)
