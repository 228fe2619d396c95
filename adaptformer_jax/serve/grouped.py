"""The modules that belong to adapter slots, run once per group of images sharing a slot.

The mixed-batch program (serve/multi.py) vmaps the ViT over images. Gathering each
image's own copy of its adapter's weights (`stacked[slots]`) writes batch x adapter-size
floats per layer; on XLA:CPU, at small token counts, that copy costs more than the
adapters' own compute (measured in docs/serving.md). Instead, every module whose variables
all belong to the slots (AdaptMLP, LoRA, the head) is intercepted and applied to the
batch laid out as K groups of M rows, one slot per group, vmapped over the groups:

- 'every_slot': group k is slot k, read straight from the stacked weights (no copy); M
  is at least the largest number of images of one slot;
- 'present': the slots present in the batch, their weights gathered once per group;
- 'image': a group per image (the per-image gather), which fits every batch.

Rows past a group's images are zeros, computed and dropped. Which layout fits a batch
depends on its slot counts, so every candidate is a branch of one `lax.switch`, the
first that fits taken: one program per batch size still serves every mix.
"""
import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Layout:
  """K groups (`groups`) of M rows (`rows`). `kind`: 'every_slot' (group k is slot k, its
  weights read in place), 'present' (the slots present, in slot order, their weights
  gathered once per group) or 'image' (a group per image, weights gathered per image)."""
  groups: int
  rows: int
  kind: str

  def fits(self, counts: jax.Array) -> jax.Array:
    """Whether a batch with `counts` images per slot fits (a traced bool)."""
    if self.kind == 'image':
      return jnp.bool_(True)
    fits = jnp.max(counts) <= self.rows
    return fits if self.kind == 'every_slot' else fits & (jnp.sum(counts > 0) <= self.groups)


