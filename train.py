"""Fine-tune a model from a config.

  python train.py --config configs/default.py --workdir runs/minilm_bbc
  python train.py --config configs/smoke.py --workdir /tmp/smoke --config.num_epochs=2

Rerunning with the workdir of an earlier run resumes from its latest checkpoint. Errors in the
input (config, data, weights) print one line and exit with status 2; --debug shows the traceback.
"""
import os
import sys

# TensorFlow only feeds data (tfds); keep it off any accelerator and quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/<name>.py file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_DEBUG = flags.DEFINE_bool('debug', False, 'Show tracebacks for input errors.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  from jaxtl.errors import JaxtlError
  from jaxtl.train import train_and_evaluate
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except JaxtlError as e:
    if _DEBUG.value:
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
