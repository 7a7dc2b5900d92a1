"""MobileNetV2 (Sandler et al., 2018) as a Flax Linen module, laid out as torchvision's.

stem (3x3/2 conv, BN, ReLU6) -> 17 inverted-residual blocks (1x1 expand, 3x3 depthwise, 1x1
linear projection; a residual when shape allows) -> 1x1 conv to 1280, BN, ReLU6 -> global average
pool -> dropout -> fc. Convs pad explicitly as PyTorch does (k // 2 each side), never 'SAME'.
They are jaxtl.ops.Conv (nn.Conv's params): 1x1 convs as matmuls, depthwise convs as sums of
shifted views; a training step on XLA:CPU is 6.7x faster than with nn.Conv (python -m
benchmarks.conv_ab, 96 px, batch 64; benchmarks/README.md).

Param names:
  stem_conv, stem_bn                                  torchvision features.0
  block_{i}/{expand,dw,project}_{conv,bn}             features.{i + 1} (block_0 has no expand)
  head_conv, head_bn                                  features.18 (the neck, for freezing)
  classifier                                          classifier.1
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxtl import ops

# (expansion t, output channels c, repeats n, first stride s), as in the paper and torchvision.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))

_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def make_divisible(value, divisor=8):
  """torchvision's _make_divisible: round to a multiple of divisor, never below 90 % of value."""
  new = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * value else new


def _conv_bn(parent_kw, x, features, name, train, *, kernel=1, stride=1, groups=1, relu=True,
             momentum=0.9, eps=1e-5):
  """conv -> BN -> optional ReLU6, as params `<name>_conv`, `<name>_bn` of the calling module."""
  pad = kernel // 2
  x = ops.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
               feature_group_count=groups, use_bias=False, kernel_init=_conv_init,
               name=f'{name}_conv', **parent_kw)(x)
  x = nn.BatchNorm(momentum=momentum, epsilon=eps, name=f'{name}_bn', **parent_kw)(
      x, use_running_average=not train)
  return jnp.clip(x, 0.0, 6.0) if relu else x  # ReLU6.


class InvertedResidual(nn.Module):
  features: int
  stride: int
  expansion: int
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv_bn = functools.partial(_conv_bn, kw, train=train, momentum=self.bn_momentum,
                                eps=self.bn_eps)
    hidden = x.shape[-1] * self.expansion
    y = conv_bn(x, hidden, 'expand') if self.expansion != 1 else x
    y = conv_bn(y, hidden, 'dw', kernel=3, stride=self.stride, groups=hidden)
    y = conv_bn(y, self.features, 'project', relu=False)
    return x + y if self.stride == 1 and x.shape[-1] == self.features else y


class MobileNetV2(nn.Module):
  """`__call__(images, train=False)` -> `(logits, out)`; images NHWC float32, normalised with
  ImageNet mean/std. out: 'stages' (the last block at each stride 2, 4, 8, 16, 32), 'features'
  (after the 1280-channel head conv), 'pre_logits' (its global average). logits is None when
  num_classes is None."""
  width_mult: float = 1.0
  last_channels: int = 1280
  dropout_rate: float = 0.2
  bn_momentum: float = 0.9         # Flax convention: 1 - PyTorch's momentum (0.1).
  bn_eps: float = 1e-5
  num_classes: Optional[int] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _blocks(self):
    """[(output channels, stride, expansion)] of the 17 blocks."""
    return [(make_divisible(c * self.width_mult), s if i == 0 else 1, t)
            for t, c, n, s in SETTINGS for i in range(n)]

  @nn.compact
  def __call__(self, images, train=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv_bn = functools.partial(_conv_bn, kw, train=train, momentum=self.bn_momentum,
                                eps=self.bn_eps)
    x = conv_bn(images.astype(self.dtype), make_divisible(32 * self.width_mult), 'stem',
                kernel=3, stride=2)
    stages = []
    blocks = self._blocks()
    for i, (features, stride, expansion) in enumerate(blocks):
      # A stage ends where the next block downsamples (or at the last block).
      x = InvertedResidual(features, stride, expansion, self.bn_momentum, self.bn_eps,
                           name=f'block_{i}', **kw)(x, train)
      if i + 1 == len(blocks) or blocks[i + 1][1] == 2:
        stages.append(x)
    last = make_divisible(self.last_channels * max(1.0, self.width_mult))
    x = conv_bn(x, last, 'head')
    out = {'stages': tuple(stages), 'features': x}
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out['pre_logits'] = x
    if self.num_classes is None:
      return None, out
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    logits = nn.Dense(self.num_classes, name='classifier', **kw)(x.astype(self.dtype))
    return logits.astype(jnp.float32), out

  def example_inputs(self):
    return (jnp.zeros((1, 224, 224, 3), jnp.float32),)

  # ---- Block structure, for freezing schemes: stem -> inverted-residual blocks -> neck -> head.
  @property
  def num_blocks(self):
    return sum(n for _, _, n, _ in SETTINGS)

  def param_group(self, path: str):
    top = path.split('/')[0]
    if top.startswith('stem_'):
      return 'stem', None
    if top.startswith('block_'):
      return 'block', int(top.removeprefix('block_'))
    if top.startswith('head_'):
      return 'neck', None
    if top == 'classifier':
      return 'head', None
    raise KeyError(f'{path!r} is not a MobileNetV2 param path')
