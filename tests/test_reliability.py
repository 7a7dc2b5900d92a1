"""Runs that die must resume exactly: SIGKILL at a random step, SIGTERM (save and exit 0), a kill
in the middle of a checkpoint save; the non-finite guard (stop or skip); gradient accumulation.

The kill tests run train.py in a subprocess on configs/smoke.py and compare the final params with
those of an uninterrupted run of the same command, bit for bit."""
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT
from jaxtl import freeze
from jaxtl import train as train_lib
from jaxtl.errors import JaxtlError
from test_train import smoke_config

# Checkpoints every 4 of the 64 steps, so a kill loses a few steps, which the rerun redoes.
COMMAND = [sys.executable, str(ROOT / 'train.py'), '--config', str(ROOT / 'configs' / 'smoke.py'),
           '--config.checkpoint_every_steps=4']
ENV = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
           PYTHONUNBUFFERED='1')


def _start(workdir, *flags):
  return subprocess.Popen([*COMMAND, '--workdir', str(workdir), *flags], env=ENV, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(workdir, *flags):
  proc = subprocess.run([*COMMAND, '--workdir', str(workdir), *flags], env=ENV, cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


def _steps(workdir):
  """Committed checkpoint steps (orbax writes into a temporary folder, then renames it)."""
  directory = workdir / 'checkpoints'
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if (
      directory.exists()) else []


def _wait_for(proc, condition, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.001)
  raise TimeoutError('the run neither reached the point nor ended')


def _final_params(workdir):
  mngr = ocp.CheckpointManager(workdir / 'checkpoints')
  return mngr.latest_step(), mngr.restore(mngr.latest_step(),
                                          args=ocp.args.StandardRestore())['params']


def _assert_same_params(a, b):
  (step_a, params_a), (step_b, params_b) = _final_params(a), _final_params(b)
  assert step_a == step_b == 64
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_a, params_b)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  _run(workdir)
  return workdir


def test_sigkill_at_a_random_step_then_rerun_is_bit_identical(uninterrupted, tmp_path):
  kill_after = random.Random().randrange(8, 56)  # Kill once a checkpoint at or past it exists.
  proc = _start(tmp_path)
  reached = _wait_for(proc, lambda: any(s >= kill_after for s in _steps(tmp_path)))
  proc.kill()
  proc.wait()
  assert reached, f'the run ended before step {kill_after}'
  killed_at = _steps(tmp_path)[-1]
  assert killed_at < 64, f'killed too late (kill_after={kill_after})'
  out = _run(tmp_path)
  assert f'Resumed from {tmp_path / "checkpoints"}/' in out, out
  _assert_same_params(uninterrupted, tmp_path)


def test_sigterm_saves_and_exits_0_then_resumes_exactly(uninterrupted, tmp_path):
  proc = _start(tmp_path)
  assert _wait_for(proc, lambda: _steps(tmp_path))  # Training is under way.
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  stopped = [l for l in out.splitlines() if l.startswith('Stopped by SIGTERM after step')]
  assert len(stopped) == 1, out
  step = int(stopped[0].split('after step ')[1].split(':')[0])
  assert 0 < step < 64 and _steps(tmp_path)[-1] == step  # It saved the step it stopped at.
  _run(tmp_path)
  _assert_same_params(uninterrupted, tmp_path)


def test_sigint_is_handled_like_sigterm(tmp_path):
  proc = _start(tmp_path, '--config.num_epochs=40')
  assert _wait_for(proc, lambda: _steps(tmp_path))
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert 'Stopped by SIGINT after step' in out and 'Traceback' not in out, out


def test_kill_during_a_save_keeps_the_last_good_checkpoint(uninterrupted, tmp_path):
  """Saves every step; SIGKILL while a save's temporary folder exists. The rerun ignores the
  partial save and resumes from the last committed one.

  A save takes milliseconds, so the poll stops the process (SIGSTOP freezes all its threads)
  and kills it only if the temporary folder is still there; otherwise it lets it go on."""
  directory = tmp_path / 'checkpoints'

  def partial():
    return [p.name for p in directory.iterdir() if not p.name.isdigit()] if (
        directory.exists()) else []

  proc = _start(tmp_path, '--config.checkpoint_every_steps=1')
  try:
    while True:
      if not _wait_for(proc, lambda: partial() and _steps(tmp_path)):
        pytest.fail('the run ended before a save was caught in progress')
      proc.send_signal(signal.SIGSTOP)
      if partial():
        break
      proc.send_signal(signal.SIGCONT)
  finally:
    proc.kill()
    proc.wait()
  committed = _steps(tmp_path)
  assert partial() and committed[-1] < 64
  _run(tmp_path)
  _assert_same_params(uninterrupted, tmp_path)


def _diverging(config):
  config.optim.update(lr=1e30, warmup_fraction=0.0, weight_decay=0.0)
  return config


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  train_lib.train_and_evaluate(smoke_config(num_epochs=1, checkpoint_every_steps=4), tmp_path)
  good = ocp.CheckpointManager(tmp_path / 'checkpoints').latest_step()
  assert good == 16
  with pytest.raises(JaxtlError, match=r'step 18: non-finite loss or gradient .*'
                     r'last good checkpoint .*/checkpoints/17 is kept'):
    train_lib.train_and_evaluate(_diverging(smoke_config(num_epochs=4, checkpoint_every_steps=1)),
                                 tmp_path)
  step, params = _final_params(tmp_path)
  assert step == 17  # Step 17's update was finite (it made step 18 overflow) and was saved.
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path, capsys):
  config = _diverging(smoke_config(num_epochs=1, on_nonfinite='skip'))
  result = train_lib.train_and_evaluate(config, tmp_path)
  assert result['skipped_steps'] == 15  # Step 1 blows the params up; every later step is skipped.
  assert 'step 2: non-finite loss or gradient (loss nan); update skipped' in capsys.readouterr().out
  _, params = _final_params(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_bad_on_nonfinite_value(tmp_path):
  with pytest.raises(JaxtlError, match="config.on_nonfinite 'ignore' is not stop or skip"):
    train_lib.train_and_evaluate(smoke_config(on_nonfinite='ignore'), tmp_path / 'w')
  assert not (tmp_path / 'w').exists()


def _tiny_setup(batch_size=16):
  config = smoke_config()
  module, variables = train_lib.create_model(config, num_classes=4)
  params = variables['params']
  labels = freeze.label_params(params, 'full', module)
  tx, _ = train_lib.make_optimizer(config.optim, labels, 10)
  rng = np.random.default_rng(0)
  batch = {'input_ids': rng.integers(0, 128, (batch_size, 12)).astype(np.int32),
           'label': rng.integers(0, 4, batch_size).astype(np.int32)}
  state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                               opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  return module, tx, labels, state, batch


def test_a_nonfinite_step_leaves_the_state_unchanged():
  module, tx, labels, state, batch = _tiny_setup()
  poisoned = jax.tree_util.tree_map(lambda x: x, state.params)
  poisoned['classifier']['bias'] = poisoned['classifier']['bias'].at[0].set(jnp.nan)
  state = state.replace(params=poisoned)
  new, metrics = jax.jit(lambda s, b: train_lib.train_step(s, b, module=module, tx=tx,
                                                           labels=labels))(state, batch)
  assert not bool(metrics['finite']) and int(new.step) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, new.params, state.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, new.opt_state, state.opt_state)


