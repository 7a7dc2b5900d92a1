"""Throughput and model FLOP utilisation of jaxtl's train step on a GPU or TPU.

  python -m benchmarks.accelerator --out benchmarks/results/accelerator-h200.json
  python -m benchmarks.accelerator --allow_cpu --tiny --out /tmp/acc.json   # smoke test on a CPU

For ViT-B/16 at 224 (images/s) and BERT-base at 128 tokens (tokens/s), mixed precision (bf16
compute, f32 params and optimizer state): the full fine-tuning train step (jaxtl.train.train_step,
AdamW, clipping at global norm 1.0) and the eval forward. MFU is the step's FLOPs as XLA counts
them (cost analysis of the compiled step) per second, over the chip's dense bf16 peak: the
datasheet number for known chips, else a large bf16 matmul measured here (the JSON says which).
A measured matmul is always reported too, as a sanity check of the datasheet peak.

It needs only jax, flax, optax, numpy and jaxtl's models/freeze/train modules. The jaxtl-side
helpers here (batches, train state, compile and FLOP count) are shared with benchmarks/run.py.
"""
import argparse
import json
import pathlib
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

try:
  import ml_collections  # noqa: F401  jaxtl.train imports it at module level.
except ImportError:
  # Accelerator images often lack ml_collections. jaxtl.train needs it only in the training
  # loop's phase configs, which a benchmark never reaches; a stand-in module lets it import.
  _stub = types.ModuleType('ml_collections')
  _stub.ConfigDict = dict
  sys.modules['ml_collections'] = _stub
  print('note: ml_collections is not installed; using a stand-in for jaxtl.train\'s import')

from jaxtl import freeze, models  # noqa: E402
from jaxtl import train as train_lib  # noqa: E402

# Dense (no sparsity) bf16 peak per device, from the vendors' datasheets, matched by substring of
# jax's device_kind (lower case), first match wins.
PEAK_BF16 = (
    ('h100 pcie', 756e12),
    ('h100 nvl', 835e12),
    ('h100', 989e12),       # SXM.
    ('gh200', 989e12),
    ('h200', 989e12),       # SXM; same tensor cores as the H100 SXM.
    ('a100', 312e12),
    ('tpu v4', 275e12),
    ('tpu v5 lite', 197e12),  # v5e.
    ('tpu v5e', 197e12),
    ('tpu v5p', 459e12),
    ('tpu v5', 459e12),
    ('tpu v6 lite', 918e12),  # v6e (Trillium).
    ('tpu v6e', 918e12),
)


# ---------------------------------------------------------------------------------------------
# jaxtl side (shared with benchmarks/run.py).
# ---------------------------------------------------------------------------------------------
class OptimConfig(dict):
  """The subset of a config.optim that make_optimizer reads, as an attribute dict (so this file
  does not need ml_collections)."""
  __getattr__ = dict.__getitem__


def optim_config(clip_norm=1.0):
  return OptimConfig(name='adamw', lr=1e-4, weight_decay=0.01, warmup_fraction=0.0,
                     schedule='constant', clip_norm=clip_norm)


def text_batch(batch_size, seq, vocab=30522, seed=0):
  rng = np.random.default_rng(seed)
  return {'input_ids': rng.integers(0, vocab, (batch_size, seq)).astype(np.int32),
          'attention_mask': np.ones((batch_size, seq), np.int32),
          'label': rng.integers(0, 2, batch_size).astype(np.int32)}


def image_batch(batch_size, size, seed=0):
  rng = np.random.default_rng(seed)
  return {'images': rng.standard_normal((batch_size, size, size, 3)).astype(np.float32),
          'label': rng.integers(0, 2, batch_size).astype(np.int32)}


def init_variables(module):
  """Random variables, initialised on the host CPU (XLA:GPU took minutes to compile BERT-base's
  init) and placed on the default device."""
  with jax.default_device(jax.devices('cpu')[0]):
    variables = models.init(module)
  return jax.device_put(dict(variables), jax.devices()[0])


def train_setup(module, variables, scheme, clip_norm=1.0):
  """(state, step): jaxtl's TrainState and train_step for a freeze preset, AdamW + clipping."""
  params = variables['params']
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  labels = freeze.label_params(params, scheme, module)
  tx, _ = train_lib.make_optimizer(optim_config(clip_norm), labels, 100)
  state = train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
      opt_state=tx.init(freeze.split(params, labels)[0]), rng=jax.random.PRNGKey(0))
  frozen_bns = train_lib.frozen_batchnorms(model_state, labels)

  def step(state, batch):
    return train_lib.train_step(state, batch, module=module, tx=tx, labels=labels,
                                frozen_bns=frozen_bns)
  return state, step


def forward_fn(module):
  def forward(variables, batch):
    inputs = {k: v for k, v in batch.items() if k != 'label'}
    return module.apply(variables, **inputs, train=False)[0]
  return forward


