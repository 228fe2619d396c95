"""Softmax attention for the ViT: which implementation runs it (XLA, or cuDNN's fused
kernel where it applies), and the pad token that lets cuDNN take odd token counts."""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from adaptformer_jax.errors import ConfigError


def attention_implementation(choice: str, dtype: Any, head_dim: int, lengths: tuple[int, ...] = (),
                             device: Any = None) -> str:
  """model.attention -> jax.nn.dot_product_attention's implementation ('xla' | 'cudnn').

  'auto' takes cuDNN's fused (flash) kernel where it is known to apply -- an
  NVIDIA GPU, bf16/f16 inputs, a head dim that is a multiple of 8 and <= 128,
  even query and key lengths (`lengths`) -- and XLA's unfused attention
  everywhere else (CPU, TPU, f32). The even lengths: jax (0.11.2) runs cuDNN
  attention forward over an odd token count but refuses to differentiate it
  ("Unsupported sequence length Q 197, KV 197" for ViT-B/16's 197 tokens); the
  ViT's blocks therefore carry one masked pad token where that makes the count
  even (`pad_tokens`), and an explicit 'cudnn' pads any other odd lengths per
  call (`padded_attention`).
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
  even = all(n % 2 == 0 for n in lengths)
  return 'cudnn' if choice == 'cudnn' or (choice == 'auto' and usable and even) else 'xla'


def pad_tokens(cfg: ml_collections.FrozenConfigDict, dtype: Any, tokens: int,
               device: Any = None) -> int:
  """Pad tokens (0 or 1) the blocks carry so that their self-attention over `tokens`
  real ones can run on cuDNN: one where the count is odd and cuDNN would take the
  even count. Padding the whole stack once costs one token of every layer's work;
  copying q, k and v to a padded length in every layer costs more (RESULTS.md)."""
  if tokens % 2 == 0:
    return 0
  padded = (tokens + 1, tokens + 1)
  return int(attention_implementation(cfg.attention, dtype, cfg.width // cfg.num_heads,
                                      padded, device) == 'cudnn')


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
  """jax.nn.dot_product_attention of (B, N, H, D) inputs with odd lengths padded to even
  and the padding masked, then cut off."""
  pad = lambda t: jnp.pad(t, ((0, 0), (0, t.shape[1] % 2), (0, 0), (0, 0)))
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v),
                                     **valid_lengths(q.shape[0], q.shape[1], k.shape[1]),
                                     implementation=implementation)
  return out[:, :q.shape[1]]


def valid_lengths(batch: int, queries: int, keys: int) -> dict[str, jax.Array]:
  """The masks of padded attention: the real query and key counts of every example."""
  full = lambda n: jnp.full((batch,), n, jnp.int32)
  return dict(query_seq_lengths=full(queries), key_value_seq_lengths=full(keys))


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                         cfg: ml_collections.FrozenConfigDict, dtype: jnp.dtype,
                         pad: int = 0, keys: jax.Array | None = None) -> jax.Array:
  """Softmax attention of (B, Nq, D) queries over (B, Nk, D) keys/values, per head,
  with model.attention's implementation. The last `pad` tokens are padding, masked
  out (their own outputs are never read). `keys` (B, Nk) bool, where given, is the
  keys each example attends to instead (pad included), on XLA's implementation."""
  heads = cfg.num_heads
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1)
  if keys is not None:
    return jax.nn.dot_product_attention(split(q), split(k), split(v), mask=keys[:, None, None],
                                        implementation='xla').reshape(q.shape)
  lengths = (q.shape[1], k.shape[1])
  implementation = attention_implementation(cfg.attention, dtype, q.shape[-1] // heads, lengths)
  if implementation == 'cudnn' and any(n % 2 for n in lengths):
    return padded_attention(split(q), split(k), split(v), implementation).reshape(q.shape)
  masks = valid_lengths(q.shape[0], lengths[0] - pad, lengths[1] - pad) if pad else {}
  return jax.nn.dot_product_attention(split(q), split(k), split(v), **masks,
                                      implementation=implementation).reshape(q.shape)