def test_a_nonfinite_step_keeps_batchnorm_statistics():
  """BatchNorm's running statistics (the model state a finite step updates) stay as they were."""
  from jaxtl.models import resnet
  module = resnet.ResNet(stage_sizes=(1,), bottleneck=False, widths=(8,), stem_width=8,
                         num_classes=3)
  images = np.random.default_rng(1).standard_normal((4, 16, 16, 3)).astype(np.float32)
  variables = module.init(jax.random.key(0), images)
  params, model_state = variables['params'], {'batch_stats': variables['batch_stats']}
  labels = freeze.label_params(params, 'full', module)
  tx, _ = train_lib.make_optimizer(smoke_config().optim, labels, 10)
  state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               model_state=model_state, opt_state=tx.init(params),
                               rng=jax.random.PRNGKey(0))
  step = jax.jit(lambda s, b: train_lib.train_step(s, b, module=module, tx=tx, labels=labels))
  batch = {'images': images, 'label': np.array([0, 1, 2, 0], np.int32)}
  good, metrics = step(state, batch)
  assert bool(metrics['finite'])
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), good.model_state,
                                   state.model_state)
  assert all(jax.tree_util.tree_leaves(changed))  # A finite step moves every statistic.
  bad, metrics = step(state, {**batch, 'images': images * np.nan})
  assert not bool(metrics['finite'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, bad.model_state, state.model_state)
  jax.tree_util.tree_map(np.testing.assert_array_equal, bad.params, state.params)


@pytest.mark.parametrize('accum_steps', [2, 4])
def test_gradient_accumulation_matches_one_large_batch(accum_steps):
  module, tx, labels, state, batch = _tiny_setup(batch_size=16)
  results = []
  for k in (1, accum_steps):
    step = jax.jit(lambda s, b, k=k: train_lib.train_step(s, b, module=module, tx=tx,
                                                          labels=labels, accum_steps=k))
    s, metrics = state, None
    for _ in range(3):
      s, metrics = step(s, batch)
    results.append((jax.device_get(s.params), jax.device_get(metrics)))
  (one, m_one), (accumulated, m_acc) = results
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                         one, accumulated)
  np.testing.assert_allclose(m_one['loss'], m_acc['loss'], rtol=1e-5)
  np.testing.assert_allclose(m_one['accuracy'], m_acc['accuracy'])


def test_gradient_accumulation_in_the_loop_on_8_devices(tmp_path):
  result = train_lib.train_and_evaluate(smoke_config(grad_accum_steps=2), tmp_path)
  assert result['test_acc'] >= 0.8, result
  with pytest.raises(JaxtlError, match='not divisible by config.grad_accum_steps = 3'):
    train_lib.train_and_evaluate(smoke_config(grad_accum_steps=3), tmp_path / 'w')
