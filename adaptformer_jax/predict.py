"""Class probabilities for image files or arrays: eval preprocessing, one jitted softmax per batch.

`predict` is the library call; `write_csv` the `--mode predict` output, one row per
image with its top-k classes.
"""
import csv
import functools
import io
from typing import Any, Sequence

import jax
import ml_collections
from jax.sharding import NamedSharding
import numpy as np
import tqdm

from adaptformer_jax import data
from adaptformer_jax import files
from adaptformer_jax import models
from adaptformer_jax import sharding
from adaptformer_jax.errors import UserError

UNREADABLE = '<unreadable>'  # the label column of a file that does not decode


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(model, variables, images):
  return jax.nn.softmax(model.apply(variables, images, train=False).astype(np.float32))


def predict(variables: dict[str, Any], config: ml_collections.ConfigDict, images: Sequence, *,
            batch_size: int = 0, progress: bool = False) -> np.ndarray:
  """(len(images), num_classes) softmax probabilities of the model `config.model`.

  `images` are all file paths (any format `folder.decode` reads) or all uint8 arrays
  (H, W) or (H, W, C) of any size; they get the eval preprocessing of
  `config.data` (eval_pp, normalize) at `config.model.image_size`. A file that
  cannot be decoded gets a row of NaN. Batches hold `batch_size` images
  (default `config.eval_batch_size`); the last is padded, so one compiled
  program serves every batch.
  """
  if config.model.num_classes == 0:  # a config file's "from the data", as configs/folder.py
    raise UserError('predict: config.model.num_classes is 0 (taken from the data); pass '
                    'run.config of `run, variables = jobs.load_variables(config, workdir)`.')
  if len(models.input_shape(config.model)) != 3:
    raise UserError('--mode predict: the model takes video clips; predict classifies '
                    "images, so use an image model (model.patch_embed='2d').")
  model = models.build(config.model)
  size = config.model.image_size
  batch_size = batch_size or config.eval_batch_size
  batches = data.image_batches(images, config.data, image_size=size, batch_size=batch_size)
  out = np.full((len(images), config.model.num_classes), np.nan, np.float32)
  place = _placement(variables)
  with tqdm.tqdm(total=len(images), unit='img', disable=not progress, mininterval=1.0,
                 dynamic_ncols=True) as bar:
    for indices, batch in batches:
      padded = np.zeros((batch_size, size, size, 3), np.float32)
      padded[:len(batch)] = batch
      probabilities = _probabilities(model, variables, place(padded))
      out[indices] = np.asarray(probabilities)[:len(batch)]
      bar.update(int(indices[-1]) + 1 - bar.n)
    bar.update(len(images) - bar.n)
  return out


def _placement(variables):
  """Splits batches over the data axis of the mesh the variables live on, if any."""
  leaf_sharding = getattr(jax.tree.leaves(variables)[0], 'sharding', None)
  if isinstance(leaf_sharding, NamedSharding) and leaf_sharding.mesh.size > 1:
    batch_sharding = sharding.batch_sharding(leaf_sharding.mesh)
    return lambda x: jax.device_put(x, batch_sharding)
  return lambda x: x


def write_csv(path: str, paths: Sequence[str], probabilities: np.ndarray,
              class_names: Sequence[str], top_k: int) -> None:
  """`path,label,prob,label_2,prob_2,...`: each file's top-k classes, most likely first.

  Written atomically: an interrupted run leaves no half CSV.
  """
  top_k = min(top_k, len(class_names))
  header = ['path', 'label', 'prob']
  for k in range(2, top_k + 1):
    header += [f'label_{k}', f'prob_{k}']
  out = io.StringIO(newline='')
  writer = csv.writer(out)
  writer.writerow(header)
  for file, row in zip(paths, probabilities):
    if np.isnan(row).any():
      writer.writerow([file, UNREADABLE, ''] + [''] * (2 * top_k - 2))
      continue
    cells = [file]
    for c in top_classes(row, top_k):
      cells += [class_names[c], f'{row[c]:.6f}']
    writer.writerow(cells)
  files.write_atomic(path, out.getvalue())


def top_classes(probabilities: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest probabilities, largest first (ties: lower index first)."""
  return np.argsort(-probabilities, kind='stable')[:k]
