"""LoRA (Hu et al., 2021): low-rank adapters beside chosen Dense kernels, y = x W + s (x A) B with
s = alpha / rank, A (in, r) random, B (r, out) zero, so the adapted model starts out equal to the
base model. Only the adapters (and the head) train: freeze scheme 'lora'.

The adapters are added without touching any model's code: `LoRA(base)` runs the base model under
a Flax method interceptor that extends every matching nn.Dense, and shares its scope, so param
paths stay those of the base model, plus `.../lora_a` and `.../lora_b`.
"""
import re
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtl import ops
from jaxtl.errors import ConfigError
from jaxtl.weights.strict import flatten, unflatten

# Attention query and value projections, in BERT (encoder/layer_i/attention/query) and ViT.
DEFAULT_TARGETS = r'.*attention/(query|value)'


class LoRA(nn.Module):
  """`base` with rank-`rank` adapters on the nn.Dense layers whose path full-matches `targets`."""
  base: nn.Module
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS

  def setup(self):
    nn.share_scope(self, self.base)  # Adapters and base params live at the base model's paths.

  def __call__(self, *args, train=False, **kwargs):
    targets, rank, scale = re.compile(self.targets), self.rank, self.alpha / self.rank

    def adapt(next_fun, call_args, call_kwargs, context):
      y = next_fun(*call_args, **call_kwargs)
      dense = context.module
      if not (isinstance(dense, nn.Dense) and context.method_name == '__call__'
              and targets.fullmatch('/'.join(dense.path))):
        return y
      x = call_args[0]
      a = dense.param('lora_a', nn.initializers.he_uniform(), (x.shape[-1], rank),
                      dense.param_dtype)
      b = dense.param('lora_b', nn.initializers.zeros, (rank, dense.features), dense.param_dtype)
      if train and self.dropout:  # Dropout on the adapter's input only.
        keep = jax.random.bernoulli(dense.make_rng('dropout'), 1.0 - self.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
      return y + ((x @ a.astype(x.dtype)) @ b.astype(x.dtype) * scale).astype(y.dtype)

    with nn.intercept_methods(adapt):
      return self.base(*args, train=train, **kwargs)

  # The base model's block structure; adapters belong to the block of the kernel they adapt.
  @property
  def num_blocks(self):
    return self.base.num_blocks

  def param_group(self, path):
    return self.base.param_group(path)

  def example_inputs(self):
    return self.base.example_inputs()


def add_adapters(module, variables, *, rank=8, alpha=16.0, dropout=0.0, targets=DEFAULT_TARGETS,
                 seed=0):
  """(LoRA module, variables with fresh adapters beside the given base variables)."""
  if rank < 1:
    raise ConfigError(f'config.model.lora.rank must be >= 1, not {rank}')
  wrapped = LoRA(module, rank=rank, alpha=alpha, dropout=dropout, targets=targets)

  def init_adapters():  # Only the adapters are outputs: XLA drops the base model's init.
    initialised = wrapped.init(ops.fused_key(seed), *module.example_inputs())
    return {p: v for p, v in flatten(initialised).items() if p.endswith(('/lora_a', '/lora_b'))}
  adapters = jax.jit(init_adapters)()
  if not adapters:
    raise ConfigError(f'LoRA targets {targets!r} match no nn.Dense layer of the model')
  return wrapped, unflatten({**flatten(variables), **adapters})


def count(variables) -> tuple:
  """(adapter params, all params)."""
  flat = flatten(variables['params'])
  adapter = sum(v.size for p, v in flat.items() if p.endswith(('/lora_a', '/lora_b')))
  return adapter, sum(v.size for v in flat.values())


def merge(module, variables):
  """(base module, variables) with every adapter folded into its kernel: W + (alpha/rank) A B."""
  if not isinstance(module, LoRA):
    return module, variables
  scale = module.alpha / module.rank
  flat = flatten(variables)
  merged = {}
  for path, value in flat.items():
    if path.endswith(('/lora_a', '/lora_b')):
      continue
    prefix = path[:-len('kernel')]
    if path.endswith('/kernel') and prefix + 'lora_a' in flat:
      a, b = flat[prefix + 'lora_a'], flat[prefix + 'lora_b']
      value = (value + scale * jnp.matmul(a, b, precision='highest')).astype(value.dtype)
    merged[path] = value
  return module.base, unflatten(merged)
