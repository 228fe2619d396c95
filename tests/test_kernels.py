"""model.kernels='pallas': the fused MLP kernels (models/kernels.py) in Pallas interpret mode on
the CPU, against the XLA path: values and gradients, f32 and bf16, odd token counts, a pad token."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptformer_jax import models
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.models import attention
from adaptformer_jax.models import kernels
from adaptformer_jax.models import vit
from conftest import IMAGES
from conftest import tiny_cfg

# Tiles smaller than the tiny shapes: several tiles per axis, ragged last ones.
TILES = kernels.Tiles(rows=16, cols=32, depth=16)
WIDTH, MLP_DIM = 32, 48  # 48: fc1's last column tile is half outside


def relative_error(got, want):
  got, want = np.float64(got), np.float64(want)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def xla_mlp(gelu, eps, x, scale, shift, w1, b1, w2, b2):
  """The XLA path of vit.Block's MLP branch: flax's LayerNorm, vit.DenseGelu, nn.Dense."""
  dtype = x.dtype
  normed = nn.LayerNorm(epsilon=eps, dtype=dtype).apply(
      {'params': {'scale': scale, 'bias': shift}}, x)
  h = vit.DenseGelu(w1.shape[1], gelu, dtype).apply({'params': {'kernel': w1, 'bias': b1}},
                                                    normed)
  return nn.Dense(w2.shape[1], dtype=dtype).apply({'params': {'kernel': w2, 'bias': b2}}, h)


def inputs(tokens, dtype, seed=0):
  """x, LayerNorm scale and shift (f32), fc1 and fc2 weights and biases (`dtype`)."""
  k = jax.random.split(jax.random.key(seed), 7)
  normal = lambda key, shape, s=1.0: s * jax.random.normal(key, shape, jnp.float32)
  return (normal(k[0], (2, tokens, WIDTH), 2.0).astype(dtype) + 0.5,
          1.0 + normal(k[1], (WIDTH,), 0.2), normal(k[2], (WIDTH,), 0.2),
          normal(k[3], (WIDTH, MLP_DIM), WIDTH ** -0.5).astype(dtype),
          normal(k[4], (MLP_DIM,), 0.5).astype(dtype),
          normal(k[5], (MLP_DIM, WIDTH), MLP_DIM ** -0.5).astype(dtype),
          normal(k[6], (WIDTH,), 0.1).astype(dtype))


def values_and_grads(fn, args, cotangent):
  """fn(*args) and the gradients of <fn(*args), cotangent> for every argument, jitted."""
  def run(*a):
    out, pullback = jax.vjp(fn, *a)
    return out, pullback(cotangent.astype(out.dtype))
  return jax.jit(run)(*args)


def test_erf_and_every_gelu_derivative_match_jax():
  """The kernels' own erf (Triton has none) and GELU derivatives, against jax on f32."""
  h = jnp.linspace(-7.0, 7.0, 4001, dtype=jnp.float32)
  np.testing.assert_allclose(kernels.erf(h), jax.lax.erf(h), atol=1e-6)
  for form, (gelu, derivative) in kernels.GELU.items():
    np.testing.assert_allclose(gelu(h), vit.GELU[form](h), atol=2e-6, err_msg=form)
    np.testing.assert_allclose(derivative(h), jax.vmap(jax.grad(vit.GELU[form]))(h),
                               atol=1e-5, err_msg=form)  # f32 cancellation near -1


@pytest.mark.parametrize('dtype,tokens,gelu', [
    ('float32', 197, 'exact'),   # ViT-B/16's token count
    ('bfloat16', 197, 'exact'),
    ('bfloat16', 5, 'tanh'),     # fewer rows than one tile
    ('float32', 9, 'quick'),     # (every GELU form's derivative: the test above)
])
def test_fused_mlp_matches_the_xla_path(dtype, tokens, gelu):
  """Output and the gradients of x, both LayerNorm parameters and all four fc weights, against
  the XLA path in f32 (on the same inputs): f32 to float rounding; bf16 within 0.8%, where
  the kernels measured 0.2-0.4% and XLA's own bf16 path 0.4-1.3% (it rounds h to bf16
  before the bias and GELU, the kernel after)."""
  args = inputs(tokens, jnp.dtype(dtype))
  cotangent = jax.random.normal(jax.random.key(9), args[0].shape)
  plan = kernels.Plan(1e-6, gelu, TILES, interpret=True)
  got = values_and_grads(lambda *a: kernels.norm_mlp(plan, *a), args, cotangent)
  assert got[0].dtype == args[0].dtype
  assert [g.dtype for g in got[1]] == [a.dtype for a in args]
  want = values_and_grads(lambda *a: xla_mlp(gelu, 1e-6, *a),
                          [a.astype(jnp.float32) for a in args], cotangent)
  tolerance = 2e-5 if dtype == 'float32' else 8e-3
  names = ['output', 'x', 'ln scale', 'ln shift', 'fc1 kernel', 'fc1 bias', 'fc2 kernel',
           'fc2 bias']
  errors = {name: relative_error(g, w) for name, g, w in
            zip(names, [got[0], *got[1]], [want[0], *want[1]])}
  assert all(e < tolerance for e in errors.values()), errors


