"""The small trainable pieces: AdaptMLP, LoRA projections, prompt-token init, SSF, Adapter+."""
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# torch.nn.init.kaiming_uniform_(w, a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
kaiming_uniform_a_sqrt5 = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
# timm's trunc_normal_(std=.02) cuts at +-2 absolute, i.e. 100 sigma: a plain normal.
timm_trunc_normal_002 = nn.initializers.normal(0.02)
# AdaptMLP kernel inits (down, up) by `init` option.
ADAPTER_INITS = {
    'lora': (kaiming_uniform_a_sqrt5, nn.initializers.zeros),
    # The official video model re-initialises every Linear after building its
    # blocks (`self.apply(self._init_weights)`), adapters included.
    'trunc_normal': (timm_trunc_normal_002, timm_trunc_normal_002),
}


class AdaptMLP(nn.Module):
  """The AdaptFormer bottleneck: s * up(dropout(relu(down(LN?(x))))).

  Mirrors the official `Adapter` with init_option='lora': down is
  kaiming-uniform, up and both biases are zero, so at step 0 the branch
  outputs exactly zero and the adapted model equals the frozen one.
  init='trunc_normal' reproduces the official video model instead, whose
  up projection starts non-zero (ADAPTER_INITS).
  """
  bottleneck: int
  scale: float | str = 0.1   # a number, or 'learnable' (a scalar initialised to 1)
  layernorm: str = 'none'    # 'none' | 'in' | 'out'
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32
  init: str = 'lora'         # a key of ADAPTER_INITS

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    width = x.shape[-1]
    # The official adapter LayerNorm is torch's default (eps 1e-5), shared by 'in'/'out'.
    norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='norm') \
        if self.layernorm != 'none' else None
    if self.layernorm == 'in':
      x = norm(x)
    down_init, up_init = ADAPTER_INITS[self.init]
    h = nn.Dense(self.bottleneck, dtype=self.dtype, name='down',
                 kernel_init=down_init)(x)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(h))
    h = nn.Dense(width, dtype=self.dtype, name='up', kernel_init=up_init)(h)
    if self.scale == 'learnable':
      h = h * self.param('scale', nn.initializers.ones, (1,)).astype(h.dtype)
    else:
      h = h * self.scale
    if self.layernorm == 'out':
      h = norm(h)
    return h


class LoRA(nn.Module):
  """Low-rank update x @ A @ B * alpha / rank, B zero-initialised (Hu et al.)."""
  features: int
  rank: int
  alpha: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.param('a', kaiming_uniform_a_sqrt5, (x.shape[-1], self.rank))
    b = self.param('b', nn.initializers.zeros, (self.rank, self.features))
    return (x @ a.astype(self.dtype)) @ b.astype(self.dtype) * (self.alpha / self.rank)


def prompt_init(key: jax.Array, shape: tuple[int, int, int],
                dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """torch xavier_uniform_ on each (1, tokens, width) prompt, as the official VPT."""
  _, tokens, width = shape
  bound = math.sqrt(6.0 / ((tokens + 1) * width))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


# ---------------------------------------------------------------- SSF (Lian et al. 2022)
# The official `init_ssf_scale_shift`: scale ~ N(1, .02), shift ~ N(0, .02).
ssf_scale_init = lambda key, shape, dtype=jnp.float32: 1 + 0.02 * jax.random.normal(
    key, shape, dtype)


class SSF(nn.Module):
  """Scale and shift every channel of the layer before it: x * scale + shift.

  Linear in x, so `merge` folds it into that layer's kernel and bias.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', ssf_scale_init, (x.shape[-1],))
    shift = self.param('shift', timm_trunc_normal_002, (x.shape[-1],))
    return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def ssf(on: bool, name: str) -> Callable[[jax.Array], jax.Array]:
  """An SSF layer named `name` where SSF is on, else the identity (one line per site)."""
  return SSF(name=name) if on else (lambda x: x)


# ---------------------------------------------------------------- Adapter+ (Steitz & Roth 2024)
# The official Houlsby init, torch trunc_normal_(std=.01, a=-.02, b=.02): N(0, .01) cut at
# 2 std, as jax's truncated_normal(.01) (its stddev is the one before the cut).
houlsby_init = nn.initializers.truncated_normal(0.01)


class AdapterPlus(nn.Module):
  """Adapter+: x -> scale * drop_path(up(GELU(down(x)))), a per-channel scale (init 1)
  on the whole up projection, bias included; exact GELU; Houlsby init (kernels
  truncated N(0, .01), zero biases); stochastic depth on the branch in training.
  Returns the branch only: the block adds it where its placement says."""
  bottleneck: int
  drop_path: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = nn.Dense(self.bottleneck, dtype=self.dtype, kernel_init=houlsby_init, name='down')(x)
    h = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=houlsby_init, name='up')(
        nn.gelu(h, approximate=False))
    if train and self.drop_path > 0:  # timm DropPath: drop whole examples, rescale the rest
      keep = jax.random.bernoulli(self.make_rng('dropout'), 1 - self.drop_path,
                                  (h.shape[0],) + (1,) * (h.ndim - 1))
      h = jnp.where(keep, h / (1 - self.drop_path), 0)
    return h * self.param('scale', nn.initializers.ones, (x.shape[-1],)).astype(h.dtype)


def adapter_plus_at(options: Any, dtype: jnp.dtype, train: bool
                    ) -> Callable[[str, jax.Array], jax.Array | int]:
  """`at(where, v)`: the Adapter+ branch on v where `where` is model.adapter_plus.placement,
  else 0. Call it in a block's compact method: the block's forward then reads as the
  official AdapterBlock.forward_{pre,post,intermediate,parallel}. `options` None: no Adapter+."""
  if options is None:
    return lambda where, v: 0
  adapter = AdapterPlus(options.dim, options.drop_path, dtype, name='adapter_plus')
  return lambda where, v: adapter(v, train) if where == options.placement else 0
