"""A catalogue of bad inputs. Each one stops with a specific jaxtl error (a JaxtlError subclass,
never a bare Python exception) whose message names the culprit: the file (and line), the tensor
key, or the config field. Through train.py the same errors print one `error: ...` line, with no
traceback and no half-written --workdir (--debug shows the traceback).

Every fixture is built here, in temporary folders: a tiny transformers BERT with a WordPiece
tokenizer, torchvision-layout torch CNNs (torch_cnns.py), Keras-layout HDF5 files written with h5py
(the layouts of Keras' save_weights; test_keras_apps.py refuses a Keras-made MobileNetV2 too), a
big_vision ViT .npz, image folders, CSV / JSONL files and orbax checkpoints.

Case ids (input -> error):
  weights (jaxtl.load_pretrained), WeightsError:
    garbage-{safetensors,bin,h5,npz}    garbage bytes named model.safetensors / pytorch_model.bin /
                                        model.h5 / model.npz -> '<file>: corrupt ...' / 'not a ...'
    npy-named-npz                       a bare .npy array named .npz -> 'not a .npz archive'
    truncated-{safetensors,torch-zip,torch-legacy}   a real checkpoint cut in half
    resnet-state-dict-in-bert-dir       torchvision ResNet weights beside a BERT config.json
    keras-file-of-another-model-{h5,weights.h5}      a Keras MobileNetV2-like file
    hidden-size-mismatch                config.json says hidden_size 48, the weights are 32 wide
    pickle-runs-code-{zip,legacy,plain} a torch.save / pickle.dump holding os.system via
                                        __reduce__: refused, and the command never ran
    empty-state-dict, unknown-format-onnx, config-json-syntax-error, config-json-missing-field,
    missing-shard, unknown-arch, missing-weights-path, npz-missing-key (a big_vision ViT .npz
    without Transformer/encoder_norm/bias)
  data (jaxtl.data loaders), DataError:
    corrupt-image-stop / corrupt-image-skip (counted), image-folder-{no-classes,empty-class,
    all-unreadable}, bad-on-bad-image, empty-{csv,jsonl,text-class-folder}, label-out-of-range-
    {jsonl,csv}, csv-missing-text-column, non-utf8-{csv,jsonl}, bad-json-line,
    fashion-mnist-truncated, bad-data-kind, tokenizer-folder-without-tokenizer
  config (jaxtl.train.train_and_evaluate on configs/smoke.py), ConfigError / SchemeError /
  CheckpointError: unknown-model-name, model-without-source-or-name, text-data-without-tokenizer,
    batch-larger-than-dataset, batch-not-divisible-by-devices, batch-not-divisible-by-accum,
    mesh-larger-than-devices, phase-unknown-field, bad-optimizer-name, bad-schedule, bad-bn-mode,
    lr-mult-unknown-group, rule-matches-nothing-in-train, workdir-{under-a-file,is-a-file},
    resume-checkpoint-of-another-model; freeze schemes (jaxtl.freeze.label_params): rule-matches-
    nothing, unknown-preset, preset-without-argument, last-n-blocks-out-of-range, malformed-label,
    malformed-rule, bad-rule-regex, uncovered-params
  CLI (python train.py): unknown-config-field, config-syntax-error, corrupt-checkpoint,
    pickle-runs-code, corrupt-image, label-out-of-range, unknown-model-name,
    resume-checkpoint-of-another-model, and --debug showing the traceback.

Every config case is refused before the workdir is created (train_and_evaluate checks each
phase's scheme, optimizer and BN mode first), and each case asserts that.

Also covered elsewhere (not repeated): test_weights.py (missing tensor, unexpected tensor, hub
offline), test_cli.py (missing config file, bad value, unwritable workdir on the CLI),
test_reliability.py (non-finite loss), test_vit_loaders.py / test_resnet.py (more wrong-arch files).
"""
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys

import h5py
import ml_collections
import numpy as np
import pytest
from PIL import Image

import jaxtl
from conftest import ROOT, make_hf_bert
from jaxtl import checkpoint, freeze
from jaxtl import train as train_lib
from jaxtl.data import images, text
from jaxtl.errors import (CheckpointError, ConfigError, DataError, JaxtlError, SchemeError,
                          WeightsError)

