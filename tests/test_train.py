"""The train loop on configs/smoke.py: it learns, checkpoints, and resumes exactly. (A step on a
mesh of 8 devices equals the single-device step: tests/test_parallel.py.)"""
import ctypes
import json
import os
import shutil
import subprocess
import sys

import jax

import numpy as np
import orbax.checkpoint as ocp
import pytest

from benchmarks.run import rss_mb
from jaxtl import host_memory, train as train_lib
from jaxtl.errors import ConfigError
from conftest import ROOT, load_config

def smoke_config(**overrides):
  return load_config('smoke', **overrides)

def _final_params(workdir):
  mngr = ocp.CheckpointManager(workdir / 'checkpoints')
  restored = mngr.restore(mngr.latest_step())
  return restored['params'], mngr.latest_step()

@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('smoke')
  result = train_lib.train_and_evaluate(smoke_config(), workdir)
  return workdir, result

def test_smoke_learns(smoke_run):
  workdir, result = smoke_run
  assert result['test_acc'] >= 0.8, result  # Chance is 0.25.
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_losses = [l['loss'] for l in lines if l['split'] == 'train']
  assert train_losses[-1] < 0.5 * train_losses[0]
  assert [l['epoch'] for l in lines if l['split'] == 'test'] == [1, 2, 3, 4]
  assert json.loads((workdir / 'classes.json').read_text()) == [f'class_{i}' for i in range(4)]

def test_resume_from_checkpoint_is_exact(smoke_run, tmp_path):
  """Delete the final checkpoint, rerun the same command: it resumes mid-run and ends
  bit-identical to the uninterrupted run."""
  workdir, result = smoke_run
  final, last_step = _final_params(workdir)
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed_dir)
  (resumed_dir / 'metrics.jsonl').unlink()
  shutil.rmtree(resumed_dir / 'checkpoints' / str(last_step))
  mngr = ocp.CheckpointManager(resumed_dir / 'checkpoints')
  resume_step = mngr.latest_step()
  assert 0 < resume_step < last_step
  train_lib.train_and_evaluate(smoke_config(), resumed_dir)
  lines = [json.loads(l) for l in (resumed_dir / 'metrics.jsonl').read_text().splitlines()]
  assert min(l['step'] for l in lines) > resume_step  # It did not start over.
  params, step = _final_params(resumed_dir)
  assert step == last_step
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, final)



def test_rerun_with_a_config_shorter_than_the_run(smoke_run, tmp_path):
  workdir, _ = smoke_run
  shutil.copytree(workdir, tmp_path / 'run')
  with pytest.raises(ConfigError, match=r"went past this config's 16 steps; use a new --workdir"):
    train_lib.train_and_evaluate(smoke_config(num_epochs=1), tmp_path / 'run')


_FAULTS_OF_A_SECOND_RUN = """
import resource
import jax, jax.numpy as jnp
# ~200 MB of temporaries (sin, cos and their product) that XLA frees when each run ends.
f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x)).sum())
x = jnp.ones((4096, 4096))
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _plain_cpu_environment():
  """This environment without glibc tunables, for a subprocess on one CPU device."""
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='')
  return env


needs_glibc = pytest.mark.skipif(host_memory.glibc_function('gnu_get_libc_version') is None,
                                 reason='needs glibc')


@needs_glibc
def test_host_malloc_lets_a_step_reuse_the_last_steps_temporaries():
  """A fresh process: with plain malloc the second run of a jitted function faults its ~200 MB of
  temporaries in again (one fault a 4 KiB page); under host_malloc_environment, it reuses them."""
  plain = _plain_cpu_environment()
  faults = {}
  for variant, env in (('plain', plain), ('host', train_lib.host_malloc_environment(plain))):
    out = subprocess.run([sys.executable, '-c', _FAULTS_OF_A_SECOND_RUN], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    faults[variant] = int(out[-1])
  assert faults['plain'] > 30_000, faults
  assert faults['host'] < faults['plain'] / 10, faults


_ALIGNED_BLOCKS = """
import ctypes
libc = ctypes.CDLL(None)
libc.free.argtypes = [ctypes.c_void_p]
addresses = []
for _ in range(4):  # As XLA:CPU allocates and frees a step's temporaries.
  block = ctypes.c_void_p()
  assert libc.posix_memalign(ctypes.byref(block), 64, 100 << 20) == 0
  addresses.append(block.value)
  libc.free(block)
print(len(set(addresses)))
"""


@needs_glibc
def test_host_malloc_reuses_a_freed_aligned_block():
  """XLA:CPU allocates a step's temporaries 64-byte aligned. With one arena, no mmap and no trim
  but glibc's per-thread cache on, the slivers an aligned allocation cuts off wall the freed block
  in and requests land elsewhere (the heap grows); with the cache off, as HOST_MALLOC_TUNABLES has
  it, every request gets the same block back. How many of the cached run's 4 requests move depends
  on where the interpreter's own allocations left the heap's top (3 or 4 seen), so that side only
  asserts that the block moved."""
  env = train_lib.host_malloc_environment(
      {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'})
  with_cache = dict(env, GLIBC_TUNABLES=env['GLIBC_TUNABLES'].replace(
      'glibc.malloc.tcache_count=0', 'glibc.malloc.tcache_count=7'))
  distinct = {}
  for variant, environ in (('tcache', with_cache), ('host', env)):
    out = subprocess.run([sys.executable, '-c', _ALIGNED_BLOCKS], env=environ, capture_output=True,
                         text=True, check=True).stdout
    distinct[variant] = int(out)
  assert distinct['host'] == 1 and distinct['tcache'] > 1, distinct


_EXEC = """
import os, sys
with open(os.environ['STARTS'], 'a') as f:
  f.write('started\\n')
