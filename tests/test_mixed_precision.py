"""Mixed precision and memory savers: bf16 compute over float32 params (BERT and ViT), bf16 first
moments (Adam's mu, SGD's momentum), and remat (BERT and ViT blocks) giving the same gradients as
the plain model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl import freeze, models
from jaxtl import train as train_lib
from test_train import smoke_config

TINY_BERT = dict(hidden_dropout=0.0, attention_dropout=0.0)
TINY_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                mlp_dim=64)


def _grads(module, variables, *inputs, labels):
  def loss(params):
    logits, _ = module.apply({**variables, 'params': params}, *inputs, train=False)
    return train_lib.cross_entropy(logits, labels).mean()
  return jax.jit(jax.grad(loss))(variables['params'])


TINY_MODELS = [
    ('bert-tiny', TINY_BERT, lambda: (np.random.default_rng(0).integers(0, 128, (4, 12)),)),
    ('vit-ti16', TINY_VIT, lambda: (np.random.default_rng(0).normal(size=(4, 32, 32, 3)),)),
]


def _inputs(inputs):
  return tuple(jnp.asarray(a, jnp.int32 if a.dtype.kind == 'i' else jnp.float32) for a in inputs())


@pytest.mark.parametrize('name,overrides,inputs', TINY_MODELS)
def test_remat_gives_the_same_gradients(name, overrides, inputs):
  plain = models.create(name, num_classes=3, **overrides)
  rematted = models.create(name, num_classes=3, remat=True, **overrides)
  x = _inputs(inputs)
  variables = plain.init(jax.random.key(0), *x)
  assert jax.tree_util.tree_structure(rematted.init(jax.random.key(0), *x)) == (
      jax.tree_util.tree_structure(variables))  # Same param paths.
  labels = jnp.array([0, 1, 2, 0])
  a = _grads(plain, variables, *x, labels=labels)
  b = _grads(rematted, variables, *x, labels=labels)
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6, rtol=1e-5), a, b)


@pytest.mark.parametrize('name,overrides,inputs', TINY_MODELS)
def test_bf16_compute_keeps_float32_master_weights(name, overrides, inputs):
  x = _inputs(inputs)
  module = models.create(name, num_classes=3, dtype=jnp.bfloat16, **overrides)
  variables = module.init(jax.random.key(0), *x)
  assert {p.dtype for p in jax.tree_util.tree_leaves(variables)} == {jnp.dtype('float32')}
  logits, out = module.apply(variables, *x)
  assert out['encoded'].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  reference = models.create(name, num_classes=3, **overrides).apply(variables, *x)[0]
  np.testing.assert_allclose(logits, reference, atol=0.05)  # bf16 keeps ~3 significant digits.
  grads = _grads(module, variables, *x, labels=jnp.array([0, 1, 2, 0]))
  assert {g.dtype for g in jax.tree_util.tree_leaves(grads)} == {jnp.dtype('float32')}


def test_bf16_bert_embedding_gradients_accumulate_in_float32():
  """Embedding rows are looked up in float32: the table's gradient is a float32 scatter-add,
  never a bf16 one (nor a cast of the whole table)."""
  import re
  module = models.create('bert-tiny', num_classes=4, dtype=jnp.bfloat16, **TINY_BERT)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 128, (8, 12)), jnp.int32)
  variables = module.init(jax.random.key(0), x)
  loss = lambda params: jnp.sum(module.apply({'params': params}, x)[0])
  text = str(jax.make_jaxpr(jax.grad(loss))(variables['params']))
  scatters = re.findall(r'(\w+)\[[\d,]*\] = scatter-add', text)
  assert len(scatters) >= 3 and set(scatters) == {'f32'}, scatters  # word, position, token type


def test_bf16_first_moments_and_a_bf16_training_run(tmp_path):
  config = smoke_config()
  config.optim.mu_dtype = 'bfloat16'
  config.model.overrides.dtype = 'bfloat16'
  module, variables = train_lib.create_model(config, num_classes=4)
  labels = freeze.label_params(variables['params'], 'full', module)
  tx, _ = train_lib.make_optimizer(config.optim, labels, 10)
  moments = [x for x in jax.tree_util.tree_leaves(tx.init(variables['params'])) if x.ndim]
  n_params = len(jax.tree_util.tree_leaves(variables['params']))
  assert sum(x.dtype == jnp.bfloat16 for x in moments) == n_params  # mu
  assert sum(x.dtype == jnp.float32 for x in moments) == n_params   # nu
  result = train_lib.train_and_evaluate(config, tmp_path)
  assert result['test_acc'] >= 0.8, result


def test_bf16_sgd_momentum():
  """mu_dtype applies to SGD's momentum as to Adam's first moment."""
  import ml_collections
  params = {'dense': {'kernel': jnp.ones((3, 4)), 'bias': jnp.zeros((4,))}}
  labels = freeze.label_params(params, [('.*', 'trainable')], None)
  optim = ml_collections.ConfigDict(dict(name='sgd', lr=0.1, momentum=0.9, schedule='constant',
                                         mu_dtype='bfloat16'))
  tx, _ = train_lib.make_optimizer(optim, labels, 10)
  state = tx.init(params)
  traces = [x for x in jax.tree_util.tree_leaves(state) if x.ndim]
  assert [x.dtype for x in traces] == [jnp.dtype('bfloat16')] * 2
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  assert {u.dtype for u in jax.tree_util.tree_leaves(updates)} == {jnp.dtype('float32')}
  np.testing.assert_allclose(updates['dense']['kernel'], -0.1)  # The first step: -lr * g.
