"""Research freezing schemes: each trains exactly the params it names (frozen ones bit-identical,
no optimizer state for them), LR multipliers give exact update ratios, gradual unfreezing carries
optimizer state across phases, LoRA starts equal to the base model and merges exactly."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxtl import freeze, lora, models
from jaxtl import train as train_lib
from jaxtl.errors import SchemeError
from jaxtl.weights.strict import flatten

NUM_LAYERS = 4


@pytest.fixture(scope='module')
def bert():
  module = models.create('bert-tiny', num_classes=3, num_layers=NUM_LAYERS, hidden_dropout=0.0,
                         attention_dropout=0.0)
  params = module.init(jax.random.key(0), *module.example_inputs())['params']
  return module, params


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    ids = rng.integers(0, 128, (8, 12)).astype(np.int32)
    yield {'input_ids': ids, 'label': rng.integers(0, 3, 8).astype(np.int32)}


def _train(module, params, labels, steps=3, name='adamw', lr=1e-2, opt_state=None):
  optim = ml_collections.ConfigDict(dict(name=name, lr=lr, weight_decay=0.1, momentum=0.0,
                                         warmup_fraction=0.0, schedule='constant', clip_norm=1.0))
  tx, _ = train_lib.make_optimizer(optim, labels, steps)
  trainable, _ = freeze.split(params, labels)
  fresh = tx.init(trainable)
  state = train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state={},
      opt_state=fresh if opt_state is None else freeze.carry_opt_state(opt_state, fresh),
      rng=jax.random.PRNGKey(0))
  step = jax.jit(lambda s, b: train_lib.train_step(s, b, module=module, tx=tx, labels=labels))
  for batch in _batches(steps):
    state, _ = step(state, batch)
  return state


def _changed(before, after):
  before, after = flatten(before), flatten(after)
  return {p for p in before if not np.array_equal(before[p], after[p])}


EXPECTED = {
    # scheme: predicate on a param path for "trains"
    'bitfit': lambda p: p.endswith('/bias') or p.startswith('classifier/'),
    'norm_only': lambda p: 'norm' in p.split('/')[-2].lower() or p.startswith('classifier/'),
    'linear_probe': lambda p: p.startswith('classifier/'),
    'last_n_blocks:1': lambda p: p.startswith(('encoder/layer_3/', 'pooler/', 'classifier/')),
    'full': lambda p: True,
    'layer_decay:0.5': lambda p: True,
}


@pytest.mark.parametrize('scheme', sorted(EXPECTED))
def test_scheme_trains_exactly_its_params(bert, scheme):
  module, params = bert
  labels = freeze.label_params(params, scheme, module)
  state = _train(module, params, labels)
  expected = {p for p in flatten(params) if EXPECTED[scheme](p)}
  # Every param that should train changed; every other one is bit-identical (weight decay on).
  assert _changed(params, state.params) == expected
  trainable_size = sum(flatten(params)[p].size for p in expected)
  moments = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if jnp.ndim(x) > 0)
  assert moments == 2 * trainable_size  # Adam's mu and nu for trainable params only.


def test_norm_only_finds_norm_layers_by_type(bert):
  module, params = bert
  norms = freeze.norm_modules(module)
  assert 'embeddings/LayerNorm' in norms and 'encoder/layer_2/output_norm' in norms
  assert len(norms) == 1 + 2 * NUM_LAYERS


def test_layer_decay_multipliers(bert):
  module, params = bert
  flat = flatten(freeze.label_params(params, 'layer_decay:0.5', module))
  n = NUM_LAYERS
  assert freeze.parse_label(flat['classifier/kernel']) == ('head', 1.0)
  assert freeze.parse_label(flat['pooler/kernel']) == ('neck', 1.0)
  assert freeze.parse_label(flat['encoder/layer_3/output/kernel']) == ('block_3', 0.5)
  assert freeze.parse_label(flat['encoder/layer_0/output/kernel']) == ('block_0', 0.5 ** n)
  assert freeze.parse_label(flat['embeddings/LayerNorm/scale']) == ('stem', 0.5 ** (n + 1))


def test_lr_multipliers_give_exact_update_ratios():
  """SGD on known gradients: each group's update is -lr * multiplier * gradient, exactly, under a
  schedule; config-level lr_mult multiplies the label's."""
  params = {'a': jnp.ones(3), 'b': jnp.ones(3), 'c': jnp.ones(3), 'd': jnp.ones(3)}
  labels = {'a': 'trainable', 'b': freeze.group_label('slow', 0.25), 'c': 'head', 'd': 'frozen'}
  schedule = optax.linear_schedule(0.5, 0.1, 10)
  tx = freeze.partition(lambda group: optax.sgd(schedule), labels, lr_mult={'head': 8.0})
  trainable, _ = freeze.split(params, labels)
  assert set(trainable) == {'a', 'b', 'c'}
  grads = {'a': jnp.array([1., 2., 3.]), 'b': jnp.array([1., 2., 3.]), 'c': jnp.array([1., 2., 3.])}
  state = tx.init(trainable)
  for step in range(3):
    updates, state = tx.update(grads, state, trainable)
    lr = schedule(step)
    np.testing.assert_array_equal(updates['a'], -lr * grads['a'])
    np.testing.assert_array_equal(updates['b'], -lr * 0.25 * grads['b'])
    np.testing.assert_array_equal(updates['c'], -lr * 8.0 * grads['c'])


