"""Text classification data: tfds datasets, local CSV / JSONL files, or a folder of .txt files per
class; tokenised once with the checkpoint's own tokenizer into fixed-length numpy arrays.

config.data fields (see configs/default.py):
  kind: 'folder' | 'csv' | 'jsonl' | 'tfds' | 'synthetic'
  path / test_path: files or folders (local, or 'pkg:<package>/<path>'); without test data a
    stratified `test_fraction` of the training data is held out (seeded).
  text_field, label_field: CSV columns / JSONL keys / tfds features (default: 'text', 'label', or
    the tfds dataset's own). Labels are class names or integer ids.
  name, train_split, test_split: for tfds.
  max_length: tokens per example (padded and truncated).
"""
import csv
import dataclasses
import io
import json
import pathlib

import numpy as np

from jaxtl import paths
from jaxtl.data import split_holdout
from jaxtl.errors import DataError, JaxtlError

# tfds text datasets: (text feature, label feature, held-out split).
KINDS = ('folder', 'csv', 'jsonl', 'tfds', 'synthetic')
TFDS_FIELDS = {'glue/sst2': ('sentence', 'label', 'validation'),
               'imdb_reviews': ('text', 'label', 'test'),
               'ag_news_subset': ('description', 'label', 'test')}


@dataclasses.dataclass
class TextData:
  train: dict           # input_ids, attention_mask, token_type_ids (int32 [N, L]), label (int32 [N])
  test: dict
  class_names: list
  max_length: int = 0
  tokenizer_dir: object = None  # The folder the tokenizer came from (None: synthetic token ids).


def _read_text(path: pathlib.Path) -> str:
  raw = path.read_bytes()
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError:
    return raw.decode('latin-1')


def read_folder(root: pathlib.Path):
  """Texts and class names from root/<class>/*.txt (classes sorted by name)."""
  classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
  if not classes:
    raise DataError(f'{root}: no class sub-folders (expected {root}/<class name>/*.txt)')
  texts, labels = [], []
  for i, name in enumerate(classes):
    files = sorted((root / name).glob('*.txt'))
    if not files:
      raise DataError(f'{root / name}: class folder holds no .txt files')
    texts += [_read_text(f) for f in files]
    labels += [i] * len(files)
  return texts, np.array(labels, np.int32), classes


def _read_records(path: pathlib.Path, kind: str):
  """[(line number, record dict)] from a CSV (header row) or JSONL file."""
  records = []
  raw = path.read_bytes()
  try:
    content = raw.decode('utf-8-sig')  # A leading byte-order mark is not part of the header.
  except UnicodeDecodeError as e:
    line = e.object[:e.start].count(b'\n') + 1
    raise DataError(f'{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x}); save the file '
                    'as UTF-8') from None
  with io.StringIO(content, newline='') as f:
    if kind == 'csv':
      for line, row in enumerate(csv.DictReader(f), start=2):
        records.append((line, row))
    else:
      for line, text in enumerate(f, start=1):
        if text.strip():
          try:
            records.append((line, json.loads(text)))
          except json.JSONDecodeError as e:
            raise DataError(f'{path}:{line}: not valid JSON ({e.msg})') from None
  if not records:
    raise DataError(f'{path}: empty data file (no examples)')
  return records


def read_records(path: pathlib.Path, kind: str, text_field: str, label_field: str):
  """(texts, raw labels, [(line, raw label)]) from a CSV or JSONL file."""
  texts, raw = [], []
  for line, rec in _read_records(path, kind):
    for field in (text_field, label_field):
      if field not in rec or rec[field] is None:
        raise DataError(f'{path}:{line}: no {field!r} field (config.data.text_field / '
                        f'label_field); fields present: {sorted(rec)}')
    texts.append(str(rec[text_field]))
    raw.append((f'{path}:{line}', rec[label_field]))
  return texts, raw


def encode_labels(raw, num_classes=None, class_names=None):
  """Integer labels and class names from raw labels (names, or integer ids in [0, num_classes))."""
  values = [v for _, v in raw]
  as_int = all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip('-').isdigit())
               for v in values)
  if as_int:
    ids = [int(v) for v in values]
    n = num_classes or (len(class_names) if class_names else max(ids) + 1)
    for (where, v), i in zip(raw, ids):
      if not 0 <= i < n:
        raise DataError(f'{where}: label {v!r} is out of range [0, {n}) '
                        f'(config.data.num_classes = {num_classes})')
    return np.array(ids, np.int32), class_names or [str(i) for i in range(n)]
  names = class_names or sorted({str(v) for v in values})
  index = {name: i for i, name in enumerate(names)}
  for where, v in raw:
    if str(v) not in index:
      raise DataError(f'{where}: label {v!r} is not one of the classes {names}')
  if num_classes and len(names) > num_classes:
    raise DataError(f'{len(names)} classes in the data ({names}) but config.data.num_classes is '
                    f'{num_classes}')
  return np.array([index[str(v)] for _, v in raw], np.int32), names


def _read_split(cfg, spec, class_names=None):
  path = paths.resolve(spec, what='config.data.path')
  if cfg.kind == 'folder':
    return read_folder(path)
  texts, raw = read_records(path, cfg.kind, cfg.get('text_field') or 'text',
                            cfg.get('label_field') or 'label')
  labels, names = encode_labels(raw, cfg.get('num_classes'), class_names)
  return texts, labels, names


