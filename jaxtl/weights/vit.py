"""ViT checkpoints in their three layouts -> jaxtl.models.vit params.

  hf          Hugging Face directories (config.json model_type 'vit'): ViTModel (its tanh pooler
              becomes the pre-logits layer) and ViTForImageClassification ('vit.' prefix,
              'classifier'); the saved names (encoder.layer.N.attention.attention.query) and the
              transformers-5 in-memory ones (layers.N.attention.q_proj).
  big_vision  .npz files of the original ViT / AugReg releases and of big_vision:
              'embedding/kernel', 'cls', 'Transformer/posembed_input/pos_embedding' (or
              'pos_embedding' without the class token's row), 'Transformer/encoderblock_N/...'
              (or one scanned 'encoderblock' with a leading layer axis),
              'Transformer/encoder_norm', 'pre_logits', 'head'.
  timm        timm VisionTransformer state dicts (.safetensors or .pth): 'patch_embed.proj',
              'cls_token', 'pos_embed', 'blocks.N.attn.qkv' (fused), 'norm', 'head'.

Each reader yields the same intermediate form: top-level params and one dict per layer, all in
Flax layout. `convert` then fixes the position embeddings (class-token row, grid resampling to
the model's image size) and lays the layers out unrolled or stacked, whichever the model's `scan`
asks for, so every layout loads into both model modes.
"""
import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.errors import WeightsError
from jaxtl.models import vit
from jaxtl.weights import strict

NAME = 'vit'
ARCHS = ('vit-ti16', 'vit-s16', 'vit-b16', 'vit-b32', 'vit-l16')
HEAD = r'head/.*'
# Masked-image-modelling parts of HF ViTForMaskedImageModeling, never used by a classifier.
DEFAULT_DROP = (r'(vit\.)?embeddings\.mask_token', r'decoder\..*')

# ---------------------------------------------------------------------------------------------
# Which layout.
# ---------------------------------------------------------------------------------------------
_NPZ_PREFIXES = ('params/', 'opt/target/')


def _strip(key, prefixes):
  for prefix in prefixes:
    if key.startswith(prefix):
      return key[len(prefix):]
  return key


def layout(checkpoint):
  """'hf', 'big_vision', 'timm' or None."""
  keys = {_strip(k, _NPZ_PREFIXES + ('module.',)) for k in checkpoint.tensors}
  if 'embedding/kernel' in keys and any(k.startswith('Transformer/encoderblock') for k in keys):
    return 'big_vision'
  if 'patch_embed.proj.weight' in keys and any(k.startswith('blocks.') for k in keys):
    return 'timm'
  if checkpoint.config is not None:  # DeiT, BEiT, ... share the key names but not the model.
    return 'hf' if checkpoint.config.get('model_type') == 'vit' else None
  if keys & {'embeddings.patch_embeddings.projection.weight',
             'vit.embeddings.patch_embeddings.projection.weight'}:
    return 'hf'
  return None


def matches(checkpoint) -> bool:
  return layout(checkpoint) is not None


def _layout_or_error(checkpoint):
  kind = layout(checkpoint)
  if kind is None:
    keys = ', '.join(list(checkpoint.tensors)[:6])
    raise WeightsError(
        f'{checkpoint.path}: not a ViT checkpoint: found none of the Hugging Face '
        "('embeddings.patch_embeddings.projection.weight'), big_vision ('embedding/kernel' with "
        "'Transformer/encoderblock_N/...') or timm ('patch_embed.proj.weight' with 'blocks.N.') "
        f'keys; its keys start: {keys}')
  return kind


# ---------------------------------------------------------------------------------------------
# Readers: checkpoint -> (top, layers, unmapped, facts), Flax layout.
#   top: {param path: (source key, array)}; layers: [{path inside a layer: (source key, array)}];
#   facts: what the tensors say about the architecture (num_heads when they tell).
# ---------------------------------------------------------------------------------------------
def _linear(key, array):
  return key, np.asarray(array).T


def _conv(key, array):
  # torch Conv2d (out, in, kh, kw) -> Flax (kh, kw, in, out).
  return key, np.transpose(array, (2, 3, 1, 0))


