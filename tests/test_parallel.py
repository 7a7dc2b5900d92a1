"""Sharding rules, FSDP and multi-process training: a step on a mesh of 8 devices, its state
replicated or FSDP-sharded, equals the single-device step; two processes on localhost train
configs/smoke.py together and agree with one process."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

import distributed_worker
from conftest import ROOT
from jaxtl import freeze, parallel
from jaxtl import train as train_lib
from jaxtl.errors import ConfigError

FSDP = dict(fsdp=True, fsdp_min_size=1024)  # bert-tiny's matrices are 1-8K elements.


def test_fsdp_rules_shard_params_and_their_moments_alike():
  _, params, _, _, init = distributed_worker.bert_tiny()
  mesh = parallel.make_mesh(8)
  abstract = jax.eval_shape(init, params, {})
  specs = {parallel.path_str(path): s.spec for path, s in
           jax.tree_util.tree_leaves_with_path(parallel.state_shardings(abstract, mesh, FSDP))}
  kernel = 'encoder/layer_0/intermediate/kernel'  # (32, 64): its largest dimension splits.
  assert specs[f'params/{kernel}'] == P(None, 'data')
  moments = [spec for path, spec in specs.items() if path.startswith('opt_state') and
             path.endswith(kernel)]
  assert len(moments) == 2 and all(m == specs[f'params/{kernel}'] for m in moments)  # mu, nu.
  assert specs['params/embeddings/word_embeddings/embedding'] == P('data', None)  # (128, 32).
  assert specs['params/encoder/layer_0/intermediate/bias'] == P()  # Under the size threshold.
  assert specs['step'] == P() and specs['rng'] == P()
  # Without fsdp everything is replicated.
  plain = parallel.state_shardings(abstract, mesh, {})
  assert all(s.spec == P() for s in jax.tree_util.tree_leaves(plain))

  # User rules come first; a rule that matches nothing or does not divide is an error.
  rules = dict(FSDP, rules=[('word_embeddings/embedding$', (None, 'data')),
                            ('intermediate/kernel$', ())])
  specs = {parallel.path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(
      parallel.state_shardings(abstract, mesh, rules))}
  assert specs['params/embeddings/word_embeddings/embedding'] == P(None, 'data')
  assert specs[f'params/{kernel}'] == P()
  with pytest.raises(ConfigError, match='match no path'):
    parallel.state_shardings(abstract, mesh, dict(rules=[('no_such_param', ())]))
  with pytest.raises(ConfigError, match='not divisible'):
    parallel.state_shardings(abstract, mesh, dict(rules=[('classifier/kernel', (None, 'data'))]))
  with pytest.raises(ConfigError, match="no mesh axis 'model'"):
    parallel.state_shardings(abstract, mesh, dict(rules=[('pooler/kernel', ('model',))]))


def test_mesh_of_8_devices_equals_one_device():
  """Three steps on 1 device, then on 8 with the state replicated and with it FSDP-sharded."""
  one, replicated, sharded = (distributed_worker.train_steps(parallel.make_mesh(n), mesh_config)
                              for n, mesh_config in ((1, {}), (8, {}), (8, FSDP)))
  for state, shard_shape in ((replicated, (32, 64)), (sharded, (32, 8))):
    kernel = state.params['encoder']['layer_0']['intermediate']['kernel']  # (32, 64)
    moments = [x for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
               if parallel.path_str(p).endswith('layer_0/intermediate/kernel')]
    for array in [kernel] + moments:  # The step kept the state in its shardings.
      assert array.sharding.is_fully_replicated == (state is replicated)
      assert array.addressable_shards[0].data.shape == shard_shape
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                           jax.device_get(one.params), jax.device_get(state.params))


def test_random_init_is_created_in_its_shardings():
  """A registry model's random params come out of the init already FSDP-sharded (each device
  computed 1/8 of every large array, none held it whole), with the values of the plain init."""
  config = distributed_worker.smoke_config(mesh=dict(data=-1, **FSDP))
  mesh = parallel.make_mesh(8)
  _, plain = train_lib.create_model(config, num_classes=4)
  _, sharded = train_lib.create_model(config, num_classes=4, mesh=mesh)
  kernel = sharded['params']['encoder']['layer_0']['intermediate']['kernel']  # (32, 64)
  assert kernel.sharding.spec == P(None, 'data') and len(kernel.sharding.device_set) == 8
  assert {shard.data.shape for shard in kernel.addressable_shards} == {(32, 8)}
  bias = sharded['params']['encoder']['layer_0']['intermediate']['bias']  # Under the threshold.
  assert bias.sharding.is_fully_replicated
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b),
                         jax.device_get(plain), jax.device_get(sharded))


def test_shard_batch_and_mesh_checks():
  mesh = parallel.make_mesh(-1)
  batch = parallel.shard_batch({'x': np.arange(16).reshape(8, 2)}, mesh)
  assert batch['x'].shape == (8, 2) and batch['x'].addressable_shards[3].data.tolist() == [[6, 7]]
  with pytest.raises(ConfigError, match='only 8 devices'):
    parallel.make_mesh(9)
  with pytest.raises(ConfigError, match='not divisible'):
    parallel.check_batch_size(12, mesh)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
  """Two processes of 2 CPU devices each (gloo collectives) on localhost: the same FSDP params in
  both and as in one process on 4 devices; train_and_evaluate writes each metrics line once and
  a checkpoint that both processes' shards complete."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # Not conftest's 8 devices.
  env.update(JAX_COORDINATOR_ADDRESS=f'localhost:{_free_port()}', JAX_NUM_PROCESSES='2',
             JAX_NUM_CPU_DEVICES='2', JAX_PLATFORMS='cpu')
  logs = [tmp_path / f'log_{i}.txt' for i in range(2)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, 'w') as out:  # Files, not pipes: a full pipe would stall one process.
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / 'tests' / 'distributed_worker.py'), str(tmp_path)],
            env={**env, 'JAX_PROCESS_ID': str(i)}, cwd=ROOT, stdout=out,
            stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=900) for p in procs]
  finally:
    for p in procs:  # One that failed leaves the other waiting on a collective.
      if p.poll() is None:
        p.kill()
        p.wait()
  assert codes == [0, 0], '\n'.join(log.read_text()[-3000:] for log in logs)

  # (1) Three train steps: the processes agree exactly, and with one process.
  seen = [dict(np.load(tmp_path / f'params_{i}.npz')) for i in range(2)]
  assert seen[0].keys() == seen[1].keys()
  for path in seen[0]:
    np.testing.assert_array_equal(seen[0][path], seen[1][path], err_msg=path)
  single = freeze.flatten(jax.device_get(
      distributed_worker.train_steps(parallel.make_mesh(4), distributed_worker.MESH).params))
  for path in seen[0]:
    np.testing.assert_allclose(seen[0][path], single[path], atol=1e-5, rtol=0, err_msg=path)

  # (2) train_and_evaluate: one writer for plain files, a checkpoint from both.
  workdir = tmp_path / 'workdir'
  results = [json.loads((tmp_path / f'result_{i}.json').read_text()) for i in range(2)]
  for result in results:
    result.pop('wall_time_s')
  assert results[0] == results[1] and results[0]['step'] == 8
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(l['split'], l['step']) for l in lines] == [('train', 2), ('train', 4), ('train', 6),
                                                        ('train', 8), ('test', 8)]
  assert (workdir / 'config.json').is_file() and (workdir / 'run.json').is_file()
  mngr = ocp.CheckpointManager(workdir / 'checkpoints')
  assert mngr.all_steps() == [4, 8]
  # Read here, on another topology: orbax needs a sharding to fall back on (it would reuse the
  # two processes' device ids otherwise).
  restored = mngr.restore(8, args=ocp.args.StandardRestore(
      fallback_sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0])))
  restored = freeze.flatten(restored['params'])
  assert restored.keys() == seen[0].keys()
  assert all(np.isfinite(v).all() for v in restored.values())
