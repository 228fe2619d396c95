"""The ViT block's MLP branch alone: XLA's ops against the fused Pallas kernels (models/kernels.py).

LayerNorm -> fc1 -> GELU -> fc2 at one block's shape, bf16, forward and the input's gradient
(adapter tuning differentiates the frozen branch only for its input): ms per call for XLA
and for each tiling of the kernels, and each one's relative error against XLA in f32 --
which tiling to make the default, and whether the kernels beat XLA before the whole step.

  python benchmarks/mlp_kernels.py [--shape 128,198,768,3072]   (a GPU; the CPU interprets)
"""
import argparse
import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adaptformer_jax.models import kernels
from adaptformer_jax.models import vit

EPS = 1e-6
# kernels.Tiles fields (rows, cols, depth, warps, stages): its default first.
TILINGS = ((128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 3), (128, 256, 64, 8, 3))


def xla_branch(x, scale, shift, w1, b1, w2, b2):
  """model.kernels='xla': flax's LayerNorm, vit.DenseGelu and nn.Dense in x's dtype."""
  dtype = x.dtype
  normed = nn.LayerNorm(epsilon=EPS, dtype=dtype).apply(
      {'params': {'scale': scale, 'bias': shift}}, x)
  h = vit.DenseGelu(w1.shape[1], 'exact', dtype).apply(
      {'params': {'kernel': w1, 'bias': b1}}, normed)
  return nn.Dense(w2.shape[1], dtype=dtype).apply({'params': {'kernel': w2, 'bias': b2}}, h)


def branch_inputs(shape: tuple[int, int, int, int]) -> list[jax.Array]:
  """x (bf16, the last token a zero pad row), LayerNorm scale and shift (f32), fc weights (bf16)."""
  batch, tokens, width, mlp_dim = shape
  k = jax.random.split(jax.random.key(0), 7)
  normal = lambda key, s, scale: scale * jax.random.normal(key, s, jnp.float32)
  x = normal(k[0], (batch, tokens, width), 1.0).at[:, -1].set(0.0)
  return [x.astype(jnp.bfloat16), 1.0 + normal(k[1], (width,), 0.1), normal(k[2], (width,), 0.1),
          normal(k[3], (width, mlp_dim), width ** -0.5).astype(jnp.bfloat16),
          normal(k[4], (mlp_dim,), 0.1).astype(jnp.bfloat16),
          normal(k[5], (mlp_dim, width), mlp_dim ** -0.5).astype(jnp.bfloat16),
          normal(k[6], (width,), 0.1).astype(jnp.bfloat16)]


def forward_and_input_grad(branch: Callable[..., jax.Array], args: list[jax.Array]
                           ) -> Callable[[], tuple[jax.Array, jax.Array]]:
  """A jitted call of `branch` and the gradient of its input x, waiting for both."""
  cotangent = jax.random.normal(jax.random.key(1), args[0].shape).astype(args[0].dtype)

  @jax.jit
  def run(*a):
    out, pullback = jax.vjp(lambda x: branch(x, *a[1:]), a[0])
    return out, pullback(cotangent.astype(out.dtype))[0]

  return lambda: jax.block_until_ready(run(*args))


def relative_error(got: jax.Array, want: jax.Array) -> float:
  got, want = np.float64(got), np.float64(want)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def measure(shape: tuple[int, int, int, int], tilings: tuple, interpret: bool,
            timer: Callable[[Callable[[], Any]], float]) -> list[dict]:
  """One row per implementation: {'impl', 'tiles', 'ms', 'out_rel_err', 'dx_rel_err'}
  or {'impl', 'tiles', 'error'}; `timer(step)` gives seconds per call."""
  args = branch_inputs(shape)
  reference = forward_and_input_grad(xla_branch, [a.astype(jnp.float32) for a in args])()
  impls = [('xla', None, xla_branch)] + [
      ('pallas', t, lambda *a, t=t: kernels.norm_mlp(
          kernels.Plan(EPS, 'exact', kernels.Tiles(*t), interpret), *a)) for t in tilings]
  rows = []
  for name, tiles, branch in impls:
    row = {'impl': name, 'tiles': tiles, 'shape': shape}
    try:
      step = forward_and_input_grad(branch, args)
      out, dx = step()
      row.update(ms=round(timer(step) * 1e3, 3), out_rel_err=relative_error(out, reference[0]),
                 dx_rel_err=relative_error(dx, reference[1]))
    except Exception as e:  # noqa: BLE001  e.g. a tiling Triton cannot compile
      row['error'] = f'{type(e).__name__}: {str(e)[:300]}'
    rows.append(row)
  return rows


def main() -> None:
  import gpu_check  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shape', default='128,198,768,3072', help='batch,tokens,width,mlp_dim')
  args = parser.parse_args()
  shape = tuple(int(v) for v in args.shape.split(','))
  interpret = jax.devices()[0].platform != 'gpu'
  for row in measure(shape, TILINGS[:1] if interpret else TILINGS, interpret,
                     lambda step: gpu_check.timed(step, 1.0)):
    print(json.dumps(row))


if __name__ == '__main__':
  main()
