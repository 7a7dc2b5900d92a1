"""jaxtl.ops.conv2d and Conv: forward and both gradients equal lax.conv_general_dilated's (1x1 as
a matmul, k x k with the matmul weight gradient, both of its paths: many input channels and few),
and Conv is nn.Conv with the same params; dot_product_attention equals the einsum form; gelu
(also PyTorch's), layer_norm/LayerNorm and the attention's softmax equal jax's and Flax's, values
and gradients, and their backward passes keep only what they should; random_bits equals
jax.random.bits and Dropout nn.Dropout, bit for bit."""
import contextlib
import io

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxtl import ops

TOL = 1e-4  # Max abs difference, relative to the reference's largest entry.

# name: (input NHWC, kernel (kh, kw), out channels, strides, padding)
CASES = {
    '1x1': ((2, 9, 9, 24), (1, 1), 16, (1, 1), ((0, 0), (0, 0))),
    '1x1_stride2': ((2, 9, 8, 24), (1, 1), 16, (2, 2), ((0, 0), (0, 0))),
    '1x1_padded': ((2, 6, 6, 8), (1, 1), 4, (1, 1), ((1, 1), (2, 0))),
    '3x3': ((2, 10, 10, 32), (3, 3), 24, (1, 1), ((1, 1), (1, 1))),
    '3x3_stride2': ((2, 11, 10, 32), (3, 3), 24, (2, 2), ((1, 1), (1, 1))),
    '3x3_few_channels': ((2, 10, 10, 3), (3, 3), 8, (1, 1), ((1, 1), (1, 1))),
    '3x3_asymmetric_pad': ((2, 9, 9, 20), (3, 3), 8, (2, 1), ((0, 1), (2, 0))),
    '7x7_stride2_stem': ((2, 20, 20, 3), (7, 7), 16, (2, 2), ((3, 3), (3, 3))),
    '7x7_stride2_wide': ((1, 17, 17, 24), (7, 7), 8, (2, 2), ((3, 3), (3, 3))),
    '4x4_patchify_valid': ((2, 16, 16, 3), (4, 4), 12, (4, 4), 'VALID'),
    '3x1': ((2, 8, 8, 16), (3, 1), 8, (1, 1), ((1, 1), (0, 0))),
}


def _reference(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _assert_close(ours, ref, what):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12)
  assert err < TOL, f'{what}: relative max error {err:.2e}'


def _assert_same_vjp(ours, reference, args, rng, names=('input', 'kernel'), what='forward'):
  """ours(*args) (jitted) against reference: the output, and the gradient of every argument
  (named by `names`) for a random output gradient."""
  ref_y, ref_vjp = jax.vjp(reference, *args)
  y, vjp = jax.vjp(jax.jit(ours), *args)
  _assert_close(y, ref_y, what)
  dy = jnp.asarray(rng.standard_normal(ref_y.shape), jnp.float32)
  for name, grad, ref_grad in zip(names, vjp(dy), ref_vjp(dy), strict=True):
    _assert_close(grad, ref_grad, f'{name} gradient')


def _planned_temporaries(f, *args):
  """Bytes of temporaries XLA plans for jit(f)(*args) (pass a fresh f: jit caches by function)."""
  return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _planned_with_and_without_after(module, x, monkeypatch):
  """Planned temporaries of the gradient of sum(module(x) ** 2): as built, then with ops._after
  made the identity (what XLA:CPU plans when nothing waits for the output gradient)."""
  params = module.init(jax.random.key(0), x)
  planned = lambda: _planned_temporaries(jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2)),
                                         params)
  ours = planned()
  monkeypatch.setattr(ops, '_after', lambda x, dy: x)
  return ours, planned()


@pytest.fixture(params=['xla', 'views'])
def weight_grad_path(request, monkeypatch):
  """A k x k conv's weight gradient from XLA's convolution (these small cases) or, as for large
  inputs, from matmuls over shifted views."""
  if request.param == 'views':
    monkeypatch.setattr(ops, '_XLA_WEIGHT_GRAD_MAX_WORK', 0)
  return request.param


@pytest.mark.parametrize('case', sorted(CASES))
def test_conv2d_matches_lax_forward_and_gradients(case, weight_grad_path):
  shape, kernel_hw, features, strides, padding = CASES[case]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((*kernel_hw, shape[-1], features))
                       / np.sqrt(np.prod(kernel_hw) * shape[-1]), jnp.float32)
  _assert_same_vjp(lambda x, k: ops.conv2d(x, k, strides, padding),
                   lambda x, k: _reference(x, k, strides, padding), (x, kernel), rng)


