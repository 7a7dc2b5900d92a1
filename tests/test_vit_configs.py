"""configs/vit_tiny_smoke.py (offline, Debian's Fashion-MNIST) and configs/vit_b16_transfer.py
(the ViT paper's recipe: weights swapped for a tiny random HF ViT saved at 224, data for
tfds.testing.mock_data) run through train_and_evaluate as they are, only smaller."""
import importlib.util

import numpy as np

from conftest import ROOT
from jaxtl import train as train_lib
from vit_checkpoints import make_hf_vit


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_tiny_smoke_config_trains_offline(tmp_path):
  config = load_config('vit_tiny_smoke')
  config.data.max_train_examples, config.data.max_test_examples = 256, 64
  config.num_epochs = 1
  result = train_lib.train_and_evaluate(config, tmp_path / 'run')
  assert result['step'] == 256 // 32
  assert np.isfinite(result['train_loss']) and result['test_acc'] > 0.1  # Chance is 0.1.


def test_b16_transfer_recipe_builds_and_trains_at_384(tmp_path):
  import tensorflow_datasets as tfds
  config = load_config('vit_b16_transfer')
  # An in21k-like headless ViTModel (tanh pooler = pre-logits) at 224, tiny.
  make_hf_vit(tmp_path / 'vit224', image_size=224, patch_size=16, hidden_size=32,
              num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
  config.model.source = str(tmp_path / 'vit224')
  assert config.optim.to_dict() == dict(name='sgd', lr=0.03, momentum=0.9, nesterov=False,
                                        weight_decay=0.0, schedule='cosine', warmup_steps=500,
                                        clip_norm=1.0, mu_dtype='')

  module, variables = train_lib.create_model(config, 10)
  params = variables['params']
  assert module.image_size == 384 and module.scan and module.remat
  assert params['pos_embedding'].shape == (1, 1 + 24 * 24, 32)
  assert 'pre_logits' not in params and not np.any(params['head']['kernel'])
  assert params['encoder']['layers']['norm1']['scale'].shape == (2, 32)

  config.batch_size = 8
  config.num_epochs = 1
  with tfds.testing.mock_data(num_examples=16):
    result = train_lib.train_and_evaluate(config, tmp_path / 'run')
  assert result['step'] == 2 and np.isfinite(result['train_loss'])
