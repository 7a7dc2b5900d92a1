"""Fine-tune a model from a config, or evaluate the latest checkpoint of a run.

  python train.py --config configs/default.py --workdir runs/minilm_bbc
  python train.py --config configs/smoke.py --workdir /tmp/smoke --config.num_epochs=2
  python train.py --config configs/smoke.py --workdir /tmp/smoke --mode=eval

Rerunning with the workdir of an earlier run resumes from its latest checkpoint. --mode=eval
evaluates the run's latest checkpoint on the config's test split and writes <workdir>/eval.json.
Errors in the input (config, data, weights) print one line and exit with status 2; --debug shows
the traceback.
"""
import os
import pathlib
import sys

# TensorFlow only feeds data (tfds); keep it off any accelerator and quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/<name>.py file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_DEBUG = flags.DEFINE_bool('debug', False, 'Show tracebacks for input errors.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train: fine-tune (resuming from the latest checkpoint); eval: evaluate '
                          'the latest checkpoint on the test split.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  from jaxtl import parallel
  from jaxtl.errors import JaxtlError
  from jaxtl.train import exec_with_host_malloc, train_and_evaluate
  exec_with_host_malloc()  # On the CPU alone: restarts once, with malloc set up for XLA's steps.
  try:
    config = _CONFIG.value
    config.keys()  # A config file that fails to load raises on first use.
  except Exception as e:
    if _DEBUG.value:
      raise
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f'error: --config: {lines[0]} ({lines[-1]})', file=sys.stderr)
    sys.exit(2)
  try:
    parallel.initialize_distributed(config)  # Multi-host: before any other JAX call.
    if _MODE.value == 'eval':
      evaluate(config, _WORKDIR.value)
    else:
      train_and_evaluate(config, _WORKDIR.value)
  except JaxtlError as e:
    if _DEBUG.value:
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def evaluate(config, workdir):
  from jaxtl.predict import EVAL_FILE, evaluate_checkpoint
  result = evaluate_checkpoint(config, workdir)
  print(f'{workdir}: checkpoint {result["step"]} on the test split ({result["num_examples"]} '
        f'examples): loss {result["loss"]:.4f}, accuracy {result["accuracy"]:.4f}; wrote '
        f'{pathlib.Path(workdir) / EVAL_FILE}')


def parse_flags(argv):
  """absl's parser, with a one-line error for a bad --config file or --config.<field> override."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # config_flags raises AttributeError/KeyError/TypeError/ValueError/...
    if '--debug' in argv:
      raise
    name = str(e).strip('"\'')
    culprit = next((a for a in argv if a.startswith('--config.') and name and
                    name in a.split('=')[0].split('.')), None)
    if culprit and isinstance(e, (AttributeError, KeyError)):
      message = f'{culprit.split("=")[0]}: unknown config field {name!r}'
    else:
      message = f'{type(e).__name__}: {e}'
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