def test_kernel_gradient_alone_and_under_jit():
  """A stem conv differentiates only its kernel (the images are constants): the custom VJP's
  input gradient is never asked for."""
  shape, kernel_hw, features, strides, padding = CASES['7x7_stride2_stem']
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((*kernel_hw, shape[-1], features)) * 0.1, jnp.float32)
  loss = lambda conv: (lambda k: jnp.sum(jnp.sin(conv(x, k, strides, padding))))
  ours = jax.jit(jax.grad(loss(ops.conv2d)))(kernel)
  _assert_close(ours, jax.grad(loss(_reference))(kernel), 'kernel gradient')


def test_bfloat16_gradients_keep_dtypes(weight_grad_path):
  x = jnp.ones((1, 6, 6, 20), jnp.bfloat16)
  kernel = jnp.full((3, 3, 20, 4), 0.1, jnp.bfloat16)
  dx, dk = jax.grad(lambda x, k: ops.conv2d(x, k, (1, 1), ((1, 1), (1, 1))).astype(
      jnp.float32).sum(), argnums=(0, 1))(x, kernel)
  assert dx.dtype == dk.dtype == jnp.bfloat16
  # Interior taps see all 36 positions: the f32-accumulated sum is exact in bf16.
  assert float(dk[1, 1, 0, 0]) == 36.0


def test_weight_gradient_inputs_wait_for_the_output_gradient(weight_grad_path, monkeypatch):
  """What a k x k conv's weight gradient derives from its input alone (the shifted views; XLA's
  own relayout of it) XLA:CPU would build during the forward pass and keep for every layer until
  the backward pass reaches it; ops._after makes it wait for the output gradient. Six 3x3 convs
  plan fewer than half the temporaries with the views (ResNet-50's full step: 1,426 -> 966 MiB),
  4 activations fewer with XLA's convolution."""
  x = jnp.ones((8, 32, 32, 16))
  kernels = [jnp.full((3, 3, 16, 16), 0.01)] * 6

  def planned():
    def loss(kernels):
      y = x
      for kernel in kernels:
        y = jax.nn.relu(ops.conv2d(y, kernel, padding=((1, 1), (1, 1))))
      return jnp.sum(y ** 2)
    return _planned_temporaries(jax.grad(loss), kernels)
  ours = planned()
  monkeypatch.setattr(ops, '_after', lambda x, dy: x)
  if weight_grad_path == 'views':
    assert ours < planned() / 2
  else:
    assert ours <= planned() - 4 * x.nbytes


