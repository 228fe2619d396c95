"""`load(path, model_cfg)`: one entry for every pretrained checkpoint, never a silent partial load.

`load` reads the official AdaptFormer (image and video) / MAE / VideoMAE / timm
PyTorch checkpoints (timm's DINOv2, CLIP and SigLIP included), DINOv2's and
OpenCLIP's own state dicts, big_vision (AugReg, SigLIP) `.npz` files -- training
checkpoints too -- and this project's own exports, and returns variables shaped
exactly like `models.build(cfg).init(...)`. Layouts are told apart by their keys,
so users never name the format. Anything that would load silently wrong (missing
backbone weights, leftover keys, wrong shapes, an ambiguous final norm) is one
UserError listing every offending key: only the leaves a tuning method adds and the
head may start fresh, and one log line per load says how many leaves came from where.
"""
import os
import re
from typing import Any

from absl import logging
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adaptformer_jax.errors import UserError
from adaptformer_jax.models import presets
from adaptformer_jax.models import tuning
from adaptformer_jax.weights import diagnose
from adaptformer_jax.weights import fit
from adaptformer_jax.weights import formats
from adaptformer_jax.weights import integrity
from adaptformer_jax.weights import layouts

def load(path: str | os.PathLike, model_cfg: ml_collections.ConfigDict, *,
         init_variables: dict[str, Any] | None = None, rng: jax.Array | None = None,
         strict: bool = True, init_has_backbone: bool = True) -> dict[str, Any]:
  """Variables for `models.build(model_cfg)` with the weights of checkpoint `path`.

  Args:
    path: a PyTorch `.pth` (official AdaptFormer, MAE, timm, DINOv2, OpenCLIP), a
      `.safetensors` (timm, or this project's '/'-keyed export), a big_vision
      `.npz` (a bare model or a training checkpoint), or an orbax checkpoint
      directory holding 'params' (and 'batch_stats').
    model_cfg: a valid model ConfigDict (as `models.preset` gives; a job validates its
      config once, before it loads); the result matches its `init` tree exactly.
    init_variables: values for the leaves the checkpoint lacks (adapters, LoRA,
      prompts, head). An export of this project that holds no backbone leaf at
      all (an adapter export) takes the whole backbone from here.
    rng: used to init those leaves when `init_variables` is None (default key 0).
    strict: if False, checkpoint keys the model has no place for are a warning.
      It never lets a backbone leaf start fresh.
    init_has_backbone: False when `init_variables` are a fresh init (training from
      `config.init_from`): an adapter export then cannot supply the backbone.

  Returns:
    {'params': ..., 'batch_stats': ... (bn_linear head only)} of numpy arrays.
  """
  model = presets.module(model_cfg)
  dummy = jnp.zeros((1, *presets.input_shape(model_cfg)), jnp.float32)
  target = flax.traverse_util.flatten_dict(
      jax.eval_shape(model.init, jax.random.key(0), dummy), sep='/')

  flat, kind = formats.read(path)
  layout, converted, ignored = layouts.convert(path, flat, kind)
  fresh_why = {}  # our path -> why it keeps its initial value
  if _mae_final_norm(path, model_cfg, converted, layout):
    converted = {k: v for k, v in converted.items() if not k.startswith('params/norm/')}
    ignored['final norm (MAE convention with pool=gap)'] = 2
    fresh_why.update({k: 'fc_norm (MAE: starts at identity)' for k in target
                      if k.startswith('params/fc_norm/')})
  grid = presets.token_grid(model_cfg)
  loaded, problems = fit.match(converted, target, grid, model_cfg.posemb_resample, fresh_why)
  missing = sorted(set(target) - set(loaded))
  backbone = [k for k in target if not tuning.FRESH_ON_LOAD.fullmatch(k)]
  # An adapter export, or the method + head file of an official training script (SSF,
  # Adapter+'s Lightning checkpoint, RepAdapter, FacT), holds no backbone leaf: the
  # backbone comes from init_variables.
  backbone_elsewhere = not any(k in converted for k in backbone) and (
      layout == 'this project' or any(_method_leaf(k) for k in converted))
  if backbone_elsewhere and not (init_variables is not None and init_has_backbone):
    raise UserError(
        f'{path} holds no backbone, only adapters and a head (an adapter export, or the '
        'method + head file of an official training script): as config.init_from pass '
        'the backbone they were trained on (for an export, adapter_config.json beside it '
        'names it); to evaluate or predict with an export, pass its folder as --adapters '
        '(in Python: load the backbone first and pass it as init_variables).')
  mismatched = {k for k, _ in problems['shape mismatches (checkpoint vs model)']}
  partly = _partly_loaded(model_cfg, loaded, missing)
  problems['missing from the checkpoint'] = [
      (k, f'{k} {tuple(target[k].shape)}') for k in missing
      if k not in mismatched and (k in partly or not (
          tuning.FRESH_ON_LOAD.fullmatch(k) or k in fresh_why or backbone_elsewhere))]
  ignored['unexpected keys (strict=False)'] = len(problems['unexpected in the checkpoint'])
  diagnose.raise_or_warn(path, problems, strict, converted, model_cfg, layout == 'this project')
  integrity.check_values(path, {converted[k][1]: v for k, v in loaded.items()})

  if missing:
    if init_variables is None:
      init_variables = model.init(rng if rng is not None else jax.random.key(0), dummy)
    fresh = flax.traverse_util.flatten_dict(init_variables, sep='/')
    if set(fresh) != set(target):
      raise ValueError('init_variables do not match the model tree: '
                       f'{sorted(set(fresh) ^ set(target))[:5]}')
    loaded.update({k: fresh[k] for k in missing})
  _log_load(path, layout, backbone, missing, fresh_why, ignored, backbone_elsewhere,
            fit.posemb_note(converted, target, model_cfg.posemb_resample)
            if len(grid) == 2 else '')
  out = {k: np.asarray(loaded[k], target[k].dtype) for k in target}
  return flax.traverse_util.unflatten_dict(out, sep='/')

