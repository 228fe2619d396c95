"""The one home of tuning methods: what each trains, what a checkpoint may lack, how they combine.

A method is a row of `METHODS`; `parse` reads `model.tuning` ('adaptformer',
'adaptformer+vpt_deep', ...) once into a `Tuning` that the model, the trainable
mask and the checkpoint loader all read. Adding a method is one layer in
`peft_layers`, one row here and one branch in `vit.VisionTransformer`.
"""
import dataclasses
import re

from adaptformer_jax.errors import ConfigError
from adaptformer_jax.errors import did_you_mean

HEAD = 'head/.*'  # every method trains a fresh classifier head


@dataclasses.dataclass(frozen=True)
class Method:
  """One tuning method.

  Attributes:
    trainable: regexes (full match on '/'-joined parameter paths) of what trains.
    added: regexes of the parameters the method adds to a plain ViT; a backbone
      checkpoint lacks them, so they keep their fresh init on load.
    load_hint: the config fix when a checkpoint's copy of `added` does not fit.
  """
  trainable: tuple[str, ...]
  added: tuple[str, ...] = ()
  load_hint: str = ''


METHODS = {
    'full': Method(('.*',)),
    'linear': Method((HEAD,)),
    'adaptformer': Method(
        (HEAD, r'block\d+/adapter/.*'), added=(r'block\d+/adapter/.*',),
        load_hint="the checkpoint's adapters do not fit: match model.tuning "
                  "('adaptformer') and model.adapter (bottleneck, scale, layernorm)"),
    'vpt_shallow': Method((HEAD, 'prompts'), added=('prompts',)),
    'vpt_deep': Method(
        (HEAD, 'prompts'), added=('prompts',),
        load_hint="the checkpoint has VPT prompts: match model.tuning ('vpt_deep') "
                  'and model.vpt.num_tokens'),
    'lora': Method((HEAD, r'block\d+/attn/lora_.*'), added=(r'block\d+/attn/lora_[qv]/.*',)),
}

# Methods that cannot be combined: both own the 'prompts' parameter.
EXCLUSIVE = (('vpt_shallow', 'vpt_deep'),)

# Model fields that do not change what exported weights mean (compute dtype, memory
# policy, train-time dropout, the init of fresh leaves, input size): an adapter
# export may be swapped into a model with other values. Every other field -- the
# architecture, the tuning method and its settings (adapter.scale/placement/
# layernorm, lora.rank/alpha, vpt.num_tokens, ...), `trainable` -- must match.
EXPORT_FREE_FIELDS = ('dtype', 'remat', 'adapter.dropout', 'head_init_std', 'image_size')


@dataclasses.dataclass(frozen=True)
class Tuning:
  """A parsed, validated `model.tuning` string: the methods and what the model builds."""
  methods: tuple[str, ...]

  @property
  def adaptformer(self) -> bool:
    return 'adaptformer' in self.methods

  @property
  def lora(self) -> bool:
    return 'lora' in self.methods

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