@pytest.mark.parametrize('shape, path', [((8, 56, 56, 64), 'xla'), ((8, 112, 112, 128), 'views')])
def test_weight_gradient_path_follows_the_work(shape, path):
  """XLA's weight-gradient convolution up to _XLA_WEIGHT_GRAD_MAX_WORK per tap (ResNet-50's 3x3
  convs at batch 8), nine matmuls over shifted views beyond (where XLA's ran 3x slower). Traced
  from shapes alone."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  kernel = jax.ShapeDtypeStruct((3, 3, shape[-1], shape[-1]), jnp.float32)
  grad = jax.grad(lambda k, x: ops.conv2d(x, k, padding=((1, 1), (1, 1))).sum())
  jaxpr = str(jax.make_jaxpr(grad)(kernel, x))
  # The forward, the input gradient (and its primal, which XLA drops), and the weight gradient's
  # conv or nine dots.
  assert (jaxpr.count('conv_general_dilated'), jaxpr.count('dot_general')) == (
      (4, 0) if path == 'xla' else (3, 9))


@pytest.mark.parametrize('use_bias', [False, True])
def test_conv_module_is_nn_conv(use_bias):
  kw = dict(features=8, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
            use_bias=use_bias)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, 9, 5)), jnp.float32)
  ours, theirs = ops.Conv(**kw), nn.Conv(**kw)
  variables = theirs.init(jax.random.key(0), x)
  assert (jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.key(0), x))
          == jax.tree_util.tree_map(jnp.shape, variables))
  if use_bias:  # nn.Conv starts biases at zero; give them values so the test sees them.
    variables = {'params': {**variables['params'], 'bias': jnp.arange(8.0)}}
  _assert_close(ours.apply(variables, x), theirs.apply(variables, x), 'Conv vs nn.Conv')


# name: (input NHWC, kernel (kh, kw), strides, padding), for depthwise convs (MobileNet's).
DEPTHWISE_CASES = {
    '3x3': ((2, 9, 9, 12), (3, 3), (1, 1), ((1, 1), (1, 1))),
    '3x3_stride2_odd': ((2, 11, 10, 12), (3, 3), (2, 2), ((1, 1), (1, 1))),
    '5x5_asymmetric': ((1, 8, 9, 5), (5, 5), (2, 1), ((2, 1), (0, 2))),
    '3x3_valid': ((2, 7, 7, 4), (3, 3), (1, 1), 'VALID'),
}


@pytest.mark.parametrize('case', sorted(DEPTHWISE_CASES))
def test_depthwise_conv2d_matches_grouped_lax_conv(case):
  shape, kernel_hw, strides, padding = DEPTHWISE_CASES[case]
  c = shape[-1]
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((*kernel_hw, 1, c)), jnp.float32)
  reference = lambda x, k: lax.conv_general_dilated(
      x, k, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)
  _assert_same_vjp(lambda x, k: ops.depthwise_conv2d(x, k, strides, padding), reference,
                   (x, kernel), rng)


def test_depthwise_conv_module_is_grouped_nn_conv():
  kw = dict(features=6, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
            feature_group_count=6, use_bias=False)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 9, 9, 6)), jnp.float32)
  ours, theirs = ops.Conv(**kw), nn.Conv(**kw)
  variables = theirs.init(jax.random.key(0), x)
  assert variables['params']['kernel'].shape == (3, 3, 1, 6)
  assert (jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.key(0), x))
          == jax.tree_util.tree_map(jnp.shape, variables))
  _assert_close(ours.apply(variables, x), theirs.apply(variables, x), 'Conv vs nn.Conv')
  with pytest.raises(ValueError, match='feature_group_count=2 with 6 input and 6 output'):
    ops.Conv(**{**kw, 'feature_group_count': 2}).init(jax.random.key(0), x)


def test_conv_rejects_same_padding():
  with pytest.raises(ValueError, match='explicit'):
    ops.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), (2, 2), 'SAME')


@pytest.mark.parametrize('window,strides,padding', [((3, 3), (2, 2), ((1, 1), (1, 1))),
                                                    ((2, 2), (2, 2), 'VALID'),
                                                    ((3, 3), (1, 1), ((1, 1), (1, 1)))])
def test_max_pool_matches_pytorch_values_and_gradients(window, strides, padding):
  """Against torch.nn.functional.max_pool2d, on inputs with ties (ReLU zeros, repeated values):
  the gradient goes to the first maximum of each window, as in PyTorch."""
  import torch  # In the test extra: a missing torch fails, not skips.
  rng = np.random.default_rng(3)
  x = np.maximum(rng.integers(-3, 4, (2, 9, 10, 3)), 0).astype(np.float32)  # Many ties.
  dy_shape = jax.eval_shape(lambda x: ops.max_pool(x, window, strides, padding), x).shape
  dy = rng.standard_normal(dy_shape).astype(np.float32)
  y, vjp = jax.vjp(lambda x: ops.max_pool(x, window, strides, padding), jnp.asarray(x))
  dx, = vjp(jnp.asarray(dy))
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_(True)
  pad = 0 if padding == 'VALID' else padding[0][0]
  ty = torch.nn.functional.max_pool2d(tx, window, strides, pad)
  ty.backward(torch.from_numpy(dy.transpose(0, 3, 1, 2)))
  np.testing.assert_array_equal(np.asarray(y), ty.detach().numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(dx), tx.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6)


def test_max_pool_gradient_matches_jax_without_ties():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 11, 11, 4)), jnp.float32)
  pads = ((1, 1), (1, 1))
  f = lambda pool: (lambda x: jnp.sum(jnp.sin(pool(x))))
  ours = jax.grad(f(lambda x: ops.max_pool(x, (3, 3), (2, 2), pads)))(x)
  ref = jax.grad(f(lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=pads)))(x)
  _assert_close(ours, ref, 'max pool gradient')


@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
@pytest.mark.parametrize('features', [(12, 5), (5, 12)], ids=['narrowing', 'widening'])
def test_dot_general_is_lax_dot_general_for_dense_layers(backend, features, monkeypatch):
  """On CPU the weight gradient is a transposed-first matmul (of the activation, or for a layer
  that narrows of the output gradient); elsewhere the plain dot (the 'gpu' case fakes the backend
  name, which is all the branch reads)."""
  if backend != jax.default_backend():
    monkeypatch.setattr(ops.jax, 'default_backend', lambda: backend)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 7, features[0])), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal(features), jnp.float32)
  numbers = (((2,), (0,)), ((), ()))
  f = lambda dot: (lambda x, k: jnp.sum(jnp.sin(dot(x, k, numbers))))
  _assert_close(ops.dot_general(x, kernel, numbers), lax.dot_general(x, kernel, numbers), 'dot')
  ours = jax.grad(f(ops.dot_general), argnums=(0, 1))(x, kernel)
  ref = jax.grad(f(lax.dot_general), argnums=(0, 1))(x, kernel)
  _assert_close(ours[0], ref[0], 'input gradient')
  _assert_close(ours[1], ref[1], 'kernel gradient')
  # Mixed precision: bf16 activations, a float32 output gradient and kernel.
  x16 = x.astype(jnp.bfloat16)
  dk = jax.grad(lambda k: jnp.sum(ops.dot_general(x16, k.astype(jnp.bfloat16), numbers,
                                                  preferred_element_type=jnp.float32)))(kernel)
  assert dk.dtype == jnp.float32
  want = x16.astype(jnp.float32).sum((0, 1))[:, None]  # d sum(x @ k) / dk; bf16-rounded below.
  np.testing.assert_allclose(dk, jnp.broadcast_to(want, features), rtol=1e-2, atol=1e-2)
  # Any other contraction is lax.dot_general's own.
  batched = (((2,), (1,)), ((0,), (0,)))
  y = jnp.ones((2, features[0], 3))
  _assert_close(ops.dot_general(x, y, batched), lax.dot_general(x, y, batched), 'batched dot')


def test_dense_with_ops_dot_general_keeps_params_and_gradients():
  x = jnp.asarray(np.random.default_rng(6).standard_normal((3, 4, 6)), jnp.float32)
  ours, theirs = nn.Dense(5, dot_general=ops.dot_general), nn.Dense(5)
  variables = theirs.init(jax.random.key(0), x)
  loss = lambda module: (lambda v: jnp.sum(module.apply(v, x) ** 2))
  _assert_close(ours.apply(variables, x), theirs.apply(variables, x), 'Dense')
  g_ours, g_ref = jax.grad(loss(ours))(variables), jax.grad(loss(theirs))(variables)
  for path in ('kernel', 'bias'):
    _assert_close(g_ours['params'][path], g_ref['params'][path], f'Dense {path} gradient')


def _reference_attention(q, k, v, bias, mask):
  """Attention written out per (batch, head) with numpy-style einsums, float32 throughout."""
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(scores + (0 if bias is None else bias), axis=-1) * mask
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def test_dense_and_gelu_backward_passes_wait_for_the_output_gradient(monkeypatch):
  """The dense layer's transposed activations and kernel, and GELU's derivative terms, depend on
  forward values alone; without ops._after XLA:CPU computes them in the forward pass (the GELU
  terms shared with the forward's own) and keeps them until the backward pass. A 4-layer
  residual MLP plans 0.74x the temporaries it plans without (10.5 against 14.3 MiB; 0.58x while
  GELU was jax.nn.gelu's erfc form, whose forward shares more with its derivative; ViT-B/16
  last_blocks then: 308 -> 234 MiB)."""
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(4):
        x = x + nn.Dense(64, dot_general=ops.dot_general)(
            ops.gelu(nn.Dense(256, dot_general=ops.dot_general)(x)))
      return x

  ours, without = _planned_with_and_without_after(MLP(), jnp.ones((8, 128, 64)), monkeypatch)
  assert ours < 0.8 * without


@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
@pytest.mark.parametrize('with_bias', [False, True])
def test_dot_product_attention_matches_einsum_reference(backend, with_bias, monkeypatch):
  """Values and all three gradients equal the einsum form, with a padding bias (BERT's), and with
  a dropout-like function applied to the probabilities (it sees them as (batch, heads, q, k))."""
  if backend != jax.default_backend():
    monkeypatch.setattr(ops.jax, 'default_backend', lambda: backend)
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32) for _ in range(3))
  bias = None
  if with_bias:  # The last two keys of example 1 are padding.
    bias = jnp.where(jnp.arange(5)[None, None, None, :] < jnp.array([5, 3])[:, None, None, None],
                     0.0, jnp.finfo(jnp.float32).min)
  mask = jnp.asarray(rng.random((2, 3, 5, 5)) > 0.2, jnp.float32) / 0.8
  for dropout, m in ((None, 1.0), (lambda p: p * mask, mask)):
    _assert_same_vjp(lambda q, k, v: ops.dot_product_attention(q, k, v, bias, dropout),
                     lambda q, k, v: _reference_attention(q, k, v, bias, m), (q, k, v), rng,
                     names=('attention dq', 'attention dk', 'attention dv'), what='attention')
  if with_bias:  # Padding keys get no weight: changing them changes nothing.
    v2 = v.at[1, 3:].set(100.0)
    _assert_close(ops.dot_product_attention(q, k, v2, bias)[1],
                  ops.dot_product_attention(q, k, v, bias)[1], 'masked keys')


def test_dot_product_attention_mixed_precision():
  """bf16 inputs: the softmax runs in float32 and the probabilities are cast to `dtype`."""
  rng = np.random.default_rng(8)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.bfloat16) for _ in range(3))
  seen = {}

  def dropout(p):
    seen['dtype'] = p.dtype
    return p
  y = ops.dot_product_attention(q, k, v, dropout=dropout, dtype=jnp.bfloat16)
  assert y.dtype == jnp.bfloat16 and seen['dtype'] == jnp.bfloat16
  ref = _reference_attention(*(t.astype(jnp.float32) for t in (q, k, v)), None, 1.0)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=5e-2)


def _residual_shapes(fn, *args):
  """Shapes of what the backward pass of fn keeps from the forward (its arguments and literals
  excluded), from jax's own report: lines such as 'f32[4,7] output of exp from ...'."""
  report = io.StringIO()
  with contextlib.redirect_stdout(report):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  shapes = []
  for line in report.getvalue().splitlines():
    aval, source = line.split(' ', 1)
    if not source.startswith(('from the argument', 'from a literal')):
      dims = aval[aval.index('[') + 1:-1]
      shapes.append(tuple(int(d) for d in dims.split(',') if d))
  return sorted(shapes)


@pytest.mark.parametrize('approximate', [False, True])
def test_gelu_matches_jax_and_keeps_only_its_input(approximate):
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.standard_normal((4, 7, 16)) * 3, jnp.float32)
  reference = lambda x: jax.nn.gelu(x, approximate=approximate)
  ours = lambda x: ops.gelu(x, approximate)
  _assert_same_vjp(ours, reference, (x,), rng, names=('gelu input',), what='gelu')
  # jax's own GELU keeps intermediates of its derivative as large as x; ours keeps none.
  assert _residual_shapes(reference, x), 'the reference no longer stores intermediates'
  assert _residual_shapes(ours, x) == []


@pytest.mark.parametrize('approximate,atol', [(False, 2e-6), (True, 2e-5)])
def test_gelu_matches_pytorch_values_and_gradients(approximate, atol):
  """Against torch.nn.functional.gelu (the exact form from erf, as ours; jax.nn.gelu's is erfc)
  over [-12, 12] and random inputs: values and input gradients within a few float32 ulps of
  outputs up to 12 (the tanh form's derivative: 1e-5 of gradients up to ~4); bfloat16 stays
  bfloat16."""
  import torch  # In the test extra: a missing torch fails, not skips.
  rng = np.random.default_rng(10)
  x = np.concatenate([np.linspace(-12, 12, 20001, dtype=np.float32),
                      rng.standard_normal(4000).astype(np.float32) * 3])
  dy = rng.standard_normal(x.shape).astype(np.float32)
  y, vjp = jax.vjp(jax.jit(lambda x: ops.gelu(x, approximate)), jnp.asarray(x))
  tx = torch.from_numpy(x).requires_grad_(True)
  ty = torch.nn.functional.gelu(tx, approximate='tanh' if approximate else 'none')
  ty.backward(torch.from_numpy(dy))
  np.testing.assert_allclose(np.asarray(y), ty.detach().numpy(), rtol=0, atol=atol)
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(dy))[0]), tx.grad.numpy(), rtol=0,
                             atol=atol)
  xb = jnp.asarray(x[::25], jnp.bfloat16)
  yb, vjp_b = jax.vjp(lambda x: ops.gelu(x, approximate), xb)
  assert yb.dtype == vjp_b(jnp.ones_like(yb))[0].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(yb, np.float32), np.asarray(y)[::25], rtol=2e-2,
                             atol=2e-2)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax_layer_norm(dtype):
  """Values and the gradients of input, scale and bias equal nn.LayerNorm's (float32 compute);
  the backward keeps only per-row statistics besides its arguments."""
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.standard_normal((3, 5, 32)) * 2 + 1.5, jnp.float32)
  variables = nn.LayerNorm(epsilon=1e-5).init(jax.random.key(0), x)
  scale = jnp.asarray(rng.standard_normal(32), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(32), jnp.float32)
  reference = lambda x, s, b: nn.LayerNorm(epsilon=1e-5).apply(
      {'params': {'scale': s, 'bias': b}}, x)
  ours = lambda x, s, b: ops.LayerNorm(epsilon=1e-5).apply({'params': {'scale': s, 'bias': b}}, x)
  assert jax.tree.structure(ops.LayerNorm(epsilon=1e-5).init(jax.random.key(0), x)) == \
      jax.tree.structure(variables)
  if dtype == jnp.float32:
    _assert_same_vjp(ours, reference, (x, scale, bias), rng,
                     names=('layer norm input', 'scale', 'bias'), what='layer norm')
    assert _residual_shapes(lambda x, s, b: ops.layer_norm(x, s, b, 1e-5), x, scale, bias) == \
        [(3, 5, 1), (3, 5, 1)]
  else:  # bf16 activations: float32 statistics, bf16 output and input gradient.
    xb = x.astype(dtype)
    y = ops.LayerNorm(epsilon=1e-5, dtype=dtype).apply({'params': {'scale': scale, 'bias': bias}},
                                                       xb)
    assert y.dtype == dtype
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               reference(xb.astype(jnp.float32), scale, bias), atol=6e-2)
    grad = jax.grad(lambda x: jnp.sum(ops.layer_norm(x, scale, bias, 1e-5, dtype)))(xb)
    assert grad.dtype == dtype


