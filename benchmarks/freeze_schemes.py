"""Step time per freezing scheme, relative to the model's own forward pass (same run, same batch).

  python -m benchmarks.freeze_schemes                 # BERT-base seq 128 and ResNet-50 at 224
  python -m benchmarks.freeze_schemes --models bert-base,vit-b16,resnet50 --schemes linear_probe
  python -m benchmarks.freeze_schemes --quick         # smaller shapes, for a smoke check

For each model and scheme it times the jitted train step with and without global-norm clipping
and divides by the jitted eval forward, the two timed in turns. A frozen backbone (linear_probe)
should cost at most 1.05x the forward pass under any optax chain, clipping included: only the head
is differentiated. Also reports XLA's FLOP count of
each compiled step over the forward's, which does not depend on machine noise. Writes
benchmarks/results/freeze_schemes-<date>.json.
"""
import argparse
import datetime
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtl import freeze, lora, models
from jaxtl import train as train_lib

SCHEMES = ('linear_probe', 'last_n_blocks:2', 'bitfit', 'norm_only', 'lora', 'layer_decay:0.75',
           'full')


def _time_alternating(calls, repeats):
  """Median seconds of each zero-argument call, timed in turns (one run each, `repeats` rounds)
  so that a drift in machine load hits them alike."""
  for call in calls:
    jax.block_until_ready(call())  # Compile and warm up.
  times = [[] for _ in calls]
  for _ in range(repeats):
    for call, spent in zip(calls, times):
      start = time.perf_counter()
      jax.block_until_ready(call())
      spent.append(time.perf_counter() - start)
  return [float(np.median(spent)) for spent in times]


def _flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()['flops']


def bench_model(name, module, batch, repeats, schemes=SCHEMES):
  variables = models.init(module)
  inputs = {k: v for k, v in batch.items() if k != 'label'}
  forward = lambda v, b: module.apply(v, **b, train=False)[0]
  jit_forward = jax.jit(forward)
  fwd_flops = _flops(forward, variables, inputs)
  rows = []
  for scheme in schemes:
    if scheme == 'lora' and name.startswith('resnet'):
      continue  # No attention projections to adapt.
    mod, var = (lora.add_adapters(module, variables, rank=8) if scheme == 'lora'
                else (module, variables))
    params = var['params']
    model_state = {k: v for k, v in var.items() if k != 'params'}
    labels = freeze.label_params(params, scheme, mod)
    for clip in (0.0, 1.0):
      optim = ml_collections.ConfigDict(dict(name='adamw', lr=1e-4, weight_decay=0.01,
                                             warmup_fraction=0.0, schedule='constant',
                                             clip_norm=clip))
      tx, _ = train_lib.make_optimizer(optim, labels, 100)
      state = train_lib.TrainState(
          step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
          opt_state=tx.init(freeze.split(params, labels)[0]), rng=jax.random.PRNGKey(0))
      frozen_bns = train_lib.frozen_batchnorms(model_state, labels)
      step = lambda s, b: train_lib.train_step(s, b, module=mod, tx=tx, labels=labels,
                                               frozen_bns=frozen_bns)
      # The state is donated, as train.py does: a step that must copy the frozen params into
      # new output buffers costs a pass over them (~0.1 s for BERT-base).
      jit_step, holder = jax.jit(step, donate_argnums=0), [jax.tree.map(jnp.copy, state)]

      def run_step():
        holder[0], metrics = jit_step(holder[0], batch)
        return metrics['loss']
      step_time, fwd_time = _time_alternating(
          [run_step, lambda: jit_forward(variables, inputs)], repeats)
      step_flops = _flops(step, state, batch)
      rows.append(dict(model=name, scheme=scheme, clip=bool(clip), step_s=step_time,
                       forward_s=fwd_time, time_ratio=step_time / fwd_time,
                       flop_ratio=step_flops / fwd_flops))
      print(f'{name:10s} {scheme:18s} clip={"on " if clip else "off"}  step {step_time:7.3f} s  '
            f'{step_time / fwd_time:5.2f}x forward  ({step_flops / fwd_flops:5.2f}x its FLOPs)',
            flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='small shapes, one repeat')
  parser.add_argument('--models', default='bert-base,resnet50', help='comma-separated')
  parser.add_argument('--schemes', default=','.join(SCHEMES), help='comma-separated')
  parser.add_argument('--repeats', type=int, default=None, help='timed runs each (default 2)')
  parser.add_argument('--out', default=None, help='JSON path (default benchmarks/results/'
                      'freeze_schemes-<date>.json)')
  args = parser.parse_args()
  train_lib.exec_with_host_malloc()  # As train.py does.
  models_, schemes = args.models.split(','), args.schemes.split(',')
  rng = np.random.default_rng(0)
  batch_size, seq, size = (8, 128, 224) if not args.quick else (4, 64, 96)
  repeats = args.repeats or (2 if not args.quick else 1)
  text = {'input_ids': rng.integers(0, 30000, (batch_size, seq)).astype(np.int32),
          'attention_mask': np.ones((batch_size, seq), np.int32),
          'label': rng.integers(0, 2, batch_size).astype(np.int32)}
  images = {'images': rng.standard_normal((batch_size, size, size, 3)).astype(np.float32),
            'label': rng.integers(0, 2, batch_size).astype(np.int32)}
  rows = []
  for name in models_:
    batch = images if name.startswith(('resnet', 'vit')) else text
    rows += bench_model(name, models.create(name, num_classes=2), batch, repeats, schemes)
  out = pathlib.Path(args.out) if args.out else pathlib.Path(__file__).parent / 'results' / (
      f'freeze_schemes-{datetime.date.today().isoformat()}{"-quick" if args.quick else ""}.json')
  out.parent.mkdir(exist_ok=True)
  out.write_text(json.dumps(dict(batch_size=batch_size, seq=seq, image_size=size,
                                 devices=str(jax.devices()), rows=rows), indent=1))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
