"""The model registry: named variants have the same parameter counts as transformers' models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxtl import models
from jaxtl.errors import ConfigError

VARIANTS = {
    'bert-base': dict(),
    'bert-large': dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096),
    'minilm-l6': dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536),
    'minilm-l12': dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=1536),
}


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_variant_param_counts_match_transformers(name):
  module = models.create(name, num_classes=3)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  with torch.device('meta'):  # Shapes only: no memory for bert-large.
    ref = transformers.BertForSequenceClassification(
        transformers.BertConfig(num_labels=3, **VARIANTS[name]))
  assert ours == sum(p.numel() for p in ref.parameters())
  assert module.num_blocks == ref.config.num_hidden_layers


def test_overrides_and_unknown_names():
  module = models.create('minilm-l6', num_classes=2, hidden_dropout=0.0, dtype=jnp.bfloat16)
  assert module.hidden_dropout == 0.0 and module.dtype == jnp.bfloat16
  with pytest.raises(ConfigError, match="unknown model 'bert-huge'; known models: bert-base"):
    models.create('bert-huge')


def test_block_structure():
  module = models.create('bert-tiny', num_classes=2)
  assert module.param_group('embeddings/LayerNorm/scale') == ('stem', None)
  assert module.param_group('encoder/layer_1/attention/query/kernel') == ('block', 1)
  assert module.param_group('pooler/kernel') == ('neck', None)
  assert module.param_group('classifier/bias') == ('head', None)


def test_bf16_compute_keeps_fp32_params_and_logits():
  module = models.create('bert-tiny', num_classes=2, dtype=jnp.bfloat16)
  ids = jnp.ones((2, 8), jnp.int32)
  variables = module.init(jax.random.key(0), ids)
  assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits, out = module.apply(variables, ids)
  assert logits.dtype == jnp.float32 and out['encoded'].dtype == jnp.bfloat16
