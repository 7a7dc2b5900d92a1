"""Export the fine-tuned model of a training run in the format its users serve.

  jaxtl.export('runs/minilm', 'export/minilm')                  # the model's default format
  python -m jaxtl.export --workdir runs/minilm --out export/minilm [--format hf|torchvision]

Formats (the default first):
  BERT        'hf': a Hugging Face directory (config.json, model.safetensors, the run's tokenizer)
              for BertForSequenceClassification (pooling='cls'), with the class names as
              id2label / label2id:
                model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
                tokenizer = transformers.AutoTokenizer.from_pretrained(out)
              A mean-pooled BERT (pooling='mean', e.g. configs/default.py's MiniLM) has no
              transformers class: the directory holds the encoder as a BertModel (no pooler),
              the head as classifier.safetensors ('weight' (classes, hidden), 'bias'), and
              config.json records {"jaxtl": {"pooling": "mean", "classifier": ...}}. Serve it as
                bert = transformers.BertModel.from_pretrained(out, add_pooling_layer=False)
                h = bert(**inputs).last_hidden_state; m = inputs['attention_mask'][..., None]
                head = torch.nn.Linear(hidden, classes)
                head.load_state_dict(safetensors.torch.load_file(f'{out}/classifier.safetensors'))
                logits = head((h * m).sum(1) / m.sum(1).clamp(min=1))
  ViT         'hf': ViTForImageClassification (class-token pooling, no representation layer;
              scanned blocks are unstacked), plus preprocessor_config.json for an image run
              (ViTImageProcessor: resize, mean/std; it has no centre crop, so a run's
              crop_fraction < 1 is not reproduced by it).
  ResNet, VGG, MobileNetV2
              'torchvision': model.safetensors, a state dict in torchvision's layout (BatchNorm
              running statistics included, num_batches_tracked = 0), and model.json with the
              torchvision builder name ('arch', null when torchvision's builders make no model of
              these sizes), its kwargs, the class names, and the run's preprocessing:
                model = torchvision.models.get_model(arch, **kwargs)
                model.load_state_dict(safetensors.torch.load_file(f'{out}/model.safetensors'))
              keras_vgg16/19 export as torchvision's vgg16/19 (fc1's rows permuted from NHWC to
              NCHW flatten order; their 7x7 map makes torchvision's adaptive pool the identity);
              they still want Caffe-style BGR inputs, as model.json's preprocess says.
              Not exportable: keras_resnet50 (ResNet v1 with conv biases), a VGG without its
              fc layers (fc_layers=False), BatchNorm eps other than torchvision's 1e-5.

LoRA adapters are merged into their kernels first. Params are written as float32. The names and
layouts come from jaxtl's own converters (jaxtl/weights), inverted, and every export is read back
with the converter before it is kept: what is written loads into exactly the run's variables.
The export is written into a temporary directory beside `out_dir` and renamed into place at the
end, so a failed export leaves nothing behind; an existing non-empty `out_dir` is refused.
"""
import argparse
import json
import os
import pathlib
import re
import shutil
import sys
import uuid
import warnings
from unittest import mock

import jax.numpy as jnp
import numpy as np

from jaxtl import lora
from jaxtl import run as run_lib
from jaxtl.errors import JaxtlError
from jaxtl.models import bert, mobilenet_v2, resnet, vgg, vit
from jaxtl.weights import bert as bert_weights
from jaxtl.weights import cnn, files, strict
from jaxtl.weights import mobilenet_v2 as mobilenet_v2_weights
from jaxtl.weights import resnet as resnet_weights
from jaxtl.weights import vgg as vgg_weights
from jaxtl.weights import vit as vit_weights

FORMATS = ('hf', 'torchvision')
WEIGHTS_FILE = 'model.safetensors'
CLASSIFIER_FILE = 'classifier.safetensors'
TORCHVISION_INFO = 'model.json'
TORCHVISION_BN_EPS = 1e-5

# `python -m jaxtl.export` runs this file as __main__ after jaxtl/__init__.py has imported it as
# jaxtl.export (so that `jaxtl.export(...)` is this function); runpy's warning about it is noise.
warnings.filterwarnings('ignore', message=r"'jaxtl\.export' found in sys\.modules",
                        category=RuntimeWarning)