def _layer_list(layers, source):
  if not layers:
    raise WeightsError(f'{source}: no encoder layers found')
  missing = sorted(set(range(max(layers) + 1)) - set(layers))
  if missing:
    raise WeightsError(f'{source}: encoder layer(s) {missing} missing (found up to {max(layers)})')
  return [layers[i] for i in range(len(layers))]


_HF_LAYER = [  # (HF module, jaxtl module, kind), in both the saved and the transformers-5 names.
    (r'attention\.attention\.(query|key|value)', r'attention/\1', 'linear'),
    (r'attention\.q_proj', 'attention/query', 'linear'),
    (r'attention\.k_proj', 'attention/key', 'linear'),
    (r'attention\.v_proj', 'attention/value', 'linear'),
    (r'attention\.(output\.dense|o_proj)', 'attention/out', 'linear'),
    (r'(intermediate\.dense|mlp\.fc1)', 'mlp/fc1', 'linear'),
    (r'(output\.dense|mlp\.fc2)', 'mlp/fc2', 'linear'),
    (r'layernorm_before', 'norm1', 'norm'),
    (r'layernorm_after', 'norm2', 'norm'),
]
_HF_TOP = [
    (r'embeddings\.patch_embeddings\.projection', 'embedding', 'conv'),
    (r'layernorm', 'encoder_norm', 'norm'),
    (r'pooler\.dense', 'pre_logits', 'linear'),
    (r'classifier', 'head', 'linear'),
]
_TORCH_PARAMS = {'linear': {'weight': 'kernel', 'bias': 'bias'},
                 'conv': {'weight': 'kernel', 'bias': 'bias'},
                 'norm': {'weight': 'scale', 'bias': 'bias'}}


def _torch_param(key, array, kind, param):
  name = _TORCH_PARAMS[kind][param]
  if name == 'kernel':
    return name, (_conv(key, array) if kind == 'conv' else _linear(key, array))
  return name, (key, np.asarray(array))


def _read_hf(checkpoint):
  top, layers, unmapped = {}, {}, []
  for key, array in checkpoint.tensors.items():
    name = key.removeprefix('vit.')
    if name == 'embeddings.cls_token':
      top['cls'] = (key, array)
      continue
    if name == 'embeddings.position_embeddings':
      top['pos_embedding'] = (key, array)
      continue
    module, _, param = name.rpartition('.')
    m = re.fullmatch(r'(?:encoder\.layer|layers)\.(\d+)\.(.+)', module)
    table, module = (_HF_LAYER, m.group(2)) if m else (_HF_TOP, module)
    for pattern, template, kind in table:
      if re.fullmatch(pattern, module) and param in _TORCH_PARAMS[kind]:
        path, value = _torch_param(key, array, kind, param)
        path = re.sub(pattern, template, module) + '/' + path
        (layers.setdefault(int(m.group(1)), {}) if m else top)[path] = value
        break
    else:
      unmapped.append((key, array))
  return top, _layer_list(layers, checkpoint.path), unmapped, {}


_NPZ_LAYER = [  # (big_vision module, jaxtl module); old (pre-linen) numbering and new.
    (r'LayerNorm_0', 'norm1'),
    (r'LayerNorm_[12]', 'norm2'),
    (r'MultiHeadDotProductAttention_[01]/(query|key|value|out)', r'attention/\1'),
    (r'MlpBlock_[03]/Dense_0', 'mlp/fc1'),
    (r'MlpBlock_[03]/Dense_1', 'mlp/fc2'),
]
_NPZ_TOP = {'embedding/kernel', 'embedding/bias', 'cls', 'pre_logits/kernel', 'pre_logits/bias',
            'head/kernel', 'head/bias'}
_NPZ_POS = ('Transformer/posembed_input/pos_embedding', 'Transformer/pos_embedding',
            'pos_embedding')


def _npz_attention(path, array, stacked):
  """Flax MultiHeadDotProductAttention keeps heads apart: q/k/v kernels (D, H, hd), biases (H, hd),
  out kernel (H, hd, D). Ours are plain Dense: (D, H*hd), (H*hd,), (H*hd, D)."""
  lead = array.shape[:1] if stacked else ()
  core = array.shape[len(lead):]
  if path.startswith('attention/out/kernel'):
    return array.reshape(lead + (core[0] * core[1], core[2])), core[0]
  if path.endswith('kernel'):
    return array.reshape(lead + (core[0], core[1] * core[2])), core[1]
  if path.startswith('attention/out'):
    return array, None
  return array.reshape(lead + (core[0] * core[1],)), core[0]


