"""The benchmark's worker protocol (benchmarks/run.py), end to end in a real worker process."""
import json
import os
import subprocess
import sys

from conftest import ROOT
from jaxtl import train as train_lib


def test_jaxtl_worker_restarts_under_host_malloc_and_speaks_its_protocol():
  """One jaxtl worker (ResNet-50's eval forward): it restarts itself under the host malloc
  settings as train.py does, then says ready, times one step and reports its peak memory on
  the protocol descriptor, which must survive that restart."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  env.pop('GLIBC_TUNABLES', None)
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.run', '--worker', 'jaxtl:resnet:eval:unrolled',
       '--warmup', '0'], input='step\nstop\n', env=env, cwd=ROOT, capture_output=True,
      text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  ready, step, final = [json.loads(line) for line in out.stdout.splitlines()]
  assert ready['ready'] is True and ready['flops'] > 1e10
  assert ready['glibc_tunables'] == train_lib.host_malloc_environment(env)['GLIBC_TUNABLES']
  assert step['step_s'] > 0 and step['cpu_s'] > 0
  assert final['peak_rss_mb'] > final['peak_delta_mb'] > 98  # ResNet-50's params alone: 98 MiB.


def test_frozen_worker_times_its_own_eval_forward_in_turn_with_the_step():
  """The frozen-step target is a ratio to jaxtl's own eval forward, so the frozen worker also
  answers 'eval' (the forward with the state's current params), in turn with 'step'; the peak it
  reports is the step's, read before the forward compiled."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.run', '--worker', 'jaxtl:resnet:frozen:unrolled',
       '--warmup', '0'], input='step\neval\nstep\neval\nstop\n', env=env, cwd=ROOT,
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  ready, *replies, final = [json.loads(line) for line in out.stdout.splitlines()]
  assert ready['commands'] == ['eval', 'step']
  assert len(replies) == 4 and all(r['step_s'] > 0 for r in replies)
  # The first eval's time includes compiling the forward (measure() discards it); the second is
  # a plain forward, about as long as a step that runs it and updates the head.
  assert 0.5 < replies[3]['step_s'] / replies[2]['step_s'] < 2
  assert final['peak_delta_mb'] > 98