def export(workdir, out_dir, format=None) -> pathlib.Path:
  """Writes the latest checkpoint of the run in `workdir` to `out_dir` (which must not exist or
  be empty) as `format` ('hf' or 'torchvision'; None: the model's default). Returns out_dir."""
  if format is not None and format not in FORMATS:
    raise JaxtlError(f'--format {format!r} is not one of {", ".join(FORMATS)}')
  out_dir = pathlib.Path(out_dir)
  _check_out_dir(out_dir)
  run = run_lib.load(workdir)
  module, variables = lora.merge(run.module, run.variables)
  writer = _writer(module, format)
  flat = {path: _float32(value) for path, value in strict.flatten(variables).items()}
  # Written beside out_dir (the same file system), then renamed into place.
  tmp = out_dir.parent / f'.{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp'
  try:
    tmp.mkdir(parents=True)
  except OSError as e:
    raise JaxtlError(f'--out {out_dir}: cannot write beside it ({e.strerror})') from None
  try:
    writer(run, module, flat, tmp)
    _check_out_dir(out_dir)  # Anything written there meanwhile is not ours to replace.
    if out_dir.exists():
      out_dir.rmdir()
    tmp.rename(out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def _check_out_dir(out_dir):
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise JaxtlError(f'--out {out_dir}: exists and is not an empty directory; give a new one')


def _float32(value):
  value = np.asarray(value)
  return value.astype(np.float32) if jnp.issubdtype(value.dtype, jnp.floating) else value


def _writer(module, format):
  writers = {bert.Bert: ('hf', _write_hf_bert), vit.ViT: ('hf', _write_hf_vit),
             resnet.ResNet: ('torchvision', _write_torchvision),
             vgg.VGG: ('torchvision', _write_torchvision),
             mobilenet_v2.MobileNetV2: ('torchvision', _write_torchvision)}
  name = f'{type(module).__module__}.{type(module).__qualname__}'
  if type(module) not in writers:
    raise JaxtlError(f'run.json: model {name} has no export format')
  own, writer = writers[type(module)]
  if format not in (None, own):
    raise JaxtlError(f'--format {format!r}: a {type(module).__name__} ({name}) exports only as '
                     f'{own!r}')
  return writer


# ---------------------------------------------------------------------------------------------
# Inverting the converters' tables. A converter renames a source module by regex,
# `re.sub(pattern, template, name)` (e.g. r'encoder\.layer\.(\d+)\.output\.dense' ->
# r'encoder/layer_\1/output'), and rearranges each tensor by a layout transform.
# ---------------------------------------------------------------------------------------------
_PATTERN_TOKEN = re.compile(r'\\(.)|\(([^()]*)\)|(.)')


def _invert_rule(pattern, template):
  """(regex over jaxtl module paths, template for `match.expand`) undoing one rename. Patterns
  are literals and flat capturing groups; a group the template drops (e.g. the alternatives
  'output\\.dense|o_proj' of one module) becomes its first alternative."""
  refs = [int(k) for k in re.findall(r'\\(\d)', template)]
  groups, source = [], []
  for m in _PATTERN_TOKEN.finditer(pattern):
    escaped, group, char = m.groups()
    if group is not None:
      if group.startswith('?'):
        raise ValueError(f'cannot invert {pattern!r}: non-capturing group')
      groups.append(group)
      k = len(groups)
      source.append(rf'\g<{refs.index(k) + 1}>' if k in refs else _literal(group.split('|')[0]))
    elif escaped is not None or char not in '.^$*+?{}[]|()':
      source.append(escaped if escaped is not None else char)
    else:
      raise ValueError(f'cannot invert {pattern!r}: {char!r}')
  parts = re.split(r'\\(\d)', template)
  target = ''.join(f'({groups[int(p) - 1]})' if i % 2 else re.escape(p)
                   for i, p in enumerate(parts))
  return re.compile(target), ''.join(source)


def _literal(regex):
  if not re.fullmatch(r'(?:\w|\\.)*', regex):
    raise ValueError(f'cannot invert {regex!r}: not a literal')
  return re.sub(r'\\(.)', r'\1', regex)


def _inverted(rules):
  """[(jaxtl regex, source template, kind)] for a converter's [(pattern, template, kind)]."""
  return [(*_invert_rule(pattern, template), kind) for pattern, template, kind in rules]


def _source_name(rules, params_of, path):
  """(source key, forward layout transform) of the param at `path` ('a/b/kernel')."""
  module_path, _, name = path.rpartition('/')
  for regex, template, kind in rules:
    m = regex.fullmatch(module_path)
    if m and name in params_of[kind]:
      param, transform = params_of[kind][name]
      return f'{m.expand(template)}.{param}', transform
  return None, None


def _undo(transform, array):
  """The source tensor x with transform(x) == array. The converters' transforms only rearrange
  elements (transposes, VGG's row permutation): known ones are undone directly, any other by
  sending element indices through it."""
  known = {cnn.SAME: lambda a: a, cnn.TRANSPOSE: np.transpose,
           cnn.TORCH_CONV: lambda a: np.transpose(a, (3, 2, 0, 1))}
  if transform in known:
    return np.ascontiguousarray(known[transform](array))
  s = array.shape
  candidates = [s, s[::-1]] + ([(s[3], s[2], s[0], s[1])] if len(s) == 4 else [])
  for shape in candidates:  # The source shape: transforms permute or reverse axes.
    try:
      index = np.asarray(transform(np.arange(array.size).reshape(shape)))
    except ValueError:
      continue
    if index.shape == s:
      source = np.empty(array.size, array.dtype)
      source[index.ravel()] = array.ravel()
      return source.reshape(shape)
  raise ValueError(f'cannot undo {transform} for shape {s}')


def _check_reads_back(converter, tensors, config, module, expected, what):
  """Reads the exported tensors with jaxtl's own converter: they must give back exactly the
  run's variables (`expected`, {'params/...': array}), every tensor used."""
  checkpoint = files.Checkpoint(pathlib.Path(what), tensors, config)
  converted, unmapped = converter.convert(checkpoint, module)
  got = {path: np.asarray(array) for path, (_, array) in converted.items()}
  problems = sorted(set(got) ^ set(expected))
  problems += [p for p in sorted(got.keys() & expected.keys())
               if got[p].shape != expected[p].shape or not np.array_equal(got[p], expected[p])]
  problems += [key for key, _ in unmapped
               if not any(strict.matches(p, key) for p in converter.DEFAULT_DROP)]
  if problems:  # A bug in the inversion, never the user's input; say where.
    raise AssertionError(f'{what}: the export does not read back into the run\'s variables: '
                         f'{", ".join(problems[:8])}')


def _save(tensors, path):
  from safetensors.numpy import save_file
  # 'format': 'pt' is what transformers' and safetensors.torch's loaders expect to find.
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
            metadata={'format': 'pt'})