def test_rule_with_options_and_group_errors(bert):
  module, params = bert
  rules = [('embeddings/.*', 'frozen'),
           ('encoder/layer_[01]/.*', {'label': 'low', 'lr_mult': 0.1}),
           ('.*', 'trainable')]
  flat = flatten(freeze.label_params(params, rules))
  assert flat['encoder/layer_1/output/bias'] == 'low*0.1'
  with pytest.raises(SchemeError, match=r"lr_mult names group\(s\) \['haed'\].*\['low', "
                                        r"'trainable'\]"):
    freeze.partition(lambda g: optax.sgd(0.1), freeze.label_params(params, rules),
                     lr_mult={'haed': 2.0})
  with pytest.raises(SchemeError, match='options are'):
    freeze.label_params(params, [('.*', {'group': 'x'})])


@pytest.mark.parametrize('name', ['bitfitt', 'layer_decay', 'layer_decay:1.5', 'layer_decay:x',
                                  'gradual_unfreeze:0', 'gradual_unfreeze:2days', 'norm-only'])
def test_typos_list_the_valid_schemes(bert, name):
  module, params = bert
  with pytest.raises(SchemeError, match=r'valid presets: full, linear_probe, last_n_blocks:N, '
                                        r'bitfit, norm_only, layer_decay:D, gradual_unfreeze:K|'
                                        r'the decay must be|K must be a positive integer'):
    freeze.unfreeze_phases(name, module)
    freeze.label_params(params, name, module)


