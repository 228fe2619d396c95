"""Many adapter exports as one model: the union config and the stacked adapter leaves.

The union model is the CONFIG's backbone with every method any export uses
(`union_config`); each export becomes one slot of arrays stacked on a leading axis
(`stack`), in the union's shapes:

- a method an export lacks is its identity: AdaptMLP and LoRA leaves all zero (the
  branch adds exactly 0); VPT prompt slots are masked out of attention
  (`VisionTransformer(prompt_lengths=...)`), so a prompt-free export sees no prompt;
- sizes that differ are padded with zeros, which change no output: adapter
  bottlenecks and LoRA ranks (relu(0) = 0, zero rows add nothing), prompt counts
  (padded in front, masked), class counts (padded logits masked before the softmax);
- per-export constants are folded into the weights: AdaptMLP's scale (fixed or learned)
  into its up projection, LoRA's alpha / rank into `b` (the union runs scale 1 and
  alpha = rank); a linear head in a union with BatchNorm heads gets statistics that
  make the BatchNorm an identity (mean 0, var 1 - eps). Folding rounds differently
  from the export's own model by a few float32 ulps, far below the 1e-5 equality
  asked of the probabilities (tests/test_serve_model.py).

Exports that change the frozen backbone (full fine-tuning, or `trainable` rules over
backbone weights), VPT-shallow next to VPT-deep, and AdaptFormer exports that differ
in placement or LayerNorm cannot share one program and are refused, saying why.
"""
import copy
import dataclasses
import re
from typing import Any

import flax.traverse_util
import ml_collections
import numpy as np

from adaptformer_jax.errors import UserError
from adaptformer_jax.models import tuning

# Model fields that belong to an export, not to the backbone: they may differ between
# the exports of one server (with tuning.EXPORT_FREE_FIELDS, which never matter).
TASK_FIELDS = ('tuning', 'adapter', 'vpt', 'lora', 'num_classes', 'head', 'head_init_std',
               'trainable')
# The methods the server stacks (besides linear heads). A slot can lack any of them: the
# union's identity for them is all-zero leaves (AdaptMLP, LoRA) or masked prompts (VPT).
ABSENT_OK = ('adaptformer', 'lora', 'vpt_shallow', 'vpt_deep')
BN_EPS = 1e-6  # the head's BatchNorm epsilon (vit.Head)


@dataclasses.dataclass(frozen=True)
class Export:
  """One adapter export, read: its name, directory, model config, class names and tensors
  ('params/...' and 'batch_stats/...' keys, as exports.py writes them)."""
  name: str
  path: str
  model: ml_collections.ConfigDict
  class_names: tuple[str, ...]
  tensors: dict[str, np.ndarray]

  @property
  def methods(self) -> tuple[str, ...]:
    return tuning.parse(self.model.tuning).methods

  @property
  def trainable_params(self) -> int:
    return int(sum(v.size for k, v in self.tensors.items() if k.startswith('params/')))


def check_backbone_fields(export: Export, backbone: ml_collections.ConfigDict) -> None:
  """Refuses an export whose model differs from the CONFIG's backbone outside TASK_FIELDS
  (the tensors are not read yet: `check_frozen_untouched` checks them)."""
  skip = lambda k: k.split('.')[0] in TASK_FIELDS or k in tuning.EXPORT_FREE_FIELDS
  mine = flax.traverse_util.flatten_dict(export.model.to_dict(), sep='.')
  theirs = flax.traverse_util.flatten_dict(backbone.to_dict(), sep='.')
  absent = '<absent>'
  diffs = [f'{k}: export {mine.get(k, absent)!r} vs config {theirs.get(k, absent)!r}'
           for k in sorted(set(mine) | set(theirs))
           if not skip(k) and _json(mine.get(k, absent)) != _json(theirs.get(k, absent))]
  if diffs:
    raise UserError(f'--adapters {export.name}={export.path} was trained on another backbone '
                    'model (' + '; '.join(diffs) + '); serve it with the config it was '
                    'trained with.')


def check_frozen_untouched(export: Export) -> None:
  """Refuses an export that holds backbone weights (full fine-tuning, `trainable` rules over
  the backbone): the server has one frozen copy of them for every task."""
  frozen = sorted(k for k in export.tensors if k.startswith('params/')
                  and not tuning.FRESH_ON_LOAD.fullmatch(k))
  if frozen:
    shown = ', '.join(frozen[:3]) + (f' and {len(frozen) - 3} more' if len(frozen) > 3 else '')
    raise UserError(f'--adapters {export.name}={export.path} changes the frozen backbone '
                    f'itself ({shown}; tuning {export.model.tuning!r}): it cannot share one '
                    'backbone with other tasks. Serve it alone with --mode predict.')


def _json(value: Any) -> Any:
  """Tuples and lists compare equal, as they do after a trip through JSON."""
  return list(value) if isinstance(value, tuple) else value


