"""The device mesh and shardings. One `jax.jit` runs on 1 CPU, 8 GPUs or a TPU pod slice: the
batch is split along the mesh axis 'data', the train state is replicated."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtl.errors import ConfigError


def initialize_distributed(config):
  """Multi-host: jax.distributed.initialize() before any other JAX call (config.distributed)."""
  if config.get('distributed', False):
    jax.distributed.initialize()


def make_mesh(num_devices=None) -> Mesh:
  devices = jax.devices()
  if num_devices not in (None, -1):
    if num_devices > len(devices):
      raise ConfigError(f'config.mesh.data = {num_devices} but only {len(devices)} devices exist')
    devices = devices[:num_devices]
  return Mesh(np.array(devices), ('data',))


def replicated(mesh):
  return NamedSharding(mesh, P())


def data_sharded(mesh):
  return NamedSharding(mesh, P('data'))


def check_batch_size(batch_size, mesh):
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(f'config.batch_size = {batch_size} is not divisible by the {n} devices of '
                      'the mesh')


def shard_batch(batch: dict, mesh) -> dict:
  """Global arrays from this process's rows of the global batch (all rows on one host)."""
  sharding = data_sharded(mesh)
  count, index = jax.process_count(), jax.process_index()
  def local(x):
    rows = len(x) // count
    return x[index * rows:(index + 1) * rows]
  return {k: jax.make_array_from_process_local_data(sharding, local(v), (len(v),) + v.shape[1:])
          for k, v in batch.items()}
