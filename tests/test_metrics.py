"""Run metrics and pictures: JSONL + TensorBoard event files (read back by TensorFlow's own reader),
the progress bar's remaining time (resumed runs included), the confusion matrix, and the PNGs."""
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxtl import metrics, plots
from jaxtl.errors import JaxtlError


def _read_events(directory):
  """[(step, {tag: value})] of every event file in `directory`, by TensorFlow's reader (which
  checks each record's CRC)."""
  import tensorflow as tf
  events = []
  for path in sorted(directory.glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      values = {v.tag: v.simple_value for v in event.summary.value}
      if values:
        events.append((event.step, values))
  return events


def test_metric_writer_writes_jsonl_and_tensorboard(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:
    writer.write(8, split='train', loss=jnp.float32(1.25), accuracy=np.float64(0.5), lr=1e-3)
    writer.write(16, split='test', epoch=1, loss=0.75, accuracy=0.875,
                 confusion_matrix=np.eye(3))  # Not a scalar: left out of both.
  assert writer.writers[1]._file.closed
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(l['step'], l['split'], l['loss']) for l in lines] == [(8, 'train', 1.25),
                                                                  (16, 'test', 0.75)]
  assert lines[1]['epoch'] == 1 and isinstance(lines[1]['epoch'], int)
  assert 'confusion_matrix' not in lines[1]
  events = _read_events(tmp_path / 'tensorboard')
  assert events == [(8, {'train/loss': 1.25, 'train/accuracy': 0.5,
                         'train/lr': pytest.approx(1e-3)}),
                    (16, {'test/epoch': 1.0, 'test/loss': 0.75, 'test/accuracy': 0.875})]


def test_crc32c_known_value():
  assert metrics.crc32c(b'123456789') == 0xE3069283  # The standard CRC-32C check value.


def test_progress_shows_remaining_time_when_resuming():
  """Resumed at step 40 of 100; the first step compiles for 30 s, then steps take 0.5 s: the
  remaining time is 0.5 s per step left, as neither the compilation nor the steps before the
  restart skew it."""
  now = [0.0]
  bar = metrics.progress(100, 40, 'train', file=io.StringIO())
  bar._time = lambda: now[0]
  bar.start_t = bar.last_print_t = 0.0
  now[0] = 30.0
  bar.update(1)
  bar.update(1)
  now[0] += 0.5
  bar.refresh()  # Before tqdm's moving average has a sample (as bar.set_postfix refreshes).
  assert '42/100 [00:30<00:29,  2.00step/s]' in str(bar)
  for _ in range(18):
    now[0] += 0.5
    bar.update(1)
  assert bar.n == 60
  assert '60/100 [00:39<00:20,  2.00step/s]' in str(bar)
  bar.close()


def test_confusion_matrix_counts_real_rows_only():
  labels = jnp.array([0, 0, 1, 2, 2, 2, 1])
  predictions = jnp.array([0, 1, 1, 2, 0, 2, 0])
  mask = jnp.array([1, 1, 1, 1, 1, 1, 0])  # The last row pads the batch.
  matrix = jax.jit(metrics.confusion_matrix, static_argnums=2)(labels, predictions, 3, mask)
  np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
  np.testing.assert_allclose(plots.normalize_rows([[1, 1, 0], [0, 0, 0], [1, 0, 3]]),
                             [[0.5, 0.5, 0], [0, 0, 0], [0.25, 0, 0.75]])


def test_read_metrics_keeps_the_last_record_of_a_redone_step(tmp_path):
  records = [dict(step=8, split='train', loss=2.0), dict(step=16, split='train', loss=1.0),
             dict(step=16, split='test', loss=1.5, accuracy=0.5, epoch=1),
             # Resumed from the checkpoint at step 8: step 16 is done again.
             dict(step=16, split='train', loss=0.9), dict(step=24, split='train', loss=0.5)]
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'time': 0.0, **r}) + '\n' for r in records))
  series = plots.read_metrics(path)
  assert series['train']['loss'] == ([8, 16, 24], [2.0, 0.9, 0.5])
  assert series['test']['accuracy'] == ([16], [0.5])
  path.write_text('{"step": 1}\nnot json\n')
  with pytest.raises(JaxtlError, match=r'metrics.jsonl:2: not a metrics record'):
    plots.read_metrics(path)


def _assert_png(path):
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert min(image.size) > 100


def test_run_plots_are_pngs(tmp_path):
  with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
    for step in range(1, 9):
      writer.write(step, split='train', loss=1 / step, accuracy=1 - 1 / step)
    writer.write(8, split='test', epoch=1, loss=0.3, accuracy=0.9)
  matrix = np.array([[5, 1, 0], [0, 3, 2], [1, 0, 7]])
  written = plots.save_run_plots(tmp_path, matrix, ['cat', 'dog', 'fish'])
  assert written == [tmp_path / 'curves.png', tmp_path / 'confusion_matrix.png']
  for path in written:
    _assert_png(path)
  with pytest.raises(JaxtlError, match=r'shape \(3, 3\) for 2 class names'):
    plots.plot_confusion_matrix(matrix, ['cat', 'dog'], tmp_path / 'x.png')
