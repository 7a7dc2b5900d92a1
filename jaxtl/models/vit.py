"""Vision Transformer (Dosovitskiy et al., 2021) as a Flax Linen module.

An image is cut into P x P patches, each linearly embedded (one strided conv); a learned class
token is prepended and learned position embeddings added; a pre-LN Transformer encoder follows:
N x [x + attention(norm1(x)), x + mlp(norm2(x))], then a final norm. The class token (or the
mean of all tokens, for 'gap' pooling) feeds an optional tanh "pre-logits" layer and the head.

Under 'token' pooling the head reads one row of the last block, so the unrolled encoder computes
that block's class-token row apart from the others once keys and values are known: a step that
reads only the logits leaves XLA to drop the other rows' attention output and MLP (ViT-B/16:
~7 % of a training step's FLOPs), while every output in `out` is still there for whoever reads it.

Param paths (L = num_layers):
  embedding/{kernel,bias}            patch embedding, a P x P conv with stride P (HWIO kernel)
  cls                                (1, 1, D) class token ('token' pooling only)
  pos_embedding                      (1, 1 + H/P * W/P, D), the class token's position first
  encoder/layer_{i}/norm1, attention/{query,key,value,out}, norm2, mlp/{fc1,fc2}
  encoder/layers/...                 the same with a leading axis of size L, when scan=True
  encoder_norm                       the final LayerNorm
  pre_logits/{kernel,bias}           optional representation layer (in21k checkpoints)
  head/{kernel,bias}                 the classifier, zero-initialised
"""
import functools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl import ops
from jaxtl.errors import ConfigError
from jaxtl.models.stacked import StackedBlocks

ACTIVATIONS = {
    'gelu': functools.partial(ops.gelu, approximate=False),  # HF and timm: the exact erf form.
    'gelu_tanh': functools.partial(ops.gelu, approximate=True),  # big_vision / original ViT.
}
POOLINGS = ('token', 'gap')
RESAMPLE_METHODS = ('bilinear', 'bicubic', 'nearest')

_dense_init = nn.initializers.xavier_uniform()


def pair(size) -> tuple:
  """(h, w) for an int or a pair (lists from a config included)."""
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  size = tuple(int(s) for s in size)
  if len(size) != 2:
    raise ConfigError(f'expected an int or an (h, w) pair, got {size}')
  return size


class SelfAttention(nn.Module):
  num_heads: int
  qkv_bias: bool
  dropout_rate: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train, query_rows=(slice(None),)):
    """Every token of x attends over all of them. Returns one output per slice of rows in
    `query_rows`: keys and values are computed once, queries and the output projection per
    slice (the last block asks for the class token apart from the rest; see EncoderBlock)."""
    hidden = x.shape[-1]
    head_dim = hidden // self.num_heads
    dense = functools.partial(nn.Dense, hidden, kernel_init=_dense_init, dtype=self.dtype,
                              param_dtype=self.param_dtype, dot_general=ops.dot_general)
    split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, head_dim))
    query = dense(use_bias=self.qkv_bias, name='query')
    k = split(dense(use_bias=self.qkv_bias, name='key')(x))
    v = split(dense(use_bias=self.qkv_bias, name='value')(x))
    out = dense(name='out')
    # Dropout on the attention probabilities needs them materialised; without it, on GPU/TPU,
    # ops.dot_product_attention calls a fused kernel where the backend has one.
    dropout = (functools.partial(ops.Dropout(self.dropout_rate), deterministic=False)
               if train and self.dropout_rate > 0 else None)
    outputs = []
    for rows in query_rows:
      q = split(query(x[:, rows]))
      context = ops.dot_product_attention(q, k, v, dropout=dropout, dtype=self.dtype)
      outputs.append(out(context.reshape(q.shape[:-2] + (hidden,))))
    return tuple(outputs)