def test_layer_norm_backward_plans_no_normalised_input_ahead_of_time(monkeypatch):
  """The backward pass's normalised input depends on forward values alone, and the sums over it
  are fusions that do not recompute it: without ops._after XLA:CPU computed it in the forward
  pass and held one per norm until the backward pass (ViT-B/16's full step: 1,064 -> 964 MiB of
  planned temporaries with it). A pre-LN residual stack of 6 plans 5 activations fewer; the
  assertion asks for at least 4."""
  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(6):
        x = x + nn.Dense(x.shape[-1])(ops.LayerNorm()(x))
      return x

  x = jnp.ones((8, 128, 64))
  ours, without = _planned_with_and_without_after(Stack(), x, monkeypatch)
  assert ours <= without - 4 * x.size * 4


def _batch_norm_reference(x, scale, bias, epsilon=1e-5):
  """nn.BatchNorm's training-mode arithmetic (float32 statistics, E[x^2] - E[x]^2 clipped at 0),
  returning what ops.batch_norm returns, for jax's autodiff to differentiate."""
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.float32)
  mean = x32.mean(axes)
  var = jnp.maximum(0.0, jnp.square(x32).mean(axes) - jnp.square(mean))
  return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias, mean, var


def _sb(variables):
  return {'s': variables['params']['scale'], 'b': variables['params']['bias']}


