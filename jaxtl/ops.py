"""2-D convolutions that train fast on XLA:CPU, as a drop-in for `flax.linen.Conv`.

XLA:CPU computes a convolution's forward and input gradient at matmul-like speed, but its
weight-gradient kernel was slow: for a 1x1 conv in ResNet-50 it took 4-13x the time of the same
contraction written as a matmul, and for 3x3 and 7x7 convs 1.3-3x. (With jaxlib 0.10, a 1x1
conv's forward and gradients through XLA's conv still take 1.5-3.8x as long.) So:

  - a 1x1 conv is a matmul over channels (a strided one subsamples first); plain autodiff then
    gives matmuls for both gradients;
  - a k x k conv keeps XLA's forward and input gradient, and a custom VJP picks the weight
    gradient's form: with few input channels (a stem conv on RGB), one im2col matmul (the k*k
    shifted views of the input stacked, k*k*C rows); else XLA's own weight-gradient conv, which
    jaxlib 0.10 runs faster than the alternative for six of ResNet-50's seven 3x3 conv shapes
    (1.1-2.2x; 0.86x for the stride-2 one into stage 4); and for inputs so large that XLA's
    falls behind (up to 3x slower), matmuls over shifted views: for each kernel offset (i, j),
    dW[i, j] = x_shifted(i, j)^T @ dy, contracting batch and space (a k*k-term im2col whose
    columns are never materialised together).

A depthwise conv (one k x k filter per channel, MobileNet's) is a sum of k*k shifted views of
the input, each times its tap's per-channel weights: elementwise work that XLA fuses, with
gradients that are elementwise too. XLA:CPU's grouped-conv kernels took ~4x as long forward and
more in the gradients (MobileNetV2 at 96 px, batch 64: 2.6 s against 1.3 s a training step).

The weight gradient's input is made to wait for the output gradient (`_after`): XLA:CPU would
otherwise build the shifted views during the forward pass and hold every layer's until the
backward pass reached it (ResNet-50's full step: 1,426 -> 966 MiB of planned temporaries, same
speed).

`max_pool` is PyTorch's max pooling with a gradient that needs no index tensors; `relu` is
jax.nn.relu in a form that XLA does not recompute in each consumer (a residual block's output);
`BatchNorm` is nn.BatchNorm whose training-mode backward pass (`batch_norm`) keeps no centred
copy of its input (ResNet-50's full step: 966 -> 637 MiB); `gelu`, `layer_norm`/`LayerNorm` and
the attention's softmax are jax's and Flax's with backward passes that keep less (the input and
per-row statistics, or the probabilities) and recompute the rest;
`dot_general` a drop-in for Flax's nn.Dense (`dot_general=ops.dot_general`, as BERT's and ViT's
encoder layers use it) whose weight gradient takes XLA:CPU's fast matmul path (on other backends
it is the plain dot), `dot_product_attention` BERT's and ViT's softmax attention in a layout
that XLA:CPU runs ~3x faster than the einsum form, and `Dropout` nn.Dropout with the same masks
drawn ~6x faster on the CPU (`random_bits`: jax's threefry bits as one fused expression);
`fused_key(seed)` is jax.random.key(seed) with the same draws through that expression, which
initialises a model without the threefry loop's temporaries.

Measured per conv on a 2-core AVX2 CPU (ResNet-50 shapes, batch 8; see benchmarks/README.md).
On GPUs and TPUs the same code is correct; there the matmul forms are what XLA does anyway for
1x1 convs, and the weight-gradient rewrite costs little, but it is not needed: use `conv2d`
everywhere for one code path and identical numerics.

`Conv` keeps nn.Conv's param names and shapes ('kernel' (kh, kw, in, out), 'bias' (out,)), so
checkpoints, loaders, freezing rules and LoRA paths are unchanged.
"""
import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.extend.random
import jax.numpy as jnp
from jax import lax
import numpy as np

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')
# Below this many input channels the weight gradient is one im2col matmul, not k*k thin ones.
_IM2COL_MAX_CHANNELS = 16
# Above it, XLA's own weight-gradient convolution up to this much work per kernel tap (output
# positions x in x out channels), and k*k matmuls beyond. Measured for 3x3 convs on the 2-core
# AVX2 CPU (jaxlib 0.10.2), batch x size x channels: XLA against the matmuls 21 / 47 ms for
# 8x56x64 (work 2**26.6), 46 / 69 for 8x28x256, 57 / 90 for 32x28x128, 241 / 289 for 12x112x64
# (2**29.2); but 251 / 183 for 16x56x128 (2**29.6), 456 / 396 for 8x160x64, 1,139 / 361 for
# 8x112x128. ResNet-50's full step at batch 8: 0.96x the time (benchmarks/README.md).
_XLA_WEIGHT_GRAD_MAX_WORK = 2**29