GARBAGE = b'this is not a checkpoint\n' * 40
VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'good', 'bad']


def _raises(error, *needles):
  """Runs the callable; asserts it raises `error` (a JaxtlError) whose message has every needle."""
  def check(fn, *args, **kwargs):
    with pytest.raises(error) as info:
      fn(*args, **kwargs)
    assert issubclass(info.type, JaxtlError)
    message = str(info.value)
    for needle in needles:
      assert str(needle) in message, message
    return message
  return check


class _RunsCode:
  """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


# ---------------------------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def bert_dir(tmp_path_factory):
  """A tiny BERT classifier (safetensors, config.json) with a WordPiece tokenizer beside it.
  Read-only: tests that break it work on a copy (`_copy`)."""
  from transformers import BertTokenizerFast
  directory = tmp_path_factory.mktemp('bert')
  make_hf_bert(directory, num_labels=3)
  BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(directory)
  return directory


def _copy(directory, tmp_path, name='model'):
  return shutil.copytree(directory, tmp_path / name)


def _torch_state(bert_dir):
  import torch
  from jaxtl.weights import files
  return {k: torch.from_numpy(np.array(v)) for k, v in
          files.read_tensors(bert_dir / 'model.safetensors').items()}


def _smoke(**fields):
  """configs/smoke.py with dotted fields set, e.g. _smoke(**{'optim.name': 'adam'})."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('smoke', ROOT / 'configs' / 'smoke.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for dotted, value in fields.items():
    *parents, name = dotted.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def _text_cfg(**fields):
  base = dict(kind='csv', path='', test_path='', test_fraction=0.25, max_length=8, text_field='',
              label_field='', num_classes=0, name='', train_split='', test_split='', tokenizer='')
  base.update(fields)
  return ml_collections.ConfigDict(base)


def _image_folder(root, bad=None):
  """root/{cat,dog}/*.png, 4 tiny images each; `bad` (a name) is a corrupt file in cat/."""
  for name in ('cat', 'dog'):
    (root / name).mkdir(parents=True)
    for j in range(4):
      Image.fromarray(np.full((10, 12, 3), 40 * j, np.uint8)).save(root / name / f'{j}.png')
  if bad:
    (root / 'cat' / bad).write_bytes(b'\x89PNG\r\n\x1a\n but then nothing')
  return root


# ---------------------------------------------------------------------------------------------
# Weights.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name, needle', [
    ('model.safetensors', 'corrupt or truncated safetensors file'),
    ('pytorch_model.bin', 'corrupt or truncated torch checkpoint'),
    ('model.h5', 'not a readable HDF5 file'),
    ('model.npz', 'not a .npz archive'),
], ids=['garbage-safetensors', 'garbage-bin', 'garbage-h5', 'garbage-npz'])
def test_garbage_weights_file(tmp_path, bert_dir, name, needle):
  if name in ('model.safetensors', 'pytorch_model.bin'):  # In a Hugging Face directory.
    directory = _copy(bert_dir, tmp_path)
    (directory / 'model.safetensors').unlink()
    path = directory / name
  else:
    path = tmp_path / name
  path.write_bytes(GARBAGE)
  _raises(WeightsError, f'{path}: ', needle)(jaxtl.load_pretrained, path, verbose=False)


def test_npy_named_npz(tmp_path):
  path = tmp_path / 'params.npz'
  with open(path, 'wb') as f:
    np.save(f, np.zeros((3, 4), np.float32))
  _raises(WeightsError, f'{path}: not a .npz archive')(jaxtl.load_pretrained, path, verbose=False)


@pytest.mark.parametrize('kind', ['safetensors', 'torch-zip', 'torch-legacy'])
def test_truncated_checkpoint(tmp_path, bert_dir, kind):
  import torch
  directory = _copy(bert_dir, tmp_path)
  if kind == 'safetensors':
    path = directory / 'model.safetensors'
  else:
    path = directory / 'pytorch_model.bin'
    torch.save(_torch_state(bert_dir), path, _use_new_zipfile_serialization=kind == 'torch-zip')
    (directory / 'model.safetensors').unlink()
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  _raises(WeightsError, f'{path}: ', 'truncated')(jaxtl.load_pretrained, directory, verbose=False)


