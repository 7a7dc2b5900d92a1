"""Training CNNs on image data: BatchNorm semantics under freezing (Keras': a frozen BN runs on
its running statistics and never updates them; config.bn_mode switches it), and the two-phase
configs/resnet50_transfer.py end to end on a tiny local image folder and a tiny random HF ResNet."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from conftest import load_config
from jaxtl import train as train_lib
from jaxtl.errors import ConfigError
from jaxtl.weights.strict import flatten


def make_image_folder(root, classes=('cat', 'dog', 'fish'), per_class=8, size=24, seed=0):
  """root/<class>/*.png|jpg: each class a distinct colour, plus noise (learnable in a few steps)."""
  rng = np.random.default_rng(seed)
  for i, name in enumerate(classes):
    (root / name).mkdir(parents=True)
    for j in range(per_class):
      base = np.zeros((size, size, 3)) + 255 * (np.arange(3) == i)
      pixels = np.clip(base * 0.7 + rng.normal(0, 30, base.shape) + 40, 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(root / name / f'{j}.{"png" if j % 2 else "jpg"}')
  return root


def make_tiny_resnet(directory, seed=0):
  torch.manual_seed(seed)
  config = transformers.ResNetConfig(embedding_size=8, layer_type='basic', depths=[1, 1, 1, 1],
                                     hidden_sizes=[8, 16, 16, 16], num_labels=10)
  transformers.ResNetForImageClassification(config).eval().save_pretrained(directory)
  return directory




@pytest.fixture(scope='module')
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp('assets')
  return make_image_folder(root / 'images'), make_tiny_resnet(root / 'resnet')


def _config(assets, scheme, bn_mode='follow_freeze', epochs=1):
  folder, resnet = assets
  config = load_config('resnet50_transfer')
  config.model.source = str(resnet)
  config.data.update(kind='image_folder', name='', path=str(folder), image_size=32,
                     test_fraction=0.25)
  config.phases = [dict(freeze=dict(scheme=scheme), num_epochs=epochs, bn_mode=bn_mode,
                        optim=dict(name='sgd', lr=0.05, momentum=0.9, schedule='constant'))]
  config.batch_size = 8
  config.checkpoint_every_steps = 1000
  return config


def _stats_after(config, workdir):
  module, variables = train_lib.create_model(config, 3)
  before = flatten(variables['batch_stats'])
  train_lib.train_and_evaluate(config, workdir)
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(workdir / 'checkpoints')
  after = flatten(mngr.restore(mngr.latest_step())['model_state']['batch_stats'])
  changed = [p for p in before if not np.array_equal(np.asarray(before[p]), np.asarray(after[p]))]
  return changed, len(before)


@pytest.mark.parametrize('scheme,bn_mode,expect', [
    ('linear_probe', 'follow_freeze', 'none'),   # Frozen base: its BN keeps its statistics.
    ('full', 'follow_freeze', 'all'),            # Everything trains: every BN updates.
    ('last_n_blocks:1', 'follow_freeze', 'top'),  # Only the top block's BNs update.
    ('full', 'eval', 'none'),                    # bn_mode overrides: never update...
    ('linear_probe', 'train', 'all'),            # ... or always (PyTorch's model.train()).
])
def test_batchnorm_follows_the_freeze(assets, tmp_path, scheme, bn_mode, expect):
  changed, total = _stats_after(_config(assets, scheme, bn_mode), tmp_path / 'run')
  if expect == 'none':
    assert changed == []
  elif expect == 'all':
    assert len(changed) == total
  else:
    assert changed and all(p.startswith('block_3/') for p in changed), changed


def test_frozen_batchnorm_paths_and_bad_mode():
  stats = {'batch_stats': {'bn1': {'mean': 0, 'var': 0}, 'block_0': {'bn1': {'mean': 0, 'var': 0}}}}
  labels = {'bn1': {'scale': 'frozen', 'bias': 'frozen'},
            'block_0': {'bn1': {'scale': 'trainable', 'bias': 'trainable'}}}
  assert train_lib.frozen_batchnorms(stats, labels) == {'bn1'}
  assert train_lib.frozen_batchnorms(stats, labels, 'eval') == {'bn1', 'block_0/bn1'}
  assert train_lib.frozen_batchnorms({}, {}) == frozenset()  # BERT: no batch_stats at all.
  with pytest.raises(ConfigError, match="config.bn_mode 'frozen' is not one of follow_freeze"):
    train_lib.frozen_batchnorms(stats, labels, 'frozen')


def test_two_phase_config_end_to_end(assets, tmp_path):
  """configs/resnet50_transfer.py as it is, on tiny data: phase 1 trains only the head (Adam),
  phase 2 the top blocks too (SGD); phase 1's frozen base is untouched."""
  folder, resnet = assets
  config = load_config('resnet50_transfer')
  config.model.source = str(resnet)
  config.data.update(kind='image_folder', name='', path=str(folder), image_size=32,
                     test_fraction=0.25)
  phases = [dict(p) for p in config.phases]
  assert phases[0]['freeze']['scheme'] == 'linear_probe' and phases[0]['optim']['name'] == 'adamw'
  assert phases[1]['optim'] == dict(name='sgd', lr=1e-4, momentum=0.9, schedule='constant')
  for p in phases:
    p['num_epochs'] = 2
  phases[0]['optim'] = dict(phases[0]['optim'], lr=0.05)
  config.phases = phases
  config.batch_size = 8
  result = train_lib.train_and_evaluate(config, tmp_path / 'run')
  assert result['phase'] == 2 and result["step"] == 4 * (18 // 8)
  assert result['test_acc'] >= 2 / 3, result  # Three colour classes; chance is 1/3.
  import json
  lines = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [l['epoch'] for l in lines if l['split'] == 'test'] == [1, 2, 3, 4]