def _labels(class_names):
  return dict(id2label={i: str(name) for i, name in enumerate(class_names)},
              label2id={str(name): i for i, name in enumerate(class_names)})


def _params(flat):
  return {path[len('params/'):]: v for path, v in flat.items() if path.startswith('params/')}


# ---------------------------------------------------------------------------------------------
# Hugging Face: BERT.
# ---------------------------------------------------------------------------------------------
def _bert_tensors(params):
  """{HF BertModel key (no 'bert.' prefix): array} for jaxtl BERT params."""
  rules = _inverted(bert_weights._MODULES)
  params_of = {}
  for kind, names in bert_weights._PARAMS.items():
    for param, (name, transpose) in names.items():
      # The first spelling of a param ('weight', not the old 'gamma').
      params_of.setdefault(kind, {}).setdefault(name, (param, cnn.TRANSPOSE if transpose
                                                       else cnn.SAME))
  tensors = {}
  for path, array in params.items():
    key, transform = _source_name(rules, params_of, path)
    if key is None:
      raise JaxtlError(f'run.json: BERT param {path} has no Hugging Face counterpart')
    tensors[key] = _undo(transform, array)
  return tensors


def _write_hf_bert(run, module, flat, out):
  import transformers
  params = _params(flat)
  if module.num_classes is None or 'classifier/kernel' not in params:
    raise JaxtlError(f'{run.workdir}: the model has no classification head to export')
  if module.scan:
    params = _unstack(params, module.num_layers)
  tensors = _bert_tensors(params)
  mean = module.pooling == 'mean'
  extra = {}
  if mean:  # No transformers class pools by mean: the encoder, and the head beside it.
    _save({'weight': tensors['classifier.weight'], 'bias': tensors['classifier.bias']},
          out / CLASSIFIER_FILE)
    extra['jaxtl'] = {'pooling': 'mean', 'classifier': CLASSIFIER_FILE}
    _save({k: v for k, v in tensors.items() if not k.startswith('classifier.')},
          out / WEIGHTS_FILE)
  else:
    _save({k if k.startswith('classifier.') else 'bert.' + k: v for k, v in tensors.items()},
          out / WEIGHTS_FILE)
  config = transformers.BertConfig(
      vocab_size=module.vocab_size, hidden_size=module.hidden_size,
      num_hidden_layers=module.num_layers, num_attention_heads=module.num_heads,
      intermediate_size=module.intermediate_size, hidden_act=module.hidden_act,
      hidden_dropout_prob=module.hidden_dropout,
      attention_probs_dropout_prob=module.attention_dropout,
      max_position_embeddings=module.max_position_embeddings,
      type_vocab_size=module.type_vocab_size, layer_norm_eps=module.layer_norm_eps,
      classifier_dropout=module.classifier_dropout,
      architectures=['BertModel' if mean else 'BertForSequenceClassification'],
      **_labels(run.class_names), **extra)
  config.save_pretrained(out)
  _check_reads_back(bert_weights, tensors, None, module.clone(scan=False),
                    _params_paths(params), f'{out / WEIGHTS_FILE}')
  tokenizer = run.workdir / 'tokenizer'
  if tokenizer.is_dir():  # Saved through transformers: only the tokenizer's own files.
    from jaxtl.data import text
    text.load_tokenizer(tokenizer).save_pretrained(str(out))