def test_gradual_unfreeze_phases_and_state_carry(bert):
  module, params = bert
  assert freeze.unfreeze_phases('gradual_unfreeze:2', module) == (2, 'epochs', NUM_LAYERS + 2)
  assert freeze.unfreeze_phases('gradual_unfreeze:50steps', module) == (50, 'steps', NUM_LAYERS + 2)
  assert freeze.unfreeze_phases('full', module) is None
  trains = lambda phase: set(freeze.split(params, freeze.label_params(
      params, 'gradual_unfreeze:1', module, phase=phase))[0])
  assert trains(0) == {'pooler', 'classifier'}
  assert trains(1) == {'pooler', 'classifier', 'encoder'}
  assert set(freeze.split(params, freeze.label_params(params, 'gradual_unfreeze:1', module,
                                                      phase=NUM_LAYERS))[0]) == {
      'pooler', 'classifier', 'encoder'}
  assert trains(NUM_LAYERS + 1) == set(params)

  # Phase 0 trains the head; phase 1 adds the top block. The head's Adam state (mu, nu, count)
  # goes into phase 1 unchanged; the new block starts fresh.
  labels0 = freeze.label_params(params, 'gradual_unfreeze:1', module, phase=0)
  state0 = _train(module, params, labels0, steps=2)
  labels1 = freeze.label_params(params, 'gradual_unfreeze:1', module, phase=1)
  optim = ml_collections.ConfigDict(dict(name='adamw', lr=1e-2, weight_decay=0.1,
                                         warmup_fraction=0.0, schedule='constant', clip_norm=1.0))
  tx1, _ = train_lib.make_optimizer(optim, labels1, 2)
  carried = freeze.carry_opt_state(state0.opt_state, tx1.init(freeze.split(state0.params,
                                                                          labels1)[0]))
  old = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(
      state0.opt_state)}
  new = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(carried)}
  head_mu = [k for k in old if "'classifier'" in k and "'kernel'" in k]
  assert head_mu and all(np.array_equal(old[k], new[k]) for k in head_mu)
  counts = [k for k in old if k.endswith('.count')]
  assert counts and all(int(new[k]) == 2 for k in counts)  # Step counts carried too.
  block = [k for k in new if "'layer_3'" in k]
  assert block and all(not np.any(new[k]) for k in block)  # The new block starts at zero.


def test_lora_starts_equal_trains_adapters_and_merges_exactly(bert):
  module, params = bert
  ids = np.random.default_rng(1).integers(0, 128, (2, 12)).astype(np.int32)
  wrapped, variables = lora.add_adapters(module, {'params': params}, rank=4, alpha=8.0)
  adapter_paths = sorted(p for p in flatten(variables['params']) if 'lora_' in p)
  assert len(adapter_paths) == 2 * 2 * NUM_LAYERS  # query and value, A and B, every layer.
  assert all('/attention/query/' in p or '/attention/value/' in p for p in adapter_paths)
  n_adapter, n_total = lora.count(variables)
  assert n_adapter == NUM_LAYERS * 2 * (32 * 4 + 4 * 32)
  # Zero-initialised B: the adapted model equals the base model before training.
  np.testing.assert_array_equal(wrapped.apply(variables, ids)[0], module.apply({'params': params},
                                                                              ids)[0])
  labels = freeze.label_params(variables['params'], 'lora', wrapped)
  state = _train(wrapped, variables['params'], labels)
  changed = _changed(variables['params'], state.params)
  assert changed == set(adapter_paths[1::2]) | set(adapter_paths[0::2]) | {
      'classifier/kernel', 'classifier/bias'}
  trained = {'params': state.params}
  merged_module, merged = lora.merge(wrapped, trained)
  assert merged_module is module and not any('lora_' in p for p in flatten(merged))
  np.testing.assert_allclose(merged_module.apply(merged, ids)[0], wrapped.apply(trained, ids)[0],
                             atol=1e-5, rtol=0)
  assert not np.allclose(wrapped.apply(trained, ids)[0], module.apply({'params': params}, ids)[0])


def test_readme_scheme_config_runs_its_function(tmp_path):
  """configs/bert_mlp_only.py: attention and embeddings frozen, MLPs train, head at 10x — on the
  real MiniLM, through the config and the CLI's own loading path."""
  import importlib.util
  from conftest import ROOT
  spec = importlib.util.spec_from_file_location('mlp_only', ROOT / 'configs' / 'bert_mlp_only.py')
  cfg_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg_module)
  config = cfg_module.get_config()
  module, variables = train_lib.create_model(config, num_classes=5)
  labels = flatten(freeze.label_params(variables['params'], config.freeze.scheme, module))
  assert labels['encoder/layer_2/attention/query/kernel'] == 'frozen'
  assert labels['encoder/layer_2/attention_norm/scale'] == 'frozen'
  assert labels['encoder/layer_2/intermediate/kernel'] == 'mlp'
  assert labels['classifier/kernel'] == 'head*10'
  tx, _ = train_lib.make_optimizer(config.optim, freeze.unflatten(labels), 10)


