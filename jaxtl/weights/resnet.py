"""ResNet checkpoints -> jaxtl.models.resnet variables.

Two layouts:
  - torchvision / timm state dicts (.pth, .bin, .safetensors): conv1, bn1, layer{s}.{b}.conv{k},
    layer{s}.{b}.bn{k}, layer{s}.{b}.downsample.{0,1}, fc. timm's plain ResNets (resnet18 ...
    resnet152, e.g. resnet50.a1_in1k) use the same names. The depth is read from the keys, so
    arch= is optional; when given it must agree with them. Both get torchvision's preprocessing
    (resize 256, crop 224, bilinear); timm's a1/a2/a3 weights were evaluated with crop 0.95,
    bicubic: set config.data.crop_fraction / interpolation for them.
  - Hugging Face directories (microsoft/resnet-50: ResNetForImageClassification or ResNetModel):
    [resnet.]embedder.embedder.{convolution,normalization}, [resnet.]encoder.stages.{s}.layers.{b}
    .{layer.{k},shortcut}.{convolution,normalization}, classifier.1; config.json gives the shape.
"""
import json
import re

from jaxtl.errors import WeightsError
from jaxtl.models import resnet
from jaxtl.weights import cnn

NAME = 'resnet'
ARCHS = tuple(f'resnet{d}' for d in resnet.DEPTHS)
HEAD = r'fc/.*'
DEFAULT_DROP = (r'.*num_batches_tracked',)


def _is_hf(checkpoint):
  return (checkpoint.config or {}).get('model_type') == 'resnet'


def matches(checkpoint) -> bool:
  return _is_hf(checkpoint) or ('conv1.weight' in checkpoint.tensors
                                and 'layer1.0.conv1.weight' in checkpoint.tensors)


def _hf_prefix(checkpoint):
  return 'resnet.' if any(k.startswith('resnet.') for k in checkpoint.tensors) else ''


def own_num_classes(checkpoint):
  key = 'classifier.1.weight' if _is_hf(checkpoint) else 'fc.weight'
  weight = checkpoint.tensors.get(key)
  return None if weight is None else weight.shape[0]


def _torch_structure(checkpoint):
  """(stage sizes, bottleneck, widths, stem width) read from torchvision-style keys."""
  t = checkpoint.tensors
  sizes = []
  for s in range(1, 5):
    blocks = {int(m.group(1)) for k in t if (m := re.match(rf'layer{s}\.(\d+)\.', k))}
    if not blocks:
      raise WeightsError(f'{checkpoint.path}: ResNet keys without layer{s}.* (keys: '
                         f'{cnn.first_keys(checkpoint)}, ...)')
    sizes.append(max(blocks) + 1)
  bottleneck = 'layer1.0.conv3.weight' in t
  last = 'conv3' if bottleneck else 'conv2'
  widths = tuple(int(t[f'layer{s}.0.{last}.weight'].shape[0]) for s in range(1, 5))
  return tuple(sizes), bottleneck, widths, int(t['conv1.weight'].shape[0])


def _depth_name(sizes, bottleneck):
  for depth, (d_sizes, d_bottleneck) in resnet.DEPTHS.items():
    if tuple(d_sizes) == tuple(sizes) and d_bottleneck == bottleneck:
      return f'resnet{depth}'
  return f'a ResNet with stage sizes {sizes} ({"bottleneck" if bottleneck else "basic"} blocks)'


def build(checkpoint, num_classes, arch=None):
  if _is_hf(checkpoint):
    return _build_hf(checkpoint, num_classes)
  if not matches(checkpoint):
    raise WeightsError(f'{checkpoint.path}: arch {arch!r} given, but the file holds no ResNet '
                       f'keys (conv1.weight, layer1.0.conv1.weight); its keys: '
                       f'{cnn.first_keys(checkpoint)}, ...')
  sizes, bottleneck, widths, stem = _torch_structure(checkpoint)
  found = _depth_name(sizes, bottleneck)
  if arch not in (None, NAME) and arch != found:
    raise WeightsError(f'{checkpoint.path}: arch {arch!r} given, but the checkpoint holds {found}')
  return resnet.ResNet(stage_sizes=sizes, bottleneck=bottleneck, widths=widths, stem_width=stem,
                       num_classes=num_classes)


