"""What every job shares about a config's model: `Run` (module, abstract variables,
trainable mask, mesh), the train state it is stored in, fresh or pretrained variables,
a trained model restored from a checkpoint, and the eval dataset.

Training (train.py) adds the optimizer, the step and the loop on top; evaluation,
export, prediction, the demo and the benchmarks need only this module, never train.py.
"""
import copy
import os
import re
from collections.abc import Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from adaptformer_jax import data
from adaptformer_jax import metrics
from adaptformer_jax import models
from adaptformer_jax import sharding
from adaptformer_jax import weights
from adaptformer_jax.errors import UserError
from adaptformer_jax.models import tuning
from adaptformer_jax.weights import checkpoints

CONFUSION_FILE = 'confusion_matrix.png'


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # micro-batches seen; the data position and dropout RNG derive from it
  params: Any
  batch_stats: Any
  opt_state: Any


def with_num_classes(config: ml_collections.ConfigDict, count: int,
                     mismatch: str) -> ml_collections.ConfigDict:
  """`config` with model.num_classes=0 ("from the data") set to `count` classes (a copy);
  any other value must equal it, else a UserError: 'model.num_classes=N but <mismatch>'."""
  if config.model.num_classes == 0:
    config = copy.deepcopy(config)
    config.model.num_classes = count
  elif config.model.num_classes != count:
    raise UserError(f'model.num_classes={config.model.num_classes} but {mismatch}.')
  return config


def init_variables(config: ml_collections.ConfigDict, model: nn.Module,
                   rng: jax.Array) -> dict[str, Any]:
  """Fresh variables, overwritten by `config.init_from` where the checkpoint has them.

  Leaves matching a `config.init_dont_load` regex (e.g. 'head/.*' to start a new
  task's classifier afresh) keep their fresh values, as big_vision's dont_load.
  """
  fresh = model.init(rng, jnp.zeros((1, *models.input_shape(config.model))), train=False)
  if not config.init_from:
    return dict(fresh)
  loaded = weights.load(config.init_from, config.model, init_variables=fresh,
                        init_has_backbone=False)
  rules = [re.compile(r) for r in config.init_dont_load]
  keep_fresh = lambda path, new, old: old if any(
      r.fullmatch('/'.join(k.key for k in path[1:])) for r in rules) else new
  return jax.tree_util.tree_map_with_path(keep_fresh, dict(loaded), dict(fresh))


class Run:
  """What a config's model is: the module, its abstract variables, the trainable mask, the mesh.

  Needs no dataset (parameter counts, init, shardings are model facts); the step
  plan and optimizer, which do, are the training `Trainer`'s. `config` is a validated
  run config with model.num_classes resolved.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.mesh = sharding.make_mesh(config.get('model_parallel', 1))
    self.model = models.module(config.model)
    example = jnp.zeros((1, *models.input_shape(config.model)))
    fresh = jax.eval_shape(lambda: self.model.init(jax.random.key(0), example))
    self.mask = tuning.trainable_mask(fresh['params'], config.model)
    self.abstract_variables = jax.eval_shape(self.stored, fresh)

  def stored(self, variables: dict[str, Any]) -> dict[str, Any]:
    """`variables` with the frozen parameters in model.frozen_dtype, as the state keeps them."""
    params = tuning.store_frozen(variables['params'], self.mask,
                                 self.config.model.frozen_dtype)
    return {**variables, 'params': params}

  def place(self, tree: Any) -> Any:
    """Puts a pytree of arrays on the mesh with the partitioning rules of `sharding`."""
    return jax.device_put(tree, sharding.tree_shardings(tree, self.mesh))

  def initial_variables(self) -> dict[str, Any]:
    """`init_variables` for this config's seed, stored as the state keeps them, on the mesh."""
    return self.place(self.stored(init_variables(self.config, self.model,
                                                 jax.random.key(self.config.seed))))

  def param_counts(self) -> tuple[int, int]:
    """(trainable, total) parameter counts of this config's model."""
    params = self.abstract_variables['params']
    return tuning.count(params, self.mask), tuning.count(params)

  def on_mesh(self, abstract: Any) -> Any:
    """Abstract arrays with the shardings `place` would give them: a restore target."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract, sharding.tree_shardings(abstract, self.mesh))

  def restore(self, workdir: str | None = None,
              checkpoint_path: str | None = None) -> tuple[dict[str, Any], str]:
    """(variables, the checkpoint step directory) of a trained model: the latest step of
    `workdir`, or the step `checkpoint_path`. Only the model's variables are read, not
    the optimizer state, so restoring needs no step plan or optimizer."""
    abstract = self.on_mesh({'step': jax.ShapeDtypeStruct((), jnp.int32),
                             **self.abstract_variables})
    if checkpoint_path:
      restored = checkpoints.restore_path(checkpoint_path, abstract, partial=True)
      source = os.path.abspath(checkpoint_path)
    else:
      with checkpoints.Checkpointer(workdir, read_only=True) as ckpt:
        restored = ckpt.restore(abstract, partial=True)
        source = os.path.join(ckpt.directory, str(int(restored['step'])))
    return {k: restored[k] for k in self.abstract_variables}, source

  @staticmethod
  def variables(state: TrainState) -> dict[str, Any]:
    """The model variables held by a train state, for `model.apply`."""
    variables = {'params': state.params}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
    return variables


def eval_dataset(config: ml_collections.ConfigDict, run: Run) -> Iterator[dict[str, jax.Array]]:
  """The eval split in padded global batches on the run's mesh."""
  return data.eval_iterator(config.data, image_size=config.model.image_size,
                            global_batch=config.eval_batch_size,
                            sharding=sharding.batch_sharding(run.mesh),
                            num_frames=num_frames(config.model))


def num_frames(model_cfg: ml_collections.ConfigDict) -> int | None:
  """The clip length a video model takes; None for image models."""
  shape = models.input_shape(model_cfg)
  return shape[0] if len(shape) == 4 else None


def write_confusion(workdir: str, result: dict[str, Any], names: list[str]) -> None:
  """<workdir>/confusion_matrix.png of an `evaluate.evaluate` result (process 0)."""
  if jax.process_index() == 0 and os.path.isdir(workdir) and 'confusion' in result:
    metrics.write_confusion_png(os.path.join(workdir, CONFUSION_FILE), result['confusion'], names)
