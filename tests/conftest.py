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
