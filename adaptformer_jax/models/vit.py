"""Vision Transformer with AdaptFormer, VPT and LoRA, as Flax Linen modules.

The block follows the official AdaptFormer forward: the adapter reads the
post-attention residual stream (no LayerNorm) and its output is added next to
the MLP's (`parallel`) or applied to the MLP's output (`sequential`). Options of
other checkpoint families (GELU form, pooling, class token, registers, LayerScale,
pre-norm, qkv biases, pre-logits) are config fields, one ViT for all of them.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adaptformer_jax.models import attention
from adaptformer_jax.models import layers
from adaptformer_jax.models import tuning

# model.gelu: torch.nn.GELU() is the exact erf form, flax's default (big_vision) the
# tanh approximation, OpenAI CLIP's QuickGELU a sigmoid approximation. 'exact' is
# written as torch writes it, with erf: cheap to recompute in the backward pass
# (DenseGelu), where jax's own form (erfc) made that pass slower on an H100 (RESULTS.md).
GELU = {
    'exact': lambda x: x * (0.5 + 0.5 * jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype))),
    'tanh': functools.partial(nn.gelu, approximate=True),
    'quick': lambda x: x * nn.sigmoid(1.702 * x),
}
dense_init = nn.initializers.xavier_uniform()
# model.remat: which activations each block keeps for the backward pass; the rest
# is recomputed there. 'none' keeps whatever autodiff needs; 'block' only the block's
# input (the block runs twice); 'dots' the matmul outputs, recomputing the LayerNorms,
# softmax and GELU -- what adapter tuning wants: frozen matmuls need no saved inputs,
# so it drops the large elementwise intermediates for little compute (RESULTS.md).
REMAT = ('none', 'block', 'dots')
# What nn.remat may save under each policy (None: nothing but the block's input).
REMAT_POLICIES = {
    'block': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_norm(cfg: ml_collections.FrozenConfigDict, dtype: jnp.dtype | None,
               name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with fused qkv, optional LoRA on q, v and FacT updates.

  `qkv_bias`: 'qkv' one fused bias; 'qv' separate q and v biases and no k bias
  (VideoMAE/BEiT: a k bias cancels in the softmax, so they never learn one);
  'none' no bias.
  """
  cfg: ml_collections.FrozenConfigDict
  dtype: jnp.dtype
  methods: tuning.Tuning = tuning.PLAIN
  pad: int = 0  # trailing pad tokens (`pad_tokens`), masked out

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, fact: dict | None = None,
               keys: jax.Array | None = None) -> jax.Array:
    """`keys` (B, N) bool: the keys each example attends to (`VisionTransformer`'s
    prompt_lengths); None: all but the pad."""
    d = x.shape[-1]
    qkv = nn.Dense(3 * d, use_bias=self.cfg.qkv_bias == 'qkv', dtype=self.dtype,
                   kernel_init=dense_init, name='qkv')(x)
    fact_update = layers.fact_updates(fact, self.cfg.fact.scale, train)
    if fact_update:
      qkv = qkv + jnp.concatenate([fact_update(x, name) for name in 'qkv'], -1)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    if self.cfg.qkv_bias == 'qv':
      q = q + self.param('q_bias', nn.initializers.zeros, (d,)).astype(q.dtype)
      v = v + self.param('v_bias', nn.initializers.zeros, (d,)).astype(v.dtype)
    if 'lora' in self.methods:
      lora = functools.partial(layers.LoRA, d, self.cfg.lora.rank,
                               self.cfg.lora.alpha, self.dtype)
      q = q + lora(name='lora_q')(x)
      v = v + lora(name='lora_v')(x)
    if 'ssf' in self.methods:
      q, k, v = jnp.split(layers.SSF(name='ssf_qkv')(jnp.concatenate([q, k, v], -1)), 3, -1)
    y = attention.multi_head_attention(q, k, v, self.cfg, self.dtype, self.pad, keys)
    out = nn.Dense(d, dtype=self.dtype, kernel_init=dense_init, name='out')(y)
    if fact_update:
      out = out + fact_update(y, 'proj')
    return layers.ssf('ssf' in self.methods, 'ssf_out')(out)