def _build_hf(checkpoint, num_classes):
  cfg = checkpoint.config
  if cfg.get('downsample_in_first_stage'):
    raise WeightsError(f'{checkpoint.directory}/config.json: downsample_in_first_stage = true is '
                       'not supported')
  if cfg.get('hidden_act', 'relu') != 'relu':
    raise WeightsError(f'{checkpoint.directory}/config.json: hidden_act '
                       f'{cfg.get("hidden_act")!r} is not supported (relu only)')
  layer_type = cfg.get('layer_type', 'bottleneck')
  if layer_type not in ('basic', 'bottleneck'):
    raise WeightsError(f'{checkpoint.directory}/config.json: layer_type {layer_type!r} is not '
                       'basic or bottleneck')
  return resnet.ResNet(
      stage_sizes=tuple(cfg.get('depths', (3, 4, 6, 3))), bottleneck=layer_type == 'bottleneck',
      widths=tuple(cfg.get('hidden_sizes', (256, 512, 1024, 2048))),
      stem_width=cfg.get('embedding_size', 64),
      stride_in_1x1=bool(cfg.get('downsample_in_bottleneck', False)), num_classes=num_classes)


def convert(checkpoint, module):
  names = cnn.Renames()
  index = 0
  hf = _is_hf(checkpoint)
  p = _hf_prefix(checkpoint) if hf else ''
  if hf:
    names.torch_conv(f'{p}embedder.embedder.convolution', 'conv1')
    names.torch_bn(f'{p}embedder.embedder.normalization', 'bn1')
    names.torch_linear('classifier.1', 'fc')
  else:
    names.torch_conv('conv1', 'conv1')
    names.torch_bn('bn1', 'bn1')
    names.torch_linear('fc', 'fc')
  for s, size in enumerate(module.stage_sizes):
    for b in range(size):
      dst = f'block_{index}'
      if hf:
        src = f'{p}encoder.stages.{s}.layers.{b}'
        for k in range(3):
          names.torch_conv(f'{src}.layer.{k}.convolution', f'{dst}/conv{k + 1}')
          names.torch_bn(f'{src}.layer.{k}.normalization', f'{dst}/bn{k + 1}')
        names.torch_conv(f'{src}.shortcut.convolution', f'{dst}/downsample_conv')
        names.torch_bn(f'{src}.shortcut.normalization', f'{dst}/downsample_bn')
      else:
        src = f'layer{s + 1}.{b}'
        for k in range(1, 4):
          names.torch_conv(f'{src}.conv{k}', f'{dst}/conv{k}')
          names.torch_bn(f'{src}.bn{k}', f'{dst}/bn{k}')
        names.torch_conv(f'{src}.downsample.0', f'{dst}/downsample_conv')
        names.torch_bn(f'{src}.downsample.1', f'{dst}/downsample_bn')
      index += 1
  return names.apply(checkpoint.tensors)


def pretrained_cfg(checkpoint):
  if not _is_hf(checkpoint):
    return dict(cnn.TORCHVISION_CFG)
  # Hugging Face image processors: shortest_edge / crop_pct, resample 2 = bilinear, 3 = bicubic.
  cfg = dict(cnn.TORCHVISION_CFG, interpolation='bicubic')
  path = checkpoint.directory / 'preprocessor_config.json'
  if path.is_file():
    try:
      pre = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise WeightsError(f'{path}: not valid JSON ({e})') from None
    size = pre.get('size', {})
    cfg.update(input_size=size.get('shortest_edge', 224) if isinstance(size, dict) else size,
               crop_fraction=pre.get('crop_pct') or cfg['crop_fraction'],
               mean=tuple(pre.get('image_mean', cfg['mean'])),
               std=tuple(pre.get('image_std', cfg['std'])),
               interpolation={2: 'bilinear', 3: 'bicubic'}.get(pre.get('resample'), 'bicubic'))
  return cfg