class Mlp(nn.Module):
  mlp_dim: int
  hidden_act: str
  dropout_rate: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    kw = dict(kernel_init=_dense_init, bias_init=nn.initializers.normal(stddev=1e-6),
              dtype=self.dtype, param_dtype=self.param_dtype, dot_general=ops.dot_general)
    y = ACTIVATIONS[self.hidden_act](nn.Dense(self.mlp_dim, name='fc1', **kw)(x))
    y = ops.Dropout(self.dropout_rate)(y, deterministic=not train)
    return nn.Dense(x.shape[-1], name='fc2', **kw)(y)


class EncoderBlock(nn.Module):
  """Pre-LN block. `drop_rate` is this block's stochastic-depth rate: an array, so that one
  scanned block serves every depth.

  `head_rows` = k > 0 (the last block under 'token' pooling) computes rows [:k] and [k:] apart
  once the keys and values are known: every later step is per token, so a caller that reads only
  the first k rows (a classifier's loss reads the class token) lets XLA drop the rest, ~84 % of
  the block's FLOPs. The values are the same either way."""
  num_heads: int
  mlp_dim: int
  hidden_act: str
  qkv_bias: bool
  layer_norm_eps: float
  dropout_rate: float
  attention_dropout: float
  stochastic_depth: bool           # Whether any block drops its residual branch.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def drop_path(self, ys, drop_rate, train):
    """Stochastic depth (Huang et al., 2016): per example, drop the residual branch with
    probability drop_rate and scale the kept ones by 1 / (1 - drop_rate). ys: the branch's row
    groups, which share one draw."""
    if not (train and self.stochastic_depth):
      return ys
    keep = 1.0 - drop_rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (ys[0].shape[0], 1, 1))
    return tuple(jnp.where(mask, y / keep.astype(y.dtype), jnp.zeros_like(y)) for y in ys)

  @nn.compact
  def __call__(self, x, drop_rate, train, head_rows=0):
    """(x, row groups): the block's output (the next block's input, nn.scan's carry) and the
    same rows as computed, in groups (one, or two with head_rows)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(ops.LayerNorm, epsilon=self.layer_norm_eps, **kw)
    dropout = ops.Dropout(self.dropout_rate, deterministic=not train)
    rows = (slice(0, head_rows), slice(head_rows, None)) if head_rows else (slice(None),)

    ys = SelfAttention(self.num_heads, self.qkv_bias, self.attention_dropout, name='attention',
                       **kw)(norm(name='norm1')(x), train, rows)
    ys = self.drop_path(tuple(dropout(y) for y in ys), drop_rate, train)
    xs = [x[:, r] + y for r, y in zip(rows, ys)]

    norm2 = norm(name='norm2')
    mlp = Mlp(self.mlp_dim, self.hidden_act, self.dropout_rate, name='mlp', **kw)
    ys = self.drop_path(tuple(dropout(mlp(norm2(x), train)) for x in xs), drop_rate, train)
    xs = tuple(x + y for x, y in zip(xs, ys))
    return (xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=1)), xs


class Encoder(nn.Module):
  """The blocks, unrolled (params encoder/layer_{i}/...) or as one nn.scan over a stacked layer
  axis (encoder/layers/..., one compiled block: fast compiles for deep models)."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  hidden_act: str
  qkv_bias: bool
  layer_norm_eps: float
  dropout_rate: float
  attention_dropout: float
  stochastic_depth: float
  scan: bool
  remat: bool
  head_rows: int = 0               # The last block's head_rows (unrolled only; see EncoderBlock).
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    """(every layer's output, the last layer's output in row groups)."""
    # Stochastic depth grows linearly with depth, from 0 at the first block (DeiT, timm).
    rates = jnp.linspace(0.0, self.stochastic_depth, self.num_layers, dtype=jnp.float32)
    block = EncoderBlock
    if self.remat:
      # Recompute each block's activations in the backward pass; `train` and `head_rows`
      # (args 3, 4) stay static.
      block = nn.remat(block, static_argnums=(3, 4))
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, hidden_act=self.hidden_act,
              qkv_bias=self.qkv_bias, layer_norm_eps=self.layer_norm_eps,
              dropout_rate=self.dropout_rate, attention_dropout=self.attention_dropout,
              stochastic_depth=self.stochastic_depth > 0, dtype=self.dtype,
              param_dtype=self.param_dtype)
    if self.scan:
      # One block for every layer: the last one cannot compute fewer rows.
      layers = nn.scan(block, variable_axes={'params': 0},
                       split_rngs={'params': True, 'dropout': True},
                       in_axes=(0, nn.broadcast, nn.broadcast), length=self.num_layers)
      _, (ys,) = layers(name='layers', **kw)(x, rates, train, 0)
      return tuple(ys[i] for i in range(self.num_layers)), (ys[-1],)
    hidden_states = []
    for i in range(self.num_layers):
      head_rows = self.head_rows if i == self.num_layers - 1 else 0
      x, groups = block(name=f'layer_{i}', **kw)(x, rates[i], train, head_rows)
      hidden_states.append(x)
    return tuple(hidden_states), groups


