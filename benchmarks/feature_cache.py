"""Epoch times of a linear probe with the feature cache, against the same probe without it.

  python -m benchmarks.feature_cache                  # configs/default.py as a probe, 4 epochs
  python -m benchmarks.feature_cache --epochs 3       # shorter

The probe is configs/default.py (the real all-MiniLM-L6-v2 on BBC News, offline) with
freeze.scheme = linear_probe: only the new head trains, so with config.feature_cache the
backbone's features are computed once and every epoch after the first trains the head on them.
The run is the product's own `train.train_and_evaluate`, once with the cache in memory and once
with it off. An epoch's time runs from the end of the previous epoch's evaluation (for the first
epoch: from the moment the cache starts computing features, or, uncached, from the same point of
the loop) to the end of its own evaluation, read from the timestamps of metrics.jsonl. The target
(issue #6): cached epochs after the first take at most 5 % of the first. Also checked: the two
runs end with the same test accuracy and loss. Writes benchmarks/results/feature_cache-<date>.json.
"""
import argparse
import datetime
import importlib.util
import json
import pathlib
import tempfile
import time

from jaxtl import feature_cache
from jaxtl import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def probe_config(epochs, cache):
  spec = importlib.util.spec_from_file_location('default', ROOT / 'configs' / 'default.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.freeze.scheme = 'linear_probe'
  config.optim.lr = 1e-3
  config.optim.lr_mult = {}
  config.optim.warmup_fraction = 0.0
  config.num_epochs = epochs
  config.checkpoint_every_steps = 10**6  # Checkpoints at phase ends only, as in any run.
  config.feature_cache = cache
  return config


def timed_run(config, workdir):
  """(per-epoch seconds, final result): each epoch ends at its test record in metrics.jsonl; the
  first starts where the loop reaches the feature cache (whether it applies or not)."""
  marks = {}
  plan = feature_cache.plan

  def marked_plan(*args, **kwargs):
    marks.setdefault('start', time.time())
    return plan(*args, **kwargs)

  feature_cache.plan = marked_plan
  try:
    result = train_lib.train_and_evaluate(config, workdir)
  finally:
    feature_cache.plan = plan
  records = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').open()]
  ends = [r['time'] for r in records if r.get('split') == 'test']
  starts = [marks['start']] + ends[:-1]
  return [round(end - start, 4) for start, end in zip(starts, ends)], result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epochs', type=int, default=4)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  rows = {}
  for cache in ('memory', 'off'):
    with tempfile.TemporaryDirectory() as workdir:
      epochs, result = timed_run(probe_config(args.epochs, cache), workdir)
    rows[cache] = dict(epoch_s=epochs, test_acc=result['test_acc'], test_loss=result['test_loss'],
                       later_over_first=[round(t / epochs[0], 5) for t in epochs[1:]])
  cached, plain = rows['memory'], rows['off']
  worst = max(cached['later_over_first'])
  print(f'\n{"":10s} {"epoch 1":>9s} {"epochs 2+ (s)":>24s} {"test acc":>9s}')
  for name, row in (('cached', cached), ('uncached', plain)):
    later = ', '.join(f'{t:.3f}' for t in row['epoch_s'][1:])
    print(f'{name:10s} {row["epoch_s"][0]:8.2f}s {later:>24s} {row["test_acc"]:9.4f}')
  print(f'cached epochs after the first: at most {100 * worst:.2f} % of the first (target 5 %: '
        f'{"met" if worst <= 0.05 else "MISSED"}); same result as uncached: '
        f'{cached["test_acc"] == plain["test_acc"]} (test loss {cached["test_loss"]:.6f} / '
        f'{plain["test_loss"]:.6f})')
  out = pathlib.Path(args.out or ROOT / 'benchmarks' / 'results' /
                     f'feature_cache-{datetime.date.today().isoformat()}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(args=vars(args), cached=cached, uncached=plain,
                                 worst_later_over_first=worst), indent=2) + '\n')
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