def _params_paths(params):
  return {'params/' + path: value for path, value in params.items()}


# ---------------------------------------------------------------------------------------------
# Hugging Face: ViT.
# ---------------------------------------------------------------------------------------------
_HF_VIT_ACTIVATIONS = {'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh'}
_HF_VIT_RESAMPLE = {'bilinear': 2, 'bicubic': 3}  # PIL's codes, as image processors store them.


def _vit_params_of():
  """{kind: {jaxtl param name: (torch param name, forward transform)}} for the ViT tables."""
  transforms = {'linear': cnn.TRANSPOSE, 'conv': cnn.TORCH_CONV}
  params_of = {}
  for kind, names in vit_weights._TORCH_PARAMS.items():
    for param, name in names.items():
      transform = transforms.get(kind, cnn.SAME) if name == 'kernel' else cnn.SAME
      params_of.setdefault(kind, {}).setdefault(name, (param, transform))
  return params_of


def _unstack(params, num_layers):
  """encoder/layers/... (scan=True, a leading layer axis) -> encoder/layer_{i}/..."""
  out = {}
  for path, value in params.items():
    if path.startswith('encoder/layers/'):
      for i in range(num_layers):
        out[f'encoder/layer_{i}/' + path[len('encoder/layers/'):]] = value[i]
    else:
      out[path] = value
  return out


def _vit_tensors(params):
  """{HF ViTModel key (no 'vit.' prefix): array} for unrolled jaxtl ViT params."""
  top, layer = _inverted(vit_weights._HF_TOP), _inverted(vit_weights._HF_LAYER)
  params_of = _vit_params_of()
  # The two plain tensors, named in vit_weights._read_hf.
  tensors = {'embeddings.cls_token': params['cls'],
             'embeddings.position_embeddings': params['pos_embedding']}
  for path, array in params.items():
    if path in ('cls', 'pos_embedding'):
      continue
    m = re.fullmatch(r'encoder/layer_(\d+)/(.+)', path)
    key, transform = _source_name(layer if m else top, params_of, m.group(2) if m else path)
    if key is None:
      raise JaxtlError(f'run.json: ViT param {path} has no Hugging Face counterpart')
    tensors[f'encoder.layer.{m.group(1)}.{key}' if m else key] = _undo(transform, array)
  return tensors


