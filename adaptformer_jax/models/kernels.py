"""Fused Pallas kernels for the ViT's MLP branch: model.kernels='pallas'.

Why: on an H100 the elementwise and reduction passes around the matmuls (LayerNorm,
bias, GELU, ...) took 10.6 of the step's 30.4 ms, each near memory bandwidth, and XLA
fuses none of them into cuBLAS's or Triton's matmuls (benchmarks/RESULTS.md). Here the
branch norm -> fc1 -> GELU -> fc2 is one differentiable op (`norm_mlp`):

  forward   mean, rstd of x's rows                 XLA: one reduction, 2 floats a row
            h = LN(x) @ w1 + b1, y = gelu(h)        one kernel: the LayerNorm inside fc1's
                                                    input load, bias and GELU in its epilogue
            z = y @ w2 + b2                         XLA (cuBLAS)
  backward  dh = (dz @ w2^T) * gelu'(h)             one kernel: GELU's derivative inside the
                                                    matmul of fc2's input gradient
            LN(x)'s gradient dh @ w1^T, the LN backward and the weight gradients: XLA

It keeps x, the row statistics and h for the backward pass; y and LN(x) are recomputed
only where weight gradients need them (frozen weights need none, and XLA drops them).
The kernels use Pallas' Triton backend (NVIDIA GPUs); inside `interpret()` they run as
plain XLA ops on any platform, which is how the CPU tests check them.
"""
import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from adaptformer_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes (powers of two, as Triton's blocks must be) and launch settings."""
  rows: int = 128   # tokens per tile
  cols: int = 128   # output features per tile
  depth: int = 64   # the contraction's chunk per loop step
  warps: int = 8
  stages: int = 3


_INTERPRET = contextvars.ContextVar('adaptformer_kernels_interpret', default=None)


@contextlib.contextmanager
def interpret(tiles: Tiles = Tiles()) -> Iterator[None]:
  """Traces the kernels in Pallas interpret mode (plain XLA ops, any platform) with
  `tiles`: the CPU tests, and debugging a kernel. Only functions traced inside it are
  affected; jit caches nothing by this setting, so trace fresh functions inside."""
  token = _INTERPRET.set(tiles)
  try:
    yield
  finally:
    _INTERPRET.reset(token)


def check(device: Any = None) -> None:
  """Raises a ConfigError where model.kernels='pallas' cannot run (outside interpret())."""
  if _INTERPRET.get() is not None:
    return
  device = device or jax.devices()[0]
  if device.platform != 'gpu' or 'nvidia' not in device.device_kind.lower():
    raise ConfigError(
        f"model.kernels='pallas' needs an NVIDIA GPU (Pallas' Triton backend), here "
        f"{device.device_kind} ({device.platform}); use model.kernels='xla'.")
  if jax.device_count() > 1:
    raise ConfigError(
        f"model.kernels='pallas' runs on one GPU (its kernels have no sharding rule yet), "
        f"here {jax.device_count()} devices; use model.kernels='xla'.")


# ---------------------------------------------------------------- activations (f32)
# Triton has no erf: this is XLA's own f32 erf (a rational function on [-4, 4]).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)
_SQRT_HALF, _INV_SQRT_2PI, _TANH_C = 0.7071067811865476, 0.3989422804014327, 0.7978845608028654


def _polynomial(coefficients: tuple[float, ...], x: jax.Array) -> jax.Array:
  out = jnp.full_like(x, coefficients[0])
  for c in coefficients[1:]:
    out = out * x + c
  return out


def erf(x: jax.Array) -> jax.Array:
  """erf of f32 `x` within 4e-7 of the exact value, from ops Triton lowers."""
  x = jnp.minimum(jnp.maximum(x, -4.0), 4.0)
  return x * _polynomial(_ERF_P, x * x) / _polynomial(_ERF_Q, x * x)


def _tanh_form(h: jax.Array) -> tuple[jax.Array, jax.Array]:
  t = jnp.tanh(_TANH_C * (h + 0.044715 * h * h * h))
  return t, _TANH_C * (1.0 + 3 * 0.044715 * h * h)


def _exact_grad(h: jax.Array) -> jax.Array:
  return 0.5 + 0.5 * erf(h * _SQRT_HALF) + h * _INV_SQRT_2PI * jnp.exp(-0.5 * h * h)


def _tanh_grad(h: jax.Array) -> jax.Array:
  t, dt = _tanh_form(h)
  return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * dt


def _quick_grad(h: jax.Array) -> jax.Array:
  s = jax.nn.sigmoid(1.702 * h)
  return s + 1.702 * h * s * (1.0 - s)


# model.gelu -> (gelu, its derivative), both of f32 arrays; the forms of vit.GELU.
GELU = {
    'exact': (lambda h: h * (0.5 + 0.5 * erf(h * _SQRT_HALF)), _exact_grad),
    'tanh': (lambda h: 0.5 * h * (1.0 + _tanh_form(h)[0]), _tanh_grad),
    'quick': (lambda h: h * jax.nn.sigmoid(1.702 * h), _quick_grad),
}


# ------------------------------------------------------------------------- kernels


def _tile(start: jax.Array, size: int, limit: int) -> tuple[pl.Slice, jax.Array]:
  """(slice, in-bounds mask) of one tile along an axis of length `limit`."""
  return pl.ds(start * size, size), start * size + jnp.arange(size) < limit


def _norm_fc1_kernel(x_ref, mean_ref, rstd_ref, scale_ref, shift_ref, w_ref, b_ref,
                     h_ref, y_ref, *, tiles: Tiles, gelu: str):
  """One (rows, cols) tile of h = LN(x) @ w + b and y = gelu(h); x is normalised chunk
  by chunk as it is loaded, so LN(x) is never written."""
  (m, k), n = x_ref.shape, w_ref.shape[1]
  rows, row_ok = _tile(pl.program_id(1), tiles.rows, m)
  cols, col_ok = _tile(pl.program_id(0), tiles.cols, n)
  mean = plgpu.load(mean_ref.at[rows], mask=row_ok, other=0.0)[:, None]
  rstd = plgpu.load(rstd_ref.at[rows], mask=row_ok, other=0.0)[:, None]

  def step(s, acc):
    depth, ok = _tile(s, tiles.depth, k)
    x = plgpu.load(x_ref.at[rows, depth], mask=row_ok[:, None] & ok[None, :], other=0.0)
    # Outside x's columns scale and shift load as 0, so the padded inputs are 0.
    scale = plgpu.load(scale_ref.at[depth], mask=ok, other=0.0)[None, :]
    shift = plgpu.load(shift_ref.at[depth], mask=ok, other=0.0)[None, :]
    normed = ((x.astype(jnp.float32) - mean) * rstd * scale + shift).astype(w_ref.dtype)
    w = plgpu.load(w_ref.at[depth, cols], mask=ok[:, None] & col_ok[None, :], other=0.0)
    return acc + jnp.dot(normed, w, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, pl.cdiv(k, tiles.depth), step,
                          jnp.zeros((tiles.rows, tiles.cols), jnp.float32))
  h = acc + plgpu.load(b_ref.at[cols], mask=col_ok, other=0.0).astype(jnp.float32)[None, :]
  ok = row_ok[:, None] & col_ok[None, :]
  plgpu.store(h_ref.at[rows, cols], h.astype(h_ref.dtype), mask=ok)
  plgpu.store(y_ref.at[rows, cols], GELU[gelu][0](h).astype(y_ref.dtype), mask=ok)


def _gelu_input_grad_kernel(dz_ref, w_ref, h_ref, dh_ref, *, tiles: Tiles, gelu: str):
  """One (rows, cols) tile of dh = (dz @ w^T) * gelu'(h): fc2's input gradient with the
  GELU's derivative applied before it is written."""
  (m, k), n = dz_ref.shape, w_ref.shape[0]
  rows, row_ok = _tile(pl.program_id(1), tiles.rows, m)
  cols, col_ok = _tile(pl.program_id(0), tiles.cols, n)

  def step(s, acc):
    depth, ok = _tile(s, tiles.depth, k)
    dz = plgpu.load(dz_ref.at[rows, depth], mask=row_ok[:, None] & ok[None, :], other=0.0)
    w = plgpu.load(w_ref.at[cols, depth], mask=col_ok[:, None] & ok[None, :], other=0.0)
    return acc + jax.lax.dot_general(dz, w, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, pl.cdiv(k, tiles.depth), step,
                          jnp.zeros((tiles.rows, tiles.cols), jnp.float32))
  ok = row_ok[:, None] & col_ok[None, :]
  h = plgpu.load(h_ref.at[rows, cols], mask=ok, other=0.0).astype(jnp.float32)
  plgpu.store(dh_ref.at[rows, cols], (acc * GELU[gelu][1](h)).astype(dh_ref.dtype), mask=ok)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static settings of one norm_mlp: LayerNorm epsilon, GELU form, tiles, mode."""
  eps: float
  gelu: str
  tiles: Tiles
  interpret: bool


def _launch(kernel: Callable[..., None], plan: Plan, out_shape: Any, rows: int, cols: int,
            *args: jax.Array) -> Any:
  """`kernel` over (column tiles, row tiles): the column tiles vary fastest, so the tiles
  running at once share their rows (read from memory about once) and sweep the weights,
  which stay in L2 (ViT-B/16's fc1 4.7 MB; x at batch 128 is 39 MB)."""
  t = plan.tiles
  return pl.pallas_call(
      functools.partial(kernel, tiles=t, gelu=plan.gelu), out_shape=out_shape,
      grid=(pl.cdiv(cols, t.cols), pl.cdiv(rows, t.rows)), interpret=plan.interpret,
      compiler_params=plgpu.CompilerParams(num_warps=t.warps, num_stages=t.stages),
      name=kernel.__name__.strip('_'))(*args)


# ---------------------------------------------------------------- the fused branch


def _stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Per-row mean and 1/std of (M, D) `x` in f32, as flax's LayerNorm computes them."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1)
  var = jnp.maximum((x * x).mean(-1) - mean * mean, 0.0)
  return mean, jax.lax.rsqrt(var + eps)


def _forward(plan, x, scale, shift, w1, b1, w2, b2):
  flat = x.reshape(-1, x.shape[-1])
  mean, rstd = _stats(flat, plan.eps)
  m, n = flat.shape[0], w1.shape[1]
  h, y = _launch(_norm_fc1_kernel, plan, [jax.ShapeDtypeStruct((m, n), w1.dtype)] * 2, m, n,
                 flat, mean, rstd, scale, shift, w1, b1)
  z = y @ w2 + b2
  return z.reshape(*x.shape[:-1], -1), (x, mean, rstd, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def norm_mlp(plan: Plan, x: jax.Array, scale: jax.Array, shift: jax.Array, w1: jax.Array,
             b1: jax.Array, w2: jax.Array, b2: jax.Array) -> jax.Array:
  """gelu(LayerNorm(x) @ w1 + b1) @ w2 + b2 over x's last axis, with the two kernels
  above; `scale` and `shift` are the LayerNorm's (f32), the rest in the compute dtype."""
  return _forward(plan, x, scale, shift, w1, b1, w2, b2)[0]


def _norm_mlp_fwd(plan, x, scale, shift, w1, b1, w2, b2):
  z, kept = _forward(plan, x, scale, shift, w1, b1, w2, b2)
  return z, (*kept, scale, shift, w1, b1, w2, b2)


def _norm_mlp_bwd(plan, kept, dz):
  x_in, mean, rstd, h, scale, shift, w1, b1, w2, b2 = kept
  x, dz = x_in.reshape(-1, x_in.shape[-1]), dz.reshape(-1, dz.shape[-1])
  dh = _launch(_gelu_input_grad_kernel, plan, jax.ShapeDtypeStruct(h.shape, h.dtype),
               *h.shape, dz, w2, h)
  f32 = jnp.float32
  normed = (x.astype(f32) - mean[:, None]) * rstd[:, None]  # LN(x) before scale and shift
  d_normed_affine = (dh @ w1.T).astype(f32)
  d_normed = d_normed_affine * scale
  dx = rstd[:, None] * (d_normed - d_normed.mean(-1, keepdims=True)
                        - normed * (d_normed * normed).mean(-1, keepdims=True))
  y = GELU[plan.gelu][0](h.astype(f32)).astype(h.dtype)  # only dw2 reads it
  sums = lambda a, like: a.astype(f32).sum(0).astype(like.dtype)
  return (dx.astype(x.dtype).reshape(x_in.shape),
          (d_normed_affine * normed).sum(0), d_normed_affine.sum(0),
          ((normed * scale + shift).astype(w1.dtype).T @ dh).astype(w1.dtype), sums(dh, b1),
          (y.T @ dz).astype(w2.dtype), sums(dz, b2))


norm_mlp.defvjp(_norm_mlp_fwd, _norm_mlp_bwd)


class _DenseParams(nn.Module):
  """nn.Dense's parameters (same names, shapes and init), unapplied."""
  features: int
  kernel_init: Callable[..., jax.Array]

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    return (self.param('kernel', self.kernel_init, (in_features, self.features)),
            self.param('bias', nn.initializers.zeros, (self.features,)))


def fused_mlp(x: jax.Array, norm: nn.LayerNorm, mlp_dim: int, gelu: str, dtype: Any,
              kernel_init: Callable[..., jax.Array]) -> jax.Array:
  """vit.Mlp's branch fc2(gelu(fc1(norm(x)))) through `norm_mlp`, with the parameters
  of vit.Mlp (fc1, fc2) and of `norm` (the caller's LayerNorm, used for nothing else).
  Call it inside vit.Mlp's compact method, whose submodules fc1 and fc2 it creates."""
  tiles = _INTERPRET.get()
  check()
  norm(x)  # creates norm's parameters on init; XLA drops the unused output
  ln = norm.variables['params']
  w1, b1 = _DenseParams(mlp_dim, kernel_init, name='fc1')(x.shape[-1])
  w2, b2 = _DenseParams(x.shape[-1], kernel_init, name='fc2')(mlp_dim)
  x, w1, b1, w2, b2 = nn.dtypes.promote_dtype(x, w1, b1, w2, b2, dtype=dtype)
  plan = Plan(norm.epsilon, gelu, tiles or Tiles(), tiles is not None)
  return norm_mlp(plan, x, ln['scale'].astype(jnp.float32), ln['bias'].astype(jnp.float32),
                  w1, b1, w2, b2)
