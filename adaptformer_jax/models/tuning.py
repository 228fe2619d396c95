"""The one home of tuning methods: what each trains, what a checkpoint may lack, how
they combine, and the trainable mask and frozen-parameter handling derived from that.

A method is a row of `METHODS`; `parse` reads `model.tuning` ('adaptformer',
'adaptformer+vpt_deep', ...) once into a `Tuning` that the model, the trainable
mask and the checkpoint loader all read. Which parameters train is data (regex
rules, big_vision style). Adding a method is one row here and its layer in
`models/layers.py`, called from `vit.VisionTransformer`.
"""
import dataclasses
import re
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import optax

from adaptformer_jax.errors import ConfigError
from adaptformer_jax.errors import did_you_mean

HEAD = 'head/.*'  # every method trains a fresh classifier head
# SSF's scale/shift pairs, named ssf_<the layer they follow> (vit.py).
SSF = r'(block\d+/((attn|mlp)/)?)?ssf_\w+/(scale|shift)'


@dataclasses.dataclass(frozen=True)
class Method:
  """One tuning method.

  Attributes:
    trainable: regexes (full match on '/'-joined parameter paths) of what trains.
    added: regexes of the parameters the method adds to a plain ViT; a backbone
      checkpoint lacks them, so they keep their fresh init on load.
    label: what the added parameters are called in the one log line per load.
    load_hint: the config fix when a checkpoint's copy of `added` does not fit.
  """
  trainable: tuple[str, ...]
  added: tuple[str, ...] = ()
  label: str = ''
  load_hint: str = ''


METHODS = {
    'full': Method(('.*',)),
    'linear': Method((HEAD,)),
    'adaptformer': Method(
        (HEAD, r'block\d+/adapter/.*'), added=(r'block\d+/adapter/.*',), label='adapter',
        load_hint="the checkpoint's adapters do not fit: match model.tuning "
                  "('adaptformer') and model.adapter (bottleneck, scale, layernorm)"),
    'vpt_shallow': Method((HEAD, 'prompts'), added=('prompts',), label='VPT prompts'),
    'vpt_deep': Method(
        (HEAD, 'prompts'), added=('prompts',), label='VPT prompts',
        load_hint="the checkpoint has VPT prompts: match model.tuning ('vpt_deep') "
                  'and model.vpt.num_tokens'),
    'lora': Method((HEAD, r'block\d+/attn/lora_.*'), added=(r'block\d+/attn/lora_[qv]/.*',),
                   label='LoRA'),
    # SSF (Lian et al. 2022): a scale and shift after the patch embedding, each norm,
    # qkv, the attention output, fc1 and fc2; the official optimizer trains them + head.
    'ssf': Method((HEAD, SSF), added=(SSF,), label='SSF',
                  load_hint="the checkpoint's SSF scales and shifts do not fit: match "
                            "model.tuning ('ssf') and the architecture"),
    # BitFit as VPT's 'tinytl-bias' (the "Bias" row of the VTAB tables): every parameter
    # named bias (LayerNorm, patch embedding, attention, MLP) + head; adds nothing.
    'bitfit': Method((HEAD, r'(.*/)?(\w+_)?bias')),
    # Adapter+ (Steitz & Roth 2024): a bottleneck after the block (model.adapter_plus).
    'adapter_plus': Method(
        (HEAD, r'block\d+/adapter_plus/.*'), added=(r'block\d+/adapter_plus/.*',),
        label='Adapter+',
        load_hint="the checkpoint's Adapter+ adapters do not fit: match model.tuning "
                  "('adapter_plus') and model.adapter_plus.dim"),
    # RepAdapter (Luo et al. 2023) and FacT (Jie & Deng 2023): models/layers.py.
    'repadapter': Method(
        (HEAD, r'block\d+/repadapter_(attn|mlp)/.*'),
        added=(r'block\d+/repadapter_(attn|mlp)/.*',), label='RepAdapter',
        load_hint="the checkpoint's RepAdapters do not fit: match model.tuning ('repadapter') "
                  'and model.repadapter (dim, groups, placement)'),
    'fact_tt': Method(
        (HEAD, 'fact/.*', r'block\d+/fact/.*'), added=(r'block\d+/fact/.*', 'fact/.*'),
        label='FacT', load_hint="the checkpoint's FacT-TT cores do not fit: match "
                                "model.tuning ('fact_tt') and model.fact.rank"),
    'fact_tk': Method(
        (HEAD, 'fact/.*'), added=('fact/.*',), label='FacT',
        load_hint="the checkpoint's FacT factors do not fit: match model.tuning ('fact_tt' "
                  "or 'fact_tk') and model.fact.rank"),
}

