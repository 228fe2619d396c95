"""Evaluation over padded batches: every example counts exactly once.

A batch with 'views' (B, V, ...) instead of 'image' (the official multi-clip x
multi-crop video test, data.eval_clips x data.eval_crops) is scored on the mean
of each video's V view logits, as the official `merge` averages the saved
outputs per video before its top-1/top-5; the loss is that of the mean logits.
"""
import functools
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaptformer_jax import models


@functools.partial(jax.jit, static_argnums=0)
def eval_step(model: nn.Module, variables: dict[str, Any],
              batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Masked sums of top-1/top-5 hits and loss, and the confusion counts, of one batch
  (of a pre-training model: its loss)."""
  mask = batch['mask'].astype(jnp.float32)
  if models.is_pretraining(model):
    # The same hidden patches at every evaluation: losses of two steps compare.
    loss = model.apply(variables, batch['image'], train=False,
                       rngs={'mask': jax.random.key(0)})
    return {'loss': jnp.sum(loss * mask), 'count': jnp.sum(mask)}
  if 'views' in batch:  # one view of every video at a time: the memory of one batch
    per_view = jax.lax.map(lambda views: model.apply(variables, views, train=False),
                           jnp.moveaxis(batch['views'], 1, 0))
    logits = per_view.mean(axis=0)
  else:
    logits = model.apply(variables, batch['image'], train=False)
  labels = batch['label']
  k = min(5, logits.shape[-1])
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  predicted = jnp.argmax(logits, -1)
  num_classes = logits.shape[-1]
  confusion = jnp.zeros((num_classes, num_classes)).at[labels, predicted].add(mask)
  return {'top1': jnp.sum((predicted == labels) * mask),
          'top5': jnp.sum(top5 * mask), 'loss': jnp.sum(loss * mask),
          'count': jnp.sum(mask), 'confusion': confusion}


def evaluate(model: nn.Module, variables: dict[str, Any],
             dataset: Iterable[dict[str, jax.Array]]) -> dict[str, Any]:
  """Top-1, top-5, mean loss and the confusion matrix of `model` over `dataset`
  (a pre-training model: mean loss only).

  `confusion[i][j]` counts examples of class i predicted as class j (a list of
  lists, so the result stays JSON); the other values are scalars.
  """
  totals = None
  for batch in dataset:
    sums = eval_step(model, variables, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop('count'))
  confusion = totals.pop('confusion', None)
  result = {k: float(v) / count for k, v in totals.items()}
  result['count'] = int(count)
  if confusion is not None:
    result['confusion'] = np.rint(confusion).astype(int).tolist()
  return result


def describe(result: dict[str, Any]) -> str:
  """One line for an `evaluate` result: top-1 and top-5, or the pre-training loss."""
  if 'top1' in result:
    return (f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
            f"({result['count']} images)")
  return f"loss {result['loss']:.4f}  ({result['count']} images)"


def scalars(result: dict[str, Any]) -> dict[str, float]:
  """The scalar metrics of an `evaluate` result, for metric writers."""
  return {k: v for k, v in result.items() if k != 'confusion'}


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
  """Top-1 accuracy of each class (NaN for a class without examples)."""
  counts = np.asarray(confusion, np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.diag(counts) / counts.sum(axis=1)


def per_class_table(confusion: np.ndarray, class_names: Sequence[str]) -> str:
  """A header and one line per class: name, top-1, number of images."""
  counts = np.asarray(confusion).sum(axis=1)
  width = max(len(n) for n in [*class_names, 'class'])
  rows = [f"{'class':<{width}}   top-1  images"]
  rows += [f'{name:<{width}}  {acc:.4f}  {count:>6}' for name, acc, count in
           zip(class_names, per_class_accuracy(confusion), counts)]
  return '\n'.join(rows)