Padding = Union[str, Sequence[Sequence[int]]]


def _pairs(padding: Padding, kernel_hw) -> tuple:
  if isinstance(padding, str):
    if padding.upper() != 'VALID':
      raise ValueError(f"padding {padding!r}: give explicit pairs ((top, bottom), (left, right)) "
                       "or 'VALID' (PyTorch-style explicit padding; 'SAME' pads strided convs "
                       'asymmetrically)')
    return ((0, 0), (0, 0))
  pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pairs) != len(kernel_hw):
    raise ValueError(f'padding {padding!r} needs one (low, high) pair per spatial dimension')
  return pairs


def _xla_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMENSIONS)


def _shifted_views(xp, kernel_hw, strides, out_hw, axes):
  """For each kernel offset (i, j), row-major: the strided window of the padded input `xp` that
  meets kernel tap (i, j) at every output position. `axes` are xp's (height, width) axes."""
  views = []
  for i in range(kernel_hw[0]):
    for j in range(kernel_hw[1]):
      index = [slice(None)] * xp.ndim
      index[axes[0]] = slice(i, i + (out_hw[0] - 1) * strides[0] + 1, strides[0])
      index[axes[1]] = slice(j, j + (out_hw[1] - 1) * strides[1] + 1, strides[1])
      views.append(xp[tuple(index)])
  return views


def _transposed_matmul(a, b):
  """a^T @ b for a (K, M) and b (K, N), accumulated in float32: a dense layer's weight gradient,
  contracting the long batch (and sequence) axis.

  XLA:CPU runs a dot that contracts both operands' leading axis on a generic path, at about a
  third of the speed of its fast (YNNPACK) matmul: 26 against 74 GFLOP/s for a BERT-base MLP
  weight gradient on one core. Materialising a^T first makes the dot canonical; the
  optimisation barrier stops XLA from folding the transpose back into the dot. But XLA:CPU's
  large transposes are slow too, so this pays only for wide outputs (N in the thousands, a
  transformer's MLP): for ResNet-50's convs it made the step ~15 % slower, and conv2d does not
  use it."""
  return jnp.matmul(lax.optimization_barrier(a.T), b, preferred_element_type=jnp.float32)


def _after(x, dy):
  """x, made to depend on dy: what the backward pass derives from a forward residual alone (the
  shifted views of a conv's input, a padded copy, a transposed activation or kernel, GELU's
  derivative terms, a LayerNorm's normalised input) XLA:CPU builds as soon as the forward pass
  has it, and keeps alive until the backward pass reaches that layer: ResNet-50's full step held
  ~420 MiB of such copies at its peak, ViT-B/16's last_blocks step ~70 MiB, its full step ~100
  MiB of normalised inputs. Adding a zero computed from dy makes them wait for the gradient that
  consumes them. (lax.optimization_barrier does not: XLA:CPU removes it before scheduling.)
  The zero is exact and costs one fused add; |s| < -1 is false for every s, NaN included, and
  XLA does not fold it away. Other backends schedule on their own, and there dy may be sharded
  across devices, where reading one of its elements is a collective: x as it is."""
  if jax.default_backend() != 'cpu':
    return x
  s = dy.reshape(-1)[0]
  zero = (jnp.abs(s) < -1).astype(x.dtype)
  return x + zero


@jax.custom_jvp
def relu(x):
  """jax.nn.relu (same values, NaN kept, and gradient 0 at 0), written as a select between x and
  a zero, for the output of a residual block. XLA duplicates an elementwise op into each consumer
  it can fuse into when the op has one array operand: relu(x + y) does, after the add is fused
  into it. A ResNet's block output feeds the next block's residual add, so that add would
  recompute it, keeping every earlier block's conv output alive until the end of the stage
  (ResNet-50's inference forward at batch 8: 133 MiB of planned temporaries; 80 with this relu).
  A select reads x twice (x and x < 0), which XLA does not duplicate."""
  return jnp.where(x < 0, jnp.zeros_like(x), x)


relu.defjvps(lambda g, y, x: jnp.where(x > 0, g, jnp.zeros_like(g)))