# Methods that cannot be combined: both own the 'prompts' (the 'fact/...') parameters.
EXCLUSIVE = (('vpt_shallow', 'vpt_deep'), ('fact_tt', 'fact_tk'))

# Model fields that do not change what exported weights mean (compute dtype, memory
# policy, train-time dropout, the init of fresh leaves, input size): an adapter
# export may be swapped into a model with other values. Every other field -- the
# architecture, the tuning method and its settings (adapter.scale/placement/
# layernorm, lora.rank/alpha, vpt.num_tokens, ...), `trainable` -- must match.
EXPORT_FREE_FIELDS = ('dtype', 'remat', 'adapter.dropout', 'head_init_std', 'image_size',
                      'adapter_plus.drop_path')


@dataclasses.dataclass(frozen=True)
class Tuning:
  """A parsed, validated `model.tuning` string: the methods and what the model builds."""
  methods: tuple[str, ...]

  def __contains__(self, method: str) -> bool:
    return method in self.methods

  @property
  def vpt(self) -> str | None:
    """'deep', 'shallow' or None."""
    for depth in ('deep', 'shallow'):
      if f'vpt_{depth}' in self.methods:
        return depth
    return None

  @property
  def trainable(self) -> tuple[str, ...]:
    """The union of the methods' trainable rules, in order, without repeats."""
    rules = []
    for m in self.methods:
      rules += [r for r in METHODS[m].trainable if r not in rules]
    return tuple(rules)


PLAIN = Tuning(('full',))  # a ViT with no method's parameters


def parse(tuning: str) -> Tuning:
  """`model.tuning` split on '+', each method checked, combinations checked."""
  methods = tuple(m.strip() for m in str(tuning).split('+'))
  for m in methods:
    if m not in METHODS:
      raise ConfigError(
          f'model.tuning: unknown method {m!r}{did_you_mean(m, METHODS)}; '
          f"allowed: {', '.join(METHODS)} (combine with '+').")
  for group in EXCLUSIVE:
    chosen = [m for m in group if m in methods]
    if len(chosen) > 1:
      raise ConfigError(f"model.tuning: choose one of {' and '.join(map(repr, chosen))}.")
  return Tuning(methods)


# Variables a backbone checkpoint may lack, whatever the tuning: every method's
# added parameters, the head and its BatchNorm statistics keep their fresh init.
FRESH_ON_LOAD = re.compile(
    'params/(' + '|'.join(dict.fromkeys(r for m in METHODS.values() for r in m.added))
    + f'|{HEAD})|batch_stats/{HEAD}')

# (regex over '/'-joined variable paths, fix) for checkpoint leaves of a method that do not fit.
LOAD_HINTS = tuple((f'params/{m.added[0]}', m.load_hint)
                   for m in METHODS.values() if m.load_hint)

# (regex over '/'-joined variable paths, what they are) for the leaves that start fresh on
# load, as the load log line names them.
FRESH_LABELS = tuple(dict.fromkeys(
    (f'params/{r}', m.label) for m in METHODS.values() for r in m.added)) + (
        (f'(params|batch_stats)/{HEAD}', 'head'),)


# ---------------------------------------------------------------- masks and freezing


def trainable_rules(model_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Regexes (full match on '/'-joined paths) of the parameters that train."""
  if model_cfg.trainable:
    return tuple(model_cfg.trainable)
  return parse(model_cfg.tuning).trainable


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
