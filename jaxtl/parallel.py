"""The device mesh, shardings and multi-host setup. One `jax.jit` runs on 1 CPU, 8 GPUs or a TPU pod
slice: the batch is split along the mesh axis 'data'; the train state is replicated, or with
FSDP (`config.mesh.fsdp`) its large arrays are split along 'data' too.

config.mesh fields:
  data: devices in the mesh (-1: all of them).
  fsdp: shard every params / optimizer-state / model-state array of at least `fsdp_min_size`
    elements along 'data', on its largest dimension divisible by the mesh size (the others stay
    replicated). The step all-gathers each param where it is used, so a device holds 1/N of the
    state: for models whose params + Adam moments do not fit one device.
  fsdp_min_size: the threshold in elements (default 2**16: matrices shard, biases and norms do not).
  rules: [(regex, spec)], first match wins, before the FSDP rule: a path matching `regex` (searched
    in the '/'-joined path, e.g. 'params/encoder/layer_0/attention/query/kernel'; an optimizer
    moment's path ends with its param's path) gets PartitionSpec(*spec), e.g.
    ('.*/embedding$', ('data', None)) or ('.*', ()) for replicated.
"""
import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtl.errors import ConfigError

DEFAULT_FSDP_MIN_SIZE = 2**16


# ---------------------------------------------------------------------------------------------
# Processes.
# ---------------------------------------------------------------------------------------------
def initialize_distributed(config):
  """Joins this process to a multi-process run; call it before any other JAX call (jax.devices()
  included), once per process. It is on when `config.distributed` is true or the environment
  names a coordinator (JAX_COORDINATOR_ADDRESS). Where a value is not in the environment
  (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), jax.distributed.initialize()
  detects it: on Cloud TPU pod slices, under SLURM (srun), Open MPI (mpirun) and Kubernetes."""
  if not (config.get('distributed', False) or os.environ.get('JAX_COORDINATOR_ADDRESS')):
    return
  if jax.distributed.is_initialized():  # A launcher or test set it up already.
    return

  def env_int(name):
    value = os.environ.get(name)
    return int(value) if value else None
  # jax reads JAX_COORDINATOR_ADDRESS itself; the process count and id it only auto-detects.
  jax.distributed.initialize(num_processes=env_int('JAX_NUM_PROCESSES'),
                             process_id=env_int('JAX_PROCESS_ID'))


def is_primary() -> bool:
  """Process 0 writes the plain files of a run (config, metrics); every process writes its own
  shards of a checkpoint (orbax coordinates them)."""
  return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------
# Mesh and batches.
# ---------------------------------------------------------------------------------------------
def make_mesh(num_devices=None) -> Mesh:
  devices = jax.devices()  # All processes' devices, ordered by process: the batch rows follow.
  if num_devices not in (None, -1):
    if num_devices > len(devices):
      raise ConfigError(f'config.mesh.data = {num_devices} but only {len(devices)} devices exist')
    if num_devices != len(devices) and jax.process_count() > 1:
      # A process without a device in the mesh could not feed its part of the batch.
      raise ConfigError(f'config.mesh.data = {num_devices}: a multi-process run uses all '
                        f'{len(devices)} devices (-1)')
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


def _process_rows(sharding, num_rows):
  """The slice of the global batch that this process's devices hold."""
  rows = [index[0] for index in sharding.addressable_devices_indices_map((num_rows,)).values()]
  return slice(min(r.start or 0 for r in rows), max(num_rows if r.stop is None else r.stop
                                                    for r in rows))


def shard_batch(batch: dict, mesh) -> dict:
  """Global arrays, split along 'data', from the global batch that every process holds on the
  host: each process hands over only the rows its own devices hold."""
  sharding = data_sharded(mesh)
  out = {}
  for key, value in batch.items():
    rows = _process_rows(sharding, len(value))
    out[key] = jax.make_array_from_process_local_data(sharding, value[rows], value.shape)
  return out


# ---------------------------------------------------------------------------------------------
# State shardings.
# ---------------------------------------------------------------------------------------------
def path_str(key_path) -> str:
  """'params/encoder/layer_0/query/kernel' for a jax key path (dict keys, attributes, indices)."""
  names = []
  for key in key_path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return '/'.join(names)


def _check_spec(path, shape, spec, mesh, regex):
  """ConfigError unless `spec` names mesh axes and splits `shape` into equal shards."""
  where = f'config.mesh.rules ({regex!r}, {tuple(spec)}) on {path} {tuple(shape)}'
  if len(spec) > len(shape):
    raise ConfigError(f'{where}: the spec has more entries than the array has dimensions')
  for dim, axes in enumerate(spec):
    if axes is None:
      continue
    axes = axes if isinstance(axes, (tuple, list)) else (axes,)
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
      raise ConfigError(f'{where}: no mesh axis {unknown[0]!r} (axes: {", ".join(mesh.shape)})')
    size = int(np.prod([mesh.shape[a] for a in axes]))
    if shape[dim] % size:
      raise ConfigError(f'{where}: dimension {dim} ({shape[dim]}) is not divisible by {size}')