def test_batch_norm_module_is_nn_batch_norm_in_both_modes():
  """Same variables; in training mode the same output (bit for bit), running statistics and
  gradients of input, scale and bias; with running averages it is nn.BatchNorm's own code."""
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.standard_normal((4, 5, 6, 16)) * 3 + 2, jnp.float32)
  ref, ours = nn.BatchNorm(momentum=0.9), ops.BatchNorm(momentum=0.9)
  variables = ref.init(jax.random.key(0), x, use_running_average=False)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x, use_running_average=False)) == \
      jax.tree.map(jnp.shape, variables)
  variables = jax.tree.map(lambda v: v + jnp.asarray(rng.standard_normal(v.shape), v.dtype) * 0.3,
                           variables)
  stats = variables['batch_stats']
  for running in (False, True):
    apply = lambda m: lambda x, s, b: m.apply({'params': {'scale': s, 'bias': b},
                                               'batch_stats': stats}, x,
                                              use_running_average=running, mutable=['batch_stats'])
    (y, new), (ref_y, ref_new) = apply(ours)(x, **_sb(variables)), apply(ref)(x, **_sb(variables))
    np.testing.assert_array_equal(y, ref_y)
    jax.tree.map(np.testing.assert_array_equal, new, ref_new)
    _assert_same_vjp(lambda *a: apply(ours)(*a)[0], lambda *a: apply(ref)(*a)[0],
                     (x, *_sb(variables).values()), rng, names=('input', 'scale', 'bias'),
                     what=f'batch norm (running averages: {running})')


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm_gradients_equal_autodiff_and_keep_only_statistics(dtype):
  """Gradients through all three outputs (the batch statistics feed the running averages) equal
  autodiff of nn.BatchNorm's formula, and stay finite for a constant channel (variance ~0, where
  the clip at 0 acts); the backward keeps only per-channel statistics besides its arguments,
  where autodiff keeps activation-sized tensors."""
  rng = np.random.default_rng(13)
  x = rng.standard_normal((3, 4, 5, 8)) * 2 + 1
  x = jnp.asarray(x, dtype)
  scale, bias = (jnp.asarray(rng.standard_normal(8), jnp.float32) for _ in range(2))
  ours = lambda x, s, b: ops.batch_norm(x, s, b, 1e-5, jnp.float32)
  y, vjp = jax.vjp(jax.jit(ours), x, scale, bias)
  ref_y, ref_vjp = jax.vjp(_batch_norm_reference, x, scale, bias)
  cotangents = tuple(jnp.asarray(rng.standard_normal(t.shape), jnp.float32) for t in ref_y)
  names = ('output', 'mean', 'var', 'input gradient', 'scale gradient', 'bias gradient')
  for name, got, want in zip(names, (*y, *vjp(cotangents)), (*ref_y, *ref_vjp(cotangents))):
    assert got.dtype == want.dtype, name
    if dtype == jnp.float32:
      _assert_close(got, want, f'batch norm {name}')
    else:  # bf16 input: float32 statistics and output (as asked), a bf16 input gradient.
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                 rtol=1e-2, atol=1e-2 * float(jnp.abs(want).max()), err_msg=name)
  constant = x.at[..., 2].set(0.7)
  y, vjp = jax.vjp(jax.jit(ours), constant, scale, bias)
  assert y[2][2] < 1e-6
  assert all(np.isfinite(np.asarray(t, np.float32)).all() for t in (*y, *vjp(cotangents)))
  assert _residual_shapes(lambda *a: ops.batch_norm(*a, 1e-5)[0], x, scale, bias) == \
      [(8,), (8,)]
  assert x.shape in _residual_shapes(lambda *a: _batch_norm_reference(*a)[0], x, scale, bias), \
      'the reference no longer keeps activation-sized tensors'