def test_resnet_state_dict_in_bert_dir(tmp_path, bert_dir):
  import torch
  import torch_cnns
  directory = tmp_path / 'model'
  directory.mkdir()
  shutil.copy(bert_dir / 'config.json', directory / 'config.json')
  torch.save(torch_cnns.resnet(18).state_dict(), directory / 'pytorch_model.bin')
  _raises(WeightsError, f'{directory / "pytorch_model.bin"}: none of its', 'is a bert tensor',
          'conv1.weight', 'another architecture')(jaxtl.load_pretrained, directory, verbose=False)


@pytest.mark.parametrize('fmt', ['h5', 'weights.h5'])
def test_keras_file_of_another_model(tmp_path, fmt):
  """A MobileNetV2-like Keras file, in the layouts of Keras 2 save_weights (layer names) and of
  Keras 3 .weights.h5 (layers by class and position)."""
  path = tmp_path / f'mobilenet.{fmt}'
  rng = np.random.default_rng(0)
  layers = {'Conv1': ('kernel', 'bias'), 'bn_Conv1': ('gamma', 'beta'),
            'expanded_conv_depthwise': ('depthwise_kernel',), 'Logits': ('kernel', 'bias')}
  with h5py.File(path, 'w') as f:
    if fmt == 'h5':
      f.attrs['layer_names'] = [name.encode() for name in layers]
      for name, variables in layers.items():
        group = f.create_group(name)
        group.attrs['weight_names'] = [f'{name}/{v}:0'.encode() for v in variables]
        for v in variables:
          group.create_dataset(f'{name}/{v}:0', data=rng.normal(size=(3, 3)).astype(np.float32))
    else:
      for cls, count in (('conv2d', 1), ('batch_normalization', 1), ('depthwise_conv2d', 1),
                         ('dense', 1)):
        for n in range(count):
          f.create_dataset(f'layers/{cls}{f"_{n}" if n else ""}/vars/0', data=np.zeros(3))
  _raises(WeightsError, f'{path}: a Keras weights file, but not of ResNet50, VGG16 or VGG19')(
      jaxtl.load_pretrained, path, verbose=False)


def test_hidden_size_mismatch(tmp_path, bert_dir):
  directory = _copy(bert_dir, tmp_path)
  config = json.loads((directory / 'config.json').read_text())
  config['hidden_size'] = 48  # The weights are 32 wide.
  (directory / 'config.json').write_text(json.dumps(config))
  _raises(WeightsError, f'{directory / "model.safetensors"} does not fit the model',
          'shape mismatch',
          'bert.embeddings.word_embeddings.weight (99, 32) -> '
          'params/embeddings/word_embeddings/embedding (99, 48)')(
      jaxtl.load_pretrained, directory, verbose=False)


