"""Model registry: `create(name, **overrides)` returns a Flax Linen module.

Every model returns `(logits, out)`, gives `example_inputs()` for `init`, and exposes its block
structure through `num_blocks` and `param_group(path)` ('stem' | 'block' | 'neck' | 'head', block
index) for freezing schemes.
"""
from jaxtl.models import bert

REGISTRY = {
    'bert-base': bert.BertBase,
    'bert-large': bert.BertLarge,
    'minilm-l6': bert.MiniLML6,
    'minilm-l12': bert.MiniLML12,
    'bert-tiny': bert.BertTiny,
}


def create(name: str, **overrides):
  """The named model variant, with any of its fields overridden (e.g. num_classes=5)."""
  if name not in REGISTRY:
    from jaxtl.errors import ConfigError
    raise ConfigError(f'unknown model {name!r}; known models: {", ".join(sorted(REGISTRY))}')
  return REGISTRY[name](**overrides)