def layouts(batch: int, capacity: int) -> tuple[Layout, ...]:
  """The candidates for `batch` images over `capacity` slots, in order of preference:
  every slot with its fair share of rows; one slot (a single-adapter batch); every slot
  with twice its fair share (uneven traffic); last, a group per image, which fits every
  batch. Candidates that would compute more than twice the batch's rows are left out,
  and none follows one that fits every batch. Each candidate is compiled into every
  slot module (code and memory per candidate and batch size: docs/serving.md), hence
  these few."""
  pow2 = lambda n: 1 << max(n - 1, 0).bit_length()
  fair = pow2(-(-batch // capacity))  # rows per slot when the slots share the batch evenly
  candidates = [Layout(capacity, fair, 'every_slot'), Layout(1, batch, 'present'),
                Layout(capacity, 2 * fair, 'every_slot'), Layout(batch, 1, 'image')]
  kept = []
  for layout in candidates:
    if layout.kind != 'image' and layout.groups * layout.rows > 2 * batch:
      continue  # more than twice the rows: a group per image costs less
    if layout not in kept:
      kept.append(layout)
    if layout.rows >= batch and (layout.kind == 'every_slot' or batch == 1):
      break  # fits every batch
  return tuple(kept)


def choose(candidates: tuple[Layout, ...], counts: jax.Array) -> jax.Array:
  """The index of the first candidate that fits (the last fits every batch)."""
  fits = jnp.stack([layout.fits(counts) for layout in candidates])
  return jnp.argmax(fits)


def apply_grouped(fn: Callable[[Any, jax.Array], jax.Array], variables: Any, x: jax.Array,
                  slots: jax.Array, capacity: int) -> jax.Array:
  """`fn(variables[slots[b]], x[b])` for every b, one `fn` call per group.

  `variables`: a pytree of (capacity, ...) arrays; `x`: (B, e, ...) with `e` the leading
  (batch) axis `fn` sees per image; `fn(group_variables, rows)` maps (n * e, ...) rows.
  """
  counts = jnp.bincount(slots, length=capacity)
  onehot = jax.nn.one_hot(slots, capacity, dtype=jnp.int32)
  # rank[b]: how many images before b share its slot (its row within its slot's group)
  rank = jnp.take_along_axis(jnp.cumsum(onehot, 0) - onehot, slots[:, None], 1)[:, 0]
  candidates = layouts(x.shape[0], capacity)
  branches = [lambda v, x, s, layout=layout: _run(layout, fn, v, x, s, counts, rank)
              for layout in candidates]
  return jax.lax.switch(choose(candidates, counts), branches, variables, x, slots)


def _run(layout: Layout, fn, variables, x, slots, counts, rank):
  if layout.kind == 'image':
    return jax.vmap(fn)(jax.tree.map(lambda leaf: leaf[slots], variables), x)
  batch, per_image = x.shape[0], x.shape[1]
  if layout.kind == 'every_slot':
    group = slots
  else:  # the present slots, in slot order; unused groups read slot 0 and are dropped
    present = counts > 0
    group = (jnp.cumsum(present) - 1)[slots]
    chosen = jnp.nonzero(present, size=layout.groups, fill_value=0)[0]
    variables = jax.tree.map(lambda leaf: leaf[chosen], variables)
  position = group * layout.rows + rank
  source = jnp.full((layout.groups * layout.rows,), batch, jnp.int32).at[position].set(
      jnp.arange(batch, dtype=jnp.int32))
  rows = jnp.take(x, source, axis=0, mode='fill', fill_value=0)
  rows = rows.reshape(layout.groups, layout.rows * per_image, *x.shape[2:])
  out = jax.vmap(fn)(variables, rows)
  out = out.reshape(layout.groups * layout.rows, per_image, *out.shape[2:])
  return jnp.take(out, position, axis=0)


_INSIDE = contextvars.ContextVar('grouped_inside', default=False)


def split(stacked: dict[str, Any], frozen: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Slot leaves ('collection/module/.../leaf' keys) -> ({module path: its variables}, the
  rest): the outermost modules whose variables are all slot leaves run grouped; the other
  slot leaves (VPT prompts, which belong to the ViT itself) are gathered per image."""
  def modules(key: str) -> list[str]:
    parts = key.split('/')[1:-1]
    return ['/'.join(parts[:i]) for i in range(1, len(parts) + 1)]
  has_frozen = {m for key in frozen for m in modules(key)}
  owned = {m for key in stacked for m in modules(key) if m not in has_frozen}
  outermost = {m for m in owned if m.rpartition('/')[0] not in owned}
  grouped, rest = {}, {}
  for key, value in stacked.items():
    collection, _, name = key.partition('/')
    module = next((m for m in modules(key) if m in outermost), None)
    if module is None:
      rest[key] = value
    else:
      grouped.setdefault(module, {}).setdefault(collection, {})[name[len(module) + 1:]] = value
  return ({m: {c: flax.traverse_util.unflatten_dict(leaves, sep='/') for c, leaves in v.items()}
           for m, v in grouped.items()}, rest)


@contextlib.contextmanager
def intercept(owned: dict[str, Any], slot: jax.Array, capacity: int) -> Iterator[None]:
  """Within it (inside a vmap over images, `slot` the image's), calls of the `owned`
  modules run grouped over the whole batch (`apply_grouped`)."""
  def interceptor(next_fun, args, kwargs, context):
    path = '/'.join(context.module.scope.path)
    if context.method_name != '__call__' or path not in owned or _INSIDE.get():
      return next_fun(*args, **kwargs)
    module = context.module.clone(parent=None)
    x, *rest = args

    def fn(variables, rows):
      token = _INSIDE.set(True)
      try:
        return module.apply(variables, rows, *rest, **kwargs)
      finally:
        _INSIDE.reset(token)

    @jax.custom_batching.custom_vmap
    def call(variables, x, slot):  # one image, outside a vmap: its slot's weights
      return fn(jax.tree.map(lambda leaf: leaf[slot], variables), x)

    @call.def_vmap
    def _batched(axis_size, in_batched, variables, x, slot):
      del axis_size
      if any(jax.tree.leaves(in_batched[0])) or not all(in_batched[1:]):
        raise ValueError('grouped modules expect unbatched slot weights and batched inputs')
      return apply_grouped(fn, variables, x, slot, capacity), True

    return call(owned[path], x, slot)

  with nn.intercept_methods(interceptor):
    yield