def _method_leaf(key: str) -> bool:
  """Whether `key` is a leaf some tuning method adds (not the head)."""
  return bool(tuning.FRESH_ON_LOAD.fullmatch(key)) and '/head/' not in key

def _partly_loaded(model_cfg, loaded, missing):
  """The missing leaves of each method of which the checkpoint holds some: a method
  comes from a checkpoint whole or not at all, never half trained and half fresh."""
  out = set()
  for m in tuning.parse(model_cfg.tuning).methods:
    own = re.compile('params/(' + '|'.join(tuning.METHODS[m].added or ['(?!)']) + ')')
    if any(own.fullmatch(k) for k in loaded):
      out.update(k for k in missing if own.fullmatch(k))
  return out

def _mae_final_norm(path, model_cfg, converted, layout):
  """Whether pool='gap' drops the checkpoint's final norm, as MAE fine-tuning does.

  A final norm without fc_norm means either "norm, then pool" (timm fc_norm=False,
  big_vision gap) or an MAE-style backbone whose fine-tuning starts fc_norm fresh.
  A backbone without a classifier is taken as the latter; a checkpoint with a head
  was trained on the normed features, so pool='gap' would silently change them.
  """
  if not (model_cfg.pool == 'gap' and 'params/norm/scale' in converted
          and 'params/fc_norm/scale' not in converted):
    return False
  if any(k.startswith('params/head/') for k in converted) or layout == 'big_vision':
    raise UserError(
        f"{path}: the checkpoint normalises before its head (final norm, no fc_norm), "
        "but model.pool='gap' averages first and normalises with a fresh fc_norm. "
        "Choose model.pool='gap_prenorm' (norm, then the mean: timm global_pool='avg' "
        "with fc_norm=False, big_vision pool_type='gap') or model.pool='cls' (the class "
        'token after the norm).')
  return True

def _log_load(path, layout, backbone, missing, fresh_why, ignored, backbone_elsewhere,
              note):
  """The one line per load: where every leaf came from."""
  missing = set(missing)
  why = {}
  for k in sorted(missing):
    if k in fresh_why:
      reason = fresh_why[k]
    elif backbone_elsewhere and not tuning.FRESH_ON_LOAD.fullmatch(k):
      reason = 'backbone from init_variables'
    else:
      reason = next((name for pattern, name in tuning.FRESH_LABELS if re.fullmatch(pattern, k)),
                    'not in the checkpoint')
    why[reason] = why.get(reason, 0) + 1
  from_file = sum(k not in missing for k in backbone)
  skipped = ', '.join(f'{n} {what}' for what, n in ignored.items() if n)
  logging.info('%s (%s layout): %d of %d backbone leaves from the file; %d leaves fresh%s%s%s',
              path, layout, from_file, len(backbone), len(missing),
              f" ({', '.join(f'{n} {r}' for r, n in why.items())})" if why else '',
              f'; ignored: {skipped}' if skipped else '', note)