def _read_big_vision(checkpoint):
  top, layers, stacked, unmapped, heads = {}, {}, {}, [], set()
  for key, array in checkpoint.tensors.items():
    name = _strip(key, _NPZ_PREFIXES)
    if name in _NPZ_TOP:
      top[name] = (key, array)
      continue
    if name in _NPZ_POS:
      top['pos_embedding'] = (key, array)
      continue
    if name.startswith('Transformer/encoder_norm/'):
      top['encoder_norm/' + name.rpartition('/')[2]] = (key, array)
      continue
    m = re.fullmatch(r'Transformer/encoderblock(?:_(\d+))?/(.+)/(kernel|bias|scale)', name)
    for pattern, template in _NPZ_LAYER if m else ():
      if re.fullmatch(pattern, m.group(2)):
        path = re.sub(pattern, template, m.group(2)) + '/' + m.group(3)
        is_stacked = m.group(1) is None
        if path.startswith('attention/'):
          array, h = _npz_attention(path, np.asarray(array), is_stacked)
          heads.add(h)
        (stacked if is_stacked else layers.setdefault(int(m.group(1)), {}))[path] = (key, array)
        break
    else:
      unmapped.append((key, array))
  if stacked and layers:
    raise WeightsError(f'{checkpoint.path}: holds both scanned (Transformer/encoderblock/...) and '
                       'per-layer (Transformer/encoderblock_N/...) blocks')
  if stacked:  # One scanned 'encoderblock': split the leading layer axis.
    depth = next(iter(stacked.values()))[1].shape[0]
    layers = {i: {p: (f'{k}[{i}]', a[i]) for p, (k, a) in stacked.items()} for i in range(depth)}
  heads.discard(None)
  return top, _layer_list(layers, checkpoint.path), unmapped, (
      {'num_heads': heads.pop()} if len(heads) == 1 else {})


_TIMM_LAYER = [
    (r'norm1', 'norm1', 'norm'),
    (r'norm2', 'norm2', 'norm'),
    (r'attn\.proj', 'attention/out', 'linear'),
    (r'mlp\.fc1', 'mlp/fc1', 'linear'),
    (r'mlp\.fc2', 'mlp/fc2', 'linear'),
]
_TIMM_TOP = [
    (r'patch_embed\.proj', 'embedding', 'conv'),
    (r'norm', 'encoder_norm', 'norm'),
    (r'pre_logits\.fc', 'pre_logits', 'linear'),
    (r'head', 'head', 'linear'),
]


def _read_timm(checkpoint):
  if any(_strip(k, ('module.',)).startswith('fc_norm.') for k in checkpoint.tensors):
    raise WeightsError(
        f'{checkpoint.path}: fc_norm.* is a timm ViT that normalises after average pooling '
        "(global_pool='avg'); jaxtl's ViT normalises before pooling (big_vision 'gap') and cannot "
        'load it')
  top, layers, unmapped = {}, {}, []
  for key, array in checkpoint.tensors.items():
    name = _strip(key, ('module.',))
    if name in ('cls_token', 'pos_embed'):
      top['cls' if name == 'cls_token' else 'pos_embedding'] = (key, array)
      continue
    module, _, param = name.rpartition('.')
    m = re.fullmatch(r'blocks\.(\d+)\.(.+)', module)
    if m and m.group(2) == 'attn.qkv' and param in ('weight', 'bias'):
      # Fused [q; k; v] along the output axis: three (D, D) kernels.
      layer = layers.setdefault(int(m.group(1)), {})
      for part, chunk in zip(('query', 'key', 'value'), np.split(np.asarray(array), 3, axis=0)):
        layer[f'attention/{part}/' + ('kernel' if param == 'weight' else 'bias')] = (
            key, chunk.T if param == 'weight' else chunk)
      continue
    table, module = (_TIMM_LAYER, m.group(2)) if m else (_TIMM_TOP, module)
    for pattern, template, kind in table:
      if re.fullmatch(pattern, module) and param in _TORCH_PARAMS[kind]:
        path, value = _torch_param(key, array, kind, param)
        path = template + '/' + path
        (layers.setdefault(int(m.group(1)), {}) if m else top)[path] = value
        break
    else:
      unmapped.append((key, array))
  return top, _layer_list(layers, checkpoint.path), unmapped, {}


