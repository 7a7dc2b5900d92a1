"""Use a trained run: class probabilities for new inputs, and evaluation of its latest checkpoint.

  python -m jaxtl.predict --workdir runs/flowers photo1.jpg photo2.png      # image runs
  python -m jaxtl.predict --workdir runs/minilm --top_k 3 articles.txt     # one example a line
  echo "the match ended 2-1" | python -m jaxtl.predict --workdir runs/minilm -
  python train.py --config configs/default.py --workdir runs/minilm --mode=eval

Everything comes from the workdir (jaxtl.run): the model, its latest checkpoint, the class names
and how raw inputs become model inputs. Image files go through the evaluation preprocessing of
training (resize, centre crop, normalise: jaxtl.data.images); text is tokenised with the run's
copy of its tokenizer, padded and truncated to the training max_length; a synthetic token run
reads lines of integer token ids.

Python:
  for p in predict('runs/flowers', ['photo1.jpg']):
    print(p.source, p.label, p.top)          # 'photo1.jpg' 'daisy' [('daisy', 0.93), ...]
"""
import argparse
import dataclasses
import json
import os
import pathlib
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Quiet, should anything import TensorFlow.

import jax
import numpy as np

from jaxtl import data as data_lib, run as run_lib
from jaxtl.data import images as image_data, text as text_data
from jaxtl.errors import DataError, JaxtlError

EVAL_FILE = 'eval.json'


@dataclasses.dataclass
class Prediction:
  source: str    # The image file, or 'file:line' / 'stdin:line' for a line of text.
  top: list      # [(class name, probability)], the most probable first.

  @property
  def label(self) -> str:
    return self.top[0][0]


def predict(workdir, inputs, top_k=5, batch_size=32) -> list:
  """[Prediction] for each input: image files (or folders of them) for an image run; for a text
  run, text files with one example a line ('-': standard input)."""
  if top_k < 1:
    raise JaxtlError(f'--top_k {top_k}: must be at least 1')
  if batch_size < 1:
    raise JaxtlError(f'--batch_size {batch_size}: must be at least 1')
  run = run_lib.load(workdir)
  arrays, sources, prepare = model_inputs(run, inputs)
  probs = probabilities(run, arrays, batch_size, prepare)
  return [Prediction(source, top_classes(p, run.class_names, top_k))
          for source, p in zip(sources, probs)]


def top_classes(probs, class_names, k) -> list:
  order = np.argsort(-probs, kind='stable')[:k]
  return [(class_names[i], float(probs[i])) for i in order]


# ---------------------------------------------------------------------------------------------
# Raw inputs -> model inputs.
# ---------------------------------------------------------------------------------------------
def model_inputs(run, inputs):
  """(arrays, sources, prepare): model inputs as numpy arrays, the source of each row, and a
  per-batch transform (image normalisation) or None."""
  kind = run.inputs.get('kind')
  if kind == 'images':
    return _image_inputs(run, inputs)
  if kind in ('text', 'tokens'):
    lines = read_lines(inputs)
    sources = [source for source, _ in lines]
    texts = [line for _, line in lines]
    arrays = (_tokenize(run, texts) if kind == 'text' else
              token_ids(lines, run.inputs['max_length']))
    return arrays, sources, None
  raise JaxtlError(f'{run.workdir / run_lib.RUN_FILE}: input kind {kind!r} is not images, text or '
                   'tokens')


