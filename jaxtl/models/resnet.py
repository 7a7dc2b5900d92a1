"""ResNet (He et al., 2016) as a Flax Linen module: ResNet-18/34 (basic blocks) and 50/101/152
(bottleneck blocks), torchvision's v1.5 by default (the stride sits on the 3x3 conv), or v1
(stride on the first 1x1 conv, biased convs: Keras applications' ResNet50).

stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool) -> 4 stages of blocks -> global average pool -> fc.
Every conv pads explicitly as PyTorch does (k // 2 on each side): Flax's 'SAME' pads strided convs
asymmetrically (more on the bottom/right), which shifts every feature map against the checkpoint's.

Param names (torchvision's, with one flat level of blocks, numbered across stages):
  conv1, bn1                              the stem
  block_{i}/conv{1,2,3}, block_{i}/bn{1,2,3}, block_{i}/downsample_conv, block_{i}/downsample_bn
  fc                                      the classifier
BatchNorm running statistics live in the 'batch_stats' collection. BN layers are called as
bn(x, use_running_average=not train) so that the train loop can keep frozen ones in eval mode.

Convs are jaxtl.ops.Conv (nn.Conv's params, computed as matmuls where XLA:CPU's conv kernels are
slow) and the stem's max pool is jaxtl.ops.max_pool (a gather-free gradient): together they make
ResNet-50's training step about 2x faster on a CPU. BatchNorm is jaxtl.ops.BatchNorm (nn.BatchNorm
whose training-mode backward pass keeps less): with the convs' lean weight gradients, the full
step's planned temporaries went from 1,426 to 620 MiB (benchmarks/README.md).
"""
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxtl import ops