_READERS = {'hf': _read_hf, 'big_vision': _read_big_vision, 'timm': _read_timm}


def _read(checkpoint):
  kind = _layout_or_error(checkpoint)
  top, layers, unmapped, facts = _READERS[kind](checkpoint)
  for name in ('embedding/kernel', 'pos_embedding'):
    if name not in top:
      raise WeightsError(f'{checkpoint.path}: a {kind} ViT checkpoint without its {name} '
                         f'(keys start: {", ".join(list(checkpoint.tensors)[:6])})')
  return kind, top, layers, unmapped, facts


# ---------------------------------------------------------------------------------------------
# Architecture from the checkpoint.
# ---------------------------------------------------------------------------------------------
def _square_grid(n, source, key):
  g = int(round(np.sqrt(n)))
  if g * g != n:
    raise WeightsError(f'{source}: {key} has {n} patch positions, not a square grid; give the '
                       'image size in a config.json')
  return g, g


def _source_grid(kind, checkpoint, top):
  """(grid, whether pos_embedding has a row for the class token)."""
  key, pos = top['pos_embedding']
  rows = pos.shape[1]
  has_cls = 'cls' in top
  config = checkpoint.config or {}
  if kind == 'hf' and 'image_size' in config:
    image, patch = vit.pair(config['image_size']), vit.pair(config.get('patch_size', 16))
    grid = (image[0] // patch[0], image[1] // patch[1])
    return grid, has_cls
  if not has_cls:
    return _square_grid(rows, checkpoint.path, key), False
  # Old ViT and timm: the class token has a row; big_vision (2022 on): it has none.
  g = int(round(np.sqrt(rows - 1)))
  if g * g == rows - 1:
    return (g, g), True
  return _square_grid(rows, checkpoint.path, key), False


_HF_ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
                   'gelu_fast': 'gelu_tanh'}


def _arch_fields(kind, checkpoint, top, layers, facts, arch):
  """ViT fields from the config (HF) or the tensor shapes (big_vision, timm)."""
  source = checkpoint.path
  kernel_key, kernel = top['embedding/kernel']
  ph, pw, channels, width = kernel.shape
  grid, _ = _source_grid(kind, checkpoint, top)
  fields = dict(
      patch_size=(ph, pw) if ph != pw else ph, num_channels=channels, hidden_size=width,
      num_layers=len(layers), mlp_dim=layers[0]['mlp/fc1/kernel'][1].shape[-1],
      qkv_bias='attention/query/bias' in layers[0],
      image_size=(grid[0] * ph, grid[1] * pw) if grid[0] != grid[1] else grid[0] * ph,
      pooling='token' if 'cls' in top else 'gap',
      representation_size=(top['pre_logits/kernel'][1].shape[-1] if 'pre_logits/kernel' in top
                            else None))
  if kind == 'hf':
    config = checkpoint.config or {}
    config_patch = vit.pair(config.get('patch_size', 16))
    if config_patch != (ph, pw):
      raise WeightsError(f'{source}: config.json patch_size {config.get("patch_size")} does not '
                         f'match {kernel_key} {tuple(np.shape(checkpoint.tensors[kernel_key]))} '
                         f'(patch {ph}x{pw})')
    if 'pre_logits/kernel' in top and config.get('pooler_act', 'tanh') != 'tanh':
      raise WeightsError(f'{source.parent / "config.json"}: pooler_act '
                         f'{config["pooler_act"]!r}: jaxtl\'s pre-logits layer is tanh only')
    act = config.get('hidden_act', 'gelu')
    if act not in _HF_ACTIVATIONS:
      raise WeightsError(f'{source.parent / "config.json"}: hidden_act {act!r} is not one of '
                         f'{sorted(_HF_ACTIVATIONS)}')
    fields.update(num_heads=config['num_attention_heads'], hidden_act=_HF_ACTIVATIONS[act],
                  layer_norm_eps=config.get('layer_norm_eps', 1e-12),
                  dropout_rate=config.get('hidden_dropout_prob', 0.0),
                  attention_dropout=config.get('attention_probs_dropout_prob', 0.0))
    return fields
  # big_vision and the original ViT code use Flax's default, the tanh approximation of GELU;
  # timm the exact one. Both use LayerNorm eps 1e-6.
  fields.update(layer_norm_eps=1e-6, hidden_act='gelu_tanh' if kind == 'big_vision' else 'gelu')
  heads = facts.get('num_heads')
  if heads is None and arch in ARCHS:
    heads = _variant(arch).keywords['num_heads']
  if heads is None:
    heads = vit.HEADS_BY_WIDTH.get(width)
  if heads is None:  # No named width: guess 64-wide heads, and say so.
    heads = width // 64 if width % 64 == 0 else 1
    warnings.warn(f'{source}: a {kind} ViT checkpoint does not store its number of heads; '
                  f'assuming num_heads={heads} for width {width} (pass arch=vit-... or '
                  "overrides={'num_heads': N} if it differs)", stacklevel=4)
  fields['num_heads'] = heads
  return fields


