"""torchvision VGG state dicts (vgg11 ... vgg19, with or without BN) -> jaxtl.models.vgg.

torchvision's keys: features.{i} (convs, and BNs right after them, numbered through a Sequential
that also holds the ReLUs and max pools), classifier.{0,3,6} (fc1, fc2, head). The depth and BN
are read from the keys. fc1's input rows are in NCHW flatten order (c, h, w); the model flattens
NHWC (h, w, c), so they are permuted here, once.
"""
import re

import numpy as np

from jaxtl.errors import WeightsError
from jaxtl.models import vgg
from jaxtl.weights import cnn

NAME = 'vgg'
ARCHS = tuple(f'vgg{d}{bn}' for d in vgg.CONFIGS for bn in ('', '_bn'))
HEAD = r'head/.*'
DEFAULT_DROP = (r'.*num_batches_tracked',)


def _conv_indices(checkpoint):
  return sorted(int(m.group(1)) for k, v in checkpoint.tensors.items()
                if (m := re.fullmatch(r'features\.(\d+)\.weight', k)) and np.ndim(v) == 4)


def matches(checkpoint) -> bool:
  t = checkpoint.tensors
  return 'features.0.weight' in t and np.ndim(t['features.0.weight']) == 4 and (
      'classifier.0.weight' in t or not any(k.startswith('classifier.') for k in t))


def own_num_classes(checkpoint):
  weight = checkpoint.tensors.get('classifier.6.weight')
  return None if weight is None else weight.shape[0]


def build(checkpoint, num_classes, arch=None):
  if not matches(checkpoint):
    raise WeightsError(f'{checkpoint.path}: arch {arch!r} given, but the file holds no '
                       f'torchvision VGG keys (features.0.weight, classifier.0.weight); its keys: '
                       f'{cnn.first_keys(checkpoint)}, ...')
  convs = len(_conv_indices(checkpoint))
  depths = {sum(sizes): depth for depth, sizes in vgg.CONFIGS.items()}
  if convs not in depths:
    raise WeightsError(f'{checkpoint.path}: {convs} convs; torchvision VGGs have '
                       f'{sorted(depths)}')
  batch_norm = 'features.1.running_mean' in checkpoint.tensors
  found = f'vgg{depths[convs]}{"_bn" if batch_norm else ""}'
  if arch not in (None, NAME) and arch != found:
    raise WeightsError(f'{checkpoint.path}: arch {arch!r} given, but the checkpoint holds {found}')
  fc = checkpoint.tensors.get('classifier.0.weight')
  return vgg.VGG(block_sizes=vgg.CONFIGS[depths[convs]], batch_norm=batch_norm,
                 fc_layers=fc is not None, fc_width=4096 if fc is None else fc.shape[0],
                 num_classes=num_classes)


def _nchw_to_nhwc_rows(weight, channels=512, size=7):
  """A torch Linear weight (out, C*H*W) in (c, h, w) order -> Dense kernel (H*W*C, out)."""
  out = weight.shape[0]
  return weight.reshape(out, channels, size, size).transpose(0, 2, 3, 1).reshape(out, -1).T


def convert(checkpoint, module):
  names = cnn.Renames()
  index = 0
  for b, size in enumerate(module.block_sizes, start=1):
    for c in range(1, size + 1):
      names.torch_conv(f'features.{index}', f'block{b}_conv{c}', bias=True)
      if module.batch_norm:
        names.torch_bn(f'features.{index + 1}', f'block{b}_bn{c}')
      index += 3 if module.batch_norm else 2  # conv, [BN], ReLU.
    index += 1  # Max pool.
  names.torch_linear('classifier.0', 'fc1', _nchw_to_nhwc_rows)
  names.torch_linear('classifier.3', 'fc2')
  names.torch_linear('classifier.6', 'head')
  return names.apply(checkpoint.tensors)


def pretrained_cfg(checkpoint):
  return dict(cnn.TORCHVISION_CFG)
