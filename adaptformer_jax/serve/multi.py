"""One frozen backbone, many adapter exports, one compiled program per batch size.

`MultiAdapter(config, [(name, dir), ...])` reads the exports, builds the union model
(serve/stack.py) and keeps the backbone once plus each adapter's leaves stacked on a
leading slot axis. `probabilities(images, slots)` classifies a batch in which every
image names its slot: inside one jitted program the unchanged ViT is `jax.vmap`ped over
the images with the backbone unbatched, so XLA still runs each frozen matmul as one
(B * tokens, width) product. The modules that belong to the slots (AdaptMLP, LoRA, the
head) run once per group of images sharing a slot, on that slot's stacked weights
(serve/grouped.py); the VPT prompts, a few tokens, are gathered per image.

Costs: the backbone is held once, each slot by its size in the union's shapes. The
program depends on the batch size, the slot count (rounded up to a power of two) and
the union's shapes (methods, largest bottleneck / rank / prompt count / class count);
the adapters' values are arguments, so another set of exports with the same union
shapes and slot capacity reuses the compiled programs (no recompile), while a new
method or a larger size compiles once per batch size. Each slot module is compiled
once per candidate group layout (grouped.layouts: up to 4), so a program takes a few
times longer to compile than a plain model's.
"""
import copy
import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adaptformer_jax import runtime
from adaptformer_jax.errors import UserError
from adaptformer_jax.models import tuning
from adaptformer_jax.serve import grouped
from adaptformer_jax.serve import stack
from adaptformer_jax.weights import exports as exports_lib


def read_export(name: str, path: str, config: ml_collections.ConfigDict) -> stack.Export:
  """The export at `path`, checked against the CONFIG's backbone (its record of the frozen
  weights, the backbone fields) and against its own model (every trainable leaf present,
  shaped and finite, as `--mode predict --adapters` checks it)."""
  exports_lib.check_backbone(path, config)
  saved = exports_lib.read_adapter_config(path)
  model = ml_collections.ConfigDict(saved['model'])
  for field in tuning.EXPORT_FREE_FIELDS:  # compute settings come from the CONFIG
    parent, _, leaf = field.rpartition('.')
    (model[parent] if parent else model)[leaf] = (
        config.model[parent] if parent else config.model)[leaf]
  names = tuple(saved.get('class_names') or ())
  if len(names) != model.num_classes:
    raise UserError(f'--adapters {name}={path}: records {len(names)} class names for '
                    f'model.num_classes={model.num_classes}; re-export it with --mode export.')
  export = stack.Export(name, path, model, names, {})
  stack.check_backbone_fields(export, config.model)
  own = runtime.Run(_with_model(config, model))
  swapped = exports_lib.swap_in_adapters(path, own.abstract_variables, own.mask, model)
  tensors = {f'{c}/{k}': v for c in ('params', 'batch_stats') for k, v in
             flax.traverse_util.flatten_dict(swapped.get(c, {}), sep='/').items()
             if isinstance(v, np.ndarray)}
  export = stack.Export(name, path, model, names, tensors)
  stack.check_frozen_untouched(export)
  return export


