"""Run metrics: a JSONL log in the workdir, a progress bar, a per-epoch table."""
import json
import pathlib
import sys
import time

import tqdm


class JsonlWriter:
  """Appends one JSON object per line to <workdir>/metrics.jsonl."""

  def __init__(self, workdir):
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'

  def write(self, step, **values):
    record = {'step': int(step), 'time': round(time.time(), 3)}
    record.update({k: float(v) if hasattr(v, '__float__') else v for k, v in values.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def progress(total, initial, desc):
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit='step', dynamic_ncols=True,
                   file=sys.stdout, leave=True, mininterval=1.0)


class EpochTable:
  """Prints a header once, then one aligned row per epoch."""
  COLUMNS = ('epoch', 'step', 'train_loss', 'train_acc', 'test_loss', 'test_acc', 'ex/s', 'time')

  def __init__(self):
    self.printed_header = False

  def row(self, **values):
    if not self.printed_header:
      tqdm.tqdm.write('  '.join(f'{c:>10}' for c in self.COLUMNS))
      self.printed_header = True
    cells = []
    for c in self.COLUMNS:
      v = values.get(c, '')
      cells.append(f'{v:>10.4f}' if isinstance(v, float) else f'{v!s:>10}')
    tqdm.tqdm.write('  '.join(cells))
