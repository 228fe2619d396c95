"""Why a checkpoint does not fit: every offending key at once, and the config fix for each."""
import re
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from adaptformer_jax.errors import UserError
from adaptformer_jax.models import tuning

_HINTS = (  # (our paths among unexpected/mismatched keys, the fix)
    (r'batch_stats/head/bn/.*', "the checkpoint has a BatchNorm head: set model.head='bn_linear'"),
    (r'params/fc_norm/.*', "the checkpoint pools by global average: set model.pool='gap'"),
    (r'params/embedding/kernel', "the patch embeddings differ: a 5-D kernel is a video "
     "tubelet (model.patch_embed='tubelet', model.tubelet = its first size, e.g. a "
     "videomae_* preset), a 4-D one an image patch (model.patch_embed='2d')"),
) + tuning.LOAD_HINTS

_UNEXPECTED_HINTS = (  # (our paths the model has no place for, the fix)
    (r'params/norm_pre/.*', 'the checkpoint normalises before the blocks (CLIP): set '
     'model.ln_pre=True'),
    (r'params/block\d+/ls[12]', 'the checkpoint has LayerScale (DINOv2, VideoMAE): set '
     'model.layerscale'),
    (r'params/registers', 'the checkpoint has register tokens: set model.num_registers'),
    (r'params/map_head/.*', "the checkpoint pools with an attention head: set model.pool='map'"),
    (r'params/pre_logits/.*', 'the checkpoint has a pre-logits layer: set model.pre_logits to '
     'its width, or load with strict=False to drop it'),
    (r'params/cls', 'the checkpoint has a class token: set model.class_token=True'),
    (r'params/block\d+/attn/[qv]_bias', "the checkpoint has separate q and v biases "
     "(VideoMAE/BEiT): set model.qkv_bias='qv'"),
    (r'params/block\d+/attn/qkv/bias', "the checkpoint has a fused qkv bias: set "
     "model.qkv_bias='qkv'"),
    (r'params/pos_embedding', "the checkpoint has a learned position table: set "
     "model.posemb='learned' (a 'sincos' table is never stored)"),
)

_MISSING_HINTS = (  # (our paths the checkpoint lacks, the fix)
    (r'params/block\d+/ls[12]', 'the checkpoint has no LayerScale: set model.layerscale=None'),
    (r'params/registers', 'the checkpoint has no register tokens: set model.num_registers=0'),
    (r'params/norm_pre/.*', 'the checkpoint has no pre-norm: set model.ln_pre=False'),
    (r'params/map_head/.*', "the checkpoint has no attention-pooling head: set model.pool to "
     "'cls', 'gap' or 'gap_prenorm'"),
    (r'params/cls', 'the checkpoint has no class token: set model.class_token=False '
     "and model.pool='gap_prenorm' or 'map'"),
    (r'params/pre_logits/.*', 'the checkpoint has no pre-logits layer: set model.pre_logits=0'),
    (r'params/block\d+/attn/qkv/bias', "the checkpoint's attention has no qkv bias: set "
     "model.qkv_bias='none' (or 'qv')"),
    (r'params/block\d+/attn/[qv]_bias', "set model.qkv_bias='qkv' (fused q, k, v biases)"),
)

def raise_or_warn(path: str, problems: dict[str, list], strict: bool,
                  converted: dict[str, tuple[Any, str]], model_cfg: ml_collections.ConfigDict,
                  own_export: bool) -> None:
  """One UserError listing every offending key, with the likely config fix."""
  unexpected = 'unexpected in the checkpoint'
  if problems[unexpected] and not strict:
    logging.warning('%s: ignoring %d checkpoint keys the model has no place for: %s',
                   path, len(problems[unexpected]),
                   summarise([text for _, text in problems[unexpected]]))
    problems[unexpected] = []
  found = {what: items for what, items in problems.items() if items}
  if not found:
    return
  hints = []
  depth = 1 + max((int(m.group(1)) for k in converted
                   for m in [re.match(r'params/block(\d+)/', k)] if m), default=-1)
  width = (np.shape(converted['params/embedding/kernel'][0])[-1]
           if 'params/embedding/kernel' in converted else None)
  if (depth and depth != model_cfg.depth) or width not in (None, model_cfg.width):
    hints.append(f'the checkpoint has depth {depth}, width {width} and the model depth '
                 f'{model_cfg.depth}, width {model_cfg.width}: choose the matching '
                 'model.name preset or override model.depth/width')
  offending = [k for what in (unexpected, 'shape mismatches (checkpoint vs model)')
               for k, _ in found.get(what, [])]
  hints += [fix for pattern, fix in _HINTS if any(re.fullmatch(pattern, k) for k in offending)]
  extra = [k for k, _ in found.get(unexpected, [])]
  hints += [fix for pattern, fix in _UNEXPECTED_HINTS if any(re.fullmatch(pattern, k) for k in extra)]
  absent = [k for k, _ in found.get('missing from the checkpoint', [])]
  hints += [fix for pattern, fix in _MISSING_HINTS if any(re.fullmatch(pattern, k) for k in absent)]
  if own_export and 'missing from the checkpoint' in found:
    hints.append('an adapter export holds only the trained leaves: load the backbone '
                 'first and pass it as init_variables')
  if unexpected in found:
    hints.append('strict=False ignores unexpected keys')
  listing = '; '.join(f'{what}: {summarise([t for _, t in items])}'
                      for what, items in found.items())
  raise UserError(f'{path} does not fit the model. {listing}. Fix: {"; ".join(hints)}.'
                  if hints else f'{path} does not fit the model. {listing}.')

_BLOCK_INDEX = re.compile(r'(blocks\.|block|encoderblock_)(\d+)')

def summarise(names: list[str]) -> str:
  """Names with block indices folded: 'blocks.{2-11}.norm1.weight (32,)'."""
  groups = {}
  for name in names:
    idx = {int(i) for _, i in _BLOCK_INDEX.findall(name)}
    if len(idx) == 1:
      groups.setdefault(_BLOCK_INDEX.sub(r'\1{}', name), []).append(idx.pop())
    else:
      groups.setdefault(name, [])
  return ', '.join(key.replace('{}', _ranges(sorted(idx))) if idx else key
                   for key, idx in groups.items())

def _ranges(idx):
  """'3' or '{0-2,5}'."""
  if len(idx) == 1:
    return str(idx[0])
  runs, start = [], idx[0]
  for prev, cur in zip(idx, idx[1:] + [None]):
    if cur != prev + 1:
      runs.append(str(start) if start == prev else f'{start}-{prev}')
      start = cur
  return '{' + ','.join(runs) + '}'
