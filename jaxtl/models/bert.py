"""BERT (Devlin et al., 2019) as a Flax Linen module, parameter-compatible with Hugging Face.

Post-LN encoder: embeddings -> N x [self-attention -> add & norm -> MLP -> add & norm] -> pooler
(tanh dense on the [CLS] token) -> optional classification head.

Param names follow the Hugging Face layout so that conversion reads as a rename:
  embeddings/{word,position,token_type}_embeddings/embedding, embeddings/LayerNorm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}, encoder/layer_{i}/attention_norm
  encoder/layer_{i}/intermediate, encoder/layer_{i}/output, encoder/layer_{i}/output_norm
  encoder/layers/...   the same with a leading axis of size num_layers, when scan=True
  pooler/{kernel,bias}, classifier/{kernel,bias}

scan=True runs the layers as one nn.scan over the stacked params: XLA compiles one layer instead
of num_layers, which cuts the compile of a BERT-base training step from 24 s to 8-10 s on a
2-core CPU (benchmarks/README.md); the loaders stack Hugging Face's per-layer tensors and export
unstacks them.
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtl import ops
from jaxtl.models.stacked import StackedBlocks

ACTIVATIONS = {
    'gelu': functools.partial(ops.gelu, approximate=False),  # HF "gelu" is the exact erf form.
    'gelu_new': functools.partial(ops.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(ops.gelu, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
}

# BERT initialises every dense and embedding matrix from N(0, 0.02); a new head starts at zero.
_init = nn.initializers.normal(stddev=0.02)


class SelfAttention(nn.Module):
  num_heads: int
  dropout_rate: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_bias, train, query_rows=(slice(None),)):
    """Every token of x attends over all of them. Returns one output per slice of rows in
    `query_rows`: keys and values are computed once, queries and the output projection per
    slice (the last layer asks for [CLS] apart from the rest; see EncoderLayer)."""
    hidden = x.shape[-1]
    head_dim = hidden // self.num_heads
    dense = functools.partial(nn.Dense, hidden, kernel_init=_init, dtype=self.dtype,
                              param_dtype=self.param_dtype, dot_general=ops.dot_general)
    split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, head_dim))
    query = dense(name='query')
    k = split(dense(name='key')(x))
    v = split(dense(name='value')(x))
    output = dense(name='output')
    # Softmax in fp32 even when the matmuls run in bf16; dropout on the probabilities.
    dropout = functools.partial(ops.Dropout(self.dropout_rate), deterministic=not train)
    outputs = []
    for rows in query_rows:
      q = split(query(x[:, rows]))
      context = ops.dot_product_attention(q, k, v, mask_bias, dropout, self.dtype)
      outputs.append(output(context.reshape(q.shape[:-2] + (hidden,))))
    return tuple(outputs)


class EncoderLayer(nn.Module):
  """Post-LN layer. `head_rows` = k > 0 (the last layer under 'cls' pooling) computes rows [:k]
  and [k:] apart once the keys and values are known: every later step is per token, so a caller
  that reads only the first k rows (a classifier's loss reads [CLS] through the pooler) lets XLA
  drop the rest, ~84 % of the layer's FLOPs. The values are the same either way."""
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  hidden_dropout: float
  attention_dropout: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_bias, train, head_rows=0):
    """(x, row groups): the layer's output (the next layer's input, nn.scan's carry) and the
    same rows as computed, in groups (one, or two with head_rows)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dropout = ops.Dropout(self.hidden_dropout, deterministic=not train)
    norm = functools.partial(ops.LayerNorm, epsilon=self.layer_norm_eps, **kw)
    rows = (slice(0, head_rows), slice(head_rows, None)) if head_rows else (slice(None),)

    ys = SelfAttention(self.num_heads, self.attention_dropout, name='attention', **kw)(
        x, mask_bias, train, rows)
    attention_norm = norm(name='attention_norm')
    xs = [attention_norm(x[:, r] + dropout(y)) for r, y in zip(rows, ys)]

    # ops.dot_general: Flax's matmul with a weight gradient on XLA:CPU's fast path (ops.py).
    dense = functools.partial(nn.Dense, kernel_init=_init, dot_general=ops.dot_general, **kw)
    intermediate = dense(self.intermediate_size, name='intermediate')
    output, output_norm = dense(x.shape[-1], name='output'), norm(name='output_norm')
    activation = ACTIVATIONS[self.hidden_act]
    xs = tuple(output_norm(x + dropout(output(activation(intermediate(x))))) for x in xs)
    return (xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=1)), xs


class Encoder(nn.Module):
  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  hidden_dropout: float
  attention_dropout: float
  remat: bool = False
  scan: bool = False
  head_rows: int = 0               # The last layer's head_rows (unrolled only; see EncoderLayer).
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_bias, train):
    """(every layer's output, after the input (the embeddings); the last layer's output in row
    groups)."""
    # remat: each layer's activations are recomputed in the backward pass instead of stored
    # (arguments 3 and 4, `train` and `head_rows`, are Python values). Param paths stay
    # encoder/layer_i/...
    layer = nn.remat(EncoderLayer, static_argnums=(3, 4)) if self.remat else EncoderLayer
    args = (self.num_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
            self.hidden_dropout, self.attention_dropout)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan:
      # One layer's params with a leading layer axis; each step draws its own dropout masks.
      # One compiled layer serves every layer: the last cannot compute fewer rows.
      layers = nn.scan(layer, variable_axes={'params': 0},
                       split_rngs={'params': True, 'dropout': True},
                       in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.num_layers)
      _, (ys,) = layers(*args, name='layers', **kw)(x, mask_bias, train, 0)
      return (x, *(ys[i] for i in range(self.num_layers))), (ys[-1],)
    hidden_states = [x]
    for i in range(self.num_layers):
      head_rows = self.head_rows if i == self.num_layers - 1 else 0
      x, groups = layer(*args, name=f'layer_{i}', **kw)(x, mask_bias, train, head_rows)
      hidden_states.append(x)
    return tuple(hidden_states), groups


class Embeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  dropout_rate: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, train):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Rows are looked up from the float32 tables and summed in float32; only then does the
    # compute dtype apply. nn.Embed with a bf16 dtype would cast the whole 30k-row table every
    # step and scatter-add its gradient in bf16 (the suspect behind BERT's slow mixed-precision
    # step on GPU, benchmarks/README.md).
    embed = lambda n, name: nn.Embed(n, self.hidden_size, embedding_init=_init, name=name,
                                     dtype=jnp.promote_types(self.param_dtype, jnp.float32),
                                     param_dtype=self.param_dtype)
    positions = jnp.arange(input_ids.shape[1])[None]
    x = (embed(self.vocab_size, 'word_embeddings')(input_ids)
         + embed(self.max_position_embeddings, 'position_embeddings')(positions)
         + embed(self.type_vocab_size, 'token_type_embeddings')(token_type_ids))
    x = ops.LayerNorm(epsilon=self.layer_norm_eps, name='LayerNorm', **kw)(x)
    return ops.Dropout(self.dropout_rate)(x, deterministic=not train)


class Bert(nn.Module):
  """BERT encoder + pooler + optional sequence-classification head.

  `__call__(input_ids, attention_mask=None, token_type_ids=None, train=False)` returns
  `(logits, out)`: logits is None when `num_classes` is None (a headless backbone); `out` holds
  'hidden_states' (the embedding output and every layer's output), 'encoded' (the last layer),
  'pooled' and 'pre_logits' (the pooled output the head reads).
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: Optional[float] = None  # None: same as hidden_dropout (HF convention).
  # 'cls': tanh dense on the [CLS] token (BERT's pooler); 'mean': masked mean of the last layer,
  # as sentence-transformers models (e.g. all-MiniLM-L6-v2) were trained, with no pooler params.
  pooling: str = 'cls'
  num_classes: Optional[int] = None
  remat: bool = False               # Recompute each layer's activations in the backward pass.
  scan: bool = False                # nn.scan over the layers (params stacked on a layer axis).
  dtype: Any = jnp.float32          # Compute dtype (bf16 for mixed precision).
  param_dtype: Any = jnp.float32    # Storage dtype of the params.

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by num_heads '
                       f'{self.num_heads}')
    if self.pooling not in ('cls', 'mean'):
      raise ValueError(f"pooling {self.pooling!r} is not 'cls' or 'mean'")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}')
    super().__post_init__()

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, train=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    # Padding keys get a large negative score, broadcast over heads and queries.
    mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                          jnp.finfo(jnp.float32).min).astype(jnp.float32)

    x = Embeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                   self.type_vocab_size, self.layer_norm_eps, self.hidden_dropout,
                   name='embeddings', **kw)(input_ids, token_type_ids, train)
    # Under 'cls' pooling the pooler reads one row of the last layer: it computes that row apart
    # from the rest, which XLA drops when nothing reads them (a classifier's step).
    hidden_states, last = Encoder(self.num_layers, self.num_heads, self.intermediate_size,
                                  self.hidden_act, self.layer_norm_eps, self.hidden_dropout,
                                  self.attention_dropout, self.remat, self.scan,
                                  1 if self.pooling == 'cls' else 0, name='encoder', **kw)(
                                      x, mask_bias, train)
    x = hidden_states[-1]

    if self.pooling == 'cls':
      pooled = jnp.tanh(nn.Dense(self.hidden_size, kernel_init=_init, name='pooler', **kw)(
          last[0][:, 0]))
    else:
      weights = attention_mask[..., None].astype(x.dtype)
      pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)
    out = {'hidden_states': hidden_states, 'encoded': x, 'pooled': pooled,
           'pre_logits': pooled}
    if self.num_classes is None:
      return None, out
    rate = self.hidden_dropout if self.classifier_dropout is None else self.classifier_dropout
    pooled = ops.Dropout(rate)(pooled, deterministic=not train)
    logits = nn.Dense(self.num_classes, kernel_init=_init, name='classifier', **kw)(pooled)
    return logits.astype(jnp.float32), out

  def example_inputs(self):
    """Arguments for `init` (only their shapes and dtypes matter)."""
    return (jnp.zeros((1, 8), jnp.int32),)

  # ---- Block structure, for freezing schemes: stem -> blocks -> neck -> head.
  @property
  def num_blocks(self):
    return self.num_layers

  def param_group(self, path: str):
    """('stem'|'block'|'neck'|'head', block index or None) for a '/'-joined param path. Scanned
    layer params get a StackedBlocks index: they freeze or train together."""
    top = path.split('/')[0]
    if top == 'embeddings':
      return 'stem', None
    if top == 'encoder' and path.split('/')[1] == 'layers':
      return 'block', StackedBlocks(self.num_layers, 'BERT')
    if top == 'encoder':
      return 'block', int(path.split('/')[1].removeprefix('layer_'))
    if top == 'pooler':
      return 'neck', None
    if top == 'classifier':
      return 'head', None
    raise KeyError(f'{path!r} is not a BERT param path')