def test_batch_norm_backward_plans_no_activations_ahead_of_time():
  """XLA:CPU computes what a backward pass derives from forward values alone as soon as the
  forward has them and keeps it until the backward needs it. ops.batch_norm's backward makes its
  centred input wait for the output gradient (ops._after): a stack of Dense -> BatchNorm -> ReLU
  plans at least 4 activations fewer temporaries than with nn.BatchNorm."""
  class Stack(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x):
      for _ in range(6):
        x = nn.relu(self.norm(use_running_average=False)(nn.Dense(32, use_bias=False)(x)))
      return x

  x = jnp.ones((8, 32, 32, 32))
  activation = x.size * 4

  def planned(norm):
    variables = Stack(norm).init(jax.random.key(0), x)
    def loss(params):
      y, _ = Stack(norm).apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                               mutable=['batch_stats'])
      return jnp.sum(y ** 2)
    return _planned_temporaries(jax.grad(loss), variables['params'])
  assert planned(ops.BatchNorm) <= planned(nn.BatchNorm) - 4 * activation


def test_relu_is_jax_relu_in_values_and_gradient():
  x = jnp.array([-jnp.inf, -2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0, jnp.inf, jnp.nan], jnp.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    np.testing.assert_array_equal(jax.jit(ops.relu)(x.astype(dtype)),
                                  jax.nn.relu(x.astype(dtype)))  # NaN stays NaN.
    assert ops.relu(x.astype(dtype)).dtype == dtype
  grad = lambda f: jax.vmap(jax.grad(lambda v: 3.0 * f(v)))(x)
  np.testing.assert_array_equal(grad(ops.relu), grad(jax.nn.relu))  # 0 at 0, as jax and torch.
  np.testing.assert_array_equal(grad(ops.relu), [0, 0, 0, 0, 0, 3, 3, 3, 0])


def test_residual_outputs_through_ops_relu_are_not_recomputed_by_their_consumers():
  """A chain of residual blocks, x = relu(x + f(x)), f a 1x1 conv and an inference-mode
  BatchNorm: with relu = max(x, 0), XLA fuses each block's output into the next block's add and
  computes it again there, so every block's conv output stays alive to the end (6 activations
  planned for 6 blocks); through ops.relu each output is computed once (2)."""
  x = jnp.ones((8, 32, 32, 64))
  activation = x.size * 4

  def planned(relu):
    def forward(kernels, x):
      for kernel in kernels:
        x = relu(x + (jnp.matmul(x, kernel) * 0.5 + 0.1))
      return x
    return _planned_temporaries(forward, [jnp.ones((64, 64))] * 6, x)
  assert planned(nn.relu) >= 6 * activation  # What ops.relu avoids is still there.
  assert planned(ops.relu) <= 2 * activation


def test_attention_softmax_keeps_only_the_probabilities():
  """Autodiff of the softmax stored its unnormalised exponentials too; the attention's backward
  keeps q, k, v and the probabilities, one (batch, heads, q, k) tensor."""
  rng = np.random.default_rng(11)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32) for _ in range(3))
  shapes = _residual_shapes(lambda q, k, v: ops.dot_product_attention(q, k, v), q, k, v)
  assert shapes.count((2, 3, 5, 5)) == 1, shapes