def _fsdp_spec(shape, axis_size, min_size):
  """Split the largest dimension that the 'data' axis divides; P() when none does or the array is
  small (scalars, biases, norms: gathering them would cost more than they weigh)."""
  if axis_size == 1 or int(np.prod(shape)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):  # Stable: the first on ties.
    if shape[dim] % axis_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'data'
      return P(*spec)
  return P()


def state_shardings(tree, mesh, mesh_config=None, *, check_rules=True):
  """A NamedSharding for each array of `tree` (arrays or jax.ShapeDtypeStructs, e.g. the
  jax.eval_shape of a train state) by the rules of `mesh_config` (config.mesh): the user's regex
  rules first, then FSDP, else replicated. With `check_rules`, a rule that matches no path is an
  error (a typo would otherwise silently replicate)."""
  mesh_config = mesh_config or {}
  rules = [(regex, tuple(tuple(a) if isinstance(a, list) else a for a in spec))
           for regex, spec in (mesh_config.get('rules') or ())]  # Lists, as from JSON or a CLI.
  try:
    compiled = [re.compile(regex) for regex, _ in rules]
  except re.error as e:
    raise ConfigError(f'config.mesh.rules: bad regex {e.pattern!r} ({e})') from None
  fsdp = bool(mesh_config.get('fsdp', False))
  min_size = mesh_config.get('fsdp_min_size', None)
  min_size = DEFAULT_FSDP_MIN_SIZE if min_size is None else min_size
  axis_size = mesh.shape['data']
  used = set()

  def sharding(key_path, leaf):
    path, shape = path_str(key_path), tuple(np.shape(leaf))
    for i, pattern in enumerate(compiled):
      if pattern.search(path):
        used.add(i)
        _check_spec(path, shape, rules[i][1], mesh, rules[i][0])
        return NamedSharding(mesh, P(*rules[i][1]))
    return NamedSharding(mesh, _fsdp_spec(shape, axis_size, min_size) if fsdp else P())

  shardings = jax.tree_util.tree_map_with_path(sharding, tree)
  unused = [rules[i][0] for i in range(len(rules)) if i not in used]
  if check_rules and unused:
    example = [path_str(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)[-1:]]
    raise ConfigError(f'config.mesh.rules: {unused} match no path of the train state (paths look '
                      f'like {example})')
  return shardings


def _put(x, sharding):
  if isinstance(x, jax.Array) and (sharding.is_fully_addressable or not x.is_fully_addressable):
    return jax.device_put(x, sharding)  # Returns x itself when it is there already.
  # Host values (pretrained numpy params), or a process-local array going into a sharding over
  # all processes: each device receives just its own slice, never the whole array.
  x = x if hasattr(x, 'shape') else np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def place(tree, mesh, mesh_config=None):
  """`tree` (host numpy or device arrays) moved into the shardings its paths get."""
  return jax.tree_util.tree_map(_put, tree,
                                state_shardings(tree, mesh, mesh_config, check_rules=False))


def gather_params(state, mesh):
  """Inside a jitted step: `state` with its params all-gathered (replicated) for the forward and
  backward pass, while the batch stays split along 'data'. Without it, the sharding propagator
  carries an FSDP param's split into the activations, which are split along 'data' by batch
  already, and reshuffles them all-to-all (or replicates them) around every layer. Gradients
  and updates go back to the state's shardings through the step's out_shardings (a
  reduce-scatter), so between steps each device holds 1/N of the params and optimizer state;
  during the step it holds the whole params and gradients. A no-op for a replicated state."""
  return state.replace(params=jax.lax.with_sharding_constraint(state.params, replicated(mesh)))


def create_state(init_fn, parts: dict, mesh, mesh_config=None):
  """(state, shardings): `init_fn(**parts)` (e.g. a TrainState with freshly initialised optimizer
  state) computed directly in the shardings of config.mesh, never whole on one device: the parts
  (params, ...) move into their shardings first, jax.eval_shape gives the state's structure and
  the rules its shardings, and a jit with those out_shardings builds it. Name the parts as the
  state's fields ('params', 'model_state', ...) so that their paths, and so shardings, agree."""
  parts = place(parts, mesh, mesh_config)
  shardings = state_shardings(jax.eval_shape(lambda p: init_fn(**p), parts), mesh, mesh_config)
  return jax.jit(lambda p: init_fn(**p), out_shardings=shardings)(parts), shardings
