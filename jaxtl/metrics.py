"""Run metrics: a JSONL log and TensorBoard event files in the workdir, a progress bar, a
per-epoch table, and the confusion matrix an eval step sums up.

  <workdir>/metrics.jsonl   one JSON object per write: step, time, split, values
  <workdir>/tensorboard/    events.out.tfevents.* with one scalar per value, tagged '<split>/<name>'

`MetricWriter` writes both; use it as a context manager (or call close()) so that the event file
is flushed and closed when a run ends or fails.
"""
import json
import os
import pathlib
import socket
import struct
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxtl.errors import JaxtlError


def _scalar(value):
  """An int or float for a number or a 0-d array (bfloat16 included); None for anything else:
  booleans, strings, vectors, matrices."""
  if value is None or isinstance(value, (bool, np.bool_, str)):
    return None
  if isinstance(value, (int, np.integer)):
    return int(value)
  try:
    array = np.asarray(value)
    return float(array) if array.ndim == 0 and array.dtype.kind != 'c' else None
  except (TypeError, ValueError):
    return None


class JsonlWriter:
  """Appends one JSON object per line to <workdir>/metrics.jsonl: numbers, strings, booleans;
  arrays (a confusion matrix) are left out, so that a line stays a line."""

  def __init__(self, workdir):
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'

  def write(self, step, **values):
    record = {'step': int(step), 'time': round(time.time(), 3)}
    for key, value in values.items():
      scalar = _scalar(value)
      if scalar is not None:
        record[key] = scalar
      elif isinstance(value, (bool, np.bool_)):
        record[key] = bool(value)
      elif isinstance(value, str) or value is None:
        record[key] = value
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')

  def close(self):
    pass  # Each write opens and closes the file.


# ---------------------------------------------------------------------------------------------
# TensorBoard event files, written without TensorFlow: importing TF costs seconds and memory in a
# process that otherwise never needs it (and tf.summary.scalar needs the separate tensorboard
# package besides). The format is small and stable: TFRecord framing around `Event` protos.
# ---------------------------------------------------------------------------------------------
def _crc32c_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord files."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack('<I', (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _tfrecord(data: bytes) -> bytes:
  length = struct.pack('<Q', len(data))
  return length + _masked_crc(length) + data + _masked_crc(data)


# Protobuf wire format: a field key is (number << 3 | wire type); 0 varint, 1 fixed64,
# 2 length-delimited, 5 fixed32.
def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version=None, scalars=None) -> bytes:
  """A tensorflow.Event: wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5;
  Summary.value = 1; Summary.Value: tag = 1, simple_value = 2 (float), which TensorBoard shows
  as a scalar."""
  out = _varint(1 << 3 | 1) + struct.pack('<d', wall_time) + _varint(2 << 3) + _varint(step)
  if file_version:
    out += _field(3, file_version.encode())
  if scalars:
    values = b''.join(
        _field(1, _field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack('<f', value))
        for tag, value in scalars.items())
    out += _field(5, values)
  return out


class TensorBoardWriter:
  """Scalars into <workdir>/tensorboard/events.out.tfevents.<time>.<host>, tagged
  '<split>/<name>' ('train/loss', 'test/accuracy'). Each process writes a file of its own, so a
  resumed run adds one beside the first. Every write is flushed: a live TensorBoard sees it."""

  def __init__(self, workdir):
    self.directory = pathlib.Path(workdir) / 'tensorboard'
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise JaxtlError(f'{self.directory}: cannot create ({e.strerror})') from None
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self.path = self.directory / name
    self._file = open(self.path, 'ab')
    self._append(_event(time.time(), 0, file_version='brain.Event:2'))

  def _append(self, event: bytes):
    self._file.write(_tfrecord(event))
    self._file.flush()

  def write(self, step, split=None, **values):
    prefix = f'{split}/' if split else ''
    scalars = {f'{prefix}{k}': _scalar(v) for k, v in values.items() if _scalar(v) is not None}
    if scalars:
      self._append(_event(time.time(), int(step), scalars=scalars))

  def close(self):
    if not self._file.closed:
      self._file.close()


class MetricWriter:
  """`write(step, split=..., **values)` to metrics.jsonl and to TensorBoard event files. Only
  process 0 of a multi-process run writes (N processes would append N copies of each line)."""

  def __init__(self, workdir, tensorboard=True):
    self.writers = []
    if jax.process_index() == 0:
      self.writers.append(JsonlWriter(workdir))
      if tensorboard:
        self.writers.append(TensorBoardWriter(workdir))

  def write(self, step, **values):
    for writer in self.writers:
      writer.write(step, **values)

  def close(self):
    for writer in self.writers:
      writer.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------
def confusion_matrix(labels, predictions, num_classes: int, weights=None):
  """float32 [C, C] counts: row = true class, column = predicted class. Jittable (an eval step
  sums it per batch); `weights` (a batch's mask) leaves padding rows out."""
  true = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if weights is not None:
    true = true * jnp.asarray(weights, jnp.float32)[:, None]
  return true.T @ jax.nn.one_hot(predictions, num_classes, dtype=jnp.float32)


# ---------------------------------------------------------------------------------------------
# Console.
# ---------------------------------------------------------------------------------------------
class StepBar(tqdm.tqdm):
  """A step bar showing elapsed<remaining time, whose rate (and so the remaining time) leaves out
  the first update after it starts or after `restart_rate()`: that step compiles the train step,
  which can take as long as a hundred steps, and would inflate the estimate for much of a short
  run. Elapsed time stays wall time. On a resumed run (initial > 0) only the steps run since the
  start count, so the remaining time holds there too."""

  def __init__(self, *args, **kwargs):
    self.restart_rate()  # Before tqdm's __init__, which draws the bar.
    super().__init__(*args, **kwargs)

  def restart_rate(self):
    """The next update includes a compilation (a new phase's step): keep it out of the rate."""
    self._warming_up, self._rate_since = True, None

  def update(self, n=1):
    if not self._warming_up or self.disable:
      return super().update(n)
    self._warming_up = False
    self.n += n
    # Measure the rate from here on: as if these steps had been done before the bar started.
    self.initial = self.last_print_n = self.n
    self.last_print_t = self._rate_since = self._time()
    self.refresh()
    return True

  @property
  def format_dict(self):
    values = super().format_dict
    # Until tqdm's moving average has a sample, it divides by all the elapsed time, compilation
    # included; divide by the time since the warm-up step instead.
    if values['rate'] is None and self._rate_since is not None and self.n > self.initial:
      elapsed = self._time() - self._rate_since
      values['rate'] = (self.n - self.initial) / elapsed if elapsed > 0 else None
    return values


def progress(total, initial, desc, file=None) -> StepBar:
  return StepBar(total=total, initial=initial, desc=desc, unit='step', dynamic_ncols=True,
                 file=file or sys.stdout, leave=True, mininterval=1.0,
                 disable=jax.process_index() != 0)  # Multi-host: one bar, on process 0.


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
