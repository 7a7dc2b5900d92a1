"""VGG (Simonyan & Zisserman, 2015) as a Flax Linen module: VGG-11/13/16/19, with or without
BatchNorm, in torchvision's layout or Keras applications' (VGG16/VGG19).

5 conv blocks (3x3 convs, pad 1, ReLU; 2x2 max pool) -> [torchvision: adaptive average pool to
7x7] -> flatten -> fc1 (4096) -> fc2 (4096) -> head. With `fc_layers=False` the trunk is globally
average-pooled instead (Keras' include_top=False, pooling='avg'; the usual transfer head).

The flatten before fc1 is always in NHWC order (h, w, c), as Keras flattens; torchvision flattens
NCHW (c, h, w), so its converter permutes fc1's input rows once at load time instead of
transposing every activation.

Param names: block{b}_conv{c} (+ block{b}_bn{c} with BN; b, c from 1, Keras' names), fc1, fc2,
head (torchvision classifier.6 / Keras 'predictions').
"""
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

# Convs per block.
CONFIGS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
WIDTHS = (64, 128, 256, 512, 512)

_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_dense_init = nn.initializers.normal(0.01)


def adaptive_avg_pool(x, size):
  """PyTorch's AdaptiveAvgPool2d over NHWC: output cell i averages input rows
  [floor(i * H / size), ceil((i + 1) * H / size)) (cells overlap or repeat when H < size)."""
  def pool(x, axis):
    n = x.shape[axis]
    cells = [jnp.mean(jax_slice(x, axis, (i * n) // size, -(-(i + 1) * n // size)), axis=axis,
                      keepdims=True) for i in range(size)]
    return jnp.concatenate(cells, axis=axis)
  if x.shape[1] == size and x.shape[2] == size:
    return x
  return pool(pool(x, 1), 2)


def jax_slice(x, axis, begin, end):
  index = [slice(None)] * x.ndim
  index[axis] = slice(begin, end)
  return x[tuple(index)]


class VGG(nn.Module):
  """`__call__(images, train=False)` -> `(logits, out)`; images NHWC float32 normalised as the
  weights' pretrained_cfg says (Keras VGG: BGR minus the Caffe mean). out: 'stages' (each
  block's pooled output), 'features' (the last), 'pre_logits' (fc2's output, or the global average
  of the trunk when fc_layers is False). logits is None when num_classes is None."""
  block_sizes: Sequence[int] = CONFIGS[16]
  batch_norm: bool = False
  fc_layers: bool = True
  adaptive_pool: bool = True       # torchvision: pool to 7x7 before fc1; Keras: flatten as is.
  fc_width: int = 4096
  dropout_rate: float = 0.5        # torchvision's dropout after fc1 and fc2; Keras has none.
  input_size: int = 224            # Without adaptive_pool, fc1's input size depends on it.
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  num_classes: Optional[int] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    stages = []
    for b, (size, width) in enumerate(zip(self.block_sizes, WIDTHS), start=1):
      for c in range(1, size + 1):
        x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_conv_init,
                    name=f'block{b}_conv{c}', **kw)(x)
        if self.batch_norm:
          x = nn.BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_eps, name=f'block{b}_bn{c}',
                           **kw)(x, use_running_average=not train)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), (2, 2))
      stages.append(x)
    out = {'stages': tuple(stages), 'features': x}

    if self.fc_layers:
      if self.adaptive_pool:
        x = adaptive_avg_pool(x, 7)
      x = x.reshape(x.shape[0], -1)  # NHWC order; see the module docstring.
      dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
      x = dropout(nn.relu(nn.Dense(self.fc_width, kernel_init=_dense_init, name='fc1', **kw)(x)))
      x = dropout(nn.relu(nn.Dense(self.fc_width, kernel_init=_dense_init, name='fc2', **kw)(x)))
    else:
      x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out['pre_logits'] = x
    if self.num_classes is None:
      return None, out
    logits = nn.Dense(self.num_classes, kernel_init=_dense_init, name='head', **kw)(
        x.astype(self.dtype))
    return logits.astype(jnp.float32), out

  def example_inputs(self):
    return (jnp.zeros((1, self.input_size, self.input_size, 3), jnp.float32),)

  # ---- Block structure, for freezing schemes: conv blocks -> neck (fc1, fc2) -> head.
  @property
  def num_blocks(self):
    return len(self.block_sizes)

  def param_group(self, path: str):
    top = path.split('/')[0]
    if top.startswith('block'):
      return 'block', int(top[len('block'):].split('_')[0]) - 1
    if top in ('fc1', 'fc2'):
      return 'neck', None
    if top == 'head':
      return 'head', None
    raise KeyError(f'{path!r} is not a VGG param path')


def _variant(depth, batch_norm=False, **layout):
  return functools.partial(VGG, block_sizes=CONFIGS[depth], batch_norm=batch_norm, **layout)


VGG11, VGG13, VGG16, VGG19 = (_variant(d) for d in (11, 13, 16, 19))
VGG11BN, VGG13BN, VGG16BN, VGG19BN = (_variant(d, True) for d in (11, 13, 16, 19))
# Keras applications: no adaptive pool (the input must be 224 for the fc layers), no dropout.
KerasVGG16 = _variant(16, adaptive_pool=False, dropout_rate=0.0)
KerasVGG19 = _variant(19, adaptive_pool=False, dropout_rate=0.0)