from jaxtl import train
train.exec_with_host_malloc()
print(os.getpid(), os.environ['GLIBC_TUNABLES'], sys.argv[1:], sep='\\n')
"""


@needs_glibc
def test_exec_with_host_malloc_restarts_the_process_once_keeping_given_tunables(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', GLIBC_TUNABLES='glibc.malloc.tcache_count=3',
             STARTS=str(tmp_path / 'starts'))
  proc = subprocess.Popen([sys.executable, '-c', _EXEC, 'a b', '--c'], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out, err = proc.communicate()
  assert proc.returncode == 0, err
  pid, tunables, args = out.splitlines()
  assert int(pid) == proc.pid  # Restarted in place (execve), not as a child.
  assert args == repr(['a b', '--c'])
  settings = dict(t.split('=') for t in tunables.split(':'))
  assert settings == {**train_lib.HOST_MALLOC_TUNABLES, 'glibc.malloc.tcache_count': '3'}
  assert (tmp_path / 'starts').read_text() == 'started\n' * 2


_REPEATED_RUNS = """
from jaxtl import train
train.exec_with_host_malloc()
import jax, jax.numpy as jnp
from benchmarks.run import rss_mb
print(jax.config.read('jax_cpu_enable_async_dispatch'))
# sin(x) is a 16 MiB temporary that XLA allocates when a run starts and frees when it ends.
f = jax.jit(lambda x, w: (jnp.sin(x) @ w).sum())
x, w = jnp.ones((4096, 1024)), jnp.ones((1024, 4))
for _ in range(3):
  f(x, w).block_until_ready()
before = rss_mb()
for _ in range(500):
  f(x, w).block_until_ready()
print(rss_mb() - before)
"""


@needs_glibc
def test_exec_with_host_malloc_runs_steps_inline_so_each_reuses_the_last_ones_block():
  """With jax's asynchronous dispatch on the CPU, a run reports its output ready before XLA frees
  its temporaries, so the next run, dispatched at once, sometimes allocates a second block while
  the first is still held (this script's RSS grew by 16-48 MiB in each of 6 processes with
  dispatch left asynchronous); exec_with_host_malloc turns it off."""
  out = subprocess.run([sys.executable, '-c', _REPEATED_RUNS], env=_plain_cpu_environment(),
                       cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
  asynchronous, growth_mib = out[-2], float(out[-1])
  assert asynchronous == 'False'
  assert growth_mib < 8, growth_mib


def test_host_malloc_leaves_accelerator_platforms_alone():
  platforms = jax.config.jax_platforms
  jax.config.update('jax_platforms', 'cuda')
  try:
    assert train_lib.host_malloc_environment() is None
  finally:
    jax.config.update('jax_platforms', platforms)


@needs_glibc
def test_release_freed_host_memory_returns_the_freed_heap():
  """200 MB of small blocks freed behind one live block (so glibc cannot shrink its heap by
  itself, as after XLA's compiler runs) stay resident until release_freed_host_memory."""
  libc = ctypes.CDLL(None)
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  blocks = [libc.malloc(4096) for _ in range(50_000)]
  for block in blocks:
    ctypes.memset(block, 1, 4096)
  pin = libc.malloc(4096)
  for block in blocks:
    libc.free(block)
  before = rss_mb()
  train_lib.release_freed_host_memory()
  after = rss_mb()
  libc.free(pin)
  assert before - after > 150, (before, after)


@pytest.mark.parametrize('scale', [0.01, 30.0], ids=['below_max_norm', 'above_max_norm'])
def test_clip_by_global_norm_matches_pytorch_clip_grad_norm(scale):
  import torch
  rng = np.random.default_rng(3)
  grads = {'dense': {'kernel': rng.standard_normal((6, 4)), 'bias': rng.standard_normal(4)},
           'scale': rng.standard_normal((3, 2, 5))}
  grads = jax.tree_util.tree_map(lambda g: (g * scale).astype(np.float32), grads)
  tx = train_lib.clip_by_global_norm(1.0)
  clipped, _ = jax.jit(tx.update)(grads, tx.init(grads))

  leaves = jax.tree_util.tree_leaves(grads)
  tensors = [torch.nn.Parameter(torch.zeros(g.shape)) for g in leaves]
  for tensor, g in zip(tensors, leaves):
    tensor.grad = torch.from_numpy(g.copy())
  torch.nn.utils.clip_grad_norm_(tensors, 1.0)
  for got, tensor in zip(jax.tree_util.tree_leaves(clipped), tensors):
    np.testing.assert_allclose(np.asarray(got), tensor.grad.numpy(), rtol=1e-6, atol=1e-7)
  norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in leaves)))
  clipped_norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g)))
                                   for g in jax.tree_util.tree_leaves(clipped))))
  np.testing.assert_allclose(clipped_norm, min(norm, 1.0), rtol=1e-5)
