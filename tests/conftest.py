"""Shared fixtures. Eight simulated CPU devices, so every train loop in the suite runs on a mesh."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # Tests never reach a hub.
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_config(name, **overrides):
  """configs/<name>.py's get_config(), with top-level fields replaced."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update(overrides)
  return config


def make_hf_bert(directory, *, num_labels=None, seed=0, **config):
  """A randomly initialised transformers BERT saved with save_pretrained (safetensors).

  Returns the torch model (eval mode) for reference outputs."""
  import torch
  import transformers
  defaults = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=64)
  defaults.update(config)
  torch.manual_seed(seed)
  if num_labels:
    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(num_labels=num_labels, **defaults))
  else:
    model = transformers.BertModel(transformers.BertConfig(**defaults))
  model.eval()
  model.save_pretrained(directory)
  return model


@pytest.fixture
def tiny_bert_dir(tmp_path):
  directory = tmp_path / 'tiny_bert'
  model = make_hf_bert(directory, num_labels=3)
  return directory, model


def check_unread_rows_are_skipped(apply, params, batch, length, width, mlp_width):
  """`apply(params) -> (logits, out)` of a transformer whose last block computes the head's row
  (the class token) apart from the others: reading only the logits (a classifier's step) must
  leave XLA to drop the others' query, attention, output projection and MLP, forward and
  backward. From XLA's cost analysis: reading out['encoded'] too adds at least those matmuls'
  FLOPs (R), and 3 R in the gradient (each matmul's input and weight gradients); the logits are
  the same either way."""
  import jax
  import numpy as np
  logits_only = lambda p: apply(p)[0]
  with_tokens = lambda p: (lambda out: (out[0], out[1]['encoded']))(apply(p))

  def flops(fn):
    cost = jax.jit(fn).lower(params).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops']

  # Per unread row: query (d x d), scores and context (t x d each), output (d x d), MLP (2 d x m).
  d, t, m = width, length, mlp_width
  r = batch * (t - 1) * 2 * (d * d + 2 * t * d + d * d + 2 * d * m)
  assert flops(with_tokens) - flops(logits_only) >= r
  assert (flops(jax.grad(lambda p: with_tokens(p)[0].sum() + with_tokens(p)[1].sum()))
          - flops(jax.grad(lambda p: logits_only(p).sum()))) >= 3 * r
  np.testing.assert_allclose(jax.jit(logits_only)(params), jax.jit(with_tokens)(params)[0],
                             atol=1e-6, rtol=0)