@pytest.mark.parametrize('shape', [(1,), (7,), (3, 5), (2, 3, 5, 7), (4, 12, 33, 33)])
@pytest.mark.parametrize('make_key', [jax.random.PRNGKey, jax.random.key], ids=['raw', 'typed'])
def test_random_bits_equal_jax_random_bits(shape, make_key):
  for seed in (0, 12345):
    key = make_key(seed)
    expected = jax.random.bits(key, shape, jnp.uint32)
    got = jax.jit(ops.random_bits, static_argnums=1)(key, shape)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_random_bits_sharded_equal_unsharded():
  # The hash of each element's flat index splits over devices like any elementwise op.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('a', 'b'))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('a', 'b'))
  key = jax.random.key(7)
  sharded = jax.jit(ops.random_bits, static_argnums=1, out_shardings=sharding)(key, (8, 6))
  assert len(sharded.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(jax.random.bits(key, (8, 6))))


def test_random_bits_rejects_other_keys():
  with pytest.raises(ValueError, match='threefry2x32'):
    ops.random_bits(jax.random.key(0, impl='rbg'), (4,))


_SAMPLERS = {
    'bits32': lambda k: jax.random.bits(k, (5, 7)),
    'bits16': lambda k: jax.random.bits(k, (9,), jnp.uint16),  # Not 32-bit: jax's own path.
    'bits8': lambda k: jax.random.bits(k, (11,), jnp.uint8),
    'normal': lambda k: jax.random.normal(k, (4, 33, 17)),
    'truncated_normal': lambda k: jax.random.truncated_normal(k, -2.0, 2.0, (300,)),
    'uniform': lambda k: jax.random.uniform(k, (2, 3), minval=-1.0, maxval=3.0),
    'bernoulli': lambda k: jax.random.bernoulli(k, 0.3, (64,)),
    'split': lambda k: jax.random.normal(jax.random.split(k, 3)[2], (6,)),
    'fold_in': lambda k: jax.random.normal(jax.random.fold_in(k, 11), (6,)),
    'vmap': lambda k: jax.vmap(lambda k: jax.random.normal(k, (2, 5)))(jax.random.split(k, 4)),
}