def from_hf_config(cfg: dict, num_classes=None, **overrides) -> Bert:
  """A Bert for a Hugging Face BertConfig (a dict from config.json)."""
  kwargs = dict(
      vocab_size=cfg['vocab_size'], hidden_size=cfg['hidden_size'],
      num_layers=cfg['num_hidden_layers'], num_heads=cfg['num_attention_heads'],
      intermediate_size=cfg['intermediate_size'],
      max_position_embeddings=cfg.get('max_position_embeddings', 512),
      type_vocab_size=cfg.get('type_vocab_size', 2),
      layer_norm_eps=cfg.get('layer_norm_eps', 1e-12), hidden_act=cfg.get('hidden_act', 'gelu'),
      hidden_dropout=cfg.get('hidden_dropout_prob', 0.1),
      attention_dropout=cfg.get('attention_probs_dropout_prob', 0.1),
      classifier_dropout=cfg.get('classifier_dropout'), num_classes=num_classes)
  kwargs.update(overrides)
  return Bert(**kwargs)


# Named variants (hidden, layers, heads, intermediate).
BertBase = functools.partial(Bert, hidden_size=768, num_layers=12, num_heads=12,
                             intermediate_size=3072)
BertLarge = functools.partial(Bert, hidden_size=1024, num_layers=24, num_heads=16,
                              intermediate_size=4096)
MiniLML6 = functools.partial(Bert, hidden_size=384, num_layers=6, num_heads=12,
                             intermediate_size=1536)
MiniLML12 = functools.partial(Bert, hidden_size=384, num_layers=12, num_heads=12,
                              intermediate_size=1536)
BertTiny = functools.partial(Bert, vocab_size=128, hidden_size=32, num_layers=2, num_heads=2,
                             intermediate_size=64, max_position_embeddings=64)
