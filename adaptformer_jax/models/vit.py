"""Vision Transformer with AdaptFormer, VPT and LoRA, as Flax Linen modules.

The block follows the official AdaptFormer forward: the adapter reads the
post-attention residual stream (no LayerNorm) and its output is added next to
the MLP's (`parallel`) or applied to the MLP's output (`sequential`).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adaptformer_jax.errors import ConfigError
from adaptformer_jax.models import methods
from adaptformer_jax.models import peft_layers

LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-6)
# torch.nn.GELU() is the exact erf form.
gelu = functools.partial(nn.gelu, approximate=False)
dense_init = nn.initializers.xavier_uniform()
# model.remat: which activations each block keeps for the backward pass; the rest
# is recomputed there. 'none' keeps whatever autodiff needs; 'block' only the block's
# input (the block runs twice); 'dots' the matmul outputs, recomputing the LayerNorms,
# softmax and GELU -- what adapter tuning wants: frozen matmuls need no saved inputs,
# so it drops the large elementwise intermediates for little compute (RESULTS.md).
# False and True are the older spellings of 'none' and 'block'.
REMAT = {False: 'none', True: 'block', 'none': 'none', 'block': 'block', 'dots': 'dots'}
# What nn.remat may save under each policy (None: nothing but the block's input).
REMAT_POLICIES = {
    'block': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def attention_implementation(choice: str, dtype, head_dim: int, device=None) -> str:
  """model.attention -> jax.nn.dot_product_attention's implementation ('xla' | 'cudnn').

  'auto' takes cuDNN's fused (flash) kernel where it applies -- an NVIDIA GPU,
  bf16/f16 inputs, a head dim that is a multiple of 8 and <= 128 -- and XLA's
  unfused attention everywhere else (CPU, TPU, f32).
  """
  device = device or jax.devices()[0]
  usable = (device.platform == 'gpu' and 'nvidia' in device.device_kind.lower()
            and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128)
  if choice == 'cudnn' and not usable:
    raise ConfigError(
        f"model.attention='cudnn' needs an NVIDIA GPU, model.dtype='bfloat16' and a "
        f'head dim that is a multiple of 8 up to 128 (here: {device.device_kind}, '
        f"{jnp.dtype(dtype).name}, {head_dim}); use 'auto' or 'xla'.")
  return 'cudnn' if choice == 'cudnn' or (choice == 'auto' and usable) else 'xla'


class Attention(nn.Module):
  """Multi-head self-attention with fused qkv and optional LoRA on q, v.

  `qkv_bias`: 'qkv' one fused bias; 'qv' separate q and v biases and no k bias
  (VideoMAE/BEiT: a k bias cancels in the softmax, so they never learn one);
  'none' no bias.
  """
  cfg: ml_collections.FrozenConfigDict
  dtype: jnp.dtype
  lora: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    heads = self.cfg.num_heads
    qkv = nn.Dense(3 * d, use_bias=self.cfg.qkv_bias == 'qkv', dtype=self.dtype,
                   kernel_init=dense_init, name='qkv')(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    if self.cfg.qkv_bias == 'qv':
      q = q + self.param('q_bias', nn.initializers.zeros, (d,)).astype(q.dtype)
      v = v + self.param('v_bias', nn.initializers.zeros, (d,)).astype(v.dtype)
    if self.lora:
      lora = functools.partial(peft_layers.LoRA, d, self.cfg.lora.rank,
                               self.cfg.lora.alpha, self.dtype)
      q = q + lora(name='lora_q')(x)
      v = v + lora(name='lora_v')(x)
    split = lambda t: t.reshape(b, n, heads, d // heads)
    implementation = attention_implementation(self.cfg.attention, self.dtype, d // heads)
    out = jax.nn.dot_product_attention(split(q), split(k), split(v),
                                       implementation=implementation)
    return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init,
                    name='out')(out.reshape(b, n, d))


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""
  cfg: ml_collections.FrozenConfigDict
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(self.cfg.mlp_dim, dtype=self.dtype, kernel_init=dense_init,
                 name='fc1')(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=dense_init,
                    name='fc2')(gelu(h))


class Block(nn.Module):
  """Pre-LN transformer block with an optional AdaptMLP branch and LoRA attention."""
  cfg: ml_collections.FrozenConfigDict
  dtype: jnp.dtype
  adapter: bool = False
  lora: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x + self.layerscale('ls1', Attention(self.cfg, self.dtype, self.lora, name='attn')(
        LayerNorm(dtype=self.dtype, name='norm1')(x)))
    adapter = None
    if self.adapter:
      a = self.cfg.adapter
      adapter = peft_layers.AdaptMLP(a.bottleneck, a.scale, a.layernorm, a.dropout,
                                     self.dtype, a.init, name='adapter')
    if adapter is not None and self.cfg.adapter.placement == 'parallel':
      adapted = adapter(x, train)
    h = self.layerscale('ls2', Mlp(self.cfg, self.dtype, name='mlp')(
        LayerNorm(dtype=self.dtype, name='norm2')(x)))
    if adapter is not None:
      h = h + (adapted if self.cfg.adapter.placement == 'parallel'
               else adapter(h, train))
    return x + h

  def layerscale(self, name: str, h: jax.Array) -> jax.Array:
    """CaiT's LayerScale: a learned per-channel gain on a residual branch (model.layerscale = its init)."""
    if self.cfg.layerscale is None:
      return h
    gamma = self.param(name, nn.initializers.constant(self.cfg.layerscale), (h.shape[-1],))
    return h * gamma.astype(h.dtype)