# torchvision initialises convs with He-normal (fan_out) and BN with scale 1, bias 0.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _pads(kernel):
  return ((kernel // 2, kernel // 2),) * 2


class Block(nn.Module):
  """A basic (two 3x3 convs) or bottleneck (1x1 -> 3x3 -> 1x1, 4x expansion) residual block."""
  width: int                 # Output channels.
  stride: int
  bottleneck: bool
  stride_in_1x1: bool = False
  conv_bias: bool = False
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda features, kernel, stride, name: ops.Conv(
        features, (kernel, kernel), (stride, stride), padding=_pads(kernel),
        use_bias=self.conv_bias, kernel_init=_conv_init, name=name, **kw)
    bn = lambda name: functools.partial(ops.BatchNorm(
        momentum=self.bn_momentum, epsilon=self.bn_eps, name=name, **kw),
        use_running_average=not train)

    if self.bottleneck:
      inner = self.width // 4
      first, second = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
      y = nn.relu(bn('bn1')(conv(inner, 1, first, 'conv1')(x)))
      y = nn.relu(bn('bn2')(conv(inner, 3, second, 'conv2')(y)))
      y, last_bn = conv(self.width, 1, 1, 'conv3')(y), bn('bn3')
    else:
      y = nn.relu(bn('bn1')(conv(self.width, 3, self.stride, 'conv1')(x)))
      y, last_bn = conv(self.width, 3, 1, 'conv2')(y), bn('bn2')
    if self.stride != 1 or x.shape[-1] != self.width:
      x = bn('downsample_bn')(conv(self.width, 1, self.stride, 'downsample_conv')(x))
    # The last BatchNorm, the sum and its ReLU run on (N*H*W, C) rows, the layout of a 1x1 conv's
    # matmul: XLA then writes the block's output over the conv's (a reshape among the fused ops
    # stops it), and ops.relu keeps the next block from computing that output again. ResNet-50's
    # inference forward at batch 8 plans 55 MiB of temporaries instead of 133.
    rows = lambda t: t.reshape(-1, self.width)
    return ops.relu(rows(x) + last_bn(rows(y))).reshape(y.shape)


class ResNet(nn.Module):
  """`__call__(images, train=False)`: images are NHWC float32, normalised as the weights'
  pretrained_cfg says. Returns `(logits, out)`; logits is None when num_classes is None (a
  headless backbone). out: 'stem' (after the max pool), 'stages' (each stage's output; strides 4,
  8, 16, 32), 'features' (the last stage), 'pre_logits' (globally average-pooled features)."""
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  bottleneck: bool = True
  widths: Sequence[int] = (256, 512, 1024, 2048)   # Output channels of each stage.
  stem_width: int = 64
  stride_in_1x1: bool = False      # True: ResNet v1 (Keras), False: v1.5 (torchvision, HF).
  conv_bias: bool = False          # Keras' ResNet50 convs carry biases.
  bn_momentum: float = 0.9         # Flax convention: 1 - PyTorch's momentum (0.1).
  bn_eps: float = 1e-5
  num_classes: Optional[int] = None
  dtype: Any = jnp.float32         # Compute dtype.
  param_dtype: Any = jnp.float32   # Storage dtype of the params.

  @nn.compact
  def __call__(self, images, train=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ops.Conv(self.stem_width, (7, 7), (2, 2), padding=_pads(7), use_bias=self.conv_bias,
                 kernel_init=_conv_init, name='conv1', **kw)(images.astype(self.dtype))
    x = ops.BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_eps, name='bn1', **kw)(
        x, use_running_average=not train)
    x = nn.relu(x)
    x = ops.max_pool(x, (3, 3), (2, 2), _pads(3))  # Pads with -inf, as PyTorch does.
    out = {'stem': x}

    stages, index = [], 0
    for stage, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for i in range(size):
        x = Block(width, 2 if stage > 0 and i == 0 else 1, self.bottleneck, self.stride_in_1x1,
                  self.conv_bias, self.bn_momentum, self.bn_eps, name=f'block_{index}', **kw)(
                      x, train)
        index += 1
      stages.append(x)
    out['stages'] = tuple(stages)
    out['features'] = x
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out['pre_logits'] = x
    if self.num_classes is None:
      return None, out
    logits = nn.Dense(self.num_classes, name='fc', **kw)(x.astype(self.dtype))
    return logits.astype(jnp.float32), out

  def example_inputs(self):
    """Arguments for `init` (only their shapes and dtypes matter)."""
    return (jnp.zeros((1, 224, 224, 3), jnp.float32),)

  # ---- Block structure, for freezing schemes: stem -> residual blocks -> head.
  @property
  def num_blocks(self):
    return sum(self.stage_sizes)

  def param_group(self, path: str):
    """('stem'|'block'|'head', block index or None) for a '/'-joined param path."""
    top = path.split('/')[0]
    if top in ('conv1', 'bn1'):
      return 'stem', None
    if top.startswith('block_'):
      return 'block', int(top.removeprefix('block_'))
    if top == 'fc':
      return 'head', None
    raise KeyError(f'{path!r} is not a ResNet param path')


def _variant(stage_sizes, bottleneck):
  widths = (256, 512, 1024, 2048) if bottleneck else (64, 128, 256, 512)
  return functools.partial(ResNet, stage_sizes=stage_sizes, bottleneck=bottleneck, widths=widths)


ResNet18 = _variant((2, 2, 2, 2), False)
ResNet34 = _variant((3, 4, 6, 3), False)
ResNet50 = _variant((3, 4, 6, 3), True)
ResNet101 = _variant((3, 4, 23, 3), True)
ResNet152 = _variant((3, 8, 36, 3), True)
# Keras applications' ResNet50: v1 strides, biased convs, BN eps 1.001e-5 and momentum 0.99.
KerasResNet50 = functools.partial(ResNet50, stride_in_1x1=True, conv_bias=True, bn_eps=1.001e-5,
                                  bn_momentum=0.99)
# Stage sizes by depth, for converters that infer the depth from a checkpoint's keys.
DEPTHS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True),
          101: ((3, 4, 23, 3), True), 152: ((3, 8, 36, 3), True)}
