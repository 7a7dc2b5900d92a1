"""One process of the two-process run in tests/test_parallel.py, and the pieces that the test
repeats in a single process for reference.

  JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0|1 \
      JAX_NUM_CPU_DEVICES=2 python tests/distributed_worker.py OUT_DIR

Each process (1) takes 3 FSDP train steps on fixed global batches, feeding only its own rows,
and saves the params as it sees them to OUT_DIR/params_<process>.npz; then (2) runs
train_and_evaluate on configs/smoke.py (FSDP, checkpoints) in the shared OUT_DIR/workdir and
saves its result to OUT_DIR/result_<process>.json.
"""
import functools
import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Importing JAX starts no backend; jax.distributed.initialize only has to come before the first
# computation (or jax.devices()).
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxtl import freeze, parallel
from jaxtl import train as train_lib

MESH = dict(data=-1, fsdp=True, fsdp_min_size=1024)  # bert-tiny's matrices are 1-8K elements.


def smoke_config(**overrides):
  spec = importlib.util.spec_from_file_location('smoke', ROOT / 'configs' / 'smoke.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update(overrides)
  return config


def loop_config():
  """configs/smoke.py cut to one epoch of 8 steps, FSDP, a checkpoint every 4 steps."""
  return smoke_config(num_epochs=1, batch_size=64, log_every_steps=2, checkpoint_every_steps=4,
                      mesh=MESH)


@functools.cache  # One model init for all the tests that use it.
def bert_tiny():
  """(module, params as host numpy, labels, tx, init) for configs/smoke.py's bert-tiny, all
  trainable; init(params, model_state) builds its TrainState."""
  config = smoke_config()
  module, variables = train_lib.create_model(config, num_classes=4)
  params = jax.device_get(variables['params'])  # Host numpy, as pretrained weights arrive.
  labels = freeze.label_params(params, 'full', module)
  tx, _ = train_lib.make_optimizer(config.optim, labels, 10)

  def init(params, model_state):
    return train_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
        opt_state=tx.init(freeze.split(params, labels)[0]), rng=jax.random.PRNGKey(0))
  return module, params, labels, tx, init


def train_steps(mesh, mesh_config, num_steps=3):
  """The train state after `num_steps` steps of bert-tiny on seeded batches of 16, built by
  parallel.create_state in the shardings of `mesh_config`; each process feeds its own rows."""
  module, params, labels, tx, init = bert_tiny()
  state, shardings = parallel.create_state(init, dict(params=params, model_state={}), mesh,
                                           mesh_config)
  step = jax.jit(lambda s, b: train_lib.train_step(
      parallel.gather_params(s, mesh), b, module=module, tx=tx, labels=labels),
                 in_shardings=(shardings, parallel.data_sharded(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  rng = np.random.default_rng(0)  # The same global batches in every process.
  for _ in range(num_steps):
    batch = {'input_ids': rng.integers(0, 128, (16, 12)).astype(np.int32),
             'label': rng.integers(0, 4, 16).astype(np.int32)}
    state, _ = step(state, parallel.shard_batch(batch, mesh))
  return state


def main(out):
  out = pathlib.Path(out)
  config = loop_config()
  config.distributed = True
  parallel.initialize_distributed(config)  # Before anything else touches JAX.
  index = jax.process_index()
  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()

  state = train_steps(parallel.make_mesh(-1), MESH)
  # FSDP-sharded params span both processes: gather them to see them whole.
  params = multihost_utils.process_allgather(state.params, tiled=True)
  np.savez(out / f'params_{index}.npz', **freeze.flatten(params))

  result = train_lib.train_and_evaluate(config, out / 'workdir')
  (out / f'result_{index}.json').write_text(json.dumps(result))


if __name__ == '__main__':
  main(sys.argv[1])
