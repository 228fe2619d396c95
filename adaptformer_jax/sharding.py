"""Device mesh, shardings and multi-host start-up."""
import os

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adaptformer_jax.errors import UserError


def initialize_distributed(coordinator_address='', num_processes=0, process_id=-1):
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


def make_mesh():
  """A 1-D data-parallel mesh over every device of every process."""
  # Auto axes: XLA propagates the batch sharding through the model by itself.
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh):
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P('data'))


def replicated(mesh):
  return NamedSharding(mesh, P())


def tree_shardings(tree, mesh):
  """The sharding of each leaf of a parameter/optimizer-state pytree: replicated."""
  return jax.tree.map(lambda _: replicated(mesh), tree)


def check_batch_divisible(batch_size, what='config.batch_size'):
  """The global batch must split evenly over processes and devices."""
  for count, name in ((jax.process_count(), 'processes'), (jax.device_count(), 'devices')):
    if batch_size % count:
      raise UserError(f'{what}={batch_size} is not divisible by the {count} {name}; '
                      f'use a multiple of {jax.device_count()}.')