def _weight_grad(x, dy, kernel_shape, strides, padding):
  """dL/dkernel of the conv, given its input x (N, H, W, C) and output gradient dy (N, Ho, Wo, O):
  an im2col matmul for few input channels, else XLA's convolution or, for large inputs, where
  that falls far behind, matmuls over shifted views. Accumulates in float32 (bf16 inputs too) and
  returns float32 (float64 for float64 inputs on XLA's path)."""
  kh, kw, c, o = kernel_shape
  out_hw = dy.shape[1:3]
  x = _after(x, dy)
  dy2 = dy.reshape(-1, o)
  if c < _IM2COL_MAX_CHANNELS:
    # One matmul: im2col^T (kh*kw*C, N*Ho*Wo) @ dy (N*Ho*Wo, O). The views are taken from a
    # channels-first copy so that the stacked matrix is already (rows, N*Ho*Wo): a canonical
    # matmul with no transposed operand.
    xt = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), *padding))
    cols = jnp.stack(_shifted_views(xt, (kh, kw), strides, out_hw, axes=(2, 3)))
    dw = jnp.matmul(cols.reshape(kh * kw * c, -1), dy2, preferred_element_type=jnp.float32)
    return dw.reshape(kh, kw, c, o)
  if dy2.shape[0] * c * o <= _XLA_WEIGHT_GRAD_MAX_WORK:
    # XLA's own weight-gradient convolution, in float32 at least.
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    transpose = jax.linear_transpose(lambda k: _xla_conv(x.astype(dtype), k, strides, padding),
                                     jax.ShapeDtypeStruct(kernel_shape, dtype))
    return transpose(dy.astype(dtype))[0]
  # k*k matmuls x_view^T (C, N*Ho*Wo) @ dy (N*Ho*Wo, O): each view is one strided copy of the
  # input, the largest intermediate; a full im2col would be k*k times that.
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  taps = [lax.dot_general(view.reshape(-1, c), dy2, (((0,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
          for view in _shifted_views(xp, (kh, kw), strides, out_hw, axes=(1, 2))]
  return jnp.stack(taps).reshape(kh, kw, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_kxk(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding)


def _conv_kxk_fwd(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _conv_kxk_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  # The input gradient is XLA's own (a transposed conv, fast on CPU). The primal conv that
  # jax.vjp traces here is unused and dead-code eliminated; and when x needs no gradient (the
  # images into a stem), this whole branch is.
  # _after: else XLA transposes the kernel for this as the step starts and keeps it until here.
  flipped_from = _after(kernel, dy)
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, flipped_from, strides, padding), x)
  dx, = input_vjp(dy)
  dw = _weight_grad(x, dy, kernel.shape, strides, padding).astype(kernel.dtype)
  return dx, dw


_conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


def _conv_1x1(x, kernel, strides, padding):
  if any(lo or hi for lo, hi in padding):
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  if strides != (1, 1):
    x = x[:, ::strides[0], ::strides[1], :]
  # Plain autodiff of the matmul: its weight gradient contracts N*H*W on XLA:CPU's slower dot
  # path, but for a conv's activations transposing first costs more than it saves (see
  # _transposed_matmul); it still beats XLA's conv weight gradient 4-13x.
  n, h, w, c = x.shape
  y = jnp.matmul(x.reshape(n * h * w, c), kernel.reshape(c, -1))
  return y.reshape(n, h, w, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x, kernel, precision, preferred_element_type):
  """x (..., K) @ kernel (K, N)."""
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


def _dense_fwd(x, kernel, precision, preferred_element_type):
  return _dense(x, kernel, precision, preferred_element_type), (x, kernel)


def _dense_bwd(precision, preferred_element_type, residuals, dy):
  x, kernel = residuals
  dy2 = dy.reshape(-1, dy.shape[-1])
  # dx = dy @ kernel^T is already on XLA:CPU's fast path; the weight gradient is not.
  common = jnp.promote_types(dy.dtype, kernel.dtype)  # dy is float32 under preferred_element_type.
  dx = lax.dot_general(dy2.astype(common), _after(kernel, dy).astype(common),
                       (((1,), (1,)), ((), ())), precision=precision)
  x2 = x.reshape(-1, x.shape[-1])
  if jax.default_backend() != 'cpu':
    # GPU/TPU compilers pick their own matmul layouts; a forced transpose would only cost.
    dw = jnp.matmul(x2.T, dy2, precision=precision, preferred_element_type=jnp.float32)
  elif x2.shape[1] > dy2.shape[1]:
    # A layer that narrows (a transformer's fc2, 3072 -> 768 features): dw^T = dy^T @ x, so that
    # what goes through XLA:CPU's slow transposes is dy and the (out, in) result, not the 4x
    # larger activation. ViT-B/16's full step: ~1.5 % faster, 14 MiB fewer temporaries.
    dw = _transposed_matmul(dy2, _after(x2, dy)).T
  else:
    dw = _transposed_matmul(_after(x2, dy), dy2)  # x2^T waits for dy: see _after.
  return dx.reshape(x.shape).astype(x.dtype), dw.astype(kernel.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  """`lax.dot_general` whose weight gradient runs on XLA:CPU's fast matmul path, for the
  dense-layer case (lhs's last axis against a 2-D rhs's first, no batch axes); any other case is
  lax.dot_general itself. Pass it to Flax: `nn.Dense(..., dot_general=ops.dot_general)` keeps
  the module, its params and LoRA/freezing paths as they are."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (kw or lhs_batch or rhs_batch or rhs.ndim != 2 or tuple(rhs_contract) != (0,)
      or tuple(lhs_contract) != (lhs.ndim - 1,)):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kw)
  return _dense(lhs, rhs, precision, preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x, approximate: bool = False):
  """GELU, x Phi(x) (`approximate`: the tanh form, `jax.nn.gelu`'s), whose backward pass keeps
  only its input.

  Autodiff of GELU stores the intermediates of its derivative for the backward pass (for the erf
  form: the erf and exp terms besides x), each as large as the MLP's hidden activations; here
  the derivative is recomputed from x, elementwise work that XLA fuses into the backward. With
  the softmax below, ViT-B/16's full step (batch 8) plans 627 MiB fewer temporaries and runs 5 %
  faster (BERT-base: 289 MiB, 2.5 %).

  The exact form is PyTorch's, Phi(x) = (1 + erf(x / sqrt 2)) / 2, not jax.nn.gelu's erfc: on the
  CPU, XLA's float32 erf is one rational polynomial while its erfc takes two branches and an exp.
  A (1576, 3072) GELU, ViT-B/16's MLP at batch 8: forward 3.9 -> 1.5 ms, backward 4.5 -> 3.2 ms
  (2 cores). The values differ from the erfc form by at most an ulp of the output."""
  if approximate:
    return jax.nn.gelu(x, approximate=True)
  return x * _normal_cdf(x)


def _normal_cdf(x):
  return 0.5 * (1 + lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


def _gelu_fwd(x, approximate):
  return gelu(x, approximate), x


def _gelu_bwd(approximate, x, dy):
  # _after: else XLA shares the derivative's erf/exp terms with the forward pass's and keeps them.
  x = _after(x, dy)
  if approximate:
    return jax.vjp(functools.partial(jax.nn.gelu, approximate=True), x)[1](dy)
  # d/dx x Phi(x) = Phi(x) + x phi(x), phi the standard normal density.
  pdf = jnp.exp(-0.5 * x * x) * (1 / np.sqrt(2 * np.pi)).astype(x.dtype)
  return (dy * (_normal_cdf(x) + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, epsilon: float, dtype=None):
  """Layer normalisation over the last axis, `(x - mean) / sqrt(var + epsilon) * scale + bias`,
  with statistics in float32 (two-pass variance, as PyTorch) and the result in `dtype` (default:
  x's).

  Its backward pass keeps x, the per-row mean and 1/std, and recomputes the normalised x once
  the output gradient has come (`_after`); autodiff of the same formula stored three more
  activation-sized tensors per norm (centred, normalised and scaled x). ViT-B/16's full step
  (batch 8) plans 215 MiB fewer temporaries and compiles 2 s faster; BERT-base's 147 MiB, and its
  step runs 6 % faster."""
  return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_stats(x, epsilon):
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return mean, lax.rsqrt(var + epsilon)


def _layer_norm_apply(x, mean, rstd, scale, bias):
  f32 = lambda t: t.astype(jnp.float32)
  return (f32(x) - mean) * rstd * f32(scale) + f32(bias)


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
  mean, rstd = _layer_norm_stats(x, epsilon)
  y = _layer_norm_apply(x, mean, rstd, scale, bias).astype(dtype or x.dtype)
  return y, (x, mean, rstd, scale, bias)  # bias only for its dtype.


def _layer_norm_bwd(epsilon, dtype, residuals, dy):
  x, mean, rstd, scale, bias = residuals
  # _after: else XLA:CPU computes x_hat as soon as the forward pass has x and holds it until here
  # (the sums over it are fusions that do not recompute it): ViT-B/16's full step held 22 of them.
  x_hat = (_after(x, dy).astype(jnp.float32) - mean) * rstd
  dy = dy.astype(jnp.float32)
  rows = tuple(range(x.ndim - 1))
  d_scale = jnp.sum(dy * x_hat, axis=rows).astype(scale.dtype)
  d_bias = jnp.sum(dy, axis=rows).astype(bias.dtype)
  d_xhat = dy * scale.astype(jnp.float32)
  dx = rstd * (d_xhat - jnp.mean(d_xhat, axis=-1, keepdims=True)
               - x_hat * jnp.mean(d_xhat * x_hat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), d_scale, d_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """nn.LayerNorm over the last axis (with scale and bias, its param names and initialisers),
  computed by `layer_norm`. `dtype` is the output's (None: the input's, promoted with the params',
  as nn.LayerNorm does)."""
  epsilon: float = 1e-6
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones_init()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    scale = self.param('scale', self.scale_init, features, self.param_dtype)
    bias = self.param('bias', self.bias_init, features, self.param_dtype)
    dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)
    return layer_norm(x, scale, bias, self.epsilon, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm(x, scale, bias, epsilon: float, dtype=None):
  """Training-mode batch normalisation over every axis but the last, computed as nn.BatchNorm
  computes it (statistics in float32, variance E[x^2] - E[x]^2 clipped at 0, then
  `(x - mean) * (rsqrt(var + epsilon) * scale) + bias`). Returns `(y, mean, var)`: y in `dtype`
  (default: x's), the batch statistics for the running averages.

  Its backward pass keeps x and the per-channel statistics and recomputes the normalised x;
  autodiff of the same formula also kept the centred x, one more activation-sized tensor per
  norm: 334 MiB of ResNet-50's full-step peak (batch 8)."""
  return _batch_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, dtype):
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(x32, axes)
  raw_var = jnp.mean(lax.square(x32), axes) - lax.square(mean)
  var = jnp.maximum(0.0, raw_var)
  y = (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias
  return (y.astype(dtype or x.dtype), mean, var), (x, mean, raw_var, scale, bias)


def _batch_norm_bwd(epsilon, dtype, residuals, cotangents):
  x, mean, raw_var, scale, bias = residuals
  dy, d_mean, d_var = cotangents
  axes = tuple(range(x.ndim - 1))
  count = math.prod(x.shape[:-1])
  f32 = mean.dtype
  # Everything is written as per-channel factors (made to wait for dy, see _after) times dy and
  # the centred x, so that XLA fuses it into two passes (the sums, then dx) and materialises no
  # activation-sized intermediate ahead of time.
  dy = dy.astype(f32)
  centred = _after(x, dy).astype(f32) - mean
  rstd = lax.rsqrt(jnp.maximum(0.0, _after(raw_var, dy)) + epsilon)
  scale32 = scale.astype(f32)
  sum_dy = jnp.sum(dy, axes)
  sum_dy_centred = jnp.sum(dy * centred, axes)
  # How var moves with raw_var through the clip: as jnp.maximum's gradient (1/2 at a tie).
  clip = jnp.where(raw_var > 0, 1.0, jnp.where(raw_var == 0, 0.5, 0.0)).astype(f32)
  d_var_total = clip * (d_var - 0.5 * rstd ** 3 * scale32 * sum_dy_centred)
  # d mean / d x = 1 / count; d var / d x = 2 (x - mean) / count.
  dx = (dy * (rstd * scale32) + centred * (2.0 * d_var_total / count)
        + (d_mean - rstd * scale32 * sum_dy) / count)
  return (dx.astype(x.dtype), (rstd * sum_dy_centred).astype(scale.dtype),
          sum_dy.astype(bias.dtype))


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.BatchNorm):
  """nn.BatchNorm (its fields, param and batch_stats names, running-average updates, and the
  use_running_average switch that train.py's frozen-BN interceptor sets) whose training-mode
  normalisation is `batch_norm`: a backward pass that keeps one activation-sized tensor fewer.
  Features on the last axis, with scale and bias, no mask or named-axis reduction; anything
  else, and inference mode, is nn.BatchNorm's own code."""

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    if (use_running_average or mask is not None or self.axis_name is not None
        or self.axis not in (-1, x.ndim - 1) or not (self.use_scale and self.use_bias)
        or not self.use_fast_variance or not self.force_float32_reductions):
      return super().__call__(x, use_running_average=use_running_average, mask=mask)
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param('scale', self.scale_init, features, self.param_dtype)
    bias = self.param('bias', self.bias_init, features, self.param_dtype)
    dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    y, mean, var = batch_norm(x, scale, bias, self.epsilon, dtype)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


@jax.custom_vjp
def _softmax(x):
  """Softmax over the last axis whose backward pass needs only the probabilities (autodiff
  also stored the unnormalised exponentials: one more (batch, heads, length, length) tensor
  per layer)."""
  return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
  y = _softmax(x)
  return y, y


def _softmax_bwd(y, dy):
  return (y * (dy - jnp.sum(dy * y, axis=-1, keepdims=True)),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def dot_product_attention(q, k, v, bias=None, dropout: Optional[Callable] = None, dtype=None):
  """Softmax attention, `softmax(q k^T / sqrt(d) + bias) v`, for q, k, v of shape (batch,
  length, heads, head_dim): what BERT's and ViT's self-attention compute, in a layout that runs
  well on XLA:CPU.

  The scores are taken in the inputs' dtype, the softmax (with `bias`, broadcastable to (batch,
  heads, q_length, k_length)) in float32, and the probabilities cast to `dtype` (default: v's)
  before `dropout` (a function of the probabilities, e.g. a bound nn.Dropout) and the product with
  v. Returns (batch, q_length, heads, head_dim).

  Why the explicit layout: written as einsums over (batch, length, heads, head_dim), XLA:CPU
  fused the whole inference attention (both batched dots and the softmax) into one YNNPACK
  fusion that took 38 ms per BERT-base layer (batch 8, 128 tokens); with q, k and v first
  transposed to (batch, heads, length, head_dim), each batched dot is a plain matmul per head
  and the same attention takes ~12 ms. Whole models, same process, alternating: BERT-base's eval
  forward 0.84x the einsum form's time, ViT-B/16's 0.91x (against jax.nn.dot_product_attention)
  and its full training step 0.91x; BERT-base's training step unchanged. The transposes are
  cheap copies; on other backends the layout is XLA's choice anyway. Without dropout and bias,
  on other backends, jax.nn.dot_product_attention runs instead (a fused kernel where one exists,
  e.g. cuDNN for bf16 on GPU)."""
  dtype = dtype or v.dtype
  if dropout is None and bias is None and jax.default_backend() != 'cpu':
    return jax.nn.dot_product_attention(q, k, v)
  heads_first = lambda t: jnp.transpose(t, (0, 2, 1, 3))
  q = heads_first(q / jnp.sqrt(q.shape[-1]).astype(q.dtype))
  k, v = heads_first(k), heads_first(v)
  scores = jnp.matmul(q, jnp.swapaxes(k, -1, -2)).astype(jnp.float32)
  if bias is not None:
    scores = scores + bias
  probs = _softmax(scores).astype(dtype)
  if dropout is not None:
    probs = dropout(probs)
  return heads_first(jnp.matmul(probs, v))


# Threefry-2x32 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"): 20 rounds in
# 5 groups of 4, a key injection after each group.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0, k1, x0, x1):
  ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for group in range(1, 6):
    for r in _THREEFRY_ROTATIONS[(group - 1) % 2]:
      x0 = x0 + x1
      x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
    x0, x1 = x0 + ks[group % 3], x1 + ks[(group + 1) % 3] + np.uint32(group)
  return x0, x1


def _is_partitionable_threefry(key) -> bool:
  """Whether jax.random.bits(key) is what random_bits computes."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(key)
    threefry = impl == FUSED_THREEFRY or str(impl) == 'threefry2x32'
  else:
    threefry = key.shape == (2,) and jax.config.jax_default_prng_impl == 'threefry2x32'
  return threefry and jax.config.jax_threefry_partitionable


def random_bits(key, shape: Sequence[int]):
  """`jax.random.bits(key, shape)` (uint32) for a threefry key, bit for bit, written as one
  elementwise expression of the element index that XLA fuses into a single loop.

  Why: jax lowers threefry on the CPU as a loop of 5 steps that writes the hash state to memory
  after each: ~21 ns an element on a 2-core AVX2 CPU, where BERT-base's training step draws 38 M
  mask elements at batch 8. Unrolled and fused: ~3 ns (the step 0.935x its time).
  Each element hashes its own flat index, as jax does with `jax_threefry_partitionable` (its
  default), so the SPMD partitioner splits it like any elementwise op."""
  if not _is_partitionable_threefry(key):
    raise ValueError('ops.random_bits reproduces threefry2x32 with jax_threefry_partitionable; '
                     f'got a {key.dtype} key of shape {key.shape}')
  return _threefry_bits(jax.random.key_data(key), shape)  # A raw uint32 key is its own data.


def _threefry_bits(data, shape):
  if math.prod(shape) >= 2 ** 32:
    raise ValueError(f'ops.random_bits: {shape} has 2**32 elements or more')
  strides = np.cumprod((1,) + tuple(shape[:0:-1]))[::-1]
  index = sum((lax.broadcasted_iota(jnp.uint32, tuple(shape), axis) * np.uint32(stride)
               for axis, stride in enumerate(strides)), jnp.zeros(shape, jnp.uint32))
  # The counter is the 64-bit index split into (high, low) words; high is 0 below 2**32.
  high, low = _threefry2x32(data[0], data[1], jnp.zeros_like(index), index)
  return high ^ low


_THREEFRY = jax.extend.random.threefry_prng_impl


def _fused_threefry_random_bits(data, bit_width, shape):
  if bit_width != 32 or not jax.config.jax_threefry_partitionable or math.prod(shape) >= 2 ** 32:
    return _THREEFRY.random_bits(data, bit_width, shape)
  return _threefry_bits(data, shape)


# jax's threefry2x32 (its seed, split and fold_in) with 32-bit draws through _threefry_bits.
FUSED_THREEFRY = jax.extend.random.define_prng_impl(
    key_shape=_THREEFRY.key_shape, seed=_THREEFRY.seed, split=_THREEFRY.split,
    random_bits=_fused_threefry_random_bits, fold_in=_THREEFRY.fold_in,
    name='threefry2x32_fused', tag='fry_fused')


def fused_key(seed):
  """`jax.random.key(seed)` whose draws are the same, bit for bit (split, fold_in, and every
  sampler built on jax.random.bits: normal, truncated_normal, uniform, bernoulli...), with its
  float32 draws computed as `random_bits`' fused expression instead of jax's threefry loop.

  For initialising a model (`module.init(ops.fused_key(seed), ...)`, as models.init does): the loop
  keeps its hash state in memory, so a large param's init needs temporaries a few times its size.
  XLA's plan for BERT-base's init: 289 MiB of temporaries (704 MiB with the layers unrolled)
  against 20 (0) this way, 2-3x faster; ResNet-50's 152 MiB against 0, and it compiles in 8 s,
  not 15."""
  return jax.random.key(seed, impl=FUSED_THREEFRY)


def _bernoulli_from_bits(bits, p: float):
  """jax.random.bernoulli's draw from uint32 bits: it keeps an element when its uniform draw (the
  top 23 bits as a float in [0, 1)) is below float32(p); in integers, when those bits are below
  ceil(p * 2**23)."""
  return (bits >> np.uint32(9)) < np.uint32(math.ceil(float(np.float32(p)) * 2 ** 23))


class Dropout(nn.Dropout):
  """nn.Dropout with the same masks, bit for bit, drawn with `random_bits` when the key is a
  threefry key (jax's default); other keys take jax.random.bernoulli, as nn.Dropout does. Same
  attributes and call; `isinstance(m, nn.Dropout)` holds, so the freezing code treats it as
  Flax's."""

  @nn.compact
  def __call__(self, inputs, deterministic: Optional[bool] = None, rng=None):
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    rng = self.make_rng(self.rng_collection) if rng is None else rng
    shape = tuple(1 if axis in self.broadcast_dims else n for axis, n in enumerate(inputs.shape))
    if _is_partitionable_threefry(rng):
      mask = _bernoulli_from_bits(random_bits(rng, shape), keep_prob)
    else:
      mask = jax.random.bernoulli(rng, keep_prob, shape)
    mask = jnp.broadcast_to(mask, inputs.shape)
    return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


def depthwise_conv2d(x, kernel, strides: Sequence[int] = (1, 1), padding: Padding = 'VALID'):
  """The depthwise NHWC convolution `lax.conv_general_dilated(..., feature_group_count=C)` with a
  (kh, kw, 1, C) kernel, as a sum over kernel taps of shifted input views times per-channel
  weights (see the module docstring)."""
  if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[-1]:
    raise ValueError(f'depthwise_conv2d takes NHWC inputs with C channels and a (kh, kw, 1, C) '
                     f'kernel; got shapes {x.shape}, {kernel.shape}')
  strides = tuple(int(s) for s in strides)
  padding = _pairs(padding, kernel.shape[:2])
  kh, kw = kernel.shape[:2]
  out_hw = tuple((x.shape[1 + a] + sum(padding[a]) - kernel.shape[a]) // strides[a] + 1
                 for a in range(2))
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  views = _shifted_views(xp, (kh, kw), strides, out_hw, axes=(1, 2))
  y = views[0] * kernel[0, 0, 0]
  for index, view in enumerate(views[1:], start=1):
    y = y + view * kernel[index // kw, index % kw, 0]
  return y


def conv2d(x, kernel, strides: Sequence[int] = (1, 1), padding: Padding = 'VALID'):
  """The NHWC x HWIO convolution `lax.conv_general_dilated(x, kernel, strides, padding)`, with
  gradients that XLA:CPU computes fast (see the module docstring). `padding` is explicit
  ((top, bottom), (left, right)) pairs, as PyTorch pads, or 'VALID'."""
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f'conv2d takes NHWC inputs and HWIO kernels; got shapes {x.shape}, '
                     f'{kernel.shape}')
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f'input has {x.shape[-1]} channels, the kernel expects {kernel.shape[2]}')
  strides = tuple(int(s) for s in strides)
  padding = _pairs(padding, kernel.shape[:2])
  if kernel.shape[:2] == (1, 1):
    return _conv_1x1(x, kernel, strides, padding)
  return _conv_kxk(x, kernel, strides, padding)


class Conv(nn.Module):
  """A 2-D convolution with nn.Conv's params and defaults, computed by `conv2d`.

  Differences from nn.Conv: 2-D NHWC only, no dilation, feature groups only 1 or depthwise
  (feature_group_count == input channels == features, computed by `depthwise_conv2d`), and
  padding must be explicit pairs or 'VALID'."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Padding = 'VALID'
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Optional[Any] = None        # Compute dtype; None: from the inputs and params.
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    groups = self.feature_group_count
    if groups != 1 and not groups == x.shape[-1] == self.features:
      raise ValueError(f'{self.name}: feature_group_count={groups} with {x.shape[-1]} input and '
                       f'{self.features} output channels; only 1 or depthwise is supported')
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1] // groups, self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if groups == 1:
      y = conv2d(x, kernel, self.strides, self.padding)
    else:
      y = depthwise_conv2d(x, kernel, self.strides, self.padding)
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------------------------
# Max pooling with PyTorch's padding and a gather-free gradient.
# ---------------------------------------------------------------------------------------------
def _max_pool_forward(x, window, strides, padding):
  init = jnp.array(-jnp.inf, x.dtype)
  return lax.reduce_window(x, init, lax.max, (1, *window, 1), (1, *strides, 1),
                           ((0, 0), *padding, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
  return _max_pool_forward(x, window, strides, padding)


def _max_pool_fwd(x, window, strides, padding):
  y = _max_pool_forward(x, window, strides, padding)
  return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, dy):
  """Each output's gradient goes to the first input (row-major in its window) that equals the
  max, as PyTorch does: for each window offset, a mask of the positions where it holds the max
  and no earlier offset did, scattered back by an interior-padded (strided) pad. XLA fuses the
  offsets into one elementwise loop; jax's own gradient of reduce_window max builds index
  tensors and a variadic reduce-window that took ~4x as long on XLA:CPU."""
  x, y = residuals
  xp = jnp.pad(_after(x, dy), ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
  out_hw = y.shape[1:3]
  taken = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros(xp.shape, dy.dtype)
  zero = jnp.zeros((), dy.dtype)
  views = _shifted_views(xp, window, strides, out_hw, axes=(1, 2))
  for index, view in enumerate(views):
    i, j = divmod(index, window[1])
    hit = (view == y) & ~taken
    taken = taken | hit
    # Place dy at rows i, i + s, ... and columns j, j + s, ... of the padded input.
    spread = [(0, 0, 0)]
    for axis, offset in ((1, i), (2, j)):
      span = (out_hw[axis - 1] - 1) * strides[axis - 1] + 1
      spread.append((offset, xp.shape[axis] - offset - span, strides[axis - 1] - 1))
    spread.append((0, 0, 0))
    dxp = dxp + lax.pad(jnp.where(hit, dy, zero), zero, spread)
  (top, _), (left, _) = padding
  return (dxp[:, top:top + x.shape[1], left:left + x.shape[2], :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window: Sequence[int], strides: Sequence[int], padding: Padding = 'VALID'):
  """NHWC max pooling, padding with -inf (PyTorch's explicit padding); the gradient of each
  output goes to the first maximal input of its window, as in PyTorch."""
  window, strides = tuple(int(w) for w in window), tuple(int(s) for s in strides)
  return _max_pool(x, window, strides, _pairs(padding, window))
