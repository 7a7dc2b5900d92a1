"""Text data: folders, CSV, JSONL and tfds; labels; the held-out split; tokenisation; errors."""
import json

import ml_collections
import numpy as np
import pytest

from jaxtl import data as data_lib
from jaxtl.data import text
from jaxtl.errors import DataError


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
  """A BERT WordPiece tokenizer built locally from a tiny vocabulary."""
  from transformers import BertTokenizerFast
  directory = tmp_path_factory.mktemp('tok')
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + 'the cat dog sat on mat a bird flew'.split()
  BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(directory)
  return directory


def _cfg(**kw):
  base = dict(kind='folder', path='', test_path='', test_fraction=0.25, max_length=8,
              text_field='', label_field='', num_classes=0, name='', train_split='',
              test_split='', tokenizer='')
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_folder_with_holdout_split(tmp_path, tokenizer_dir):
  for name, n in (('animals', 8), ('birds', 4)):
    (tmp_path / name).mkdir()
    for i in range(n):
      (tmp_path / name / f'{i}.txt').write_text('the cat sat on the mat' if name == 'animals'
                                                else 'a bird flew')
  data = text.load(_cfg(path=str(tmp_path)), tokenizer_dir, seed=0)
  assert data.class_names == ['animals', 'birds']
  assert len(data.train['label']) == 9 and len(data.test['label']) == 3
  assert sorted(data.test['label'].tolist()) == [0, 0, 1]  # Stratified: 25 % of each class.
  assert data.train['input_ids'].shape == (9, 8) and data.train['input_ids'].dtype == np.int32
  animal = data.train['input_ids'][data.train['label'] == 0][0]
  assert animal[0] == 2 and list(animal[1:7]) == [5, 6, 8, 9, 5, 10] and animal[7] == 3
  bird = data.train['attention_mask'][data.train['label'] == 1][0]
  assert bird.tolist() == [1, 1, 1, 1, 1, 0, 0, 0]


def test_jsonl_and_csv_with_test_files(tmp_path, tokenizer_dir):
  rows = [('the cat', 'pets'), ('a bird flew', 'wild'), ('dog sat', 'pets')]
  (tmp_path / 'train.jsonl').write_text(
      '\n'.join(json.dumps({'text': t, 'label': l}) for t, l in rows) + '\n')
  (tmp_path / 'test.csv').write_text('body,topic\n"the dog",pets\nbird,wild\n')
  data = text.load(_cfg(kind='jsonl', path=str(tmp_path / 'train.jsonl'), test_fraction=0.5),
                   tokenizer_dir)
  assert data.class_names == ['pets', 'wild']
  assert len(data.train['label']) == 2 and len(data.test['label']) == 1
  with pytest.raises(DataError, match='3 examples are too few to hold out'):
    text.load(_cfg(kind='jsonl', path=str(tmp_path / 'train.jsonl'), test_fraction=0.1),
              tokenizer_dir)
  data = text.load(_cfg(kind='csv', path=str(tmp_path / 'test.csv'), text_field='body',
                        label_field='topic', test_path=str(tmp_path / 'test.csv')), tokenizer_dir)
  assert data.test['label'].tolist() == [0, 1]


def test_label_out_of_range_names_file_and_line(tmp_path, tokenizer_dir):
  (tmp_path / 'd.jsonl').write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 3}\n')
  with pytest.raises(DataError, match=r'd\.jsonl:2: label 3 is out of range \[0, 2\)'):
    text.load(_cfg(kind='jsonl', path=str(tmp_path / 'd.jsonl'), num_classes=2), tokenizer_dir)


def test_empty_data_file(tmp_path, tokenizer_dir):
  (tmp_path / 'empty.csv').write_text('text,label\n')
  with pytest.raises(DataError, match=r'empty\.csv: empty data file'):
    text.load(_cfg(kind='csv', path=str(tmp_path / 'empty.csv')), tokenizer_dir)


def test_missing_field_and_bad_json(tmp_path, tokenizer_dir):
  (tmp_path / 'a.jsonl').write_text('{"sentence": "a", "label": 0}\n')
  with pytest.raises(DataError, match=r"a\.jsonl:1: no 'text' field.*\['label', 'sentence'\]"):
    text.load(_cfg(kind='jsonl', path=str(tmp_path / 'a.jsonl')), tokenizer_dir)
  (tmp_path / 'b.jsonl').write_text('{"text": "a", "label": 0}\n{"text": \n')
  with pytest.raises(DataError, match=r'b\.jsonl:2: not valid JSON'):
    text.load(_cfg(kind='jsonl', path=str(tmp_path / 'b.jsonl')), tokenizer_dir)


def test_missing_path_and_empty_folder(tmp_path, tokenizer_dir):
  with pytest.raises(DataError, match=r"config.data.path '/no/such/dir'.*does not exist"):
    text.load(_cfg(path='/no/such/dir'), tokenizer_dir)
  with pytest.raises(DataError, match='no class sub-folders'):
    text.load(_cfg(path=str(tmp_path)), tokenizer_dir)
  (tmp_path / 'empty_class').mkdir()
  with pytest.raises(DataError, match='empty_class: class folder holds no .txt files'):
    text.load(_cfg(path=str(tmp_path)), tokenizer_dir)


def test_tfds_text_dataset_with_mock_data(tokenizer_dir):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    data = text.load(_cfg(kind='tfds', name='glue/sst2'), tokenizer_dir)
  assert data.class_names == ['negative', 'positive']
  assert data.train['input_ids'].shape == (12, 8) and len(data.test['label']) == 12


def test_batches_are_seeded_resumable_and_padded():
  arrays = {'x': np.arange(10), 'label': np.arange(10)}
  a = [b['x'].tolist() for b in data_lib.batches(arrays, 3, seed=1, epoch=2, shuffle=True,
                                                 drop_remainder=True)]
  b = [b['x'].tolist() for b in data_lib.batches(arrays, 3, seed=1, epoch=2, shuffle=True,
                                                 drop_remainder=True, start=1)]
  assert len(a) == 3 and a[1:] == b
  assert sorted(sum(a, [])) != list(range(9))  # Shuffled...
  c = [b['x'].tolist() for b in data_lib.batches(arrays, 3, seed=1, epoch=3, shuffle=True,
                                                 drop_remainder=True)]
  assert a != c  # ... differently each epoch.
  last = list(data_lib.batches(arrays, 4))[-1]
  assert last['x'].tolist() == [8, 9, 0, 0] and last['mask'].tolist() == [1, 1, 0, 0]


def test_synthetic_is_learnable_by_keywords():
  data = text.synthetic(num_classes=3, n_train=50, n_test=10, length=12)
  ids, labels = data.train['input_ids'], data.train['label']
  keywords = 2 + np.arange(12).reshape(3, 4)
  for row, label in zip(ids, labels):
    assert np.isin(keywords[label], row).any()
    others = np.delete(keywords, label, axis=0)
    assert not np.isin(others, row).any()
