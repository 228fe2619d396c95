"""The small trainable pieces: AdaptMLP, LoRA projections, prompt-token init, SSF,
Adapter+, RepAdapter, FacT."""
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


# ------------------------------------------------------------ RepAdapter and FacT

# Both official codes put nn.Dropout(0.1) on the bottleneck (identity at eval).
BOTTLENECK_DROPOUT = 0.1


class GroupedDense(nn.Module):
  """nn.Dense with a block-diagonal kernel, stored as its blocks side by side: torch's
  1x1 Conv1d(groups=g), whose output group i reads only input group i.

  `kernel` is (in / g, features): column o holds the weights of output o over the
  inputs of its group, so a torch weight (features, in / g, 1) loads as [..., 0].T.
  """
  features: int
  groups: int
  dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    g = self.groups
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1] // g, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jnp.einsum('...gi,igo->...go', x.reshape(*x.shape[:-1], g, -1),
                   kernel.reshape(kernel.shape[0], g, -1))
    return y.reshape(*x.shape[:-1], self.features) + bias


class RepAdapter(nn.Module):
  """x + scale * up(dropout(down(x))): RepAdapter (Luo et al. 2023, official
  `repadapter.RepAdapter`), linear, so it folds into the projection after it.

  As the official 1x1 convolutions: `down` xavier-uniform with a zero bias, `up`
  grouped (`groups`) and all zero, so a fresh adapter is the identity; the scale
  multiplies up's bias too.
  """
  hidden: int
  groups: int
  scale: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = nn.Dense(self.hidden, dtype=self.dtype, name='down',
                 kernel_init=nn.initializers.xavier_uniform())(x)
    h = nn.Dropout(BOTTLENECK_DROPOUT, deterministic=not train)(h)
    return x + GroupedDense(x.shape[-1], self.groups, self.dtype, name='up')(h) * self.scale


class Kernel(nn.Module):
  """A bare weight matrix at `<name>/kernel`, where checkpoint layouts put a torch
  Linear's weight (FacT's bias-free factors)."""
  shape: tuple[int, ...]
  init: nn.initializers.Initializer = kaiming_uniform_a_sqrt5

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param('kernel', self.init, self.shape)


class FacTFactors(nn.Module):
  """FacT's model-level factors (Jie & Deng, AAAI 2023), and each block's cores.

  Both official variants share U (`FacTu`, width -> rank) and V (`FacTv`, rank ->
  width, zero: a fresh FacT changes nothing) across all layers; FacT-TK also shares
  the tensor C (`FacTc`, rank^3) and P (`FacTp`), whose columns pick each projection's
  core: core = C @ P[:, j]. The official code hard-codes ViT-B (width 768, MLP 4 x 768,
  12 layers, so P has 12 x 12 = 144 columns); here U, V take the model's width and P
  has depth x (4 + 2m) columns for an MLP of m x width (m = mlp_dim / width): per
  block q, k, v, proj, then m columns of fc1 and m of fc2, the official order.

  Returns, per block, {'u', 'v'} and for TK its (rank, rank, 4 + 2m) cores.
  """
  kind: str  # 'tt' | 'tk'
  rank: int
  depth: int
  chunks: int  # m = mlp_dim / width

  @nn.compact
  def __call__(self, width: int) -> list[dict[str, jax.Array]]:
    r = self.rank
    shared = dict(u=Kernel((width, r), name='u')(),
                  v=Kernel((r, width), nn.initializers.zeros, name='v')())
    if self.kind == 'tt':
      return [shared] * self.depth
    per_layer = 4 + 2 * self.chunks
    xavier = nn.initializers.xavier_uniform()  # = torch's on (r, cols) and (r, r, r)
    p = self.param('p', xavier, (r, self.depth * per_layer))
    c = self.param('c', xavier, (r, r, r))
    cores = c @ p
    return [dict(shared, cores=cores[..., i * per_layer:(i + 1) * per_layer])
            for i in range(self.depth)]


class FacTCores(nn.Module):
  """One block's FacT cores, (in, out) matrices of the rank space, by projection.

  FacT-TT: six parameters of the block (official `{q,k,v,proj}_FacTs`,
  `fc1_FacTs` rank -> m x rank, `fc2_FacTs` m x rank -> rank; torch Linear init).
  FacT-TK: the block's slice of C @ P, cut and reshaped as the official code does
  (fc1 = cores[:, :, :m].reshape(r, m r); fc2 the same of [m:], transposed).
  """
  rank: int
  chunks: int

  @nn.compact
  def __call__(self, tk_cores: jax.Array | None) -> dict[str, jax.Array]:
    r, m = self.rank, self.chunks
    if tk_cores is None:
      shapes = dict(q=(r, r), k=(r, r), v=(r, r), proj=(r, r), fc1=(r, m * r), fc2=(m * r, r))
      return {n: Kernel(s, name=n)() for n, s in shapes.items()}
    return tk_block_cores(tk_cores, m)


def tk_block_cores(cores: Any, chunks: int) -> dict[str, Any]:
  """FacT-TK: a block's (rank, rank, 4 + 2m) slice of C @ P as the (in, out) cores of
  its projections, cut and reshaped as the official code does (NumPy or jax arrays)."""
  r, m = cores.shape[0], chunks
  attn, mlp = cores[..., :4], cores[..., 4:]
  return dict(q=attn[..., 0], k=attn[..., 1], v=attn[..., 2], proj=attn[..., 3],
              fc1=mlp[..., :m].reshape(r, m * r), fc2=mlp[..., m:].reshape(r, m * r).T)


def fact_update(x: jax.Array, u: jax.Array, core: jax.Array, v: jax.Array, scale: float,
                dropout: nn.Dropout) -> jax.Array:
  """scale * V(dropout(U(x) @ core)), FacT's update of one projection's output.

  A projection from (or to) m x width features -- fc2's input, fc1's output -- is m
  chunks of width, each through U (or V), as the official reshape(B, N, 4, C).
  """
  rank = u.shape[1]
  h = x.reshape(*x.shape[:-1], core.shape[0] // rank, -1) @ u.astype(x.dtype)
  h = dropout(h.reshape(*x.shape[:-1], -1) @ core.astype(x.dtype))
  h = h.reshape(*h.shape[:-1], core.shape[1] // rank, rank) @ v.astype(x.dtype)
  return h.reshape(*x.shape[:-1], -1) * scale


def fact_updates(fact: dict[str, Any] | None, scale: float,
                 train: bool) -> Callable[[jax.Array, str], jax.Array] | None:
  """(input, projection name) -> FacT's update of that projection's output, for a block's
  `fact` ({'u', 'v', 'cores'}; None: no FacT, no function). Call it inside the module
  that owns the projections: the dropout is that module's."""
  if not fact:
    return None
  dropout = nn.Dropout(BOTTLENECK_DROPOUT, deterministic=not train)
  return lambda x, name: fact_update(x, fact['u'], fact['cores'][name], fact['v'], scale,
                                     dropout)