@pytest.mark.parametrize('kind', ['zip', 'legacy', 'plain'])
def test_pickle_that_runs_code_is_refused(tmp_path, bert_dir, kind):
  import torch
  marker = tmp_path / 'pwned'
  directory = _copy(bert_dir, tmp_path)
  (directory / 'model.safetensors').unlink()
  path = directory / 'pytorch_model.bin'
  if kind == 'plain':  # Not even a torch file: pickle.dump of the payload alone.
    path.write_bytes(pickle.dumps(_RunsCode(marker)))
  else:
    state = {**_torch_state(bert_dir), 'evil': _RunsCode(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=kind == 'zip')
  _raises(WeightsError, f'{path}: ', 'system', 'refusing to load it')(
      jaxtl.load_pretrained, directory, verbose=False)
  assert not marker.exists()


def test_empty_state_dict(tmp_path):
  import torch
  path = tmp_path / 'empty.pth'
  torch.save({}, path)
  _raises(WeightsError, f'{path}: holds no tensors')(jaxtl.load_pretrained, path, verbose=False)


def test_unknown_weights_format(tmp_path):
  path = tmp_path / 'model.onnx'
  path.write_bytes(GARBAGE)
  _raises(WeightsError, f"{path}: unknown weights format '.onnx'")(
      jaxtl.load_pretrained, path, verbose=False)


def test_config_json_syntax_error(tmp_path, bert_dir):
  directory = _copy(bert_dir, tmp_path)
  (directory / 'config.json').write_text('{"model_type": "bert",')
  _raises(WeightsError, f'{directory / "config.json"}: not valid JSON')(
      jaxtl.load_pretrained, directory, verbose=False)


def test_config_json_missing_field(tmp_path, bert_dir):
  directory = _copy(bert_dir, tmp_path)
  config = json.loads((directory / 'config.json').read_text())
  del config['num_attention_heads']
  (directory / 'config.json').write_text(json.dumps(config))
  _raises(WeightsError, f"{directory / 'config.json'}: no 'num_attention_heads'")(
      jaxtl.load_pretrained, directory, verbose=False)


def test_shard_index_names_a_missing_shard(tmp_path, bert_dir):
  directory = tmp_path / 'sharded'
  directory.mkdir()
  shutil.copy(bert_dir / 'config.json', directory / 'config.json')
  (directory / 'model.safetensors.index.json').write_text(json.dumps(
      {'weight_map': {'classifier.weight': 'model-00001-of-00002.safetensors'}}))
  _raises(WeightsError, f'{directory / "model-00001-of-00002.safetensors"}: no such file')(
      jaxtl.load_pretrained, directory, verbose=False)


def test_unknown_arch(bert_dir):
  _raises(WeightsError, "arch 'resnet51' is not known", 'resnet')(
      jaxtl.load_pretrained, bert_dir, arch='resnet51', verbose=False)


def test_missing_weights_path(tmp_path):
  _raises(WeightsError, f"weights source '{tmp_path / 'nope'}'", 'does not exist')(
      jaxtl.load_pretrained, tmp_path / 'nope', verbose=False)


def test_npz_missing_key(tmp_path):
  from vit_checkpoints import big_vision_npz, make_hf_vit
  path = tmp_path / 'vit.npz'
  arrays = big_vision_npz(make_hf_vit(None, num_labels=2), path)
  del arrays['Transformer/encoder_norm/bias']
  np.savez(path, **arrays)
  _raises(WeightsError, f'{path} does not fit the model', 'not in the checkpoint',
          'encoder_norm/bias')(jaxtl.load_pretrained, path, verbose=False)


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------
def test_corrupt_image_stops_naming_the_file(tmp_path):
  root = _image_folder(tmp_path / 'pets', bad='broken.png')
  cfg = ml_collections.ConfigDict(dict(kind='image_folder', path=str(root), image_size=8))
  _raises(DataError, f'{root / "cat" / "broken.png"}: unreadable image')(images.load, cfg)


def test_corrupt_image_skip_is_counted(tmp_path, capsys):
  root = _image_folder(tmp_path / 'pets', bad='broken.png')
  data = images.load(ml_collections.ConfigDict(dict(
      kind='image_folder', path=str(root), image_size=8, on_bad_image='skip')))
  assert data.skipped == [str(root / 'cat' / 'broken.png')]
  assert len(data.train['label']) + len(data.test['label']) == 8
  assert 'Skipped 1 unreadable image(s)' in capsys.readouterr().out


@pytest.mark.parametrize('layout', ['no-classes', 'empty-class', 'all-unreadable'])
def test_image_folder_without_images(tmp_path, layout):
  root = tmp_path / 'pets'
  root.mkdir()
  if layout == 'no-classes':
    (root / 'readme.txt').write_text('no class folders here')
    needle = f'{root}: no class sub-folders'
  elif layout == 'empty-class':
    _image_folder(root / 'x')
    root = root / 'x'
    (root / 'owl').mkdir()
    needle = f'{root / "owl"}: class folder holds no images'
  else:
    (root / 'cat').mkdir()
    (root / 'cat' / 'a.jpg').write_bytes(b'not a jpeg')
    needle = f'{root}: none of the images could be read'
  cfg = ml_collections.ConfigDict(dict(kind='image_folder', path=str(root), image_size=8,
                                       on_bad_image='skip'))
  _raises(DataError, needle)(images.load, cfg)


def test_bad_on_bad_image_value(tmp_path):
  root = _image_folder(tmp_path / 'pets')
  cfg = ml_collections.ConfigDict(dict(kind='image_folder', path=str(root), on_bad_image='ignore'))
  _raises(DataError, "config.data.on_bad_image 'ignore' is not stop or skip")(images.load, cfg)


@pytest.mark.parametrize('kind', ['csv', 'jsonl', 'folder'])
def test_empty_text_dataset(tmp_path, bert_dir, kind):
  if kind == 'folder':
    path = tmp_path / 'texts'
    (path / 'sports').mkdir(parents=True)
    (path / 'sports' / 'a.txt').write_text('good')
    (path / 'politics').mkdir()
    needle = f'{path / "politics"}: class folder holds no .txt files'
  else:
    path = tmp_path / f'train.{kind}'
    path.write_text('text,label\n' if kind == 'csv' else '\n\n')
    needle = f'{path}: empty data file'
  _raises(DataError, needle)(text.load, _text_cfg(kind=kind, path=str(path)), bert_dir)


@pytest.mark.parametrize('kind', ['jsonl', 'csv'])
def test_label_out_of_range(tmp_path, bert_dir, kind):
  path = tmp_path / f'train.{kind}'
  rows = [('good', 0), ('bad', 1), ('good', 2), ('bad', 1)]  # Label 2 with num_classes = 2.
  if kind == 'jsonl':
    path.write_text(''.join(json.dumps({'text': t, 'label': l}) + '\n' for t, l in rows))
    where = f'{path}:3'
  else:
    path.write_text('text,label\n' + ''.join(f'{t},{l}\n' for t, l in rows))
    where = f'{path}:4'  # The header is line 1.
  _raises(DataError, f'{where}: label', 'out of range [0, 2)', 'config.data.num_classes = 2')(
      text.load, _text_cfg(kind=kind, path=str(path), num_classes=2), bert_dir)


def test_csv_missing_text_column(tmp_path, bert_dir):
  path = tmp_path / 'train.csv'
  path.write_text('sentence,label\ngood,pos\nbad,neg\n')
  _raises(DataError, f"{path}:2: no 'text' field", "['label', 'sentence']")(
      text.load, _text_cfg(path=str(path)), bert_dir)


@pytest.mark.parametrize('kind', ['csv', 'jsonl'])
def test_non_utf8_text(tmp_path, bert_dir, kind):
  path = tmp_path / f'train.{kind}'
  lines = (['text,label', 'good,pos', 'caf\xe9 bad,neg'] if kind == 'csv' else
           ['{"text": "good", "label": 0}', '{"text": "caf\xe9", "label": 1}'])
  path.write_bytes('\n'.join(lines).encode('latin-1') + b'\n')
  line = 3 if kind == 'csv' else 2
  _raises(DataError, f'{path}:{line}: not UTF-8 text (byte 0xe9)')(
      text.load, _text_cfg(kind=kind, path=str(path)), bert_dir)


def test_bad_json_line(tmp_path, bert_dir):
  path = tmp_path / 'train.jsonl'
  path.write_text('{"text": "good", "label": 0}\n{"text": "bad", "label": \n')
  _raises(DataError, f'{path}:2: not valid JSON')(
      text.load, _text_cfg(kind='jsonl', path=str(path)), bert_dir)


def test_fashion_mnist_truncated(tmp_path):
  header = bytes([0, 0, 8, 3]) + b''.join(n.to_bytes(4, 'big') for n in (10, 28, 28))
  with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
    f.write(header + bytes(100))  # 100 of the 7840 bytes.
  _raises(DataError, f'{tmp_path / "train-images-idx3-ubyte.gz"}: truncated')(
      images.load, ml_collections.ConfigDict(dict(kind='fashion_mnist', path=str(tmp_path))))


def test_bad_data_kind(tmp_path, bert_dir):
  _raises(DataError, "config.data.kind 'tsv' is not one of folder, csv, jsonl")(
      text.load, _text_cfg(kind='tsv', path=str(tmp_path)), bert_dir)


def test_tokenizer_folder_without_tokenizer(tmp_path, bert_dir):
  (tmp_path / 'train.csv').write_text('text,label\n' + 'good,pos\nbad,neg\n' * 4)
  empty = tmp_path / 'weights_only'
  empty.mkdir()
  shutil.copy(bert_dir / 'config.json', empty / 'config.json')
  _raises(DataError, f'{empty}: no tokenizer files', 'vocab.txt', 'config.data.tokenizer')(
      text.load, _text_cfg(path=str(tmp_path / 'train.csv')), empty)


# ---------------------------------------------------------------------------------------------
# Configs: train_and_evaluate on configs/smoke.py (8 simulated devices, see conftest.py).
# ---------------------------------------------------------------------------------------------
_CREATE_MODEL = train_lib.create_model
_MODELS = {}


def _create_model_once(config, num_classes, mesh=None):
  """train.create_model, memoised by model and class count: these cases are about other fields,
  and compiling a BERT's init again for each (5-10 s on 2 cores) would dominate the file. The
  variables come unsharded whatever the mesh; the train state places them in its shardings."""
  key = (config.model.get('name'), config.model.get('source'), num_classes)
  if key not in _MODELS:
    _MODELS[key] = _CREATE_MODEL(config, num_classes)
  module, variables = _MODELS[key]
  return module, dict(variables)  # train_and_evaluate pops 'params' from it.


@pytest.fixture
def cached_models(monkeypatch):
  monkeypatch.setattr(train_lib, 'create_model', _create_model_once)


# (id, fields, error, message excerpts, whether the error comes before the workdir is created).
CONFIG_CASES = [
    ('unknown-data-kind', {'data.kind': 'txt'}, ConfigError,
     ["config.data.kind 'txt' is not one of", 'image_folder'], True),
    ('unknown-model-name', {'model.name': 'bert-small'}, ConfigError,
     ["unknown model 'bert-small'", 'bert-tiny'], True),
    ('model-without-source-or-name', {'model.name': ''}, ConfigError,
     ['config.model needs `source`'], True),
    ('text-data-without-tokenizer', {'data.kind': 'csv', 'data.path': '{tmp}/train.csv'},
     ConfigError, ['config.data.tokenizer is needed'], True),
    ('batch-larger-than-dataset', {'batch_size': 1024}, ConfigError,
     ['config.batch_size = 1024 is larger than the 512 training examples'], True),
    ('batch-not-divisible-by-devices', {'batch_size': 12}, ConfigError,
     ['config.batch_size = 12 is not divisible by the 8 devices'], True),
    ('batch-not-divisible-by-accum', {'grad_accum_steps': 3}, ConfigError,
     ['config.batch_size = 32 is not divisible by config.grad_accum_steps = 3'], True),
    ('mesh-larger-than-devices', {'mesh.data': 16}, ConfigError,
     ['config.mesh.data = 16 but only 8 devices exist'], True),
    ('phase-unknown-field', {'phases': [dict(freeze=dict(scheme='full'), epochs=1)]},
     ConfigError, ["config.phases[0] has unknown field(s) ['epochs']", 'num_epochs'], True),
    ('bad-optimizer-name', {'optim.name': 'adam'}, ConfigError,
     ["config.optim.name 'adam' is not one of adamw, sgd"], True),
    ('bad-mu-dtype', {'optim.mu_dtype': 'bf16'}, ConfigError,
     ["config.optim.mu_dtype 'bf16' is not a float dtype such as 'bfloat16'"], True),
    ('bad-schedule', {'optim.schedule': 'step'}, ConfigError,
     ["config.optim.schedule 'step' is not one of linear, cosine, constant"], True),
    ('bad-bn-mode', {'bn_mode': 'frozen'}, ConfigError,
     ["config.bn_mode 'frozen' is not one of follow_freeze, train, eval"], True),
    ('lr-mult-unknown-group', {'optim.lr_mult': {'encoder': 0.1}}, SchemeError,
     ["config.optim.lr_mult names group(s) ['encoder']", "['head', 'trainable']"], True),
    ('rule-matches-nothing-in-train',
     {'freeze.scheme': [('decoder/.*', 'frozen'), ('.*', 'trainable')]}, SchemeError,
     ["freeze rule(s) ['decoder/.*'] match no param", 'encoder/layer_0'], True),
]


@pytest.mark.parametrize('fields, error, needles, before_workdir',
                         [case[1:] for case in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(tmp_path, cached_models, fields, error, needles, before_workdir):
  (tmp_path / 'train.csv').write_text('text,label\n' + 'good,pos\nbad,neg\n' * 4)
  fields = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in fields.items()}
  workdir = tmp_path / 'w'
  _raises(error, *needles)(train_lib.train_and_evaluate, _smoke(**fields), workdir)
  if before_workdir:
    assert not workdir.exists()


@pytest.fixture(scope='module')
def bert_tiny():
  module, variables = _create_model_once(_smoke(), num_classes=4)
  return module, variables['params']


@pytest.mark.parametrize('scheme, needles', [
    ([('encoder/.*', 'frozen'), ('decoder/.*', 'frozen'), ('.*', 'trainable')],
     ["freeze rule(s) ['decoder/.*'] match no param", 'some real paths: classifier/bias']),
    ('last_blocks:2', ["unknown freeze scheme 'last_blocks:2'", 'last_n_blocks:N']),
    ('last_n_blocks', ["unknown freeze scheme 'last_n_blocks'"]),
    ('last_n_blocks:9', ["'last_n_blocks:9': N must be an integer in [0, 2]"]),
    ([('classifier/.*', 'head*fast'), ('.*', 'frozen')], ["bad label 'head*fast'"]),
    ([('.*',)], ["bad freeze rule ('.*',): expected (regex, label)"]),
    ([('encoder/(', 'frozen'), ('.*', 'trainable')], ["bad freeze rule regex 'encoder/('"]),
    ([('encoder/.*', 'frozen')], ['param(s) without a label', 'classifier/bias']),
], ids=['rule-matches-nothing', 'unknown-preset', 'preset-without-argument',
        'last-n-blocks-out-of-range', 'malformed-label', 'malformed-rule', 'bad-rule-regex',
        'uncovered-params'])
def test_bad_freeze_scheme(bert_tiny, scheme, needles):
  module, params = bert_tiny
  _raises(SchemeError, *needles)(freeze.label_params, params, scheme, module)


@pytest.mark.parametrize('where', ['under-a-file', 'is-a-file'])
def test_unwritable_workdir(tmp_path, where):
  blocker = tmp_path / 'file'
  blocker.write_text('keep me')
  workdir = blocker / 'w' if where == 'under-a-file' else blocker
  _raises(ConfigError, f'--workdir {workdir}: not writable ({blocker} is a file)')(
      train_lib.train_and_evaluate, _smoke(), workdir)
  assert blocker.read_text() == 'keep me'


def _foreign_checkpoint(workdir, num_classes=3):
  """A workdir holding the step-5 checkpoint of a smoke run with another class count."""
  import jax
  import jax.numpy as jnp
  config = _smoke()
  module, variables = _create_model_once(config, num_classes)
  params = variables['params']
  labels = freeze.label_params(params, 'full', module)
  tx, _ = train_lib.make_optimizer(config.optim, labels, 10)
  state = train_lib.TrainState(step=jnp.asarray(5, jnp.int32), params=params, model_state={},
                               opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  checkpoint.save(checkpoint.manager(workdir), state)
  return workdir / 'checkpoints' / '5'


def test_resume_checkpoint_of_another_model(tmp_path, cached_models):
  step_dir = _foreign_checkpoint(tmp_path / 'w')
  _raises(CheckpointError, f'{step_dir}: it was written by another model',
          'params/classifier/kernel is (32, 3) in the checkpoint but (32, 4) here',
          'use a new --workdir')(train_lib.train_and_evaluate, _smoke(), tmp_path / 'w')


# ---------------------------------------------------------------------------------------------
# The CLI: one `error:` line naming the culprit, no traceback, no workdir left behind.
# ---------------------------------------------------------------------------------------------
def _cli(*args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=300)
  return proc.returncode, proc.stdout, proc.stderr


def _cli_error(workdir, *flags, config=None, keep_workdir=False):
  """Runs train.py expecting an input error; returns its `error:` line."""
  code, out, err = _cli('--config', str(config or ROOT / 'configs' / 'smoke.py'),
                        '--workdir', str(workdir), *flags)
  assert code == 2, out + err
  assert 'Traceback' not in out + err, out + err
  lines = [line for line in err.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1, err
  if not keep_workdir:
    assert not workdir.exists(), f'{workdir} was written: {list(workdir.rglob("*"))}'
  return lines[0]


def _image_run(tmp_path, source):
  """Flags for fine-tuning the weights file `source` on an image folder. (An image run reads
  the weights first, for their preprocessing, and never imports transformers: a fast failure.)"""
  root = _image_folder(tmp_path / 'pets')
  return [f'--config.model.source={source}', '--config.data.kind=image_folder',
          f'--config.data.path={root}']


def test_cli_unknown_config_field(tmp_path):
  line = _cli_error(tmp_path / 'w', '--config.foo=1')
  assert "--config.foo: unknown config field 'foo'" in line


def test_cli_config_syntax_error(tmp_path):
  config = tmp_path / 'broken_config.py'
  config.write_text('import ml_collections\n\ndef get_config(:\n  return None\n')
  line = _cli_error(tmp_path / 'w', config=config)
  assert 'SyntaxError' in line and 'broken_config.py, line 3' in line


def test_cli_corrupt_checkpoint(tmp_path):
  path = tmp_path / 'model.safetensors'
  path.write_bytes(GARBAGE)
  line = _cli_error(tmp_path / 'w', *_image_run(tmp_path, path))
  assert f'error: {path}: corrupt or truncated safetensors file' in line


def test_cli_pickle_that_runs_code(tmp_path):
  import torch
  import torch_cnns
  marker, path = tmp_path / 'pwned', tmp_path / 'resnet18.pth'
  torch.save({**torch_cnns.resnet(18).state_dict(), 'evil': _RunsCode(marker)}, path)
  line = _cli_error(tmp_path / 'w', *_image_run(tmp_path, path))
  assert f'error: {path}: the pickle asks for' in line and 'refusing' in line
  assert not marker.exists()


def test_cli_corrupt_image(tmp_path):
  root = _image_folder(tmp_path / 'pets', bad='0_broken.png')
  line = _cli_error(tmp_path / 'w', '--config.model.name=resnet18',
                    '--config.data.kind=image_folder', f'--config.data.path={root}')
  assert f'error: {root / "cat" / "0_broken.png"}: unreadable image' in line


def test_cli_label_out_of_range(tmp_path, bert_dir):
  path = tmp_path / 'train.csv'
  path.write_text('text,label\n' + 'good,0\nbad,1\n' * 4 + 'good,7\n')
  line = _cli_error(tmp_path / 'w', '--config.data.kind=csv', f'--config.data.path={path}',
                    '--config.data.num_classes=2', f'--config.data.tokenizer={bert_dir}')
  assert f"error: {path}:10: label '7' is out of range [0, 2)" in line


def test_cli_unknown_model_name(tmp_path):
  line = _cli_error(tmp_path / 'w', '--config.model.name=bert-small')
  assert "error: unknown model 'bert-small'; known models:" in line


def test_cli_resume_checkpoint_of_another_model(tmp_path):
  """Refused before orbax reads an array (whose failures would log pages of async tracebacks)."""
  step_dir = _foreign_checkpoint(tmp_path / 'w')
  line = _cli_error(tmp_path / 'w', keep_workdir=True)
  assert f'error: {step_dir}: it was written by another model' in line
  assert 'params/classifier/kernel is (32, 3) in the checkpoint but (32, 4) here' in line


def test_cli_debug_shows_the_traceback(tmp_path):
  path = tmp_path / 'model.safetensors'
  path.write_bytes(GARBAGE)
  code, out, err = _cli('--config', str(ROOT / 'configs' / 'smoke.py'), '--workdir',
                        str(tmp_path / 'w'), *_image_run(tmp_path, path), '--debug')
  assert code != 0
  assert 'Traceback' in err and 'WeightsError' in err and 'corrupt or truncated' in err