class Mlp(nn.Module):
  """fc1 -> GELU (model.gelu) -> fc2; FacT's updates on each fc, SSF's scale and shift
  after each (with FacT's). model.kernels='pallas' runs `fused` = (the LayerNorm that
  made x, its input) and this branch as fused kernels (kernels.py), same parameters."""
  cfg: ml_collections.FrozenConfigDict
  dtype: jnp.dtype
  methods: tuning.Tuning = tuning.PLAIN

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, fact: dict | None = None,
               fused: tuple[nn.LayerNorm, jax.Array] | None = None) -> jax.Array:
    if self.cfg.kernels == 'pallas':  # Pallas loads (~1 s) only where it is asked for
      # (the schema refuses the methods that change this branch: schema._kernels)
      from adaptformer_jax.models import kernels  # pylint: disable=g-import-not-at-top
      norm, inputs = fused
      return kernels.fused_mlp(inputs, norm, self.cfg.mlp_dim, self.cfg.gelu, self.dtype,
                               dense_init)
    fact_update = layers.fact_updates(fact, self.cfg.fact.scale, train)
    shift = fact_update and fact_update(x, 'fc1')
    if 'ssf' in self.methods:  # SSF sits between fc1 and the GELU: no fused DenseGelu
      h = nn.Dense(self.cfg.mlp_dim, dtype=self.dtype, kernel_init=dense_init, name='fc1')(x)
      h = GELU[self.cfg.gelu](layers.SSF(name='ssf_fc1')(h if shift is None else h + shift))
    else:
      h = DenseGelu(self.cfg.mlp_dim, self.cfg.gelu, self.dtype, name='fc1')(x, shift)
    out = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=dense_init, name='fc2')(h)
    if fact_update:
      out = out + fact_update(h, 'fc2')
    return layers.ssf('ssf' in self.methods, 'ssf_fc2')(out)


