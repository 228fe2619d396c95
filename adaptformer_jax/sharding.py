"""Device mesh, shardings and multi-host start-up."""
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adaptformer_jax.errors import UserError


def initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Joins a multi-process run when asked to (arguments, or JAX_COORDINATOR_ADDRESS etc.).

  Single-process runs skip it; on Cloud TPU and SLURM, `jax.distributed.initialize()`
  with no arguments discovers the peers itself, so `auto` is accepted too.
  """
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  num_processes = num_processes or int(os.environ.get('JAX_NUM_PROCESSES', 0))
  if process_id < 0:
    process_id = int(os.environ.get('JAX_PROCESS_ID', -1))
  if not coordinator_address:
    return
  if coordinator_address == 'auto':
    jax.distributed.initialize()
    return
  if num_processes <= 0 or process_id < 0:
    raise UserError('multi-host: a coordinator address needs --num_processes and '
                    '--process_id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID).')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(model_parallel: int = 1) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh: batches split over 'data', big kernels over 'model'.

  `model_parallel` devices share each replica's large kernels (tensor
  parallelism for presets whose parameters do not fit one device); it must
  divide the devices of one process, so a kernel's shards never cross hosts.
  """
  local = jax.local_device_count()
  if model_parallel < 1 or local % model_parallel:
    raise UserError(f'model_parallel={model_parallel} must divide the {local} devices '
                    'of each process.')
  # Auto axes: XLA propagates the batch and kernel shardings through the model itself.
  return jax.make_mesh((jax.device_count() // model_parallel, model_parallel),
                       ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P('data'))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# (regex searched in a leaf's '/'-joined path, spec); the first match wins and
# unmatched leaves are replicated. Megatron-style: qkv and fc1 split their output
# features, out and fc2 their input features, so each half-block needs one
# all-reduce over 'model'. These kernels hold ~98% of a ViT's parameters; norms,
# out/fc2 biases, embeddings, adapters, LoRA, prompts and the head are small and
# replicated. The rules match inside optimizer states too (momentum of full tuning).
PARTITION_RULES = (
    (r'(attn/qkv|mlp/fc1)/kernel$', P(None, 'model')),
    (r'(attn/qkv|mlp/fc1)/bias$', P('model')),
    (r'(attn/out|mlp/fc2)/kernel$', P('model', None)),
)


def partition_spec(path: str, shape: Sequence[int], mesh: jax.sharding.Mesh,
                   rules: Sequence[tuple[str, P]] = PARTITION_RULES) -> P:
  """The spec of the first rule matching `path`; an axis that does not divide its dim is dropped."""
  for pattern, spec in rules:
    if re.search(pattern, path) and len(spec) == len(shape):
      return P(*(axis if axis is None or dim % mesh.shape[axis] == 0 else None
                 for axis, dim in zip(spec, shape)))
  return P()


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """The NamedSharding of each leaf of a parameter/optimizer/train-state pytree."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, partition_spec(
          jax.tree_util.keystr(path, simple=True, separator='/'), np.shape(leaf), mesh)),
      tree)


def check_batch_divisible(batch_size: int, what: str = 'config.batch_size') -> None:
  """The global batch must split evenly over processes and devices."""
  for count, name in ((jax.process_count(), 'processes'), (jax.device_count(), 'devices')):
    if batch_size % count:
      raise UserError(f'{what}={batch_size} is not divisible by the {count} {name}; '
                      f'use a multiple of {jax.device_count()}.')
