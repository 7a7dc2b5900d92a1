"""Flax BERT against transformers' PyTorch BERT: logits, pooled output and every layer's hidden
states within 1e-4, through every checkpoint format load_pretrained reads; scanned layers
(scan=True) against transformers and against the unrolled model's gradients."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxtl
from conftest import check_unread_rows_are_skipped, make_hf_bert

TOL = 1e-4
CONFIGS = {
    # MiniLM-like: 6 x 384, 12 heads.
    'minilm_like': dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, vocab_size=300, max_position_embeddings=128),
    # Deep, narrow, odd-sized: 9 layers of 36 with 3 heads, intermediate 50, 3 token types.
    'deep_narrow_odd': dict(hidden_size=36, num_hidden_layers=9, num_attention_heads=3,
                            intermediate_size=50, vocab_size=123, type_vocab_size=3,
                            layer_norm_eps=1e-7, max_position_embeddings=40),
    'relu': dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                 hidden_act='relu', vocab_size=77, max_position_embeddings=40),
    'gelu_new': dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                     intermediate_size=72, hidden_act='gelu_new', vocab_size=77,
                     max_position_embeddings=40, type_vocab_size=4),
}


def _inputs(config, batch=3, length=19, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, config['vocab_size'], (batch, length))
  mask = np.ones_like(ids)
  mask[1, 11:] = 0   # Padded examples of different lengths.
  mask[2, 4:] = 0
  types = rng.integers(0, config.get('type_vocab_size', 2), (batch, length))
  return ids, mask, types


def _save_torch(model, path, legacy):
  # transformers 5 writes only safetensors: save the pickled state dict ourselves.
  torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize('fmt', ['safetensors', 'bin', 'bin_legacy'])
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_sequence_classification_parity(tmp_path, name, fmt):
  config = CONFIGS[name]
  model = make_hf_bert(tmp_path, num_labels=5, **config)
  if fmt != 'safetensors':
    _save_torch(model, tmp_path / 'pytorch_model.bin', legacy=fmt == 'bin_legacy')
    os.remove(tmp_path / 'model.safetensors')
  ids, mask, types = _inputs(config)
  with torch.no_grad():
    ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types), output_hidden_states=True)
    ref_pooled = model.bert.pooler(ref.hidden_states[-1])

  module, variables = jaxtl.load_pretrained(tmp_path)
  logits, out = module.apply(variables, ids, attention_mask=mask, token_type_ids=types)

  assert logits.shape == (3, 5)
  np.testing.assert_allclose(logits, ref.logits.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(out['pooled'], ref_pooled.numpy(), atol=TOL, rtol=0)
  assert len(out['hidden_states']) == config['num_hidden_layers'] + 1
  for i, (ours, theirs) in enumerate(zip(out['hidden_states'], ref.hidden_states)):
    np.testing.assert_allclose(ours, theirs.numpy(), atol=TOL, rtol=0, err_msg=f'hidden state {i}')
  np.testing.assert_array_equal(out['encoded'], out['hidden_states'][-1])


def test_bert_model_without_prefix_is_headless(tmp_path):
  """A plain BertModel (no `bert.` prefix, no classifier) loads as a headless backbone."""
  config = CONFIGS['gelu_new']
  model = make_hf_bert(tmp_path, **config)
  ids, mask, types = _inputs(config)
  with torch.no_grad():
    ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types), output_hidden_states=True)
  module, variables = jaxtl.load_pretrained(tmp_path)
  logits, out = module.apply(variables, ids, attention_mask=mask, token_type_ids=types)
  assert logits is None and 'classifier' not in variables['params']
  np.testing.assert_allclose(out['pooled'], ref.pooler_output.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(out['encoded'], ref.last_hidden_state.numpy(), atol=TOL, rtol=0)


def test_new_head_is_zero_initialised_and_replaces_the_old_one(tmp_path):
  make_hf_bert(tmp_path, num_labels=3, **CONFIGS['relu'])
  module, variables = jaxtl.load_pretrained(tmp_path, num_classes=7)
  head = variables['params']['classifier']
  assert head['kernel'].shape == (48, 7) and head['bias'].shape == (7,)
  assert not np.any(head['kernel']) and not np.any(head['bias'])
  ids, mask, types = _inputs(CONFIGS['relu'])
  logits, _ = module.apply(variables, ids, attention_mask=mask, token_type_ids=types)
  np.testing.assert_array_equal(logits, np.zeros((3, 7)))


def test_dtype_casts_params(tmp_path):
  import jax.numpy as jnp
  make_hf_bert(tmp_path, num_labels=2)
  module, variables = jaxtl.load_pretrained(tmp_path, dtype=jnp.bfloat16)
  dtypes = {x.dtype for x in __import__('jax').tree_util.tree_leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.bfloat16)} and module.param_dtype == jnp.bfloat16


@pytest.mark.parametrize('remat', [False, True])
def test_scanned_layers_match_transformers_and_the_unrolled_gradients(tmp_path, remat):
  import jax
  config = CONFIGS['deep_narrow_odd']
  model = make_hf_bert(tmp_path, num_labels=4, **config)
  ids, mask, types = _inputs(config)
  with torch.no_grad():
    ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types), output_hidden_states=True)
  module, scanned = jaxtl.load_pretrained(tmp_path, overrides={'scan': True, 'remat': remat})
  # One stacked array per layer param, the layer axis first.
  assert list(scanned['params']['encoder']) == ['layers']
  assert scanned['params']['encoder']['layers']['intermediate']['kernel'].shape == (9, 36, 50)
  logits, out = jax.jit(module.apply)(scanned, ids, mask, types)
  np.testing.assert_allclose(logits, ref.logits.numpy(), atol=TOL, rtol=0)
  assert len(out['hidden_states']) == 10
  for i, (ours, theirs) in enumerate(zip(out['hidden_states'], ref.hidden_states)):
    np.testing.assert_allclose(ours, theirs.numpy(), atol=TOL, rtol=0, err_msg=f'hidden state {i}')

  # Training mode without dropout: the same gradients as the unrolled model, layer by layer.
  unrolled_module, unrolled = jaxtl.load_pretrained(tmp_path)
  labels = np.array([0, 3, 1])

  def grads(module, variables):
    def loss(params):
      logits, _ = module.apply({'params': params}, ids, mask, types, train=True)
      return -jnp.mean(jax.nn.log_softmax(logits)[np.arange(3), labels])
    return jax.jit(jax.grad(loss))(variables['params'])
  overrides = dict(hidden_dropout=0.0, attention_dropout=0.0)
  ours = grads(module.clone(**overrides), scanned)
  theirs = grads(unrolled_module.clone(**overrides), unrolled)
  for name, g in ours['encoder']['layers']['attention']['query'].items():
    for i in range(9):
      np.testing.assert_allclose(g[i], theirs['encoder'][f'layer_{i}']['attention']['query'][name],
                                 atol=1e-5, rtol=0, err_msg=f'layer {i} query {name}')
  np.testing.assert_allclose(ours['embeddings']['word_embeddings']['embedding'],
                             theirs['embeddings']['word_embeddings']['embedding'], atol=1e-5)


def test_last_layer_skips_the_rows_the_pooler_does_not_read():
  """Under 'cls' pooling the last layer computes [CLS]'s row apart from the others, so that a
  classifier's step skips the rest (conftest.check_unread_rows_are_skipped says how that is
  checked). Against transformers, logits and every row: test_sequence_classification_parity."""
  import jax
  module = jaxtl.models.create('bert-tiny', num_classes=2)
  ids = np.arange(32).reshape(2, 16) % 100
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  params = module.init(jax.random.key(0), ids)['params']
  check_unread_rows_are_skipped(lambda p: module.apply({'params': p}, ids, mask), params,
                                batch=2, length=16, width=module.hidden_size,
                                mlp_width=module.intermediate_size)


def test_scanned_layers_apply_dropout_in_training():
  import jax
  module = jaxtl.models.create('bert-tiny', num_classes=2, scan=True)
  ids = np.arange(16).reshape(2, 8) % 100
  variables = module.init(jax.random.key(0), ids)
  run = lambda key: module.apply(variables, ids, train=True, rngs={'dropout': jax.random.key(key)})
  (a, out_a), (b, _) = run(1), run(2)
  _, eval_out = module.apply(variables, ids)
  assert not np.allclose(out_a['encoded'], eval_out['encoded'])  # Dropout acted,
  assert not np.allclose(a, b)                                     # and follows its key.
  np.testing.assert_array_equal(run(1)[0], a)


def test_scanned_layers_freeze_together_or_say_why(tmp_path):
  from jaxtl import freeze
  from jaxtl.errors import SchemeError
  make_hf_bert(tmp_path, num_labels=2, num_hidden_layers=3)
  module, variables = jaxtl.load_pretrained(tmp_path, overrides={'scan': True})
  for scheme, want in (('full', 'trainable'), ('linear_probe', 'frozen'),
                       ('last_n_blocks:3', 'trainable'), ('last_n_blocks:0', 'frozen')):
    labels = freeze.flatten(freeze.label_params(variables['params'], scheme, module))
    assert labels['encoder/layers/output/kernel'] == want, scheme
  with pytest.raises(SchemeError, match=r"scanned BERT \(scan=True\) stores its 3 blocks as one "
                                        r"stacked array .*scan': False"):
    freeze.label_params(variables['params'], 'last_n_blocks:1', module)


def test_scanned_load_names_a_missing_layer_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file
  from jaxtl.errors import WeightsError
  make_hf_bert(tmp_path, num_labels=2, num_hidden_layers=3)
  tensors = load_file(tmp_path / 'model.safetensors')
  del tensors['bert.encoder.layer.1.output.dense.weight']
  save_file(tensors, tmp_path / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(WeightsError, match=r"model.safetensors: layer\(s\) \[1\] lack output/kernel "
                                         r'\(layer 0 has it: bert.encoder.layer.0.output.dense.weight\)'):
    jaxtl.load_pretrained(tmp_path, overrides={'scan': True})


def test_lora_adapts_scanned_layers():
  """LoRA's default targets (query, value) in a scanned BERT: adapters stacked like the kernels,
  and (lora_b at zero) the adapted model computes what the base model does."""
  import jax
  from jaxtl import freeze, lora
  module = jaxtl.models.create('bert-tiny', num_classes=2, scan=True)
  ids = np.arange(16).reshape(2, 8) % 100
  variables = module.init(jax.random.key(0), ids)
  wrapped, adapted = lora.add_adapters(module, variables, rank=4)
  shapes = {p: a.shape for p, a in freeze.flatten(adapted['params']).items() if 'lora' in p}
  assert shapes == {'encoder/layers/attention/query/lora_a': (2, 32, 4),
                    'encoder/layers/attention/query/lora_b': (2, 4, 32),
                    'encoder/layers/attention/value/lora_a': (2, 32, 4),
                    'encoder/layers/attention/value/lora_b': (2, 4, 32)}
  np.testing.assert_allclose(wrapped.apply(adapted, ids)[0], module.apply(variables, ids)[0],
                             atol=1e-6)
