"""Using a trained run: predictions for image files, text lines and token lines, and the
evaluation of its latest checkpoint (train.py --mode=eval), which must agree with the train loop."""
import io
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from test_train import smoke_config
from jaxtl import checkpoint, models, predict, run as run_lib
from jaxtl import train as train_lib
from jaxtl.data import images as image_data, text as text_data
from jaxtl.errors import DataError, JaxtlError
from jaxtl.models import resnet




@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """configs/smoke.py trained for one epoch (16 steps) by the train loop."""
  workdir = tmp_path_factory.mktemp('smoke')
  config = smoke_config(num_epochs=1)
  return workdir, config, train_lib.train_and_evaluate(config, workdir)


def make_run(workdir, module, variables, class_names, data):
  """A workdir as the train loop leaves it (run.json, checkpoint), without training."""
  workdir.mkdir(parents=True, exist_ok=True)
  run_lib.write(workdir, module, class_names, data)
  variables = dict(variables)
  state = train_lib.TrainState(step=jnp.asarray(1, jnp.int32), params=variables.pop('params'),
                               model_state=variables, opt_state={}, rng=jax.random.PRNGKey(0))
  checkpoint.save(checkpoint.manager(workdir), state)
  return workdir


def softmax(logits):
  return np.asarray(jax.nn.softmax(logits, axis=-1))


# ---------------------------------------------------------------------------------------------
# Evaluation of a checkpoint.
# ---------------------------------------------------------------------------------------------
def test_eval_agrees_with_the_train_loop(smoke_run):
  workdir, config, trained = smoke_run
  result = predict.evaluate_checkpoint(config, workdir)
  matrix = np.asarray(result['confusion_matrix'])
  assert matrix.shape == (4, 4) and matrix.sum() == 256
  assert np.trace(matrix) / 256 == pytest.approx(trained['test_acc'])
  assert result['step'] == 16 and result['num_examples'] == 256
  assert result['accuracy'] == trained['test_acc']
  assert result['loss'] == pytest.approx(trained['test_loss'], rel=1e-5)
  saved = json.loads((workdir / 'eval.json').read_text())
  assert saved['accuracy'] == result['accuracy'] and saved['split'] == 'test'
  assert saved['confusion_matrix'] == matrix.tolist()
  assert (workdir / 'confusion_matrix.png').read_bytes()[:4] == b'\x89PNG'


def test_token_predictions_agree_with_eval(smoke_run, tmp_path):
  """Top-1 of `predict` on the test split, written as lines of token ids, has the accuracy the
  eval step finds."""
  workdir, config, trained = smoke_run
  test = text_data.synthetic(4, seed=config.seed).test
  lines = [' '.join(map(str, ids[mask > 0])) for ids, mask in
           zip(test['input_ids'], test['attention_mask'])]
  (tmp_path / 'ids.txt').write_text('\n'.join(lines) + '\n\n')  # A blank line is no example.
  predictions = predict.predict(workdir, [str(tmp_path / 'ids.txt')], top_k=2)
  assert len(predictions) == 256
  assert predictions[3].source == f'{tmp_path / "ids.txt"}:4'
  names = [f'class_{i}' for i in range(4)]
  accuracy = np.mean([names.index(p.label) == label
                      for p, label in zip(predictions, test['label'])])
  assert accuracy == trained['test_acc']
  for p in predictions:
    (first, p1), (second, p2) = p.top
    assert first != second and 1 >= p1 >= p2 >= 0


def test_eval_cli(smoke_run):
  workdir, _, trained = smoke_run  # On the 8 simulated devices it was trained on.
  proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), '--config',
                         str(ROOT / 'configs' / 'smoke.py'), '--workdir', str(workdir),
                         '--mode=eval'], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert 'checkpoint 16 on the test split (256 examples)' in proc.stdout
  assert f'accuracy {trained["test_acc"]:.4f}' in proc.stdout