def test_gradual_unfreeze_in_the_train_loop(tmp_path, monkeypatch):
  """configs/smoke.py with 'gradual_unfreeze:1': one compile per unfreezing step (after each, the
  freed host memory is released), each segment trains exactly its params, and a run resumed
  mid-way ends bit-identical."""
  import importlib.util
  import shutil
  import orbax.checkpoint as ocp
  from conftest import ROOT
  spec = importlib.util.spec_from_file_location('smoke', ROOT / 'configs' / 'smoke.py')
  smoke = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(smoke)
  config = smoke.get_config()
  config.freeze.scheme = 'gradual_unfreeze:1'   # bert-tiny: 2 blocks -> 4 segments of 1 epoch.
  traces = []
  original = train_lib.train_step
  def counting(state, batch, **kw):
    traces.append(sorted(freeze.split(state.params, kw['labels'])[0]))
    return original(state, batch, **kw)
  monkeypatch.setattr(train_lib, 'train_step', counting)
  # The compiler's freed heap goes back to the OS after each segment's first (compiling) step
  # and each evaluation's first batch: 4 segments, 4 epoch-end evaluations.
  releases = []
  monkeypatch.setattr(train_lib, 'release_freed_host_memory', lambda: releases.append(1))
  result = train_lib.train_and_evaluate(config, tmp_path / 'a')
  assert len(releases) == 4 + 4
  assert traces == [['classifier', 'pooler'], ['classifier', 'encoder', 'pooler'],
                    ['classifier', 'encoder', 'pooler'],
                    ['classifier', 'embeddings', 'encoder', 'pooler']]
  assert result['step'] == 64 and result['test_acc'] > 0.5

  mngr = ocp.CheckpointManager(tmp_path / 'a' / 'checkpoints')
  final = mngr.restore(64)['params']
  earlier = mngr.restore(48)['params']
  # Segment 4 (steps 48-64) is the first to train the embeddings.
  assert not np.array_equal(final['embeddings']['word_embeddings']['embedding'],
                            earlier['embeddings']['word_embeddings']['embedding'])
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '64')
  train_lib.train_and_evaluate(config, tmp_path / 'b')
  resumed = ocp.CheckpointManager(tmp_path / 'b' / 'checkpoints').restore(64)['params']
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, final)


@pytest.mark.parametrize('name', ['bert-tiny', 'vit'])
def test_frozen_parts_run_in_inference_mode(name):
  """Dropout and stochastic depth inside wholly frozen modules are the identity during training
  (Keras' base_model(x, training=False)): under linear_probe the features the head sees equal the
  eval-mode features; under full they do not."""
  if name == 'vit':
    module = models.create('vit-ti16', num_classes=3, image_size=32, patch_size=8, hidden_size=32,
                           num_layers=2, num_heads=2, mlp_dim=64, dropout_rate=0.3,
                           stochastic_depth=0.5)
  else:
    module = models.create('bert-tiny', num_classes=3, hidden_dropout=0.3, attention_dropout=0.3)
  example = module.example_inputs()[0]
  inputs = ((jnp.arange(32, dtype=jnp.int32).reshape(4, 8) if name == 'bert-tiny' else
             jax.random.normal(jax.random.key(1), (4,) + example.shape[1:])),)
  params = module.init(jax.random.key(0), *inputs)['params']
  _, eval_out = module.apply({'params': params}, *inputs, train=False)
  for scheme, equal in (('linear_probe', True), ('full', False)):
    labels = freeze.label_params(params, scheme, module)
    with train_lib._frozen_parts_in_inference_mode(frozenset(), train_lib.frozen_scopes(labels)):
      _, out = module.apply({'params': params}, *inputs, train=True,
                            rngs={'dropout': jax.random.key(2)})
    assert np.allclose(out['pre_logits'], eval_out['pre_logits'], atol=1e-6) == equal, scheme
