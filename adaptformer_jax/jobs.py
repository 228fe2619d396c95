"""The jobs that read a trained run: evaluate it, export its adapters, merge them into
plain weights, predict, load variables.

A trained model is a workdir's checkpoint (latest, or `--checkpoint`) or a backbone
(`config.init_from`) with exported adapters; either records its class names, and
loading one needs no dataset. The jobs take no workdir lock: a run being trained
can be read, its checkpoints appear by atomic rename. Every result names the
checkpoint it came from.
"""
import json
import os
import time
from typing import Any, Sequence

from absl import logging
import flax.traverse_util
import jax
import ml_collections
import numpy as np
import safetensors.numpy

from adaptformer_jax import class_names
from adaptformer_jax import data
from adaptformer_jax import evaluate
from adaptformer_jax import files
from adaptformer_jax import models
from adaptformer_jax import predict
from adaptformer_jax import runtime
from adaptformer_jax import schema
from adaptformer_jax import workdirs
from adaptformer_jax.errors import UserError
from adaptformer_jax.models import mae
from adaptformer_jax.models import merge as merging
from adaptformer_jax.weights import checkpoints
from adaptformer_jax.weights import exports
from adaptformer_jax.weights import timm_layout

EVAL_FILE = 'eval.json'
PREDICTIONS_FILE = 'predictions.csv'
MERGED_WEIGHTS = 'model.safetensors'  # this project's layout: model.init_from reads it
MERGED_CONFIG = 'config.json'
TIMM_WEIGHTS = 'timm_model.safetensors'  # timm's VisionTransformer(**timm_config.json)
TIMM_CONFIG = 'timm_config.json'
SHOWN_PREDICTIONS = 20  # images whose predictions are printed; the CSV has them all


def model_config(config: ml_collections.ConfigDict, workdir: str | None = None,
                 checkpoint_path: str | None = None,
                 adapters: str | None = None) -> tuple[ml_collections.ConfigDict, list[str]]:
  """(config validated, with model.num_classes resolved; the model's class names).

  The names are those the model records; a run from before they were recorded
  falls back on the dataset's. model.num_classes=0 becomes their count; any other
  value must equal it. A workdir without a checkpoint is a UserError.
  """
  if not (adapters or checkpoint_path or workdir and checkpoints.latest_step(workdir) is not None):
    raise UserError(f'--workdir {workdir} has no checkpoint; train first, or pass '
                    '--checkpoint PATH.')
  names = class_names.of_model(workdir, checkpoint_path, adapters)
  if names is None:
    names = data.info(config.data).class_names
  config = runtime.with_num_classes(
      config, len(names), f'the trained model records {len(names)} class names; use the '
      'config it was trained with')
  schema.validate(config)
  return config, list(names)


def trained_model(config: ml_collections.ConfigDict, workdir: str | None = None,
                  checkpoint_path: str | None = None, adapters: str | None = None
                  ) -> tuple[runtime.Run, dict[str, Any], list[str], str]:
  """(run, variables, class names, where the weights came from) of a trained model.

  From the latest checkpoint of `workdir` (or `checkpoint_path`), or -- with
  `adapters` -- the frozen backbone of `config.init_from` with the exported
  adapters swapped in. `run.config` has model.num_classes resolved.
  """
  config, names = model_config(config, workdir, checkpoint_path, adapters)
  run = runtime.Run(config)
  if not adapters:
    variables, source = run.restore(workdir, checkpoint_path)
    return run, variables, names, source
  exports.check_backbone(adapters, config)
  variables = runtime.init_variables(config, run.model, jax.random.key(config.seed))
  variables = exports.swap_in_adapters(adapters, variables, run.mask, config.model)
  return run, run.place(run.stored(variables)), names, os.path.abspath(adapters)


def load_variables(config: ml_collections.ConfigDict, workdir: str | None = None,
                   checkpoint_path: str | None = None,
                   adapters: str | None = None) -> tuple[runtime.Run, dict[str, Any]]:
  """(run, variables) of a trained model (`trained_model`), ready for `run.model.apply`."""
  run, variables, _, _ = trained_model(config, workdir, checkpoint_path, adapters)
  return run, variables


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str,
                     checkpoint_path: str | None = None, adapters: str | None = None,
                     per_class: bool = False) -> dict[str, Any]:
  """Eval job: top-1/top-5 and the confusion matrix of `load_variables(...)`, recorded in
  <workdir>/eval.json, and confusion_matrix.png (with `per_class`, printed per class).

  The data must have the model's classes, in the same order. The record names the
  checkpoint (or adapters) measured. It is written only where it belongs: not over a
  training workdir's record with another run's checkpoint, and a workdir that cannot
  be written (read-only) loses the record with a warning, not the result.
  """
  info = data.info(config.data)
  run, variables, names, source = trained_model(config, workdir, checkpoint_path, adapters)
  class_names.check(names, info.class_names, 'the model was trained on')
  result = evaluate.evaluate(run.model, variables, runtime.eval_dataset(run.config, run))
  # The picture goes where the record goes: never into another run's or a read-only workdir.
  if (jax.process_index() == 0 and os.path.isdir(workdir)
      and _record(workdir, {**result, 'checkpoint': source})):
    runtime.write_confusion(workdir, result, names)
  if per_class:
    print(evaluate.per_class_table(result['confusion'], names))
  return result