class Head(nn.Module):
  """Linear classifier, optionally after a parameter-free BatchNorm (MAE linear-probe head)."""
  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.cfg.head == 'bn_linear':
      # torch BatchNorm1d(affine=False, eps=1e-6, momentum=0.1).
      x = nn.BatchNorm(use_running_average=not train, use_bias=False,
                       use_scale=False, epsilon=1e-6, momentum=0.9, name='bn')(x)
    return nn.Dense(self.cfg.num_classes, name='linear',
                    kernel_init=nn.initializers.truncated_normal(self.cfg.head_init_std),
                    )(x)


def sinusoid_table(num_tokens: int, width: int) -> np.ndarray:
  """The fixed 1-D sin/cos table of "Attention is all you need", as VideoMAE's
  `get_sinusoid_encoding_table`: (1, num_tokens, width) float32.

  It is a function of the token count, not a parameter, so a checkpoint never
  holds it and any clip length or frame size gets its own table.
  """
  position = np.arange(num_tokens, dtype=np.float64)[:, None]
  angle = position / np.power(10000, 2 * (np.arange(width) // 2) / width)
  angle[:, 0::2], angle[:, 1::2] = np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])
  return angle[None].astype(np.float32)


class VisionTransformer(nn.Module):
  """ViT classifier for images (B, H, W, 3) or, with a tubelet patch embedding,
  videos (B, T, H, W, 3); `cfg` is a model ConfigDict from `presets.preset`.

  The tuning method is parsed here, once; the blocks get plain booleans.
  """
  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    tuning = methods.parse(cfg.tuning)
    p = cfg.patch_size
    # A video tubelet is a 3-D patch: kernel = stride = (tubelet, p, p).
    patch = (p, p) if cfg.patch_embed == '2d' else (cfg.tubelet, p, p)
    x = nn.Conv(cfg.width, patch, strides=patch, padding='VALID', dtype=dtype,
                kernel_init=dense_init, name='embedding')(images)
    b = x.shape[0]
    x = x.reshape(b, -1, cfg.width)  # (t,) h, w order, as torch's flatten(2)
    if cfg.class_token:
      cls = self.param('cls', nn.initializers.normal(1e-6), (1, 1, cfg.width))
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.width)).astype(x.dtype), x], 1)
    if cfg.posemb == 'learned':
      pos = self.param('pos_embedding', nn.initializers.normal(0.02),
                       (1, x.shape[1], cfg.width))
    else:
      pos = sinusoid_table(x.shape[1], cfg.width)
    x = x + pos.astype(x.dtype)

    vpt = tuning.vpt
    n_prompt = cfg.vpt.num_tokens
    if vpt:
      prompts = self.param('prompts', peft_layers.prompt_init,
                           (cfg.depth if vpt == 'deep' else 1, n_prompt, cfg.width))
      add_prompts = lambda x, i: jnp.concatenate(
          [jnp.broadcast_to(prompts[i], (b, n_prompt, cfg.width)).astype(x.dtype), x], 1)

    remat = REMAT[cfg.remat]
    block = Block if remat == 'none' else nn.remat(
        Block, static_argnums=(2,), policy=REMAT_POLICIES[remat])
    for i in range(cfg.depth):
      # Official VPT-deep: fresh prompts prepended before every block, dropped after it.
      if vpt == 'deep' or (vpt == 'shallow' and i == 0):
        x = add_prompts(x, i if vpt == 'deep' else 0)
      x = block(cfg, dtype, tuning.adaptformer, tuning.lora, name=f'block{i}')(x, train)
      if vpt == 'deep' or (vpt == 'shallow' and i == cfg.depth - 1):
        x = x[:, n_prompt:]

    if cfg.pool == 'cls':
      x = LayerNorm(name='norm')(x)[:, 0]
    else:
      x = LayerNorm(name='fc_norm')(x[:, int(cfg.class_token):].mean(axis=1))
    return Head(cfg, name='head')(x.astype(jnp.float32), train)
