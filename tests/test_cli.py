"""train.py on bad input: exits non-zero with one clear line naming the problem, no traceback."""
import os
import subprocess
import sys


from conftest import ROOT


def run(*args, cwd=None):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), *args], capture_output=True,
                        text=True, env=env, cwd=cwd or ROOT, timeout=300)
  return proc.returncode, proc.stdout + proc.stderr


SMOKE = ['--config', str(ROOT / 'configs' / 'smoke.py')]


def _assert_clean_error(code, out, *needles):
  assert code != 0, out
  assert 'Traceback' not in out, out
  for needle in needles:
    assert needle in out, out


def test_unknown_config_field(tmp_path):
  code, out = run(*SMOKE, '--workdir', str(tmp_path / 'w'), '--config.optim.learning_rate=1')
  _assert_clean_error(code, out, 'learning_rate')
  assert not (tmp_path / 'w').exists()  # Nothing written for a run that never started.


def test_missing_weights_path(tmp_path):
  code, out = run(*SMOKE, '--workdir', str(tmp_path / 'w'), '--config.model.source=/no/such/ckpt',
                  '--config.data.kind=folder', '--config.data.path=/tmp')
  _assert_clean_error(code, out, "error: weights source '/no/such/ckpt'", 'does not exist')


def test_bad_freeze_scheme(tmp_path):
  code, out = run(*SMOKE, '--workdir', str(tmp_path / 'w'), '--config.freeze.scheme=last_blocks:2')
  _assert_clean_error(code, out, "unknown freeze scheme 'last_blocks:2'", 'linear_probe')


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  code, out = run(*SMOKE, '--workdir', str(blocker / 'sub'))
  _assert_clean_error(code, out, f'--workdir {blocker / "sub"}: not writable')


def test_batch_not_divisible_by_devices(tmp_path):
  env_flags = '--xla_force_host_platform_device_count=8'
  proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), *SMOKE, '--workdir',
                         str(tmp_path / 'w'), '--config.batch_size=12'], capture_output=True,
                        text=True, env=dict(os.environ, XLA_FLAGS=env_flags), timeout=300)
  _assert_clean_error(proc.returncode, proc.stdout + proc.stderr,
                      'config.batch_size = 12 is not divisible by the 8 devices')


def test_debug_shows_the_traceback(tmp_path):
  code, out = run(*SMOKE, '--workdir', str(tmp_path / 'w'), '--config.freeze.scheme=nope', '--debug')
  assert code != 0 and 'Traceback' in out and 'SchemeError' in out


def test_missing_config_file_and_bad_value(tmp_path):
  code, out = run('--config', str(tmp_path / 'nope.py'), '--workdir', str(tmp_path / 'w'))
  _assert_clean_error(code, out, 'error: --config:', 'nope.py')
  code, out = run(*SMOKE, '--workdir', str(tmp_path / 'w'), '--config.optim.lr=fast')
  _assert_clean_error(code, out, '--config.optim.lr=fast', "could not convert string to float")


def test_empty_data_file(tmp_path, tiny_bert_dir):
  directory, _ = tiny_bert_dir
  (tmp_path / 'train.csv').write_text('text,label\n')
  code, out = run(*SMOKE, '--workdir', str(tmp_path / 'w'), f'--config.model.source={directory}',
                  '--config.data.kind=csv', f'--config.data.path={tmp_path / "train.csv"}')
  _assert_clean_error(code, out, f'error: {tmp_path / "train.csv"}: empty data file')


def test_checkpoint_without_config_json(tmp_path, tiny_bert_dir):
  from transformers import BertTokenizerFast
  directory, _ = tiny_bert_dir
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'good', 'bad']
  BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(directory)
  (directory / 'config.json').unlink()
  (tmp_path / 'd.csv').write_text('text,label\n' + 'good,pos\nbad,neg\n' * 8)
  code, out = run(*SMOKE, '--workdir', str(tmp_path / 'w'), f'--config.model.source={directory}',
                  '--config.data.kind=csv', f'--config.data.path={tmp_path / "d.csv"}')
  _assert_clean_error(code, out, f'error: {directory}: no config.json')
