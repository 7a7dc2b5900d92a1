"""A training run as its workdir holds it, for whatever comes after training (predict, evaluate,
export): the model's constructor, the class names and the input pipeline are written beside the
checkpoints, so a workdir is self-contained; no pretrained checkpoint or dataset is read again.

  <workdir>/run.json      {"model": spec, "class_names": [...], "inputs": {...}}
  <workdir>/tokenizer/    the text model's tokenizer files (text runs)
  <workdir>/checkpoints/  orbax train states (jaxtl.checkpoint)

A model spec is the module's class and its dataclass fields ({"lora": {...}, "base": spec} for a
LoRA-wrapped model), e.g. {"class": "jaxtl.models.resnet.ResNet", "fields": {...}}.
"""
import dataclasses
import importlib
import json
import pathlib
import shutil

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxtl import checkpoint
from jaxtl.errors import JaxtlError

RUN_FILE = 'run.json'


def model_spec(module: nn.Module) -> dict:
  from jaxtl import lora
  if isinstance(module, lora.LoRA):
    return {'lora': dict(rank=module.rank, alpha=module.alpha, dropout=module.dropout,
                         targets=module.targets), 'base': model_spec(module.base)}
  fields = {}
  for field in dataclasses.fields(module):
    if field.name in ('parent', 'name'):
      continue
    value = getattr(module, field.name)
    if field.name.endswith('dtype'):
      value = jnp.dtype(value).name
    elif isinstance(value, tuple):
      value = list(value)
    fields[field.name] = value
  cls = type(module)
  return {'class': f'{cls.__module__}.{cls.__qualname__}', 'fields': fields}


def module_from_spec(spec: dict) -> nn.Module:
  if 'lora' in spec:
    from jaxtl import lora
    return lora.LoRA(module_from_spec(spec['base']), **spec['lora'])
  module_name, _, class_name = spec['class'].rpartition('.')
  if not module_name.startswith('jaxtl.models.'):
    raise JaxtlError(f'run.json: model class {spec["class"]!r} is not a jaxtl model')
  cls = getattr(importlib.import_module(module_name), class_name)
  fields = {}
  for name, value in spec['fields'].items():
    if name.endswith('dtype'):
      value = jnp.dtype(value).type
    elif isinstance(value, list):
      value = tuple(value)
    fields[name] = value
  return cls(**fields)


def write(workdir, module, class_names, data):
  """run.json (and the tokenizer of a text run) for `module` trained on `data`."""
  workdir = pathlib.Path(workdir)
  inputs = {}
  if hasattr(data, 'preprocess'):  # Images: jaxtl.data.images.Preprocess.
    inputs = {'kind': 'images', 'preprocess': dataclasses.asdict(data.preprocess)}
  elif getattr(data, 'tokenizer_dir', None):
    shutil.copytree(data.tokenizer_dir, workdir / 'tokenizer', dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns('*.safetensors', '*.bin', '*.h5', '*.msgpack',
                                                  '*.onnx', '*.pt', '*.pth', 'onnx', 'openvino'))
    inputs = {'kind': 'text', 'max_length': int(data.max_length)}
  elif hasattr(data, 'max_length'):
    inputs = {'kind': 'tokens', 'max_length': int(data.max_length)}  # Synthetic token ids.
  text = json.dumps({'model': model_spec(module), 'class_names': list(class_names),
                     'inputs': inputs}, indent=1)
  tmp = workdir / (RUN_FILE + '.tmp')
  tmp.write_text(text)
  tmp.replace(workdir / RUN_FILE)


@dataclasses.dataclass
class Run:
  workdir: pathlib.Path
  module: nn.Module
  variables: dict          # {'params': ..., plus batch_stats etc.} as numpy arrays
  class_names: list
  inputs: dict             # How raw inputs become model inputs (see `write`).
  step: int

  @property
  def config(self) -> dict:
    path = self.workdir / 'config.json'
    return json.loads(path.read_text()) if path.exists() else {}


def load(workdir) -> Run:
  """The latest checkpoint of the run in `workdir`, with what it takes to use it."""
  workdir = pathlib.Path(workdir)
  info_path = workdir / RUN_FILE
  if not info_path.exists():
    raise JaxtlError(f'{workdir}: not a jaxtl run (no {RUN_FILE}); give the --workdir of a '
                     'train.py run')
  try:
    info = json.loads(info_path.read_text())
    module = module_from_spec(info['model'])
  except (ValueError, KeyError, TypeError, AttributeError, ImportError) as e:
    raise JaxtlError(f'{info_path}: unreadable ({type(e).__name__}: {e})') from None
  step, state = checkpoint.restore_raw(workdir)
  variables = {'params': state['params'], **(state.get('model_state') or {})}
  variables = _as_numpy(variables)
  return Run(workdir, module, variables, info['class_names'], info.get('inputs') or {}, step)


def _as_numpy(tree):
  if isinstance(tree, dict):
    return {k: _as_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)
