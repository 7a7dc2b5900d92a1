"""Hugging Face BERT checkpoints (BertModel, BertForSequenceClassification, BertForPreTraining, ...)
-> jaxtl.models.bert params.

HF keys are renamed module by module; a torch Linear (out, in) becomes a Flax Dense kernel
(in, out). Keys may carry the `bert.` prefix of the task models, and old TF-converted checkpoints
spell LayerNorm params `gamma`/`beta`. For a model built with scan=True the per-layer tensors are
stacked on a leading layer axis (encoder/layers/...).
"""
import re

from jaxtl.errors import WeightsError
from jaxtl.models import bert
from jaxtl.weights import strict

NAME = 'bert'

# (HF module regex, jaxtl module template, kind). Kinds: linear (weight -> kernel, transposed),
# embed (weight -> embedding), norm (weight/gamma -> scale, bias/beta -> bias).
_MODULES = [
    (r'embeddings\.(word|position|token_type)_embeddings', r'embeddings/\1_embeddings', 'embed'),
    (r'embeddings\.LayerNorm', 'embeddings/LayerNorm', 'norm'),
    (r'encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)', r'encoder/layer_\1/attention/\2',
     'linear'),
    (r'encoder\.layer\.(\d+)\.attention\.output\.dense', r'encoder/layer_\1/attention/output',
     'linear'),
    (r'encoder\.layer\.(\d+)\.attention\.output\.LayerNorm', r'encoder/layer_\1/attention_norm',
     'norm'),
    (r'encoder\.layer\.(\d+)\.intermediate\.dense', r'encoder/layer_\1/intermediate', 'linear'),
    (r'encoder\.layer\.(\d+)\.output\.dense', r'encoder/layer_\1/output', 'linear'),
    (r'encoder\.layer\.(\d+)\.output\.LayerNorm', r'encoder/layer_\1/output_norm', 'norm'),
    (r'pooler\.dense', 'pooler', 'linear'),
    (r'classifier', 'classifier', 'linear'),
]
_PARAMS = {
    'linear': {'weight': ('kernel', True), 'bias': ('bias', False)},
    'embed': {'weight': ('embedding', False)},
    'norm': {'weight': ('scale', False), 'gamma': ('scale', False), 'bias': ('bias', False),
             'beta': ('bias', False)},
}

# Dropped by default, and said so: buffers that are not params, and pre-training heads
# (masked-LM and next-sentence prediction) that a classifier never uses.
DEFAULT_DROP = (r'(bert\.)?embeddings\.(position_ids|token_type_ids)', r'cls\..*')

HEAD = r'classifier/.*'


def matches(checkpoint) -> bool:
  config = checkpoint.config or {}
  return config.get('model_type') == 'bert' or any(
      a.startswith('Bert') for a in config.get('architectures') or ())


def own_num_classes(checkpoint):
  """The checkpoint's own number of classes, when it carries a classifier."""
  weight = checkpoint.tensors.get('classifier.weight')
  return None if weight is None else weight.shape[0]


def build(checkpoint, num_classes, arch=None):
  if checkpoint.config is None:
    raise WeightsError(f'{checkpoint.path}: a BERT checkpoint needs its config.json beside it')
  try:
    return bert.from_hf_config(checkpoint.config, num_classes=num_classes)
  except KeyError as e:
    raise WeightsError(f'{checkpoint.directory / "config.json"}: no {e.args[0]!r} (a BERT config '
                       'needs vocab_size, hidden_size, num_hidden_layers, num_attention_heads and '
                       'intermediate_size)') from None


def convert(checkpoint, module=None):
  """({'params/<path>': (source key, array in Flax layout)}, [(unmapped source key, array)])."""
  converted, unmapped = {}, []
  for key, array in checkpoint.tensors.items():
    source_module, _, param = key.removeprefix('bert.').rpartition('.')
    for pattern, template, kind in _MODULES:
      if re.fullmatch(pattern, source_module) and param in _PARAMS[kind]:
        name, transpose = _PARAMS[kind][param]
        path = 'params/' + re.sub(pattern, template, source_module) + '/' + name
        converted[path] = (key, array.T if transpose else array)
        break
    else:
      unmapped.append((key, array))
  if module is not None and module.scan:  # One stacked tensor per layer param.
    converted = strict.stack_layers(converted, module.num_layers, checkpoint.path)
  return converted, unmapped