def _write_hf_vit(run, module, flat, out):
  import transformers
  if module.pooling != 'token':
    raise JaxtlError(f"run.json: a ViT with pooling={module.pooling!r} cannot export as 'hf': "
                     "ViTForImageClassification classifies the class token (pooling='token')")
  if module.representation_size:
    raise JaxtlError(f'run.json: a ViT with representation_size={module.representation_size} '
                     "(a pre-logits layer) cannot export as 'hf': ViTForImageClassification "
                     'has none')
  params = _params(flat)
  if module.num_classes is None or 'head/kernel' not in params:
    raise JaxtlError(f'{run.workdir}: the model has no classification head to export')
  if module.scan:
    params = _unstack(params, module.num_layers)
  tensors = _vit_tensors(params)
  _save({k if k.startswith('classifier.') else 'vit.' + k: v for k, v in tensors.items()},
        out / WEIGHTS_FILE)
  image, patch = vit.pair(module.image_size), vit.pair(module.patch_size)
  config = transformers.ViTConfig(
      image_size=image[0] if image[0] == image[1] else list(image),
      patch_size=patch[0] if patch[0] == patch[1] else list(patch),
      num_channels=module.num_channels, hidden_size=module.hidden_size,
      num_hidden_layers=module.num_layers, num_attention_heads=module.num_heads,
      intermediate_size=module.mlp_dim, hidden_act=_HF_VIT_ACTIVATIONS[module.hidden_act],
      qkv_bias=module.qkv_bias, layer_norm_eps=module.layer_norm_eps,
      hidden_dropout_prob=module.dropout_rate,
      attention_probs_dropout_prob=module.attention_dropout,
      architectures=['ViTForImageClassification'], **_labels(run.class_names))
  config.save_pretrained(out)
  _check_reads_back(vit_weights, tensors, config.to_dict(), module.clone(scan=False),
                    _params_paths(params), f'{out / WEIGHTS_FILE}')
  pre = run.inputs.get('preprocess') if run.inputs.get('kind') == 'images' else None
  if pre:
    _write_vit_processor(pre, image, out)


def _write_vit_processor(pre, image, out):
  """preprocessor_config.json for ViTImageProcessor: resize to the model's size, scale to [0, 1],
  normalise by the run's mean and std."""
  if pre.get('channel_order', 'RGB') != 'RGB':
    raise JaxtlError(f'run.json: inputs channel_order {pre["channel_order"]!r}: '
                     'ViTImageProcessor feeds RGB')
  config = dict(image_processor_type='ViTImageProcessor', do_resize=True,
                size={'height': image[0], 'width': image[1]},
                resample=_HF_VIT_RESAMPLE.get(pre.get('interpolation'), 2), do_rescale=True,
                rescale_factor=1 / 255, do_normalize=True, image_mean=list(pre['mean']),
                image_std=list(pre['std']))
  (out / 'preprocessor_config.json').write_text(json.dumps(config, indent=2) + '\n')


# ---------------------------------------------------------------------------------------------
# torchvision: ResNet, VGG, MobileNetV2.
# ---------------------------------------------------------------------------------------------
_TORCHVISION = {  # Converter, and the fields that must equal a builder's for it to fit.
    resnet.ResNet: (resnet_weights, ('stage_sizes', 'bottleneck', 'widths', 'stem_width')),
    vgg.VGG: (vgg_weights, ('block_sizes', 'batch_norm', 'fc_width')),
    mobilenet_v2.MobileNetV2: (mobilenet_v2_weights, ('last_channels',)),
}


def _torchvision_names(converter, module) -> dict:
  """{variable path: (torchvision key, forward layout transform)}: the converter's own rename
  table for `module`, inverted. Its `convert` builds the table (a cnn.Renames) from the module
  alone, then applies it to a checkpoint's tensors; here applying hands the table back."""
  with mock.patch.object(cnn.Renames, 'apply', lambda names, tensors: (names.table, [])):
    table, _ = converter.convert(files.Checkpoint(pathlib.Path('export'), {}, None), module)
  return {path: (key, transform) for key, (path, transform) in table.items()}


