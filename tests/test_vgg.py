"""VGG in torchvision's layout: parity (logits and every block's features, within 1e-4) against a
PyTorch VGG built with torchvision's exact module layout (torch_cnns.py; torchvision itself does
not install beside torch 2.13), with and without BN, at sizes where the adaptive 7x7 pool repeats
(32 px: 1x1 -> 7x7) and averages overlapping cells (64 px: 2x2 -> 7x7); fc1's NCHW flatten order
is permuted at load time. Param counts of all variants; conv-block freezing."""
import jax
import numpy as np
import pytest
import torch

import torch_cnns
from jaxtl import freeze, load_pretrained, models
from jaxtl.errors import WeightsError

TOL = 1e-4


@pytest.mark.parametrize('depth,batch_norm,size', [(11, False, 32), (11, True, 64),
                                                   (13, True, 32)])
def test_torchvision_vgg_parity(depth, batch_norm, size, tmp_path):
  torch.manual_seed(depth)
  # A narrow classifier (fc_width 64) keeps the file small; the converter reads it from the keys.
  ref = torch_cnns.VGG(depth, batch_norm, num_classes=10, fc_width=64)
  ref = torch_cnns.randomize_bn(ref).eval()
  path = tmp_path / 'vgg.pth'
  torch.save(ref.state_dict(), path)
  module, variables = load_pretrained(path, verbose=False)
  assert (module.batch_norm, module.fc_width, module.num_blocks) == (batch_norm, 64, 5)
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  logits, out = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  with torch.no_grad():
    ref_logits, ref_stages = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  diffs = [np.abs(np.asarray(logits) - ref_logits.numpy()).max()]
  diffs += [np.abs(np.asarray(o) - r.numpy().transpose(0, 2, 3, 1)).max()
            for o, r in zip(out['stages'], ref_stages)]
  assert max(diffs) < TOL, diffs


@pytest.mark.parametrize('depth', [11, 13, 16, 19])
@pytest.mark.parametrize('batch_norm', [False, True])
def test_param_counts_match_torchvision_layout(depth, batch_norm):
  module = models.create(f'vgg{depth}{"_bn" if batch_norm else ""}', num_classes=1000)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())
  with torch.device('meta'):
    ref = torch_cnns.VGG(depth, batch_norm)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  assert count(shapes['params']) == sum(p.numel() for p in ref.parameters())


def test_freezing_by_conv_block_and_arch_check(tmp_path):
  module = models.create('vgg16', num_classes=3)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())
  labels = freeze.flatten(freeze.label_params(shapes['params'], 'last_n_blocks:1', module))
  assert labels['block4_conv3/kernel'] == 'frozen'
  assert labels['block5_conv1/kernel'] == labels['fc1/kernel'] == 'trainable'
  assert labels['head/kernel'] == 'head'
  path = tmp_path / 'vgg11.pth'
  torch.save(torch_cnns.VGG(11, fc_width=8).state_dict(), path)
  with pytest.raises(WeightsError, match=r"vgg11.pth: arch 'vgg16' given, but the checkpoint "
                                         r"holds vgg11"):
    load_pretrained(path, arch='vgg16', verbose=False)
