"""jaxtl.ops.Conv against flax's nn.Conv in the same model, same process, alternating steps.

  python -m benchmarks.conv_ab                                  # MobileNetV2, 96 px, batch 64
  python -m benchmarks.conv_ab --model resnet50 --image_size 224 --batch 8

The model is built twice: as committed (its convs are jaxtl.ops.Conv) and with nn.Conv in their
place (same params, same arguments). Both compile first; then the full fine-tuning step (jaxtl's
train_step, AdamW, clipping) and the eval forward run in turns, one call each, so machine load
hits both alike. Prints the medians and the ratios (nn.Conv / ops: above 1, ops is faster).
"""
import argparse
import contextlib
import importlib
import statistics
import time
import types

import flax.linen as nn
import jax

from benchmarks import accelerator as common
from jaxtl import models

MODULES = {'mobilenet_v2': 'jaxtl.models.mobilenet_v2', 'resnet50': 'jaxtl.models.resnet'}


@contextlib.contextmanager
def flax_convs(model):
  """Inside: the model file's `ops.Conv` is flax's nn.Conv (ops' other functions unchanged)."""
  file = importlib.import_module(MODULES[model])
  ops = file.ops
  file.ops = types.SimpleNamespace(**{**vars(ops), 'Conv': nn.Conv})
  try:
    yield
  finally:
    file.ops = ops


def build(model, image_size, batch_size):
  module = models.create(model, num_classes=10)
  variables = common.init_variables(module)
  batch = common.image_batch(batch_size, image_size)
  batch['label'] = batch['label'] % 10
  state, step = common.train_setup(module, variables, 'full')
  step, _ = common.compile_timed(step, state, batch)
  forward, _ = common.compile_timed(common.forward_fn(module), variables, batch)
  return dict(step=lambda: jax.block_until_ready(step(state, batch)),
              forward=lambda: jax.block_until_ready(forward(variables, batch)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', choices=sorted(MODULES), default='mobilenet_v2')
  parser.add_argument('--image_size', type=int, default=96)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=3)
  args = parser.parse_args()
  # Traced and compiled while the patch is in place; the compiled programs keep what they saw.
  sides = {'ops.Conv': build(args.model, args.image_size, args.batch)}
  with flax_convs(args.model):
    sides['nn.Conv'] = build(args.model, args.image_size, args.batch)
  times = {(side, what): [] for side in sides for what in ('step', 'forward')}
  for _ in range(args.steps + 1):  # The first round warms up and is dropped.
    for (side, what), ts in times.items():
      start = time.perf_counter()
      sides[side][what]()
      ts.append(time.perf_counter() - start)
  median = {key: statistics.median(ts[1:]) for key, ts in times.items()}
  print(f'{args.model}, {args.image_size} px, batch {args.batch}, {jax.devices()[0].platform}, '
        f'median of {args.steps}:')
  for what in ('step', 'forward'):
    flax_s, ops_s = median['nn.Conv', what], median['ops.Conv', what]
    print(f'  {what:8s} nn.Conv {flax_s:7.3f} s   ops.Conv {ops_s:7.3f} s   '
          f'nn.Conv / ops {flax_s / ops_s:5.2f}')


if __name__ == '__main__':
  main()