def test_a_pad_token_changes_no_real_token_or_gradient():
  """ViT-B/16's pad token (attention.pad_tokens): a 198th row of zeros whose output nothing reads
  (zero cotangent) leaves the 197 real rows' outputs and every gradient as without it."""
  args = inputs(197, jnp.bfloat16)
  padded = (jnp.pad(args[0], ((0, 0), (0, 1), (0, 0))), *args[1:])
  cotangent = jax.random.normal(jax.random.key(9), args[0].shape)
  plan = kernels.Plan(1e-6, 'exact', TILES, interpret=True)
  fused = lambda *a: kernels.norm_mlp(plan, *a)
  out, grads = values_and_grads(fused, args, cotangent)
  out_pad, grads_pad = values_and_grads(fused, padded,
                                        jnp.pad(cotangent, ((0, 0), (0, 1), (0, 0))))
  assert np.isfinite(np.float32(out_pad)).all()
  np.testing.assert_array_equal(np.float32(out_pad[:, :197]), np.float32(out))
  assert not np.asarray(grads_pad[0][:, 197:]).any()
  np.testing.assert_array_equal(np.float32(grads_pad[0][:, :197]), np.float32(grads[0]))
  for g, g_pad in zip(grads[1:], grads_pad[1:]):
    np.testing.assert_allclose(np.float32(g_pad), np.float32(g), rtol=1e-2, atol=1e-6)


def test_vit_with_pallas_kernels_matches_xla_with_a_pad_token(monkeypatch):
  """The whole tiny ViT, bf16, with one pad token forced (as cuDNN attention gets on a GPU):
  the same parameters, and logits and gradients within bf16 rounding of model.kernels='xla'."""
  monkeypatch.setattr(attention, 'pad_tokens', lambda *args, **kwargs: 1)
  xla = models.build(tiny_cfg(dtype='bfloat16', depth=1))
  pallas = models.build(tiny_cfg(dtype='bfloat16', depth=1, kernels='pallas'))
  variables = jax.jit(xla.init)(jax.random.key(0), IMAGES)
  params = dict(variables['params'])  # a random head, or no gradient reaches the blocks
  params['head'] = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), a.shape),
                                params['head'])
  labels = jnp.arange(len(IMAGES))

  def loss(model, p):
    logits = model.apply({'params': p}, IMAGES).astype(jnp.float32)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean(), logits

  with kernels.interpret(TILES):
    shapes = jax.eval_shape(pallas.init, jax.random.key(0), IMAGES)
    (_, got), got_grads = jax.jit(jax.value_and_grad(lambda p: loss(pallas, p),
                                                     has_aux=True))(params)
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)
  (_, want), want_grads = jax.jit(jax.value_and_grad(lambda p: loss(xla, p),
                                                     has_aux=True))(params)
  assert relative_error(got, want) < 2e-2
  grads = jax.tree_util.tree_leaves_with_path(got_grads)
  errors = {jax.tree_util.keystr(path): relative_error(g, w) for (path, g), w in
            zip(grads, jax.tree.leaves(want_grads)) if np.any(w)}
  assert any('fc1' in path for path in errors) and max(errors.values()) < 5e-2, errors


def test_pallas_kernels_off_a_gpu_is_one_config_error():
  model = models.build(tiny_cfg(kernels='pallas'))
  with pytest.raises(ConfigError, match=r"model.kernels='pallas' needs an NVIDIA GPU .*"
                                        r"use model.kernels='xla'"):
    jax.eval_shape(model.init, jax.random.key(0), IMAGES)
  with pytest.raises(ConfigError, match=r"model.kernels: must be one of 'xla', 'pallas', "
                                        r"got 'triton'"):
    models.preset('vit_ti16', kernels='triton')


@pytest.mark.parametrize('method', ['ssf', 'fact_tt', 'repadapter'])
def test_pallas_kernels_refuse_a_method_that_changes_the_mlp_branch(method):
  with pytest.raises(ConfigError, match=(
      rf"model.kernels='pallas' fuses the plain MLP branch .*; tuning {method} changes it")):
    tiny_cfg(tuning=method, kernels='pallas')
  tiny_cfg(tuning='repadapter', kernels='pallas', repadapter=dict(placement='attn'))