class ViT(nn.Module):
  """Vision Transformer.

  `__call__(images, train=False)`: images are NHWC float32, already normalised, of size
  `image_size`. Returns `(logits, out)`: logits is None when `num_classes` is None (a headless
  backbone); `out` holds 'stem' (the patch embeddings, (B, H/P, W/P, D)), 'hidden_states' (the
  encoder input and every layer's output, before the final norm), 'encoded' (the final-normed
  tokens), 'pooled' (class token or token mean) and 'pre_logits' (what the head reads).
  """
  image_size: Union[int, Sequence[int]] = 224
  patch_size: Union[int, Sequence[int]] = 16
  num_channels: int = 3
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-6
  hidden_act: str = 'gelu'
  pooling: str = 'token'            # 'token': the class token; 'gap': mean of the tokens.
  representation_size: Optional[int] = None  # A tanh pre-logits layer of this size, if set.
  num_classes: Optional[int] = None
  dropout_rate: float = 0.0
  attention_dropout: float = 0.0
  stochastic_depth: float = 0.0     # Drop-path rate of the last block (0 at the first).
  scan: bool = False                # nn.scan over the blocks (params stacked on a layer axis).
  remat: bool = False               # Recompute block activations in the backward pass.
  # How load_pretrained resamples a checkpoint's position-embedding grid to this image_size
  # (the model itself never resamples).
  resample_method: str = 'bilinear'
  dtype: Any = jnp.float32          # Compute dtype (bf16 for mixed precision).
  param_dtype: Any = jnp.float32    # Storage dtype of the params.

  def __post_init__(self):
    image, patch = pair(self.image_size), pair(self.patch_size)
    if image[0] % patch[0] or image[1] % patch[1]:
      raise ConfigError(f'image_size {image[0]}x{image[1]} is not divisible by patch_size '
                        f'{patch[0]}x{patch[1]}')
    if self.hidden_size % self.num_heads:
      raise ConfigError(f'hidden_size {self.hidden_size} is not divisible by num_heads '
                        f'{self.num_heads}')
    if self.pooling not in POOLINGS:
      raise ConfigError(f'pooling {self.pooling!r} is not one of {POOLINGS}')
    if self.hidden_act not in ACTIVATIONS:
      raise ConfigError(f'hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}')
    if self.resample_method not in RESAMPLE_METHODS:
      raise ConfigError(f'resample_method {self.resample_method!r} is not one of '
                        f'{RESAMPLE_METHODS}')
    if not 0.0 <= self.stochastic_depth < 1.0:
      raise ConfigError(f'stochastic_depth {self.stochastic_depth} is not in [0, 1)')
    super().__post_init__()

  @property
  def grid_size(self) -> tuple:
    """Patches along (height, width)."""
    (h, w), (ph, pw) = pair(self.image_size), pair(self.patch_size)
    return h // ph, w // pw

  @property
  def num_prefix_tokens(self) -> int:
    return 1 if self.pooling == 'token' else 0

  @nn.compact
  def __call__(self, images, train=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    want = (*pair(self.image_size), self.num_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ConfigError(
          f'ViT expects NHWC images of shape (batch, {want[0]}, {want[1]}, {want[2]}) (its '
          f'image_size and num_channels); got {tuple(images.shape)}. Resize the images, or load '
          f"the weights at their size (load_pretrained(..., overrides={{'image_size': ...}}) "
          'resamples the position embeddings)')
    out = {}

    # Patch embedding: a P x P conv with stride P is one linear map per patch.
    patch = pair(self.patch_size)
    x = nn.Conv(self.hidden_size, patch, strides=patch, padding='VALID', name='embedding',
                **kw)(images.astype(self.dtype))
    out['stem'] = x
    n, gh, gw, d = x.shape
    x = x.reshape(n, gh * gw, d)

    if self.pooling == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, d)), x], axis=1)
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), (1, x.shape[1], d),
                     self.param_dtype)
    x = x + pos.astype(x.dtype)
    x = ops.Dropout(self.dropout_rate)(x, deterministic=not train)

    # Under 'token' pooling the head reads one row of the last block: it computes that row apart
    # from the rest, which XLA drops when nothing reads them (a classifier's step).
    layer_outputs, last = Encoder(
        self.num_layers, self.num_heads, self.mlp_dim, self.hidden_act, self.qkv_bias,
        self.layer_norm_eps, self.dropout_rate, self.attention_dropout, self.stochastic_depth,
        self.scan, self.remat, self.num_prefix_tokens, name='encoder', **kw)(x, train)
    out['hidden_states'] = (x,) + layer_outputs
    encoder_norm = ops.LayerNorm(epsilon=self.layer_norm_eps, name='encoder_norm', **kw)
    last = tuple(encoder_norm(rows) for rows in last)  # The norm is per token too.
    x = out['encoded'] = last[0] if len(last) == 1 else jnp.concatenate(last, axis=1)

    x = out['pooled'] = last[0][:, 0] if self.pooling == 'token' else jnp.mean(x, axis=1)
    if self.representation_size:
      x = jnp.tanh(nn.Dense(self.representation_size, name='pre_logits', **kw)(x))
    out['pre_logits'] = x
    if self.num_classes is None:
      return None, out
    # A zero head starts every class at equal odds (the ViT paper's fine-tuning recipe).
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name='head', **kw)(x)
    return logits.astype(jnp.float32), out

  def example_inputs(self):
    """Arguments for `init` (only their shapes and dtypes matter)."""
    return (jnp.zeros((1, *pair(self.image_size), self.num_channels), jnp.float32),)

  # ---- Block structure, for freezing schemes: stem -> blocks -> neck -> head.
  @property
  def num_blocks(self):
    return self.num_layers

  def param_group(self, path: str):
    """('stem'|'block'|'neck'|'head', block index or None) for a '/'-joined param path. Scanned
    layer params get a StackedBlocks index: they freeze or train together."""
    parts = path.split('/')
    if parts[0] in ('embedding', 'cls', 'pos_embedding'):
      return 'stem', None
    if parts[0] == 'encoder' and len(parts) > 1:
      if parts[1] == 'layers':
        return 'block', StackedBlocks(self.num_layers, 'ViT')
      if parts[1].startswith('layer_'):
        return 'block', int(parts[1].removeprefix('layer_'))
    if parts[0] in ('encoder_norm', 'pre_logits'):
      return 'neck', None
    if parts[0] == 'head':
      return 'head', None
    raise KeyError(f'{path!r} is not a ViT param path')


# Named variants (Dosovitskiy et al. Table 1; Ti and S from Touvron et al. / Steiner et al.).
ViTTi16 = functools.partial(ViT, hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768,
                            patch_size=16)
ViTS16 = functools.partial(ViT, hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536,
                           patch_size=16)
ViTB16 = functools.partial(ViT, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
                           patch_size=16)
ViTB32 = functools.partial(ViT, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
                           patch_size=32)
ViTL16 = functools.partial(ViT, hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096,
                           patch_size=16)

# Heads of the named widths, for checkpoints whose tensors do not tell (fused or 2-D qkv).
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
