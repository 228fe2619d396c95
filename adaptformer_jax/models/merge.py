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
from adaptformer_jax.models import layers
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


def _repadapter(params: dict[str, np.ndarray], cfg: ml_collections.ConfigDict) -> None:
  """x + s ((x down + b) up + c) = x (I + s down up) + s (b up + c), a linear map folded
  into the projection that reads it: qkv (and fc1 for placement='block'), as the
  official `set_RepWeight` (up's groups as a block-diagonal matrix, `sparse2dense`)."""
  rep = cfg.repadapter
  sites = (('attn', 'attn/qkv'), ('mlp', 'mlp/fc1'))[:2 if rep.placement == 'block' else 1]
  for i, (where, target) in ((i, site) for i in range(cfg.depth) for site in sites):
    a = f'block{i}/repadapter_{where}/'
    down, up = params.pop(a + 'down/kernel'), _block_diagonal(params.pop(a + 'up/kernel'),
                                                               rep.groups)
    shift = rep.scale * (params.pop(a + 'down/bias') @ up + params.pop(a + 'up/bias'))
    kernel = params[f'block{i}/{target}/kernel']
    params[f'block{i}/{target}/kernel'] = kernel + rep.scale * down @ (up @ kernel)
    _add_bias(params, f'block{i}/{target}', shift @ kernel, cfg)


def _block_diagonal(kernel: np.ndarray, groups: int) -> np.ndarray:
  """layers.GroupedDense's (in / g, out) kernel as the dense (in, out) matrix it stands for."""
  rows, cols = kernel.shape[0], kernel.shape[1] // groups
  dense = np.zeros((rows * groups, kernel.shape[1]))
  for g in range(groups):
    dense[g * rows:(g + 1) * rows, g * cols:(g + 1) * cols] = kernel[:, g * cols:(g + 1) * cols]
  return dense


def _add_bias(params: dict[str, np.ndarray], layer: str, bias: np.ndarray,
              cfg: ml_collections.ConfigDict) -> None:
  """`bias` added to `layer`'s; qkv with model.qkv_bias='qv' takes its q and v thirds (a
  key bias adds the same to every score of a query: the softmax cancels it)."""
  if not layer.endswith('attn/qkv') or cfg.qkv_bias == 'qkv':
    params[f'{layer}/bias'] = params[f'{layer}/bias'] + bias
  elif cfg.qkv_bias == 'qv':
    d = bias.shape[0] // 3
    for j, name in ((0, 'q_bias'), (2, 'v_bias')):
      params[layer.replace('qkv', name)] = params[layer.replace('qkv', name)] + bias[j * d:(j + 1) * d]
  else:
    raise ConfigError("model.qkv_bias='none': a RepAdapter's bias has no qkv bias to fold "
                      "into; merge a model with qkv biases ('qkv' or 'qv').")


def _fact(params: dict[str, np.ndarray], cfg: ml_collections.ConfigDict) -> None:
  """FacT's update x -> s V(U(x) core) is the kernel s U core V (per chunk for fc1's
  output and fc2's input), added to the projection's."""
  m = cfg.mlp_dim // cfg.width
  u, v = params.pop('fact/u/kernel'), params.pop('fact/v/kernel')
  tk = 'fact/c' in params
  if tk:
    cores = params.pop('fact/c') @ params.pop('fact/p')
    per_layer = cores.shape[-1] // cfg.depth
  for i in range(cfg.depth):
    block = (layers.tk_block_cores(cores[..., i * per_layer:(i + 1) * per_layer], m) if tk else
             {n: params.pop(f'block{i}/fact/{n}/kernel')
              for n in ('q', 'k', 'v', 'proj', 'fc1', 'fc2')})
    delta = {n: cfg.fact.scale * _fact_kernel(u, core, v) for n, core in block.items()}
    qkv = np.concatenate([delta['q'], delta['k'], delta['v']], axis=1)
    for target, d in (('attn/qkv', qkv), ('attn/out', delta['proj']),
                      ('mlp/fc1', delta['fc1']), ('mlp/fc2', delta['fc2'])):
      params[f'block{i}/{target}/kernel'] = params[f'block{i}/{target}/kernel'] + d


def _fact_kernel(u: np.ndarray, core: np.ndarray, v: np.ndarray) -> np.ndarray:
  """The (m_in width, m_out width) kernel of layers.fact_update without its scale:
  block (i, j) is U core[i-th rank rows, j-th rank columns] V."""
  width, r = u.shape
  blocks = core.reshape(core.shape[0] // r, r, core.shape[1] // r, r)
  return np.einsum('ca,iajb,bd->icjd', u, blocks, v).reshape(
      blocks.shape[0] * width, blocks.shape[2] * width)


# Folded in this order: what adds to a kernel (LoRA, FacT), then SSF's scales of the
# layers' outputs, then RepAdapter's map of their inputs.
RULES: dict[str, Rule] = {
    'full': lambda params, cfg: None,
    'linear': lambda params, cfg: None,
    'bitfit': lambda params, cfg: None,  # it trains existing biases: nothing added
    'lora': _lora,
    'fact_tt': _fact,
    'fact_tk': _fact,
    'ssf': _ssf,
    'repadapter': _repadapter,
}

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