def _read_tfds(cfg):
  import tensorflow_datasets as tfds
  text_key, label_key, held_out = TFDS_FIELDS.get(cfg.name, ('text', 'label', 'test'))
  text_key, label_key = cfg.get('text_field') or text_key, cfg.get('label_field') or label_key
  builder = tfds.builder(cfg.name, data_dir=cfg.get('data_dir'))
  builder.download_and_prepare()
  names = builder.info.features[label_key].names
  splits = []
  for split in (cfg.get('train_split') or 'train', cfg.get('test_split') or held_out):
    ds = tfds.as_numpy(builder.as_dataset(split=split))
    examples = [(ex[text_key], int(ex[label_key])) for ex in ds]
    if not examples:
      raise DataError(f'tfds {cfg.name} split {split!r} is empty')
    texts = [t.decode('utf-8') if isinstance(t, bytes) else str(t) for t, _ in examples]
    splits.append((texts, np.array([l for _, l in examples], np.int32), list(names)))
  return splits


def synthetic(num_classes=4, n_train=512, n_test=256, length=16, vocab_size=128, seed=0):
  """Token sequences whose class is given by the keywords they contain, amid random tokens.

  Token 1 starts each sequence ([CLS]); each class owns 4 keyword ids; 0 is padding."""
  rng = np.random.default_rng(seed)
  keywords = 2 + np.arange(num_classes * 4).reshape(num_classes, 4)
  first_noise = 2 + keywords.size

  def make(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    ids = rng.integers(first_noise, vocab_size, (n, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, n)
    for i, (label, used) in enumerate(zip(labels, lengths)):
      ids[i, rng.choice(np.arange(1, used), 2, replace=False)] = rng.choice(keywords[label], 2)
      ids[i, used:] = 0
    ids[:, 0] = 1
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': np.zeros_like(ids),
            'label': labels}
  return TextData(make(n_train), make(n_test), [f'class_{i}' for i in range(num_classes)],
                  length)


def tokenize(tokenizer, texts, labels, max_length):
  enc = tokenizer(list(texts), padding='max_length', truncation=True, max_length=max_length,
                  return_tensors='np', return_token_type_ids=True, return_attention_mask=True)
  return {'input_ids': enc['input_ids'].astype(np.int32),
          'attention_mask': enc['attention_mask'].astype(np.int32),
          'token_type_ids': enc['token_type_ids'].astype(np.int32), 'label': labels}


# Any of these in a folder means a tokenizer was saved there (save_pretrained writes several).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt', 'vocab.json',
                   'spiece.model', 'sentencepiece.bpe.model', 'tokenizer.model')


def load_tokenizer(directory):
  from transformers import AutoTokenizer
  directory = pathlib.Path(directory)
  if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
    raise DataError(f'{directory}: no tokenizer files (none of {", ".join(TOKENIZER_FILES)}); '
                    'save the tokenizer there (tokenizer.save_pretrained) or point '
                    'config.data.tokenizer at a folder that has one')
  try:
    return AutoTokenizer.from_pretrained(str(directory), use_fast=True)
  except (OSError, ValueError) as e:
    first = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
    raise DataError(f'{directory}: no usable tokenizer ({first})') from None


def load(cfg, tokenizer_dir, seed=0) -> TextData:
  """The train and test splits of `config.data`, tokenised with the tokenizer in `tokenizer_dir`."""
  if cfg.kind == 'synthetic':
    return synthetic(cfg.get('num_classes', 4), seed=seed)
  try:
    if cfg.kind == 'tfds':
      (train_texts, train_y, names), (test_texts, test_y, _) = _read_tfds(cfg)
    elif cfg.kind in ('folder', 'csv', 'jsonl'):
      train_texts, train_y, names = _read_split(cfg, cfg.path)
      if cfg.get('test_path'):
        test_texts, test_y, test_names = _read_split(cfg, cfg.test_path, names)
        if test_names != names:
          raise DataError(f'config.data.test_path {cfg.test_path}: classes {test_names} differ '
                          f'from the training classes {names}')
      else:
        fraction = cfg.get('test_fraction', 0.2)
        train_idx, test_idx = split_holdout(train_y, fraction, seed)
        if not len(test_idx) or not len(train_idx):
          raise DataError(f'{cfg.path}: {len(train_y)} examples are too few to hold out '
                          f'config.data.test_fraction = {fraction} for testing; add data or '
                          'give config.data.test_path')
        test_texts, test_y = [train_texts[i] for i in test_idx], train_y[test_idx]
        train_texts, train_y = [train_texts[i] for i in train_idx], train_y[train_idx]
    else:
      raise DataError(f'config.data.kind {cfg.kind!r} is not one of folder, csv, jsonl, tfds, '
                      'synthetic')
  except JaxtlError as e:
    raise DataError(str(e)) from None
  tokenizer = load_tokenizer(tokenizer_dir)
  length = cfg.get('max_length', 128)
  return TextData(tokenize(tokenizer, train_texts, train_y, length),
                  tokenize(tokenizer, test_texts, test_y, length), names, length,
                  pathlib.Path(tokenizer_dir))
