"""Pretrained weights: `load_pretrained(source) -> (module, variables)`.

A source is
  - a local Hugging Face model directory (config.json + model.safetensors / pytorch_model.bin,
    possibly sharded), or a single weights file,
  - `hf:org/name[@revision]`, fetched from the Hugging Face Hub into its cache,
  - `pkg:<package>/<path>`, a file or directory inside an installed Python package.

Each architecture has a converter module (weights/bert.py, ...) with this interface:
  NAME                          architecture name, as `arch=` spells it
  matches(checkpoint) -> bool   whether it reads this checkpoint (config.json, key names)
  build(checkpoint, num_classes, arch) -> module
  own_num_classes(checkpoint)   the checkpoint's classifier size, or None
  convert(checkpoint, module) -> ({variable path: (source key, array)}, [(unmapped key, array)])
                                variable paths start with the collection: 'params/...',
                                'batch_stats/...'
  HEAD                          regex of the head's param paths (without 'params/')
  DEFAULT_DROP                  regexes of source keys that are never params (buffers, ...)
  pretrained_cfg(checkpoint)    optional: the preprocessing the weights expect (input_size, mean,
                                std, crop_fraction, interpolation, channel_order; see
                                jaxtl/data/images.py); None or absent: ImageNet defaults
The tensors are then merged strictly (see strict.py).
"""
import pathlib

from jaxtl import paths
from jaxtl.errors import JaxtlError, WeightsError
from jaxtl.weights import bert as bert_weights
from jaxtl.weights import files, hub, strict
from jaxtl.weights import keras_apps, mobilenet_v2 as mobilenet_v2_weights, resnet as resnet_weights
from jaxtl.weights import vgg as vgg_weights
from jaxtl.weights import vit as vit_weights
from jaxtl.weights.files import Checkpoint

CONVERTERS = [bert_weights]
CONVERTERS += [resnet_weights, mobilenet_v2_weights, vgg_weights, keras_apps]
CONVERTERS += [vit_weights]


def resolve(source) -> pathlib.Path:
  """A local path for any source spelling (downloading `hf:` ids)."""
  source = str(source)
  if source.startswith('hf:'):
    return hub.download(source[len('hf:'):])
  try:
    return paths.resolve(source, what='weights source')
  except JaxtlError as e:
    raise WeightsError(str(e)) from None


def _pick_converter(checkpoint: Checkpoint, arch):
  names = ', '.join(c.NAME for c in CONVERTERS)
  if arch is not None:
    for converter in CONVERTERS:
      if converter.NAME == arch or arch in getattr(converter, 'ARCHS', ()):
        return converter
    raise WeightsError(f'arch {arch!r} is not known; jaxtl loads: {names}')
  for converter in CONVERTERS:
    if converter.matches(checkpoint):
      return converter
  if checkpoint.config is not None:
    raise WeightsError(
        f'{checkpoint.directory / "config.json"}: model_type {checkpoint.config.get("model_type")!r} '
        f'(architectures {checkpoint.config.get("architectures")}) is not supported; jaxtl loads: '
        f'{names}')
  keys = ', '.join(list(checkpoint.tensors)[:5])
  raise WeightsError(f'{checkpoint.path}: cannot tell the architecture from its keys ({keys}, ...); '
                     f'pass arch= (one of {names})')


def load_pretrained(source, *, arch=None, num_classes=None, dont_load=(), dtype=None,
                    overrides=None, verbose=True):
  """(module, variables) for a pretrained checkpoint; variables holds 'params' (and e.g.
  'batch_stats' for models with BatchNorm).

  arch: the architecture, when the checkpoint cannot tell (e.g. a bare torchvision state dict).
  num_classes: None keeps the checkpoint's classifier if it has one (else a headless model);
    N puts a new, zero-initialised N-way head in its place.
  dont_load: regexes (full match) over source keys or param paths to drop; a dropped model param
    starts at zero.
  dtype: storage dtype of the loaded params (default float32; the model's param_dtype follows).
  overrides: model fields to change, e.g. {'dtype': jnp.bfloat16, 'hidden_dropout': 0.0}.
  """
  checkpoint = files.read_checkpoint(resolve(source))
  if not checkpoint.tensors:
    raise WeightsError(f'{checkpoint.path}: holds no tensors')
  converter = _pick_converter(checkpoint, arch)

  own_classes = converter.own_num_classes(checkpoint)
  # A new head replaces the checkpoint's (if any): its tensors are dropped, its params start at 0.
  new = (converter.HEAD,) if num_classes is not None else ()
  num_classes = own_classes if num_classes is None else num_classes
  dont_load = tuple(dont_load) + tuple(converter.DEFAULT_DROP)

  overrides = dict(overrides or {})
  if dtype is not None:
    overrides['param_dtype'] = dtype
  module = converter.build(checkpoint, num_classes, arch)
  module = module.clone(**overrides) if overrides else module
  converted, unmapped = converter.convert(checkpoint, module)
  if not converted:  # Not one tensor has a place: another architecture, not a partial fit.
    raise WeightsError(
        f'{checkpoint.path}: none of its {len(checkpoint.tensors)} tensors is a {converter.NAME} '
        f'tensor (keys: {", ".join(list(checkpoint.tensors)[:5])}, ...); a checkpoint of another '
        'architecture?')
  shapes = strict.target_shapes(module, *module.example_inputs())
  variables, dropped = strict.merge(
      str(checkpoint.path), shapes, converted,
      source_shapes={k: tuple(v.shape) for k, v in checkpoint.tensors.items()},
      unmapped=unmapped, new=new, dont_load=dont_load, dtype=dtype)
  if verbose:
    _report(checkpoint, dropped, bool(new), num_classes)
  return module, variables


def pretrained_cfg(source, *, arch=None):
  """The preprocessing a weights source expects (a dict, see jaxtl/data/images.py), or None when
  its converter does not say (text models). Reads the checkpoint: the data pipeline needs this
  before the model exists (its class count comes from the data)."""
  checkpoint = files.read_checkpoint(resolve(source))
  get = getattr(_pick_converter(checkpoint, arch), 'pretrained_cfg', None)
  return get(checkpoint) if get else None


def _report(checkpoint, dropped, new, num_classes):
  total = len(checkpoint.tensors)
  head = (f'new zero-initialised {num_classes}-way head' if new else
          f'its own {num_classes}-way head' if num_classes else 'no head')
  print(f'Loaded {total - len(dropped)}/{total} tensors from {checkpoint.path}; {head}'
        + (f'; dropped {len(dropped)}: {", ".join(dropped[:6])}{" ..." if len(dropped) > 6 else ""}'
           if dropped else ''))