def _with_model(config: ml_collections.ConfigDict,
                model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = copy.deepcopy(config)
  config.model = model
  return config


class MultiAdapter:
  """A backbone with named adapter exports; see the module docstring."""

  def __init__(self, config: ml_collections.ConfigDict, adapters: Sequence[tuple[str, str]]):
    if not adapters:
      raise UserError('--adapters: give at least one NAME=DIR (an export of --mode export).')
    names = [n for n, _ in adapters]
    if len(set(names)) != len(names):
      raise UserError(f'--adapters: names must differ; {sorted(names)} repeats one.')
    self.config = config
    self.exports = [read_export(n, os.path.abspath(p), config) for n, p in adapters]
    union = _with_model(config, stack.union_config(config.model, self.exports))
    run = runtime.Run(union)
    self.model, self.num_classes = run.model, union.model.num_classes
    leaves = stack.adapter_leaves(run.abstract_variables, run.mask)
    self.slots = {e.name: i for i, e in enumerate(self.exports)}
    capacity = 1 << (len(self.exports) - 1).bit_length()
    variables = run.stored(runtime.init_variables(union, run.model, jax.random.key(config.seed)))
    flat = {f'{c}/{k}': v for c in variables for k, v in
            flax.traverse_util.flatten_dict(variables[c], sep='/').items()}
    self.backbone = jax.device_put({k: v for k, v in flat.items() if k not in leaves})
    self.stacked = jax.device_put(stack.stack(self.exports, leaves, capacity))
    self._described = [{'name': e.name, 'method': e.model.tuning, 'classes': list(e.class_names),
                        'trainable_params': e.trainable_params} for e in self.exports]
    # The slots hold the values now: drop the host copies (the server holds each adapter once).
    self.exports = [dataclasses.replace(e, tensors={}) for e in self.exports]
    self.prompt_lengths = jnp.asarray(stack.prompt_lengths(self.exports, capacity))
    self.class_counts = jnp.asarray(stack.class_counts(self.exports, capacity))
    self.image_shape = (config.model.image_size, config.model.image_size, 3)

  def describe(self) -> list[dict[str, Any]]:
    """[{name, method, classes, trainable_params}] of the adapters, in slot order."""
    return self._described

  def probabilities(self, images: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """(B, max classes) softmax of each preprocessed image (B, H, W, 3) float32 through
    its slot's adapter; a slot's columns past its class count are 0."""
    return np.asarray(_probabilities(self.model, self.backbone, self.stacked,
                                     self.prompt_lengths, self.class_counts,
                                     jnp.asarray(images, jnp.float32),
                                     jnp.asarray(slots, jnp.int32)))

  def compile(self, batch_size: int) -> None:
    """Compiles (or finds compiled) the program for `batch_size` images."""
    self.probabilities(np.zeros((batch_size, *self.image_shape), np.float32),
                       np.zeros((batch_size,), np.int32))

  def memory_bytes(self) -> dict[str, int]:
    """Bytes held for the backbone (once) and for the stacked adapter slots."""
    size = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))
    return {'backbone': size(self.backbone), 'adapters': size(self.stacked)}


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(model, backbone, stacked, prompt_lengths, class_counts, images, slots):
  """The one program: vmap the ViT over images, the slot modules grouped by slot
  (serve/grouped.py), other slot leaves gathered per image; mask padded classes."""
  owned, per_image = grouped.split(stacked, backbone)
  capacity = prompt_lengths.shape[0]

  def one(leaves, image, prompts, slot):
    flat = {**backbone, **leaves}
    variables = flax.traverse_util.unflatten_dict({tuple(k.split('/')): v
                                                   for k, v in flat.items()})
    with grouped.intercept(owned, slot, capacity):
      return model.apply(variables, image[None], train=False, prompt_lengths=prompts[None])[0]

  picked = jax.tree.map(lambda leaf: leaf[slots], per_image)
  logits = jax.vmap(one)(picked, images, prompt_lengths[slots], slots).astype(jnp.float32)
  real = jnp.arange(logits.shape[-1]) < class_counts[slots][:, None]
  return jax.nn.softmax(jnp.where(real, logits, -jnp.inf), axis=-1)


def parse_adapters(specs: Sequence[str]) -> list[tuple[str, str]]:
  """'NAME=DIR' flags -> [(name, dir)]; a spec without a name or directory is a UserError."""
  out = []
  for spec in specs:
    name, sep, path = spec.partition('=')
    if not sep or not name or not path:
      raise UserError(f'--adapters {spec}: expected NAME=DIR, e.g. --adapters '
                      'cifar=runs/cifar_export.')
    out.append((name, path))
  return out