def test_predict_cli_on_fewer_devices_than_training(smoke_run, tmp_path):
  """A run trained on 8 devices, used on 1: `python -m jaxtl.predict`."""
  workdir = smoke_run[0]
  (tmp_path / 'ids.txt').write_text('1 2 3 4\n1 60 61\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.run([sys.executable, '-m', 'jaxtl.predict', '--workdir', str(workdir),
                         '--top_k', '1', str(tmp_path / 'ids.txt')], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert [l.split()[0] for l in proc.stdout.splitlines()] == [f'{tmp_path / "ids.txt"}:1',
                                                              f'{tmp_path / "ids.txt"}:2']


def test_eval_without_a_checkpoint(smoke_run, tmp_path):
  workdir, config, _ = smoke_run
  shutil.copy(workdir / 'run.json', tmp_path / 'run.json')
  with pytest.raises(JaxtlError, match=f'{tmp_path / "checkpoints"}: no checkpoint to read'):
    predict.evaluate_checkpoint(config, tmp_path)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), '--config',
                         str(ROOT / 'configs' / 'smoke.py'), '--workdir', str(tmp_path / 'none'),
                         '--mode=eval'], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f'error: {tmp_path / "none"}: not a jaxtl run (no run.json); give the --workdir of a '
      'train.py run']


# ---------------------------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def image_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('image_run')
  module = resnet.ResNet(stage_sizes=(1,), bottleneck=False, widths=(8,), stem_width=8,
                         num_classes=3)
  variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = jax.tree_util.tree_map(np.array, variables)  # Writable copies.
  variables['batch_stats']['bn1']['mean'] += 0.3  # Running statistics must come along.
  pre = image_data.Preprocess(image_size=32, crop_fraction=0.8, mean=(0.5, 0.4, 0.3),
                              std=(0.2, 0.25, 0.3))
  make_run(root / 'run', module, variables, ['cat', 'dog', 'fish'],
           types.SimpleNamespace(preprocess=pre))
  rng = np.random.default_rng(0)
  photos = root / 'photos'
  photos.mkdir()
  for name, size in (('a.png', (40, 56)), ('b.jpg', (48, 48))):
    Image.fromarray(rng.integers(0, 256, size + (3,), np.uint8)).save(photos / name)
  Image.fromarray(rng.integers(0, 256, (30, 30), np.uint8)).save(photos / 'gray.bmp')
  return root / 'run', photos, module, variables, pre


def test_image_predictions(image_run):
  workdir, photos, module, variables, pre = image_run
  files = [photos / 'a.png', photos / 'b.jpg', photos / 'gray.bmp']
  predictions = predict.predict(workdir, [str(f) for f in files], top_k=3)
  # The reference: the test split's own path (read as a folder is read, eval preprocessing).
  pixels = np.stack([image_data.read_image(f, pre.resize_size) for f in files])
  batch = image_data.ImageData({}, {}, [], pre).prepare({'images': pixels}, train=False)
  expected = softmax(module.apply(variables, batch['images'], train=False)[0])
  for p, probs, f in zip(predictions, expected, files):
    assert p.source == str(f)
    assert [name for name, _ in p.top] == [['cat', 'dog', 'fish'][i] for i in np.argsort(-probs)]
    np.testing.assert_allclose([q for _, q in p.top], np.sort(probs)[::-1], rtol=1e-5)
  # A folder stands for the images in it (sorted); top_k is capped by the number of classes.
  from_folder = predict.predict(workdir, [str(photos)], top_k=10)
  assert [p.source for p in from_folder] == [str(photos / n) for n in ('a.png', 'b.jpg',
                                                                        'gray.bmp')]
  assert len(from_folder[0].top) == 3