def _variant(arch):
  from jaxtl import models
  return models.REGISTRY[arch]


def own_num_classes(checkpoint):
  """The checkpoint's own number of classes, when it carries a classifier."""
  for key, axis in (('classifier.weight', 0), ('vit.classifier.weight', 0), ('head.weight', 0),
                    ('module.head.weight', 0), ('head/kernel', -1), ('params/head/kernel', -1),
                    ('opt/target/head/kernel', -1)):
    if key in checkpoint.tensors:
      return checkpoint.tensors[key].shape[axis]
  return None


def build(checkpoint, num_classes, arch=None):
  kind, top, layers, _, facts = _read(checkpoint)
  return vit.ViT(num_classes=num_classes,
                 **_arch_fields(kind, checkpoint, top, layers, facts, arch))


# ---------------------------------------------------------------------------------------------
# Position embeddings.
# ---------------------------------------------------------------------------------------------
_JAX_METHODS = {'bilinear': 'linear', 'bicubic': 'cubic', 'nearest': 'nearest'}


def resample_pos_embedding(pos, old_grid, new_grid, num_prefix_tokens=1, method='bilinear'):
  """(1, prefix + new_h*new_w, D) from (1, prefix + old_h*old_w, D): the patch rows resampled as
  an image grid (half-pixel centres, as torch's align_corners=False; antialiased when shrinking),
  the class token's row kept apart and unchanged. The same grid returns `pos` itself."""
  old_grid, new_grid = tuple(old_grid), tuple(new_grid)
  if old_grid == new_grid:
    return pos
  prefix, grid = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
  d = grid.shape[-1]
  grid = jnp.asarray(grid, jnp.float32).reshape(*old_grid, d)
  grid = jax.image.resize(grid, (*new_grid, d), method=_JAX_METHODS[method])
  grid = np.asarray(grid, pos.dtype).reshape(1, new_grid[0] * new_grid[1], d)
  return np.concatenate([prefix, grid], axis=1)


def _fit_pos_embedding(kind, checkpoint, top, module):
  """pos_embedding in the model's layout: a row for the class token (a zero one when the source
  adds no position to it), the patch grid resampled to the model's grid."""
  key, pos = top['pos_embedding']
  pos = np.asarray(pos)
  if pos.ndim == 2:
    pos = pos[None]
  grid, has_cls_row = _source_grid(kind, checkpoint, top)
  if 'cls' in top and not has_cls_row:
    pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  prefix = 1 if 'cls' in top else 0
  if pos.shape[1] - prefix != grid[0] * grid[1]:
    raise WeightsError(f'{checkpoint.path}: {key} {tuple(pos.shape)} does not hold a {grid[0]}x'
                       f'{grid[1]} grid of patches')
  if module.num_prefix_tokens != prefix:
    return key, pos  # Pooling differs; strict merge reports the shapes.
  return key, resample_pos_embedding(pos, grid, module.grid_size, prefix, module.resample_method)