def union_config(backbone: ml_collections.ConfigDict,
                 exports: list[Export]) -> ml_collections.ConfigDict:
  """The CONFIG's model with every method of `exports`, sized for the largest of each."""
  methods = list(dict.fromkeys(m for e in exports for m in e.methods if m != 'linear'))
  if 'vpt_shallow' in methods and 'vpt_deep' in methods:
    shallow = [e.name for e in exports if 'vpt_shallow' in e.methods]
    deep = [e.name for e in exports if 'vpt_deep' in e.methods]
    raise UserError(f'--adapters: VPT-shallow ({", ".join(shallow)}) and VPT-deep '
                    f'({", ".join(deep)}) exports cannot share one program (their prompts '
                    'enter different blocks); serve them from two servers.')
  for method in methods:
    if method not in ABSENT_OK:
      users = [e.name for e in exports if method in e.methods]
      raise UserError(f'--adapters: {", ".join(users)} use(s) {method!r}, which the server '
                      f'cannot stack ({", ".join(ABSENT_OK)} and linear heads it can); '
                      'fold a linear method into plain weights with --mode merge and serve '
                      'that with --mode predict.')
  model = copy.deepcopy(backbone)
  model.tuning = '+'.join(methods) or 'linear'
  model.trainable = ()
  model.num_classes = max(len(e.class_names) for e in exports)
  model.head = 'bn_linear' if any(e.model.head == 'bn_linear' for e in exports) else 'linear'
  users = lambda m: [e for e in exports if m in e.methods]
  if users('adaptformer'):
    for option in ('placement', 'layernorm'):
      values = {e.name: e.model.adapter[option] for e in users('adaptformer')}
      if len(set(values.values())) > 1:
        raise UserError(f'--adapters: AdaptFormer exports differ in adapter.{option} '
                        f'({values}); one program needs one {option}: serve them from '
                        'separate servers.')
    model.adapter = dict(users('adaptformer')[0].model.adapter.to_dict(),
                         bottleneck=max(e.model.adapter.bottleneck for e in users('adaptformer')),
                         scale=1.0)
  if users('lora'):
    rank = max(e.model.lora.rank for e in users('lora'))
    model.lora = dict(rank=rank, alpha=float(rank))
  vpt = [e for e in exports if any(m.startswith('vpt_') for m in e.methods)]
  if vpt:
    model.vpt.num_tokens = max(e.model.vpt.num_tokens for e in vpt)
  return model


def adapter_leaves(abstract: dict[str, Any], mask: Any) -> dict[str, Any]:
  """{'params/...' or 'batch_stats/...': ShapeDtypeStruct} of the leaves a slot owns:
  the union's trainable ones and the head's BatchNorm statistics."""
  flat_mask = flax.traverse_util.flatten_dict(mask, sep='/')
  owned = {f'params/{k}': v for k, v in
           flax.traverse_util.flatten_dict(abstract['params'], sep='/').items() if flat_mask[k]}
  owned.update({f'batch_stats/{k}': v for k, v in flax.traverse_util.flatten_dict(
      abstract.get('batch_stats', {}), sep='/').items()})
  return owned


def stack(exports: list[Export], leaves: dict[str, Any], slots: int) -> dict[str, np.ndarray]:
  """{leaf: (slots, *shape) float32}: slot i holds exports[i] in the union's shapes; slots
  past the exports stay zero (never named by a request)."""
  out = {k: np.zeros((slots, *v.shape), np.float32) for k, v in leaves.items()}
  for i, export in enumerate(exports):
    for key, target in leaves.items():
      out[key][i] = _leaf(export, key, target.shape)
  return out


def prompt_lengths(exports: list[Export], slots: int) -> np.ndarray:
  """(slots,) int32: each slot's VPT prompt count (0 without VPT)."""
  counts = [e.model.vpt.num_tokens if any(m.startswith('vpt_') for m in e.methods) else 0
            for e in exports]
  return np.array(counts + [0] * (slots - len(exports)), np.int32)


def class_counts(exports: list[Export], slots: int) -> np.ndarray:
  """(slots,) int32: each slot's class count (1 for empty slots, never read)."""
  return np.array([len(e.class_names) for e in exports] + [1] * (slots - len(exports)), np.int32)


def _leaf(export: Export, key: str, shape: tuple[int, ...]) -> np.ndarray:
  """The export's value of union leaf `key`, folded and padded to `shape`; its identity
  where the export lacks the leaf's method."""
  value = export.tensors.get(key)
  if value is None:
    if key.endswith('head/bn/var'):
      return np.full(shape, 1.0 - BN_EPS, np.float32)
    if key.endswith('head/bn/mean') or re.search(r'/(adapter|lora_[qv])/|^params/prompts$', key):
      return np.zeros(shape, np.float32)
    raise UserError(f'--adapters {export.name}={export.path}: the export lacks {key}, which '
                    'the other exports of this server have; serve it alone.')
  value = np.asarray(value, np.float32)
  if re.search(r'/adapter/up/(kernel|bias)$', key):
    value = value * _adapter_scale(export, key)
  elif re.search(r'/lora_[qv]/b$', key):
    value = value * (export.model.lora.alpha / export.model.lora.rank)
  front = key == 'params/prompts'  # prompts are right-aligned: the masked slots lead
  pad = [(s - v, 0) if front and axis == 1 else (0, s - v)
         for axis, (v, s) in enumerate(zip(value.shape, shape))]
  if len(value.shape) != len(shape) or any(p < 0 for pad_axis in pad for p in pad_axis):
    raise UserError(f'--adapters {export.name}={export.path}: {key} has shape {value.shape}, '
                    f'which does not fit the union model\'s {tuple(shape)}.')
  return np.pad(value, pad)


def _adapter_scale(export: Export, key: str) -> np.ndarray | float:
  """AdaptMLP's output scale of the block of `key`: the learned scalar or the fixed one."""
  if export.model.adapter.scale == 'learnable':
    return export.tensors[key.split('/up/')[0] + '/scale'].astype(np.float32)
  return float(export.model.adapter.scale)

