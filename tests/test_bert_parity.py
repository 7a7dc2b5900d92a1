"""Flax BERT against transformers' PyTorch BERT: logits, pooled output and every layer's hidden
states within 1e-4, through every checkpoint format load_pretrained reads."""
import os

import numpy as np
import pytest
import torch

import jaxtl
from conftest import make_hf_bert

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
