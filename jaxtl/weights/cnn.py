"""Shared pieces of the CNN converters: preprocessing configs, and a rename table from a
checkpoint's layer names to Flax variable paths with the layout change each tensor needs.

PyTorch convs are (out, in, kh, kw) and Flax's (kh, kw, in, out); a depthwise conv (C, 1, kh, kw)
becomes (kh, kw, 1, C) by the same transpose. A Linear is (out, in), a Dense kernel (in, out).
BatchNorm's weight/bias are params (scale/bias); its running mean/var go to 'batch_stats'.
"""
import numpy as np

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# torchvision's ImageNet eval transform: resize 256, centre crop 224, bilinear.
TORCHVISION_CFG = dict(input_size=224, crop_fraction=0.875, interpolation='bilinear',
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, channel_order='RGB')
# Keras applications' 'caffe' preprocessing (ResNet50, VGG16/19): BGR, minus the ImageNet mean in
# 0..255, no scaling; written on the [0, 1] scale the pipeline uses (mean / 255, std 1 / 255).
CAFFE_CFG = dict(input_size=224, crop_fraction=0.875, interpolation='bilinear',
                 mean=(103.939 / 255, 116.779 / 255, 123.68 / 255), std=(1 / 255,) * 3,
                 channel_order='BGR')

TORCH_CONV = lambda w: np.transpose(w, (2, 3, 1, 0))
TRANSPOSE = lambda w: np.transpose(w)
SAME = lambda w: w


class Renames:
  """{source key: (variable path, layout transform)}, filled layer by layer."""

  def __init__(self):
    self.table = {}

  def add(self, key, path, transform=SAME):
    self.table[key] = (path, transform)

  def torch_conv(self, src, dst, bias=False):
    self.add(f'{src}.weight', f'params/{dst}/kernel', TORCH_CONV)
    if bias:
      self.add(f'{src}.bias', f'params/{dst}/bias')

  def torch_linear(self, src, dst, transform=TRANSPOSE):
    self.add(f'{src}.weight', f'params/{dst}/kernel', transform)
    self.add(f'{src}.bias', f'params/{dst}/bias')

  def torch_bn(self, src, dst):
    self.add(f'{src}.weight', f'params/{dst}/scale')
    self.add(f'{src}.bias', f'params/{dst}/bias')
    self.add(f'{src}.running_mean', f'batch_stats/{dst}/mean')
    self.add(f'{src}.running_var', f'batch_stats/{dst}/var')

  def apply(self, tensors):
    """(converted, unmapped) as the converter protocol returns them."""
    converted, unmapped = {}, []
    for key, array in tensors.items():
      if key in self.table:
        path, transform = self.table[key]
        converted[path] = (key, transform(np.asarray(array)))
      else:
        unmapped.append((key, array))
    return converted, unmapped


def first_keys(checkpoint, n=5):
  return ', '.join(list(checkpoint.tensors)[:n])