@pytest.mark.parametrize('sampler', sorted(_SAMPLERS))
def test_fused_key_draws_equal_jax_random_key(sampler):
  for seed in (0, 2024):
    expected = jax.jit(_SAMPLERS[sampler])(jax.random.key(seed))
    got = jax.jit(_SAMPLERS[sampler])(ops.fused_key(seed))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  assert ops._is_partitionable_threefry(ops.fused_key(0))
  np.testing.assert_array_equal(ops.random_bits(ops.fused_key(3), (10,)),
                                jax.random.bits(jax.random.key(3), (10,)))


def test_fused_key_inits_a_model_as_jax_random_key_without_the_temporaries():
  """The same params, bit for bit; XLA's plan for the init holds no threefry state the size of
  the largest param (here a 2**21-element embedding, 8 MiB)."""
  from jaxtl.models.bert import Bert
  module = Bert(vocab_size=2 ** 13, hidden_size=256, num_layers=2, num_heads=4,
                intermediate_size=512, max_position_embeddings=64, num_classes=3)
  inputs = (jnp.ones((1, 8), jnp.int32),)
  init = lambda key: jax.jit(lambda: module.init(key, *inputs)).lower().compile()
  expected, got = init(jax.random.key(4))(), init(ops.fused_key(4))()
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)
  embedding = 2 ** 13 * 256 * 4
  assert init(jax.random.key(4)).memory_analysis().temp_size_in_bytes >= embedding
  assert init(ops.fused_key(4)).memory_analysis().temp_size_in_bytes < embedding / 8


@pytest.mark.parametrize('rate,broadcast_dims', [(0.1, ()), (0.5, ()), (0.37, (1,)), (0.9, (0, 2))])
@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg'])
def test_dropout_masks_equal_flax_dropout(rate, broadcast_dims, impl):
  x = jax.random.normal(jax.random.key(0), (4, 33, 17))
  rngs = {'dropout': jax.random.key(5, impl=impl)}
  expected = nn.Dropout(rate, broadcast_dims).apply({}, x, deterministic=False, rngs=rngs)
  got = ops.Dropout(rate, broadcast_dims).apply({}, x, deterministic=False, rngs=rngs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  assert 0 < np.mean(np.asarray(got) == 0) < 1


def test_dropout_edge_cases_and_gradient():
  x = jnp.arange(1.0, 13.0).reshape(3, 4)
  rngs = {'dropout': jax.random.PRNGKey(1)}
  assert ops.Dropout(0.0).apply({}, x, deterministic=False, rngs=rngs) is x
  np.testing.assert_array_equal(ops.Dropout(0.3, deterministic=True).apply({}, x), x)
  np.testing.assert_array_equal(ops.Dropout(1.0).apply({}, x, deterministic=False, rngs=rngs), 0)
  # The gradient is the mask over keep_prob, as Flax's.
  grad = lambda cls: jax.grad(lambda x: cls(0.4).apply({}, x, False, rngs=rngs).sum())(x)
  np.testing.assert_array_equal(grad(ops.Dropout), grad(nn.Dropout))
  assert isinstance(ops.Dropout(0.1), nn.Dropout)


@pytest.mark.parametrize('p', [0.9, 0.5, 0.63, 1e-3, 0.1])
def test_bernoulli_threshold_matches_jax_uniform_at_the_boundary(p):
  # The 23-bit draws on either side of p * 2**23, through jax's float path and the integer one.
  edge = int(np.float32(p) * 2 ** 23)
  draws = np.arange(max(edge - 3, 0), edge + 4, dtype=np.uint32)
  bits = jnp.asarray(draws << np.uint32(9) | np.uint32(0x1ff))
  floats = lax.bitcast_convert_type((bits >> 9) | np.uint32(0x3F800000), jnp.float32) - 1.0
  np.testing.assert_array_equal(ops._bernoulli_from_bits(bits, p), floats < np.float32(p))
