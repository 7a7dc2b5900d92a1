"""The benchmark's worker protocol (benchmarks/run.py), end to end in a real worker process."""
import json
import os
import subprocess
import sys

from conftest import ROOT
from jaxtl import train as train_lib

# The benchmark's processes as a user starts them from the repository root, on the CPU.
ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))


def test_jaxtl_worker_restarts_under_host_malloc_and_speaks_its_protocol():
  """One jaxtl worker (ResNet-50's eval forward): it restarts itself under the host malloc
  settings as train.py does, then says ready, times one step and reports its peak memory on
  the protocol descriptor, which must survive that restart."""
  env = dict(ENV)
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
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.run', '--worker', 'jaxtl:resnet:frozen:unrolled',
       '--warmup', '0'], input='step\neval\nstep\neval\nstop\n', env=ENV, cwd=ROOT,
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  ready, *replies, final = [json.loads(line) for line in out.stdout.splitlines()]
  assert ready['commands'] == ['eval', 'step']
  assert len(replies) == 4 and all(r['step_s'] > 0 for r in replies)
  # The first eval's time includes compiling the forward (measure() discards it); the second is
  # a plain forward, about as long as a step that runs it and updates the head.
  assert 0.5 < replies[3]['step_s'] / replies[2]['step_s'] < 2
  assert final['peak_delta_mb'] > 98


def test_the_driver_runs_both_sides_and_writes_ratios(tmp_path):
  """The parent process end to end on the smallest model (MobileNetV2's eval forward, 1 step):
  the matmul peak, both workers, the ratio table and the JSON with every figure the README
  reads."""
  out = tmp_path / 'run.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.run', '--models', 'mobilenet', '--modes', 'eval',
       '--steps', '1', '--warmup', '0', '--out', str(out)], env=ENV, cwd=ROOT,
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Other processes used' in proc.stdout and f'wrote {out}' in proc.stdout
  result = json.loads(out.read_text())
  assert len(result['matmul_gflops']) == 2 and result['peak_gflops'] > 1
  assert 0 <= result['disturbance']['others_share'] <= 1
  (row,) = result['rows']
  assert (row['model'], row['mode']) == ('mobilenet', 'eval')
  j, t = row['jaxtl'], row['torch']
  assert j['step_s'] > 0 and t['step_s'] > 0 and j['flops'] > 1e9 and j['compile_s'] > 0
  assert row['time_ratio'] == j['step_s'] / t['step_s']
  assert row['memory_ratio'] == j['peak_delta_mb'] / t['peak_delta_mb']
  table_row = [line for line in proc.stdout.splitlines() if line.startswith('mobilenet')]
  assert len(table_row) == 1 and f'{row["time_ratio"]:.2f}' in table_row[0]


def test_default_output_never_overwrites(tmp_path):
  import datetime
  from benchmarks import run
  day = datetime.date(2026, 12, 6)
  first = run.default_out(False, tmp_path, day)
  assert first.name == '2026-12-06.json'
  first.write_text('{}')
  assert run.default_out(False, tmp_path, day).name == '2026-12-06-2.json'
  assert run.default_out(True, tmp_path, day).name == '2026-12-06-quick.json'


def test_accelerator_script_smoke_on_the_cpu(tmp_path):
  """benchmarks/accelerator.py on tiny models (the GPU figures come from a real accelerator):
  refuses a CPU unless told, then reports throughput and MFU for ViT and BERT in bf16."""
  refused = subprocess.run([sys.executable, '-m', 'benchmarks.accelerator'], env=ENV, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
  assert refused.returncode == 2 and '--allow_cpu' in refused.stderr
  out = tmp_path / 'acc.json'
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.accelerator', '--allow_cpu', '--tiny',
                         '--out', str(out)], env=ENV, cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['dtype'] == 'bfloat16' and result['tiny'] is True
  assert [r['model'] for r in result['rows']] == ['vit-tiny', 'bert-tiny']
  for row in result['rows']:
    assert row['train_per_s'] > 0 and row['eval_per_s'] > 0 and row['train_mfu'] > 0
