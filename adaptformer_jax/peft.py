"""Which parameters train (regex rules, big_vision style) and an optimizer that freezes the rest."""
import re
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import optax

from adaptformer_jax.errors import ConfigError
from adaptformer_jax.models import methods


def trainable_rules(model_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Regexes (full match on '/'-joined paths) of the parameters that train."""
  if model_cfg.trainable:
    return tuple(model_cfg.trainable)
  return methods.parse(model_cfg.tuning).trainable


def trainable_mask(params: Any, model_cfg: ml_collections.ConfigDict) -> Any:
  """A pytree of bools shaped like `params`: True where the parameter trains.

  A rule that matches no parameter is an error: it is almost always a typo.
  """
  rules = trainable_rules(model_cfg)
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  try:
    compiled = [re.compile(r) for r in rules]
  except re.error as e:
    raise ConfigError(f'model.trainable: invalid regex ({e}).') from None
  mask = {path: any(r.fullmatch(path) for r in compiled) for path in flat}
  unused = [r.pattern for r in compiled if not any(r.fullmatch(p) for p in flat)]
  if unused:
    raise ConfigError(
        f'model.trainable: rule(s) {unused} match no parameter; parameter paths '
        f"look like {sorted(flat)[:3]}. Fix the regex or the tuning method.")
  return flax.traverse_util.unflatten_dict(mask, sep='/')


def count(tree: Any, mask: Any = None) -> int:
  """Number of scalars in `tree` (only where `mask` is True, if given)."""
  sizes = jax.tree.map(lambda x: x.size, tree)
  if mask is not None:
    sizes = jax.tree.map(lambda s, m: s if m else 0, sizes, mask)
  return int(sum(jax.tree.leaves(sizes)))


def store_frozen(params: Any, mask: Any, dtype: Any) -> Any:
  """Frozen floating leaves cast to `dtype` (storage only: layers compute in model.dtype).

  bfloat16 halves the frozen backbone's memory; trainable leaves, and so their
  gradients and optimizer state, keep their float32.
  """
  dtype = jnp.dtype(dtype)
  return jax.tree.map(
      lambda p, m: p if m or not jnp.issubdtype(p.dtype, jnp.floating) else p.astype(dtype),
      params, mask)


def freeze(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
  """`tx` on the trainable leaves; frozen leaves get zero updates and no optimizer state."""
  labels = jax.tree.map(lambda m: 'train' if m else 'frozen', mask)
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)


def stop_frozen_gradients(params: Any, mask: Any) -> Any:
  """Marks frozen leaves constant, so autodiff computes no weight gradients for them

  (and keeps none of the activations only those gradients would need).
  """
  return jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)


def apply_updates(params: Any, updates: Any, mask: Any) -> Any:
  """optax.apply_updates on trainable leaves; frozen leaves are returned untouched (bit-exact)."""
  return jax.tree.map(lambda p, u, m: optax.apply_updates(p, u) if m else p,
                      params, updates, mask)
