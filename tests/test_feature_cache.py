"""The feature cache for linear probes: a probe trained on cached features ends where the uncached
run ends (tiny BERT, with and without its classifier dropout; a tiny ResNet on images), the cache
stays off where it cannot be exact, and the disk cache is reused only for the same backbone and
data."""
import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ROOT
from jaxtl import data as data_lib, feature_cache, freeze, models, parallel
from jaxtl import train as train_lib
from jaxtl.data import images as image_data


def smoke_config(**overrides):
  spec = importlib.util.spec_from_file_location('smoke', ROOT / 'configs' / 'smoke.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.freeze.scheme = 'linear_probe'
  config.optim.lr = 0.05
  config.num_epochs = 2
  config.update(overrides)
  return config


def probe_run(config, module, variables, data, mode, head_only=False):
  """One phase of train_and_evaluate, written out: the lead's loop with the feature-cache hook
  (plan after the state is built; the cached module and data stand in for the model's).
  head_only: the state holds the head's params only while training, merged back at the end."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.feature_cache = mode
  phase = train_lib.phases_of(config)[0]
  variables = jax.device_get(variables)  # Host copies: the step donates the state's buffers.
  params = variables['params']
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  mesh = parallel.make_mesh(config.mesh.data)
  repl, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  steps_per_epoch = data_lib.num_examples(data.train) // config.batch_size
  labels = freeze.label_params(params, phase.freeze.scheme, module)
  tx, _ = train_lib.make_optimizer(phase.optim, labels, phase.num_epochs * steps_per_epoch)
  frozen_bns = train_lib.frozen_batchnorms(model_state, labels, phase.bn_mode)
  state = jax.device_put(train_lib.TrainState(
      step=jnp.asarray(0, jnp.int32), params=params, model_state=model_state,
      opt_state=tx.init(freeze.split(params, labels)[0]), rng=jax.random.PRNGKey(config.seed)),
      repl)
  # ---- The hook.
  cache = feature_cache.plan(config, phase, module, state.params, state.model_state, labels,
                             data, mesh=mesh)
  step_module, step_data = (cache.module, cache.data) if cache else (module, data)
  # ----
  if head_only:
    full_params = state.params
    state = state.replace(params=cache.head_params(state.params), model_state={})
    labels, frozen_bns = cache.labels(labels), frozenset()
  p_train_step = jax.jit(
      lambda s, b: train_lib.train_step(s, b, module=step_module, tx=tx, labels=labels,
                                        frozen_bns=frozen_bns),
      in_shardings=(repl, sharded), out_shardings=(repl, repl), donate_argnums=0)
  p_eval_step = jax.jit(lambda s, b: train_lib.eval_step(s, b, module=step_module),
                        in_shardings=(repl, sharded), out_shardings=repl)
  for epoch in range(phase.num_epochs):
    for batch in data_lib.batches(step_data.train, config.batch_size, seed=config.seed,
                                  epoch=epoch, shuffle=True, drop_remainder=True):
      batch = train_lib._prepare(step_data, batch, train=True, seed=config.seed, epoch=epoch,
                                 step=int(state.step))
      state, _ = p_train_step(state, parallel.shard_batch(batch, mesh))
  test = train_lib.evaluate(p_eval_step, state, step_data, config.batch_size, mesh)
  if head_only:
    state = state.replace(params=cache.merge(full_params, state.params),
                          model_state=model_state)
  return jax.device_get(state), test, cache


def assert_same_run(uncached, cached):
  (state_a, test_a, cache_a), (state_b, test_b, cache_b) = uncached, cached
  assert cache_a is None and cache_b is not None
  # The state keeps the full params: the frozen ones exactly, the head within float noise.
  assert jax.tree_util.tree_structure(state_a.params) == jax.tree_util.tree_structure(
      state_b.params)
  head = cache_b.head
  for path, a in freeze.flatten(state_a.params).items():
    b = freeze.flatten(state_b.params)[path]
    if path.startswith(head + '/'):
      np.testing.assert_allclose(b, a, atol=1e-5, rtol=0, err_msg=path)
    else:
      np.testing.assert_array_equal(b, a, err_msg=path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, state_a.model_state, state_b.model_state)
  assert not np.allclose(state_b.params[head]['kernel'], 0)  # The head did train.
  assert test_b['accuracy'] == test_a['accuracy']
  np.testing.assert_allclose(test_b['loss'], test_a['loss'], rtol=1e-4)


def random_variables(module, *inputs, seed=0):
  """Variables of the shapes module.init gives, drawn with numpy: jitting (or running) init
  costs more than the rest of a test on a shared 2-core machine. The head starts at zero, as a
  new head does; BatchNorm statistics are away from (0, 1) so that using them shows."""
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    name, top = path[-1].key, path[1].key
    if top in ('classifier', 'fc') or name == 'bias':
      return np.zeros(leaf.shape, leaf.dtype)
    if name == 'scale':
      return np.ones(leaf.shape, leaf.dtype)
    if name in ('mean', 'var'):
      return (rng.uniform(0.5, 1.5, leaf.shape) if name == 'var' else
              rng.normal(0, 0.1, leaf.shape)).astype(leaf.dtype)
    fan_in = np.prod(leaf.shape[:-1]) if name == 'kernel' else 1 / 0.02 ** 2  # Embeddings.
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def bert():
  """configs/smoke.py's tiny BERT (dropout 0) and synthetic data: 512 train, 256 test."""
  config = smoke_config()
  data = train_lib.load_data(config)
  module = models.create(config.model.name, num_classes=len(data.class_names),
                         **config.model.overrides)
  return module, random_variables(module, *module.example_inputs()), data


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_bert_probe_matches_uncached(bert, dropout):
  """With dropout 0.1 the encoder's dropouts are frozen (identity) and the classifier dropout
  acts: the cached head draws the same masks as the full model."""
  module, variables, data = bert
  module = module.clone(hidden_dropout=dropout, attention_dropout=dropout)
  uncached = probe_run(smoke_config(), module, variables, data, 'off')
  cached = probe_run(smoke_config(), module, variables, data, 'auto')
  assert cached[2].mode == 'memory' and cached[2].head == 'classifier'
  assert (cached[2].module.dropout or {}).get('rate', 0.0) == dropout
  assert cached[2].data.train['features'].shape == (512, 32)
  assert_same_run(uncached, cached)


# ---------------------------------------------------------------------------------------------
# Images: a tiny ResNet with BatchNorm on a small synthetic array.
# ---------------------------------------------------------------------------------------------
def tiny_images(n_train=48, n_test=20, size=20, seed=0, augment='none'):
  rng = np.random.default_rng(seed)
  def split(n):
    label = rng.integers(0, 3, n).astype(np.int32)
    base = 255 * (np.arange(3) == label[:, None])[:, None, None, :] * 0.6
    images = np.clip(base + rng.normal(60, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)
    return {'images': images, 'label': label}
  pre = image_data.Preprocess(image_size=16, crop_fraction=1.0, augment=augment)
  return image_data.ImageData(split(n_train), split(n_test), ['r', 'g', 'b'], pre)


def image_config(**overrides):
  config = smoke_config()
  config.model = dict(name='resnet18', source='', overrides=dict(
      stage_sizes=(1, 1, 1, 1), widths=(8, 8, 16, 16), stem_width=8))
  config.optim = dict(name='sgd', lr=0.1, momentum=0.9, schedule='constant')
  config.batch_size = 8
  config.num_epochs = 3
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def resnet():
  config = image_config()
  module = models.create('resnet18', num_classes=3, **config.model.overrides)
  return module, random_variables(module, jnp.zeros((1, 16, 16, 3)))


def test_resnet_probe_matches_uncached(resnet):
  module, variables = resnet
  data = tiny_images()
  uncached = probe_run(image_config(), module, variables, data, 'off')
  cached = probe_run(image_config(), module, variables, data, 'memory')
  assert cached[2].head == 'fc' and cached[2].module.dropout is None
  assert_same_run(uncached, cached)
  # A loop may also keep only the head in its state, and merge it back into the full params.
  head_only = probe_run(image_config(), module, variables, data, 'memory', head_only=True)
  assert_same_run(uncached, head_only)


def _plan(config, module, variables, data, mode='auto', **kw):
  config = ml_collections.ConfigDict(config.to_dict())
  config.feature_cache = mode
  phase = train_lib.phases_of(config)[0]
  params = variables['params']
  labels = freeze.label_params(params, phase.freeze.scheme, module)
  state = {k: v for k, v in variables.items() if k != 'params'}
  return feature_cache.plan(config, phase, module, params, state, labels, data, **kw)


@pytest.mark.parametrize('change,reason', [
    (dict(bn_mode='train'), "BatchNorm 'bn1' normalises with batch statistics"),
    (dict(augment='flip'), "config.data.augment is 'flip'"),
    (dict(scheme='last_n_blocks:1'), 'outside the head train'),
    (dict(mode='off'), None),
])
def test_not_applicable(resnet, capsys, change, reason):
  module, variables = resnet
  config = image_config(bn_mode=change.get('bn_mode', 'follow_freeze'))
  config.freeze.scheme = change.get('scheme', 'linear_probe')
  data = tiny_images(augment=change.get('augment', 'none'))
  assert _plan(config, module, variables, data, change.get('mode', 'memory')) is None
  printed = capsys.readouterr().out
  assert (reason in printed) if reason else printed == ''


def test_dropout_before_pre_logits_is_not_cached():
  """VGG's dropout after fc2 acts in train mode (it is the root's, not a frozen module's) and
  pre_logits is its output: training on clean cached features would not be the same run. Without
  dropout the same model qualifies."""
  for rate, expect in ((0.5, 'dropout'), (0.0, None)):
    module = models.create('vgg11', num_classes=3, input_size=32, fc_width=8,
                           adaptive_pool=False, dropout_rate=rate)
    params = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())['params']
    labels = freeze.label_params(params, 'linear_probe', module)
    if expect:
      with pytest.raises(feature_cache.NotApplicable, match="dropout 'Dropout_0' .* acts"):
        feature_cache._trace(module, params, {}, labels, 'follow_freeze', 'head')
    else:
      dense, dropout = feature_cache._trace(module, params, {}, labels, 'follow_freeze', 'head')
      assert dropout is None and dense['features'] == 3


# ---------------------------------------------------------------------------------------------
# Disk mode.
# ---------------------------------------------------------------------------------------------
def test_disk_cache_is_written_reused_and_keyed(bert, tmp_path, capsys):
  module, variables, bert_data = bert
  config = smoke_config()
  first = _plan(config, module, variables, bert_data, 'disk', workdir=tmp_path)
  assert first.mode == 'disk' and not first.reused
  assert first.directory.parent == tmp_path / 'feature_cache'
  assert sorted(p.name for p in first.directory.iterdir()) == ['meta.json', 'test.npy',
                                                                'train.npy']
  assert isinstance(first.data.train['features'], np.memmap)
  memory = _plan(config, module, variables, bert_data, 'memory')
  for split in ('train', 'test'):
    np.testing.assert_array_equal(getattr(first.data, split)['features'],
                                  getattr(memory.data, split)['features'])

  # The same backbone and data: read back, not recomputed. A new head does not matter.
  head = {'kernel': variables['params']['classifier']['kernel'] + 1.0,
          'bias': variables['params']['classifier']['bias']}
  again = _plan(config, module, {'params': {**variables['params'], 'classifier': head}},
                bert_data, 'disk', workdir=tmp_path)
  assert again.reused and again.directory == first.directory
  assert 'reused' in capsys.readouterr().out
  np.testing.assert_array_equal(again.data.test['features'], first.data.test['features'])

  # Another backbone (one param moved), or other data: a new key, computed afresh.
  moved = jax.tree_util.tree_map(lambda x: x, variables['params'])
  moved['pooler'] = {**moved['pooler'], 'bias': moved['pooler']['bias'] + 0.5}
  other = _plan(config, module, {'params': moved}, bert_data, 'disk', workdir=tmp_path)
  assert not other.reused and other.directory != first.directory
  assert not np.allclose(other.data.train['features'], first.data.train['features'])
  fewer = type(bert_data)({k: v[:-32] for k, v in bert_data.train.items()}, bert_data.test,
                          bert_data.class_names, bert_data.max_length)
  third = _plan(config, module, variables, fewer, 'disk', workdir=tmp_path)
  assert not third.reused and third.directory not in (first.directory, other.directory)
  assert len(list((tmp_path / 'feature_cache').iterdir())) == 3


def test_unfinished_disk_cache_is_recomputed(bert, tmp_path):
  module, variables, bert_data = bert
  config = smoke_config()
  first = _plan(config, module, variables, bert_data, 'disk', workdir=tmp_path)
  expect = np.array(first.data.train['features'])  # Read now: the file is about to be spoilt.
  del first.data.train['features']
  (first.directory / 'meta.json').unlink()  # As if the run died while writing.
  (first.directory / 'train.npy').unlink()
  (first.directory / 'train.npy').write_bytes(b'garbage')
  again = _plan(config, module, variables, bert_data, 'disk', workdir=tmp_path)
  assert not again.reused
  np.testing.assert_array_equal(again.data.train['features'], expect)


def test_train_and_evaluate_with_cache_equals_without(tmp_path, capsys):
  """End to end through the real loop once it calls feature_cache.plan: the same checkpoint and
  test accuracy as without the cache; and a cached run resumed from its mid-run checkpoint ends
  where the uninterrupted one did."""
  import shutil
  from jaxtl import checkpoint
  results, params = {}, {}
  for mode in ('off', 'auto'):
    config = smoke_config()
    config.feature_cache = mode
    results[mode] = train_lib.train_and_evaluate(config, tmp_path / mode)
    params[mode] = checkpoint.restore_raw(tmp_path / mode)[1]['params']
  assert "Feature cache: the head trains on out['pre_logits']" in capsys.readouterr().out
  assert results['auto']['test_acc'] == results['off']['test_acc']
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                         params['auto'], params['off'])

  last, _ = checkpoint.restore_raw(tmp_path / 'auto')
  shutil.rmtree(tmp_path / 'auto' / 'checkpoints' / str(last))
  config = smoke_config()
  config.feature_cache = 'auto'
  train_lib.train_and_evaluate(config, tmp_path / 'auto')
  assert 'Resumed from' in capsys.readouterr().out
  step, state = checkpoint.restore_raw(tmp_path / 'auto')
  assert step == last
  jax.tree_util.tree_map(np.testing.assert_array_equal, state['params'], params['auto'])