# ---------------------------------------------------------------------------------------------
# Conversion.
# ---------------------------------------------------------------------------------------------
def convert(checkpoint, module=None):
  """({'params/<path>': (source key, array in Flax layout)}, [(unmapped source key, array)])."""
  kind, top, layers, unmapped, facts = _read(checkpoint)
  if module is None:
    module = build(checkpoint, own_num_classes(checkpoint))
  _, kernel = top['embedding/kernel']
  if tuple(kernel.shape[:2]) != vit.pair(module.patch_size):
    key = top['embedding/kernel'][0]
    raise WeightsError(
        f'{checkpoint.path}: patch size mismatch: {key} '
        f'{tuple(np.shape(checkpoint.tensors[key]))} has {kernel.shape[0]}x{kernel.shape[1]} '
        f'patches but the model\'s patch_size is {module.patch_size}')
  if 'cls' in top:
    key, cls = top['cls']
    top['cls'] = key, np.asarray(cls).reshape(1, 1, -1)
  top['pos_embedding'] = _fit_pos_embedding(kind, checkpoint, top, module)

  converted = {'params/' + path: value for path, value in top.items()}
  for i, layer in enumerate(layers):
    for path, value in layer.items():
      converted[f'params/encoder/layer_{i}/{path}'] = value
  if module.scan:  # One stacked tensor per layer param.
    converted = strict.stack_layers(converted, module.num_layers, checkpoint.path)
  return converted, unmapped


# ---------------------------------------------------------------------------------------------
# Preprocessing that goes with the weights.
# ---------------------------------------------------------------------------------------------
_PIL_RESAMPLE = {0: 'bilinear', 2: 'bilinear', 3: 'bicubic'}  # nearest: no such option there.
# Google's ViT checkpoints (original, AugReg, big_vision, and HF google/vit-*) take inputs in
# [-1, 1]: mean = std = 0.5.
_INCEPTION = (0.5, 0.5, 0.5)


def pretrained_cfg(checkpoint, module=None) -> dict:
  """How the checkpoint's images were prepared, as jaxtl.data.images reads it: input_size (side,
  or (h, w) when not square), mean and std (RGB, for pixels in [0, 1]), crop_fraction (eval:
  resize to input_size / crop_fraction, centre crop), interpolation, channel_order. With
  `module`, input_size is the module's (e.g. after a resolution change)."""
  kind, top, _, _, _ = _read(checkpoint)
  if module is None:
    grid, _ = _source_grid(kind, checkpoint, top)
    ph, pw = top['embedding/kernel'][1].shape[:2]
    size = (grid[0] * ph, grid[1] * pw)
  else:
    size = vit.pair(module.image_size)
  # big_vision and the ViT paper evaluate on the whole image resized, without a crop.
  cfg = dict(input_size=size, mean=_INCEPTION, std=_INCEPTION, crop_fraction=1.0,
             interpolation='bilinear', channel_order='RGB')
  if kind == 'hf':
    path = checkpoint.directory / 'preprocessor_config.json'
    if path.is_file():  # ViTImageProcessor: resize to `size`, no crop.
      try:
        pre = json.loads(path.read_text())
      except json.JSONDecodeError as e:
        raise WeightsError(f'{path}: not valid JSON ({e})') from None
      if pre.get('do_normalize', True):
        cfg.update(mean=tuple(pre.get('image_mean', _INCEPTION)),
                   std=tuple(pre.get('image_std', _INCEPTION)))
      else:
        cfg.update(mean=(0.0,) * 3, std=(1.0,) * 3)
      cfg['interpolation'] = _PIL_RESAMPLE.get(pre.get('resample', 2), 'bilinear')
  elif kind == 'timm':
    # timm's ViT weights from Google: inception mean/std, crop 0.9, bicubic; a timm hub
    # directory's config.json says so explicitly.
    cfg.update(crop_fraction=0.9, interpolation='bicubic')
    timm_cfg = (checkpoint.config or {}).get('pretrained_cfg') or {}
    if timm_cfg:
      cfg.update(mean=tuple(timm_cfg.get('mean', cfg['mean'])),
                 std=tuple(timm_cfg.get('std', cfg['std'])),
                 crop_fraction=float(timm_cfg.get('crop_pct', cfg['crop_fraction'])))
      if timm_cfg.get('interpolation') in ('bilinear', 'bicubic'):
        cfg['interpolation'] = timm_cfg['interpolation']
      if module is None and 'input_size' in timm_cfg:
        cfg['input_size'] = tuple(timm_cfg['input_size'][-2:])
  h, w = cfg['input_size']
  cfg['input_size'] = h if h == w else (h, w)
  return cfg
