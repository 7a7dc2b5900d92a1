"""Pictures of a run, saved in its workdir:

  curves.png            train and test loss and accuracy against the step (from metrics.jsonl)
  confusion_matrix.png  the test split's confusion matrix, rows the true classes

Matplotlib draws on its Agg canvas through `matplotlib.figure.Figure`, never pyplot: no display is
needed, no global figure state is touched, nothing leaks across calls.
"""
import json
import pathlib

import numpy as np

from jaxtl.errors import JaxtlError

MAX_ANNOTATED_CLASSES = 30  # Beyond this, cells get too small to hold a number.


def read_metrics(path) -> dict:
  """{split: {name: (steps, values)}} from a metrics.jsonl, sorted by step. A step logged twice
  (a run resumed from a checkpoint redoes the steps after it) keeps its last record."""
  path = pathlib.Path(path)
  records = {}
  try:
    lines = path.read_text().splitlines()
  except OSError as e:
    raise JaxtlError(f'{path}: unreadable ({e.strerror})') from None
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      records[(record.get('split', ''), int(record['step']))] = record
    except (ValueError, KeyError, TypeError):
      raise JaxtlError(f'{path}:{number}: not a metrics record') from None
  series = {}
  for (split, step), record in sorted(records.items(), key=lambda item: item[0][1]):
    for name, value in record.items():
      if name in ('step', 'time', 'split') or not isinstance(value, (int, float)):
        continue
      steps, values = series.setdefault(split, {}).setdefault(name, ([], []))
      steps.append(step)
      values.append(float(value))
  return series


def _figure(**kwargs):
  try:
    from matplotlib.figure import Figure
  except ImportError:
    raise JaxtlError('plots need matplotlib (pip install matplotlib)') from None
  return Figure(**kwargs)


def plot_curves(metrics_path, out_path) -> pathlib.Path:
  """curves.png: loss and accuracy against the step, one line per split."""
  series = read_metrics(metrics_path)
  fig = _figure(figsize=(10, 4), layout='constrained')
  for ax, name, title in zip(fig.subplots(1, 2), ('loss', 'accuracy'), ('Loss', 'Accuracy')):
    for split in sorted(series, key=lambda split: (split != 'train', split)):
      if name in series[split]:
        steps, values = series[split][name]
        # Test points are sparse (one per epoch): mark them.
        ax.plot(steps, values, label=split, marker='o' if len(steps) < 50 else None)
    ax.set(title=title, xlabel='step')
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend()
  out_path = pathlib.Path(out_path)
  fig.savefig(out_path, dpi=100)
  return out_path


def normalize_rows(matrix) -> np.ndarray:
  """Each row as fractions of its true class (recall on the diagonal); an empty row stays 0."""
  matrix = np.asarray(matrix, np.float64)
  totals = matrix.sum(axis=1, keepdims=True)
  return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def plot_confusion_matrix(matrix, class_names, out_path) -> pathlib.Path:
  """confusion_matrix.png: colour = the row-normalised fraction, text = the count."""
  matrix = np.asarray(matrix)
  n = len(class_names)
  if matrix.shape != (n, n):
    raise JaxtlError(f'confusion matrix of shape {matrix.shape} for {n} class names')
  side = min(max(4.0, 0.45 * n + 2.5), 40.0)
  fig = _figure(figsize=(side, side * 0.9), layout='constrained')
  ax = fig.subplots()
  image = ax.imshow(normalize_rows(matrix), cmap='Blues', vmin=0.0, vmax=1.0)
  fig.colorbar(image, ax=ax, shrink=0.8, label='fraction of the true class')
  ticks = np.arange(n)
  ax.set_xticks(ticks, class_names, rotation=45 if n > 3 else 0, ha='right' if n > 3 else 'center')
  ax.set_yticks(ticks, class_names)
  ax.set(xlabel='predicted', ylabel='true',
         title=f'Confusion matrix ({int(matrix.sum())} examples)')
  if n <= MAX_ANNOTATED_CLASSES:
    fractions = normalize_rows(matrix)
    for i in range(n):
      for j in range(n):
        value = float(matrix[i, j])
        ax.text(j, i, f'{value:.0f}' if value.is_integer() else f'{value:.2f}', ha='center',
                va='center', fontsize=8, color='white' if fractions[i, j] > 0.5 else 'black')
  out_path = pathlib.Path(out_path)
  fig.savefig(out_path, dpi=100)
  return out_path


def save_run_plots(workdir, confusion_matrix=None, class_names=None) -> list:
  """curves.png (when metrics.jsonl exists) and confusion_matrix.png (when a matrix is given) in
  `workdir`; returns the paths written."""
  workdir = pathlib.Path(workdir)
  written = []
  if (workdir / 'metrics.jsonl').exists():
    written.append(plot_curves(workdir / 'metrics.jsonl', workdir / 'curves.png'))
  if confusion_matrix is not None:
    written.append(plot_confusion_matrix(confusion_matrix, class_names,
                                         workdir / 'confusion_matrix.png'))
  return written