def _record(workdir: str, record: dict[str, Any]) -> bool:
  """Writes <workdir>/eval.json where it belongs; False where it was not written."""
  path = os.path.join(workdir, EVAL_FILE)
  own = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if os.path.isdir(own) and os.path.dirname(record['checkpoint']) != own:
    logging.warning('%s not written: it records the checkpoints of this workdir, and %s '
                    'is not one of them.', path, record['checkpoint'])
    return False
  try:
    files.write_atomic(path, json.dumps(record))
  except OSError as e:
    logging.warning('%s not written (%s); the printed result is the only record.', path,
                    e.strerror)
    return False
  return True


def export(config: ml_collections.ConfigDict, workdir: str, out_dir: str,
           checkpoint_path: str | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Export job: writes the trainable leaves of the latest checkpoint to out_dir
  (of a pre-training run: the encoder, which downstream models load).

  A different export already in out_dir is replaced only with `overwrite`.
  """
  run, variables, names, source = trained_model(config, workdir, checkpoint_path)
  mask = mae.encoder_mask(run.mask) if models.is_pretraining(run.model) else run.mask
  return exports.export_adapters(out_dir, variables, mask, run.config.model, names,
                                 source=source, backbone=exports.backbone_record(run.config),
                                 overwrite=overwrite)


def merge(config: ml_collections.ConfigDict, workdir: str | None, out_dir: str,
          checkpoint_path: str | None = None, adapters: str | None = None,
          overwrite: bool = False) -> list[str]:
  """Merge job: the trained model with its tuning method folded into plain ViT weights
  (`models.merge.merge_tuning`), written to out_dir in this project's layout and, where
  timm's VisionTransformer can hold the model, in timm's. Returns the files written.
  """
  run, variables, names, source = trained_model(config, workdir, checkpoint_path, adapters)
  merged, model_cfg = merging.merge_tuning(jax.device_get(variables), run.config.model)
  tensors = {f'{collection}/{k}': np.asarray(v) for collection in merged
             for k, v in flax.traverse_util.flatten_dict(merged[collection], sep='/').items()}
  record = {'format': 'adaptformer_jax.merged/1', 'model': model_cfg.to_dict(),
            'merged_from': run.config.model.tuning, 'class_names': names, 'checkpoint': source}
  written = {MERGED_WEIGHTS: safetensors.numpy.save(tensors),
             MERGED_CONFIG: json.dumps(record, indent=2).encode()}
  no_timm = timm_layout.unsupported(model_cfg)
  if no_timm:
    print(f"No timm copy: timm's VisionTransformer cannot hold {'; '.join(no_timm)}.")
  else:
    written[TIMM_WEIGHTS] = safetensors.numpy.save(timm_layout.state_dict(merged, model_cfg))
    written[TIMM_CONFIG] = json.dumps({'kwargs': timm_layout.timm_kwargs(model_cfg),
                                       'class_names': names}, indent=2).encode()
  workdirs.check_writable(out_dir, '--out')
  clash = [f for f in written if os.path.exists(os.path.join(out_dir, f))]
  if clash and not overwrite:
    raise UserError(f'--out {out_dir} already holds {", ".join(clash)}; pass --overwrite to '
                    'replace them, or choose a new directory.')
  for name, content in written.items():
    files.write_atomic(os.path.join(out_dir, name), content)
  return sorted(written)


def predict_files(config: ml_collections.ConfigDict, workdir: str | None,
                  images: Sequence[str], *, out: str | None = None, top_k: int = 5,
                  checkpoint_path: str | None = None,
                  adapters: str | None = None) -> tuple[list[str], np.ndarray]:
  """Predict job: the top-k classes of image files, printed and in <out>/predictions.csv.

  `images` are files, directories (searched recursively) or globs; `out` defaults
  to the workdir. A file that does not decode is reported in the CSV and the rest
  go on. Returns (paths, probabilities).
  """
  if not images:
    raise UserError('--mode predict needs --images PATH [PATH ...] (files, directories or '
                    'globs).')
  if top_k < 1:
    raise UserError(f'--top_k={top_k}: must be at least 1.')
  if jax.process_count() > 1:
    raise UserError('--mode predict runs in one process; start it without the multi-host '
                    'flags.')
  paths = data.list_images(images)
  out = out or workdir
  if not out:
    raise UserError('--mode predict needs --out DIR (or --workdir) for predictions.csv.')
  workdirs.check_writable(out, '--out')
  run, variables, names, _ = trained_model(config, workdir, checkpoint_path, adapters)
  start = time.perf_counter()
  probabilities = predict.predict(variables, run.config, paths, progress=config.progress)
  elapsed = time.perf_counter() - start
  csv_path = os.path.join(out, PREDICTIONS_FILE)
  predict.write_csv(csv_path, paths, probabilities, names, top_k)
  unreadable = np.isnan(probabilities).any(axis=1)
  for path, row, bad in list(zip(paths, probabilities, unreadable))[:SHOWN_PREDICTIONS]:
    top = ', '.join(f'{names[c]} {row[c]:.3f}' for c in predict.top_classes(row, top_k))
    print(f'{path}: {predict.UNREADABLE if bad else top}')
  if len(paths) > SHOWN_PREDICTIONS:
    print(f'... and {len(paths) - SHOWN_PREDICTIONS} more in {csv_path}')
  print(f'Predicted {len(paths) - unreadable.sum()} images ({unreadable.sum()} unreadable) in '
        f'{elapsed:.1f}s ({len(paths) / elapsed:.1f} images/s, compiling included); wrote '
        f'{csv_path}.')
  return paths, probabilities