def test_bad_image_inputs(image_run, tmp_path):
  workdir = image_run[0]
  with pytest.raises(DataError, match=f'{tmp_path / "missing.jpg"}: no such image file'):
    predict.predict(workdir, [str(tmp_path / 'missing.jpg')])
  (tmp_path / 'notes.jpg').write_text('not an image')
  with pytest.raises(DataError, match=f'{tmp_path / "notes.jpg"}: unreadable image'):
    predict.predict(workdir, [str(tmp_path / 'notes.jpg')])
  with pytest.raises(JaxtlError, match='--top_k 0: must be at least 1'):
    predict.predict(workdir, [str(tmp_path / 'notes.jpg')], top_k=0)


def test_predict_cli(image_run, tmp_path, capsys):
  workdir, photos = image_run[:2]
  assert predict.main(['--workdir', str(workdir), '--top_k', '2', str(photos / 'a.png')]) == 0
  line, = capsys.readouterr().out.splitlines()
  source, first, p1, second, p2 = line.split()
  assert source == str(photos / 'a.png') and {first, second} < {'cat', 'dog', 'fish'}
  assert float(p1) >= float(p2)
  assert predict.main(['--workdir', str(workdir), '--json', str(photos / 'a.png')]) == 0
  top = json.loads(capsys.readouterr().out)['top']
  assert top[0] == [first, pytest.approx(float(p1), abs=1e-4)]
  # Errors: one line naming the path, status 2, no traceback.
  assert predict.main(['--workdir', str(workdir), str(tmp_path / 'nope.png')]) == 2
  assert (capsys.readouterr().err ==
          f'error: {tmp_path / "nope.png"}: no such image file or folder\n')
  with pytest.raises(SystemExit) as exit_:
    predict.main(['--workdir', str(workdir), '--top_k', 'many', 'x.png'])
  assert exit_.value.code == 2
  assert capsys.readouterr().err == "error: argument --top_k: invalid int value: 'many'\n"


# ---------------------------------------------------------------------------------------------
# Text.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def text_run(tmp_path_factory):
  from transformers import BertTokenizerFast
  root = tmp_path_factory.mktemp('text_run')
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'match', 'ended', 'stocks', 'fell',
           'vote', 'today']
  BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / 'tok')
  module = models.create('bert-tiny', num_classes=3)
  variables = jax.tree_util.tree_map(
      np.array, jax.jit(module.init)(jax.random.key(1), *module.example_inputs()))
  variables['params']['classifier']['kernel'] *= 50  # Distinct probabilities, not all ~1/3.
  make_run(root / 'run', module, variables, ['sport', 'business', 'politics'],
           types.SimpleNamespace(tokenizer_dir=root / 'tok', max_length=12))
  return root / 'run', module, variables


def test_text_predictions_from_files_and_stdin(text_run, tmp_path, monkeypatch):
  workdir, module, variables = text_run
  assert (workdir / 'tokenizer' / 'tokenizer.json').exists()
  texts = ['the match ended', 'stocks fell today', 'vote today']
  (tmp_path / 'a.txt').write_text(f'{texts[0]}\n\n  {texts[1]}  \n')
  monkeypatch.setattr(sys, 'stdin', io.StringIO(texts[2] + '\n'))
  predictions = predict.predict(workdir, [str(tmp_path / 'a.txt'), '-'], top_k=1)
  assert [p.source for p in predictions] == [f'{tmp_path / "a.txt"}:1',
                                             f'{tmp_path / "a.txt"}:3', 'stdin:1']
  tokenizer = text_data.load_tokenizer(workdir / 'tokenizer')
  batch = text_data.tokenize(tokenizer, texts, np.zeros(3, np.int32), 12)
  batch.pop('label')
  expected = softmax(module.apply(variables, **batch, train=False)[0])
  names = ['sport', 'business', 'politics']
  assert [p.top[0][0] for p in predictions] == [names[i] for i in expected.argmax(-1)]
  np.testing.assert_allclose([p.top[0][1] for p in predictions], expected.max(-1), rtol=1e-5)
  (tmp_path / 'blank.txt').write_text('\n \n')
  with pytest.raises(DataError, match='no text to classify'):
    predict.predict(workdir, [str(tmp_path / 'blank.txt')])
