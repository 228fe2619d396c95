"""Evaluation over padded batches: every example counts exactly once."""
import functools
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@functools.partial(jax.jit, static_argnums=0)
def eval_step(model: nn.Module, variables: dict[str, Any],
              batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Masked sums of top-1/top-5 hits and loss over one (possibly padded) batch."""
  logits = model.apply(variables, batch['image'], train=False)
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  k = min(5, logits.shape[-1])
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {'top1': jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
          'top5': jnp.sum(top5 * mask), 'loss': jnp.sum(loss * mask),
          'count': jnp.sum(mask)}


def evaluate(model: nn.Module, variables: dict[str, Any],
             dataset: Iterable[dict[str, jax.Array]]) -> dict[str, float]:
  """Top-1, top-5 and mean loss of `model` over every batch of `dataset`."""
  totals = None
  for batch in dataset:
    sums = eval_step(model, variables, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'top1': float(totals['top1']) / count, 'top5': float(totals['top5']) / count,
          'loss': float(totals['loss']) / count, 'count': int(count)}
