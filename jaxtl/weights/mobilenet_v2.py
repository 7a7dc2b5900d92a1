"""torchvision MobileNetV2 state dicts -> jaxtl.models.mobilenet_v2 variables.

torchvision's keys: features.0.{0,1} (stem conv, BN); features.{i}.conv.* for the 17 inverted
residual blocks (block 0, without expansion: conv.0.{0,1} depthwise, conv.1 project, conv.2 BN;
the others: conv.0.{0,1} expand, conv.1.{0,1} depthwise, conv.2 project, conv.3 BN);
features.18.{0,1} (1x1 conv to 1280, BN); classifier.1 (after dropout).
"""
from jaxtl.errors import WeightsError
from jaxtl.models import mobilenet_v2
from jaxtl.weights import cnn

NAME = 'mobilenet_v2'
HEAD = r'classifier/.*'
DEFAULT_DROP = (r'.*num_batches_tracked',)


def matches(checkpoint) -> bool:
  return ('features.0.0.weight' in checkpoint.tensors
          and 'features.1.conv.0.0.weight' in checkpoint.tensors)


def own_num_classes(checkpoint):
  weight = checkpoint.tensors.get('classifier.1.weight')
  return None if weight is None else weight.shape[0]


def build(checkpoint, num_classes, arch=None):
  if not matches(checkpoint):
    raise WeightsError(f'{checkpoint.path}: arch {arch!r} given, but the file holds no '
                       'torchvision MobileNetV2 keys (features.0.0.weight, '
                       f'features.1.conv.0.0.weight); its keys: {cnn.first_keys(checkpoint)}, ...')
  stem = checkpoint.tensors['features.0.0.weight'].shape[0]
  width_mult = stem / 32
  module = mobilenet_v2.MobileNetV2(width_mult=width_mult, num_classes=num_classes)
  blocks = 1 + max(int(k.split('.')[1]) for k in checkpoint.tensors if k.startswith('features.'))
  if blocks != module.num_blocks + 2:
    raise WeightsError(f'{checkpoint.path}: {blocks} feature layers; torchvision MobileNetV2 has '
                       f'{module.num_blocks + 2} (stem, 17 blocks, head conv)')
  return module


def convert(checkpoint, module):
  names = cnn.Renames()
  names.torch_conv('features.0.0', 'stem_conv')
  names.torch_bn('features.0.1', 'stem_bn')
  for i, (_, _, expansion) in enumerate(module._blocks()):
    src, dst = f'features.{i + 1}.conv', f'block_{i}'
    parts = ['dw', 'project'] if expansion == 1 else ['expand', 'dw', 'project']
    # Each conv-BN-ReLU6 is a Sequential (conv.j.0, conv.j.1); the last conv and BN are flat.
    for j, part in enumerate(parts[:-1]):
      names.torch_conv(f'{src}.{j}.0', f'{dst}/{part}_conv')
      names.torch_bn(f'{src}.{j}.1', f'{dst}/{part}_bn')
    names.torch_conv(f'{src}.{len(parts) - 1}', f'{dst}/project_conv')
    names.torch_bn(f'{src}.{len(parts)}', f'{dst}/project_bn')
  last = module.num_blocks + 1
  names.torch_conv(f'features.{last}.0', 'head_conv')
  names.torch_bn(f'features.{last}.1', 'head_bn')
  names.torch_linear('classifier.1', 'classifier')
  return names.apply(checkpoint.tensors)


def pretrained_cfg(checkpoint):
  return dict(cnn.TORCHVISION_CFG)