def _existing(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.exists():
    raise DataError(f'{path}: no such {what}')
  return path


def image_files(inputs) -> list:
  """The image files named, a folder standing for the images directly inside it."""
  files = []
  for name in inputs:
    path = _existing(pathlib.Path(name), 'image file or folder')
    if path.is_dir():
      found = sorted(p for p in path.iterdir() if p.suffix.lower() in image_data.EXTENSIONS)
      if not found:
        raise DataError(f'{path}: folder holds no images ({", ".join(image_data.EXTENSIONS)})')
      files += found
    else:
      files.append(path)
  return files


def _image_inputs(run, inputs):
  try:
    fields = {k: tuple(v) if isinstance(v, list) else v
              for k, v in run.inputs['preprocess'].items()}
    pre = image_data.Preprocess(**fields)
  except (KeyError, TypeError, AttributeError) as e:
    raise JaxtlError(f'{run.workdir / run_lib.RUN_FILE}: bad image preprocessing ({e})') from None
  files = image_files(inputs)
  # Stored as training stores them (the eval resize size, uint8); batches are normalised and
  # centre-cropped by the same code that prepares the test split.
  pixels = np.stack([image_data.read_image(f, pre.resize_size, pre.interpolation) for f in files])
  data = image_data.ImageData(train={}, test={}, class_names=run.class_names, preprocess=pre)
  return {'images': pixels}, [str(f) for f in files], lambda b: data.prepare(b, train=False)


def read_lines(inputs) -> list:
  """[(source, line)] of the non-blank lines of text files ('-': standard input); sources are
  'file:line number'."""
  lines = []
  for name in inputs:
    if name == '-':
      source, text = 'stdin', sys.stdin.read()
    else:
      path = _existing(pathlib.Path(name), 'text file')
      if path.is_dir():
        raise DataError(f'{path}: a folder; give text files with one example a line')
      try:
        source, text = str(path), text_data._read_text(path)
      except OSError as e:
        raise DataError(f'{path}: unreadable ({e.strerror})') from None
    lines += [(f'{source}:{number}', line.strip())
              for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
  if not lines:
    raise DataError(f'{", ".join(inputs)}: no text to classify (all lines blank)')
  return lines


def _tokenize(run, texts) -> dict:
  tokenizer = text_data.load_tokenizer(run.workdir / 'tokenizer')
  arrays = text_data.tokenize(tokenizer, texts, np.zeros(len(texts), np.int32),
                              run.inputs['max_length'])
  arrays.pop('label')
  return arrays


def token_ids(lines, max_length) -> dict:
  """Model inputs from lines of whitespace-separated token ids (synthetic token runs), padded
  with 0 and truncated to max_length."""
  ids = np.zeros((len(lines), max_length), np.int32)
  mask = np.zeros_like(ids)
  for row, (source, line) in enumerate(lines):
    try:
      values = [int(token) for token in line.split()][:max_length]
    except ValueError:
      raise DataError(f'{source}: expected integer token ids, got {line[:50]!r}') from None
    ids[row, :len(values)] = values
    mask[row, :len(values)] = 1
  return {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': np.zeros_like(ids)}


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------
def probabilities(run, arrays, batch_size=32, prepare=None) -> np.ndarray:
  """float32 [N, C] softmax probabilities, in batches (the last one padded, then cut)."""
  variables = jax.device_put(run.variables)

  @jax.jit
  def apply(variables, batch):
    logits, _ = run.module.apply(variables, **batch, train=False)
    return jax.nn.softmax(logits.astype(np.float32), axis=-1)

  # One input should not pay for a batch of 32 (a padded batch computes every row).
  batch_size = min(batch_size, data_lib.num_examples(arrays))
  out = []
  for batch in data_lib.batches(arrays, batch_size):
    real = batch.pop('mask') > 0
    if prepare is not None:
      batch = prepare(batch)
    out.append(np.asarray(apply(variables, batch))[real])
  return np.concatenate(out)


def evaluate_checkpoint(config, workdir) -> dict:
  """Loss and accuracy of the latest checkpoint in `workdir` on the test split of `config`'s
  data, by the train loop's own eval step; written to <workdir>/eval.json, with the confusion
  matrix (also drawn to confusion_matrix.png)."""
  # The training stack loads only here: predicting does without it.
  import jax.numpy as jnp
  from jaxtl import parallel, plots, train as train_lib

  run = run_lib.load(workdir)  # Fails first (no run, no checkpoint) before any data is read.
  data = train_lib.load_data(config)
  if list(data.class_names) != list(run.class_names):
    raise DataError(f'the config\'s data has classes {list(data.class_names)[:10]} but the run in '
                    f'{workdir} was trained on {list(run.class_names)[:10]}')
  mesh = parallel.make_mesh(config.get('mesh', {}).get('data'))
  parallel.check_batch_size(config.batch_size, mesh)
  repl, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  model_state = {k: v for k, v in run.variables.items() if k != 'params'}
  state = jax.device_put(train_lib.TrainState(
      step=jnp.asarray(run.step, jnp.int32), params=run.variables['params'],
      model_state=model_state, opt_state={}, rng=jax.random.PRNGKey(0)), repl)
  p_eval_step = jax.jit(lambda s, b: train_lib.eval_step(s, b, module=run.module),
                        in_shardings=(repl, sharded), out_shardings=repl)
  metrics = train_lib.evaluate(p_eval_step, state, data, config.batch_size, mesh)

  confusion = metrics['confusion_matrix']
  result = {'step': int(run.step), 'split': 'test',
            'num_examples': data_lib.num_examples(data.test), **metrics,
            'confusion_matrix': confusion.tolist()}
  path = run.workdir / EVAL_FILE
  try:
    path.write_text(json.dumps(result, indent=1))
    plots.plot_confusion_matrix(confusion, run.class_names, run.workdir / 'confusion_matrix.png')
  except OSError as e:
    raise JaxtlError(f'{e.filename or path}: cannot write ({e.strerror})') from None
  return result


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One line, like train.py's errors, instead of usage + message.
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def format_prediction(prediction: Prediction) -> str:
  return '  '.join([prediction.source] + [f'{name} {p:.4f}' for name, p in prediction.top])


def main(argv=None) -> int:
  parser = _Parser(prog='python -m jaxtl.predict',
                   description='Top-k classes of images or lines of text, by a trained run.')
  parser.add_argument('--workdir', required=True, help='the --workdir of a train.py run')
  parser.add_argument('--top_k', type=int, default=5, help='classes shown per input')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--json', action='store_true', help='one JSON object a line')
  parser.add_argument('--debug', action='store_true', help='tracebacks for input errors')
  parser.add_argument('inputs', nargs='+', metavar='INPUT',
                      help='image files or folders (image runs); text files, one example a line, '
                           'or - for standard input (text runs)')
  args = parser.parse_args(argv)
  try:
    predictions = predict(args.workdir, args.inputs, args.top_k, args.batch_size)
  except JaxtlError as e:
    if args.debug:
      raise
    print(f'error: {e}', file=sys.stderr)
    return 2
  for p in predictions:
    print(json.dumps({'source': p.source, 'top': p.top}) if args.json else format_prediction(p))
  return 0


if __name__ == '__main__':
  sys.exit(main())