def compile_timed(fn, *args, donate=()):
  """(compiled, seconds to trace, lower and compile)."""
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  return compiled, time.perf_counter() - start


def flops(fn, *args):
  """XLA's FLOP count of fn(*args), from cost analysis of the program lowered for the host CPU.

  Why not the compiled program's own count: XLA:GPU turns matmuls into cuBLAS custom calls,
  which its cost analysis counts as zero (it said 2 GFLOP for a ViT-B/16 forward, not 35), and
  jax's pre-optimisation count returns nothing on GPU. The CPU lowering is the same program up
  to platform-specific rewrites, and costs a trace, not a compile. On a CPU it agrees with the
  compiled count within ~10 % (elementwise ops expand differently)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=cpu), args)
  return cost(jax.jit(fn).lower(*abstract))


def cost(stage, key='flops'):
  """One entry of a Lowered or Compiled stage's cost analysis (0.0 when absent)."""
  analysis = stage.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per computation.
    analysis = analysis[0]
  return float((analysis or {}).get(key, 0.0))


def memory(compiled):
  """XLA's static memory plan of a compiled function, in bytes (None where unsupported)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # Not every backend implements it.
    return None
  if m is None:
    return None
  return dict(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
              temporaries=int(m.temp_size_in_bytes), aliased=int(m.alias_size_in_bytes),
              peak_estimate=int(m.argument_size_in_bytes + m.output_size_in_bytes
                                + m.temp_size_in_bytes - m.alias_size_in_bytes))


# ---------------------------------------------------------------------------------------------
# Accelerator measurements.
# ---------------------------------------------------------------------------------------------
def matmul_flops_per_s(n, dtype, repeats=20):
  """FLOP/s of an n x n x n matmul, best of `repeats` back-to-back calls."""
  keys = jax.random.split(jax.random.key(1))
  a = jax.random.normal(keys[0], (n, n), dtype)
  b = jax.random.normal(keys[1], (n, n), dtype)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, b))
  best = float('inf')
  for _ in range(3):  # Three bursts: a burst amortises dispatch, the best one dodges noise.
    start = time.perf_counter()
    for _ in range(repeats):
      out = f(a, b)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / repeats)
  return 2 * n ** 3 / best


def device_peak(kind):
  low = kind.lower()
  for key, peak in PEAK_BF16:
    if key in low:
      return peak
  return None


def time_steps(run, warmup, steps):
  """Seconds per call of run() (which returns something to block on), after warm-up; calls are
  dispatched back to back and waited for once, as a training loop does."""
  for _ in range(warmup):
    out = run()
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    out = run()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def bench(name, module, batch, units_per_example, unit, args, peak):
  variables = init_variables(module)
  batch = jax.device_put(batch)
  # The step donates its state; the forward keeps reading `variables`, so the state gets copies.
  state, step = train_setup(module, jax.tree_util.tree_map(jnp.copy, variables), args.scheme)
  step_c, step_compile_s = compile_timed(step, state, batch, donate=(0,))
  step_flops = flops(step, state, batch)
  holder = [state]

  def train_once():
    holder[0], metrics = step_c(holder[0], batch)
    return metrics['loss']
  step_s = time_steps(train_once, args.warmup, args.steps)
  holder[0] = None  # Frees the train state's device memory before the forward runs.
  n = len(batch['label'])
  row = dict(model=name, batch_size=n, unit=unit, dtype=args.dtype,
             train_step_s=step_s, train_per_s=n * units_per_example / step_s,
             train_step_flops=step_flops, train_tflop_per_s=step_flops / step_s / 1e12,
             train_mfu=step_flops / step_s / peak, compile_train_step_s=step_compile_s,
             train_step_memory=memory(step_c))
  if not args.train_only:
    fwd_c, fwd_compile_s = compile_timed(forward_fn(module), variables, batch)
    fwd_flops = flops(forward_fn(module), variables, batch)
    fwd_s = time_steps(lambda: fwd_c(variables, batch), args.warmup, args.steps)
    row.update(eval_forward_s=fwd_s, eval_per_s=n * units_per_example / fwd_s,
               eval_forward_flops=fwd_flops, eval_tflop_per_s=fwd_flops / fwd_s / 1e12,
               eval_mfu=fwd_flops / fwd_s / peak, compile_eval_s=fwd_compile_s)
  return row


def _tflops(x):
  return f'{x / 1e12:.1f} TFLOP/s' if x >= 1e12 else f'{x / 1e9:.1f} GFLOP/s'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='vit,bert', help='comma-separated: vit, bert')
  parser.add_argument('--image_batch', type=int, default=128)
  parser.add_argument('--text_batch', type=int, default=64)
  parser.add_argument('--seq', type=int, default=128)
  parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'),
                      help='compute dtype; params and optimizer state stay float32')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--scheme', default='full', help="freeze preset of the train step")
  parser.add_argument('--no_dropout', action='store_true',
                      help="BERT's dropout rates set to 0 (to see what dropout costs)")
  parser.add_argument('--prng_impl', default=None,
                      help="jax_default_prng_impl, e.g. 'rbg' (dropout masks from a cheaper PRNG)")
  parser.add_argument('--train_only', action='store_true', help='skip the eval forward')
  parser.add_argument('--out', default=None, help='JSON path')
  parser.add_argument('--allow_cpu', action='store_true', help='run on a CPU anyway (smoke test)')
  parser.add_argument('--tiny', action='store_true',
                      help='tiny models and batches: checks the script, measures nothing useful')
  args = parser.parse_args()

  if args.prng_impl:
    jax.config.update('jax_default_prng_impl', args.prng_impl)
  backend = jax.default_backend()
  if backend == 'cpu' and not args.allow_cpu:
    print('benchmarks.accelerator measures GPUs and TPUs, and jax sees only a CPU here '
          f'(devices: {jax.devices()}). Use benchmarks.run for CPU numbers, or pass '
          '--allow_cpu (with --tiny) to smoke-test this script.', file=sys.stderr)
    sys.exit(2)
  if args.tiny:
    args.image_batch, args.text_batch, args.seq = 2, 2, 16
    args.warmup, args.steps = 1, 2

  device = jax.devices()[0]
  dtype = jnp.dtype(args.dtype)
  spec_peak = device_peak(device.device_kind) if args.dtype == 'bfloat16' else None
  measured_peak = matmul_flops_per_s(1024 if backend == 'cpu' else 8192, dtype)
  peak = spec_peak or measured_peak
  peak_source = ('datasheet dense bf16 peak' if spec_peak else
                 f'measured {1024 if backend == "cpu" else 8192}^3 {args.dtype} matmul')
  print(f'device: {device.device_kind} ({backend}, {jax.device_count()} device(s)); '
        f'jax {jax.__version__}')
  print(f'peak for MFU: {_tflops(peak)} ({peak_source}); measured {args.dtype} matmul: '
        f'{_tflops(measured_peak)}', flush=True)

  kw = dict(dtype=dtype, num_classes=1000 if not args.tiny else 10)
  rows = []
  for name in args.models.split(','):
    if name == 'vit':
      module = (models.create('vit-b16', **kw) if not args.tiny else
                models.create('vit-ti16', image_size=32, num_layers=2, **kw))
      batch = image_batch(args.image_batch, module.image_size)
      rows.append(bench('vit-b16' if not args.tiny else 'vit-tiny', module, batch, 1, 'images',
                        args, peak))
    elif name == 'bert':
      if args.no_dropout:
        kw.update(hidden_dropout=0.0, attention_dropout=0.0)
      module = models.create('bert-base' if not args.tiny else 'bert-tiny', **kw)
      batch = text_batch(args.text_batch, args.seq, vocab=module.vocab_size)
      rows.append(bench('bert-base' if not args.tiny else 'bert-tiny', module, batch, args.seq,
                        'tokens', args, peak))
    else:
      parser.error(f'unknown model {name!r}; choose from vit, bert')
    r = rows[-1]
    print(f'{r["model"]}: compiled the train step in {r["compile_train_step_s"]:.1f} s', flush=True)

  header = (f'{"model":10s} {"batch":>5s} {"train /s":>15s} {"step ms":>8s} {"MFU":>6s}   '
            f'{"eval /s":>15s} {"fwd ms":>8s} {"MFU":>6s}')
  print(header + '\n' + '-' * len(header))
  for r in rows:
    line = (f'{r["model"]:10s} {r["batch_size"]:5d} {r["train_per_s"]:>9,.0f} {r["unit"][:5]:5s}'
            f'{r["train_step_s"] * 1e3:8.1f} {100 * r["train_mfu"]:5.1f}%')
    if 'eval_per_s' in r:
      line += (f'   {r["eval_per_s"]:>9,.0f} {r["unit"][:5]:5s}{r["eval_forward_s"] * 1e3:8.1f} '
               f'{100 * r["eval_mfu"]:5.1f}%')
    print(line)
  result = dict(device_kind=device.device_kind, backend=backend, device_count=jax.device_count(),
                jax_version=jax.__version__, dtype=args.dtype, tiny=args.tiny,
                peak_flop_per_s=peak, peak_source=peak_source,
                measured_matmul_flop_per_s=measured_peak, warmup=args.warmup, steps=args.steps,
                prng_impl=str(jax.config.jax_default_prng_impl), no_dropout=args.no_dropout,
                scheme=args.scheme,
                flops_note='FLOPs: XLA cost analysis of the step lowered for the host CPU (XLA:GPU '
                           'counts its cuBLAS calls as 0); not a 6ND model estimate',
                rows=rows)
  if args.out:
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f'wrote {path}')


if __name__ == '__main__':
  main()
