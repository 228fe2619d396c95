"""Folding a linear tuning method into plain ViT weights (peft's `merge_and_unload`).

A method whose added computation is linear in its input (LoRA's low-rank update,
SSF's scale and shift, RepAdapter, FacT) can be absorbed into the frozen weights it
sits next to: the merged model is a plain ViT (`tuning='full'`) with the same logits
and the inference cost of the backbone. Each mergeable method has one rule in `RULES`;
the merge runs in float64 NumPy and casts back, so large scales lose no precision.
"""
import re
from typing import Any, Callable

import flax.traverse_util
import ml_collections
import numpy as np

from adaptformer_jax.errors import ConfigError
from adaptformer_jax.models import tuning

# A rule folds one method's parameters into the plain ones and deletes them. It takes
# the '/'-joined flat params (float64 NumPy, modified in place) and the model config.
Rule = Callable[[dict[str, np.ndarray], ml_collections.ConfigDict], None]

# Why a method has no rule: its branch is not linear in the input.
NOT_LINEAR = {
    'adaptformer': 'its bottleneck has a ReLU between the projections',
    'vpt_shallow': 'its prompts are extra tokens that every attention layer attends to',
    'vpt_deep': 'its prompts are extra tokens that every attention layer attends to',
    'adapter_plus': 'its bottleneck has a GELU between the projections',
}


def _lora(params: dict[str, np.ndarray], cfg: ml_collections.ConfigDict) -> None:
  """q and v gain x @ a @ b * alpha / rank: add a @ b * alpha / rank to their columns
  of the fused qkv kernel."""
  scale = cfg.lora.alpha / cfg.lora.rank
  for i in range(cfg.depth):
    kernel = params[f'block{i}/attn/qkv/kernel']
    d = kernel.shape[0]
    for j, name in ((0, 'lora_q'), (2, 'lora_v')):
      prefix = f'block{i}/attn/{name}/'
      kernel[:, j * d:(j + 1) * d] += (params.pop(prefix + 'a') @ params.pop(prefix + 'b')
                                        ) * scale


def _ssf(params: dict[str, np.ndarray], cfg: ml_collections.ConfigDict) -> None:
  """(x W + b) * s + t = x (W * s) + (b * s + t): each scale/shift pair into the kernel
  (or LayerNorm scale) and bias of the layer it follows."""
  if cfg.qkv_bias != 'qkv' or cfg.pool == 'gap':
    raise ConfigError(
        "model.tuning='ssf' merges only into a model with a fused qkv bias "
        "(model.qkv_bias='qkv') and a final norm to fold into (model.pool not 'gap': "
        "fc_norm would normalise the scale away); this model has "
        f'qkv_bias={cfg.qkv_bias!r}, pool={cfg.pool!r}.')
  for name in [k[:-len('/scale')] for k in params if re.search(r'(^|/)ssf_\w+/scale$', k)]:
    layer = re.sub(r'ssf_(\w+)$', r'\1', name)  # ssf_<layer> follows <layer>
    scale, shift = params.pop(name + '/scale'), params.pop(name + '/shift')
    weight = layer + ('/scale' if re.search(r'(^|/)norm\d?$', layer) else '/kernel')
    params[weight] *= scale
    params[layer + '/bias'] = params[layer + '/bias'] * scale + shift


RULES: dict[str, Rule] = {  # folded in this order: SSF scales what the others add to
    'full': lambda params, cfg: None,
    'linear': lambda params, cfg: None,
    'bitfit': lambda params, cfg: None,  # it trains existing biases: nothing added
    'lora': _lora,
    'ssf': _ssf,
}


def mergeable(method: str) -> bool:
  return method in RULES


def merge_tuning(variables: Any, model_cfg: ml_collections.ConfigDict
                 ) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
  """(variables, model config) of a plain ViT with the same logits: every method of
  `model_cfg.tuning` folded into the weights, `tuning='full'`, no method parameters.

  A method that is not linear in its input cannot be merged: a ConfigError says so.
  """
  methods = tuning.parse(model_cfg.tuning).methods
  refused = [m for m in methods if m not in RULES]
  if refused:
    raise ConfigError('; '.join(
        f'model.tuning={m!r} cannot be merged into plain weights: '
        f"{NOT_LINEAR.get(m, 'it has no merge rule')}" for m in refused)
        + f". Mergeable methods: {', '.join(m for m in tuning.METHODS if m in RULES)}.")
  flat = flax.traverse_util.flatten_dict(dict(variables['params']), sep='/')
  dtypes = {k: np.asarray(v).dtype for k, v in flat.items()}
  work = {k: np.asarray(v, np.float64).copy() for k, v in flat.items()}
  for m in (m for m in RULES if m in methods):
    RULES[m](work, model_cfg)
  merged = {k: v.astype(dtypes[k]) for k, v in work.items()}
  out = dict(variables)
  out['params'] = flax.traverse_util.unflatten_dict(merged, sep='/')
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  cfg.tuning = 'full'
  return out, cfg