def _check_torchvision_layout(module):
  name = type(module).__name__
  if isinstance(module, resnet.ResNet) and (module.stride_in_1x1 or module.conv_bias):
    raise JaxtlError(f'run.json: this ResNet (stride_in_1x1={module.stride_in_1x1}, '
                     f'conv_bias={module.conv_bias}: ResNet v1 as keras_resnet50) cannot export '
                     "as 'torchvision': torchvision's ResNet is v1.5 without conv biases")
  if isinstance(module, vgg.VGG) and not module.fc_layers:
    raise JaxtlError("run.json: a VGG with fc_layers=False (global average pool head) cannot "
                     "export as 'torchvision': torchvision's VGG has fc1 and fc2")
  if isinstance(module, vgg.VGG) and not module.adaptive_pool and module.input_size // 32 != 7:
    raise JaxtlError(f'run.json: this VGG without adaptive pooling (Keras layout) reads a '
                     f'{module.input_size // 32}x{module.input_size // 32} map into fc1 '
                     f'(input_size {module.input_size}); torchvision\'s VGG pools to 7x7, so '
                     "only input_size 224 exports as 'torchvision'")
  uses_bn = not isinstance(module, vgg.VGG) or module.batch_norm
  if uses_bn and module.bn_eps != TORCHVISION_BN_EPS:
    raise JaxtlError(f'run.json: {name} bn_eps {module.bn_eps}: torchvision\'s BatchNorm uses '
                     f"{TORCHVISION_BN_EPS}; this model cannot export as 'torchvision'")


def _torchvision_arch(module):
  """The torchvision builder (a jaxtl registry name) that makes this layout, or None."""
  from jaxtl import models
  _, fields = _TORCHVISION[type(module)]
  same = lambda a, b: (tuple(a) if isinstance(a, (list, tuple)) else a) == (
      tuple(b) if isinstance(b, (list, tuple)) else b)
  for name, make in models.REGISTRY.items():
    variant = make()
    if (type(variant) is type(module) and not name.startswith('keras_')
        and all(same(getattr(variant, f), getattr(module, f)) for f in fields)):
      return name
  return None


def _write_torchvision(run, module, flat, out):
  _check_torchvision_layout(module)
  converter, _ = _TORCHVISION[type(module)]
  if module.num_classes is None:
    raise JaxtlError(f'{run.workdir}: the model has no classification head to export')
  names = _torchvision_names(converter, module)
  state = {}
  for path, array in flat.items():
    if path not in names:
      raise JaxtlError(f'run.json: {type(module).__name__} variable {path} has no torchvision '
                       'counterpart')
    key, transform = names[path]
    state[key] = _undo(transform, array)
  for key in [k for k in state if k.endswith('.running_mean')]:
    state[key[:-len('running_mean')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  _check_reads_back(converter, state, None, module, flat, f'{out / WEIGHTS_FILE}')
  _save(state, out / WEIGHTS_FILE)
  kwargs = {'num_classes': module.num_classes}
  if isinstance(module, mobilenet_v2.MobileNetV2) and module.width_mult != 1.0:
    kwargs['width_mult'] = module.width_mult
  info = dict(format='torchvision', arch=_torchvision_arch(module), kwargs=kwargs,
              class_names=list(run.class_names), preprocess=run.inputs.get('preprocess'),
              jaxtl_model=run_lib.model_spec(module), step=run.step)
  (out / TORCHVISION_INFO).write_text(json.dumps(info, indent=1) + '\n')


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One line, as train.py's errors, not usage + message.
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> int:
  parser = _Parser(
      prog='python -m jaxtl.export',
      description='Export the fine-tuned model of a train.py run (Hugging Face or torchvision).')
  parser.add_argument('--workdir', required=True, help='the --workdir of a train.py run')
  parser.add_argument('--out', required=True, help='a new (or empty) directory to write')
  parser.add_argument('--format', choices=FORMATS,
                      help="default: 'hf' for BERT and ViT, 'torchvision' for CNNs")
  parser.add_argument('--debug', action='store_true', help='tracebacks for input errors')
  args = parser.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  try:
    out = export(args.workdir, args.out, format=args.format)
  except JaxtlError as e:
    if args.debug:
      raise
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'Exported {args.workdir} to {out}:')
  for path in sorted(p for p in out.rglob('*') if p.is_file()):
    print(f'  {path}  ({os.path.getsize(path):,} bytes)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