class DenseGelu(nn.Module):
  """GELU(x @ kernel + bias), with nn.Dense's parameters, whose backward pass keeps
  only the matmul's output.

  The bias add and GELU are checkpointed together, so XLA fuses them into one pass
  that writes only the activation and recomputes them in the backward pass; kept, they
  add a saved (B, N, mlp_dim) tensor: 12 passes over 155 MB per ViT-B/16 step at
  batch 128 (RESULTS.md).
  """
  features: int
  gelu: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, shift: jax.Array | None = None) -> jax.Array:
    """`shift`: added before the GELU (FacT's update of fc1)."""
    kernel = self.param('kernel', dense_init, (x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = x @ kernel if shift is None else x @ kernel + shift
    return jax.checkpoint(lambda y, b: GELU[self.gelu](y + b))(y, bias)


class Block(nn.Module):
  """Pre-LN transformer block, optional LayerScale, an optional AdaptMLP branch, LoRA
  attention, RepAdapters on the attention's (and MLP's) input, FacT, SSF scales and
  shifts, an Adapter+ branch (model.adapter_plus.placement).

  The adapter reads the stream after the (LayerScale'd) attention residual and
  adds next to (or acts on) what the MLP branch adds, LayerScale included.
  """
  cfg: ml_collections.FrozenConfigDict
  dtype: jnp.dtype
  methods: tuning.Tuning = tuning.PLAIN
  pad: int = 0  # trailing pad tokens (`pad_tokens`), masked out of the attention

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, fact: dict | None = None,
               keys: jax.Array | None = None) -> jax.Array:
    """`fact`: this block's share of the model-level FacT factors (layers.FacTFactors);
    `keys`: the keys each example attends to (Attention)."""
    ssf = 'ssf' in self.methods
    rep = 'repadapter' in self.methods and self.cfg.repadapter
    repadapter = lambda where: layers.RepAdapter(rep.dim, rep.groups, rep.scale, self.dtype,
                                                 name=f'repadapter_{where}')
    if fact is not None:
      fact = dict(fact, cores=layers.FacTCores(self.cfg.fact.rank, self.cfg.mlp_dim // x.shape[-1],
                                               name='fact')(fact.get('cores')))
    h = layers.ssf(ssf, 'ssf_norm1')(layer_norm(self.cfg, self.dtype, 'norm1')(x))
    if rep:  # official repattn / repblock: before the attention (and the MLP)
      h = repadapter('attn')(h, train)
    x = x + self.layerscale('ls1', Attention(self.cfg, self.dtype, self.methods, self.pad,
                                             name='attn')(h, train, fact, keys))
    plus = layers.adapter_plus_at(
        self.cfg.adapter_plus if 'adapter_plus' in self.methods else None, self.dtype, train)
    x = x + plus('pre', x)
    adapter = None
    if 'adaptformer' in self.methods:
      a = self.cfg.adapter
      adapter = layers.AdaptMLP(a.bottleneck, a.scale, a.layernorm, a.dropout,
                                     self.dtype, a.init, name='adapter')
    if adapter is not None and self.cfg.adapter.placement == 'parallel':
      adapted = adapter(x, train)
    norm2 = layer_norm(self.cfg, self.dtype, 'norm2')
    h = layers.ssf(ssf, 'ssf_norm2')(norm2(x))
    if rep and rep.placement == 'block':
      h = repadapter('mlp')(h, train)
    h = self.layerscale('ls2', Mlp(self.cfg, self.dtype, self.methods, name='mlp')(
        h, train, fact, fused=(norm2, x)))
    h = h + plus('intermediate', h) + plus('parallel', x)
    if adapter is not None:
      h = h + (adapted if self.cfg.adapter.placement == 'parallel'
               else adapter(h, train))
    return x + h + plus('post', x + h)

  def layerscale(self, name: str, h: jax.Array) -> jax.Array:
    """CaiT's LayerScale: a learned per-channel gain on a residual branch (model.layerscale = its init)."""
    if self.cfg.layerscale is None:
      return h
    gamma = self.param(name, nn.initializers.constant(self.cfg.layerscale), (h.shape[-1],))
    return h * gamma.astype(h.dtype)


class MapHead(nn.Module):
  """Attention pooling (big_vision MAPHead, timm AttentionPoolLatent): a learned
  probe attends over the tokens, then a residual LN + MLP."""
  cfg: ml_collections.FrozenConfigDict
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, _, d = x.shape
    probe = self.param('probe', dense_init, (1, 1, d))
    q = nn.Dense(d, dtype=self.dtype, kernel_init=dense_init, name='q')(
        jnp.broadcast_to(probe, (b, 1, d)).astype(x.dtype))
    k, v = jnp.split(nn.Dense(2 * d, dtype=self.dtype, kernel_init=dense_init,
                              name='kv')(x), 2, axis=-1)
    y = attention.multi_head_attention(q, k, v, self.cfg, self.dtype)
    y = nn.Dense(d, dtype=self.dtype, kernel_init=dense_init, name='out')(y)
    norm = layer_norm(self.cfg, self.dtype, 'norm')
    y = y + Mlp(self.cfg, self.dtype, name='mlp')(norm(y), fused=(norm, y))
    return y[:, 0]


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


class PatchEmbedding(nn.Module):
  """nn.Conv with kernel = stride and VALID padding (same parameters, same outputs),
  computed as one matmul over flattened patches: cuDNN runs such a convolution as
  several kernels, far slower than one matmul of the same FLOPs (RESULTS.md)."""
  width: int
  patch: tuple[int, ...]
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, channels = len(self.patch), x.shape[-1]
    kernel = self.param('kernel', dense_init, (*self.patch, channels, self.width))
    bias = self.param('bias', nn.initializers.zeros, (self.width,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    grid = [size // p for size, p in zip(x.shape[1:1 + n], self.patch)]
    x = x[(slice(None), *(slice(g * p) for g, p in zip(grid, self.patch)))]  # VALID
    x = x.reshape(x.shape[0], *[d for g, p in zip(grid, self.patch) for d in (g, p)], channels)
    x = x.transpose(0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1)
    x = x.reshape(x.shape[0], int(np.prod(grid)), -1)
    return x @ kernel.reshape(-1, self.width) + bias


def embed_patches(cfg: ml_collections.FrozenConfigDict, dtype: jnp.dtype,
                  images: jax.Array) -> jax.Array:
  """Patch tokens (B, N, width) in (t,) h, w order, as torch's flatten(2).

  Call it inside a compact module: the projection becomes its 'embedding'
  submodule, the name every checkpoint layout maps to (the ViT, MAE's encoder).
  A video tubelet is a 3-D patch: kernel = stride = (tubelet, p, p).
  """
  p = cfg.patch_size
  patch = (p, p) if cfg.patch_embed == '2d' else (cfg.tubelet, p, p)
  return PatchEmbedding(cfg.width, patch, dtype, name='embedding')(images)


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
  videos (B, T, H, W, 3); `cfg` is a model ConfigDict from `models.preset`.

  The tuning method is parsed here, once; the blocks get the parsed `Tuning`. Token
  order: [VPT prompts] [class token] [registers] patches; the position embedding
  covers the class token (when there is one) and the patches.

  `prompt_lengths` (B,) int, optional: how many VPT prompts each example has, the
  last of the vpt.num_tokens slots; the slots in front are masked out of every
  attention's keys. One program then serves prompts of several lengths, or none
  (adaptformer_jax/serve).
  """
  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False,
               prompt_lengths: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    methods = tuning.parse(cfg.tuning)
    ssf = lambda name: layers.ssf('ssf' in methods, name)
    x = ssf('ssf_embedding')(embed_patches(cfg, dtype, images))
    b = x.shape[0]
    tokens = lambda t: jnp.broadcast_to(t, (b,) + t.shape[1:]).astype(x.dtype)
    if cfg.class_token:
      cls = self.param('cls', nn.initializers.normal(1e-6), (1, 1, cfg.width))
      x = jnp.concatenate([tokens(cls), x], 1)
    if cfg.posemb == 'learned':
      pos = self.param('pos_embedding', nn.initializers.normal(0.02),
                       (1, x.shape[1], cfg.width))
    else:
      pos = sinusoid_table(x.shape[1], cfg.width)
    x = x + pos.astype(x.dtype)
    if cfg.num_registers:  # DINOv2: no position embedding on registers
      registers = self.param('registers', nn.initializers.normal(1e-6),
                             (1, cfg.num_registers, cfg.width))
      x = jnp.concatenate([x[:, :int(cfg.class_token)], tokens(registers),
                           x[:, int(cfg.class_token):]], 1)
    if cfg.ln_pre:
      x = layer_norm(cfg, dtype, 'norm_pre')(x)

    vpt = methods.vpt
    n_prompt = cfg.vpt.num_tokens
    if vpt:
      prompts = self.param('prompts', layers.prompt_init,
                           (cfg.depth if vpt == 'deep' else 1, n_prompt, cfg.width))
      add_prompts = lambda x, i: jnp.concatenate([tokens(prompts[i:i + 1]), x], 1)

    # FacT: model-level factors shared by all blocks; each block gets its share as an input.
    kind = next((m[len('fact_'):] for m in methods.methods if m.startswith('fact_')), None)
    fact = kind and layers.FacTFactors(kind, cfg.fact.rank, cfg.depth, cfg.mlp_dim // cfg.width,
                                       name='fact')(cfg.width)
    pad = attention.pad_tokens(cfg, dtype, x.shape[1] + (n_prompt if vpt else 0))
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))  # at the end: prompts go in front
    keys = None
    if vpt and prompt_lengths is not None:
      slot = jnp.arange(n_prompt + x.shape[1])
      keys = (slot >= n_prompt - prompt_lengths[:, None]) & (slot < n_prompt + x.shape[1] - pad)
    block = Block if cfg.remat == 'none' else nn.remat(
        Block, static_argnums=(2,), policy=REMAT_POLICIES[cfg.remat])
    for i in range(cfg.depth):
      # Official VPT-deep: fresh prompts prepended before every block, dropped after it.
      if vpt == 'deep' or (vpt == 'shallow' and i == 0):
        x = add_prompts(x, i if vpt == 'deep' else 0)
      x = block(cfg, dtype, methods, pad, name=f'block{i}')(x, train, fact and fact[i], keys)
      if vpt == 'deep' or (vpt == 'shallow' and i == cfg.depth - 1):
        x = x[:, n_prompt:]
    x = x[:, :x.shape[1] - pad]

    patches = slice(int(cfg.class_token) + cfg.num_registers, None)
    if cfg.pool == 'gap':  # MAE: no final norm, fc_norm after the mean
      # SSF's last scale and shift act on the tokens: the same on their mean.
      x = layer_norm(cfg, None, 'fc_norm')(ssf('ssf_norm')(x[:, patches].mean(axis=1)))
    else:
      x = ssf('ssf_norm')(layer_norm(cfg, None, 'norm')(x))
      if cfg.pool == 'cls':
        x = x[:, 0]
      elif cfg.pool == 'gap_prenorm':
        x = x[:, patches].mean(axis=1)
      else:
        x = MapHead(cfg, dtype, name='map_head')(x[:, patches])
    if cfg.pre_logits:
      x = jnp.tanh(nn.Dense(cfg.pre_logits, dtype=dtype, name='pre_logits')(x))
    return Head(cfg, name='head')(x.astype(jnp.float32), train)
