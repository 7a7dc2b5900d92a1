"""Reading tensors and configs from the files people have: safetensors (single or sharded),
PyTorch pickles (`.bin`, `.pth`, `.pt`), Keras HDF5 weights (`.h5`, `.weights.h5`) and numpy
`.npz` archives of JAX params (big_vision), into {name: np.ndarray}."""
import dataclasses
import json
import pathlib
import struct

import ml_dtypes
import numpy as np

from jaxtl.errors import WeightsError
from jaxtl.weights import torch_pickle

# In order of preference when a directory holds several.
WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                'pytorch_model.bin.index.json')


@dataclasses.dataclass
class Checkpoint:
  path: pathlib.Path          # The weights file read.
  tensors: dict               # {source key: np.ndarray}, as stored.
  config: dict | None         # config.json beside it, if any.

  @property
  def directory(self):
    return self.path.parent


def read_checkpoint(path: pathlib.Path) -> Checkpoint:
  """A Hugging Face directory (config.json + weights) or a single weights file."""
  path = pathlib.Path(path)
  if path.is_dir():
    config = read_config(path)
    weights = find_weights(path)
  else:
    weights = path
    config = read_config(path.parent) if (path.parent / 'config.json').is_file() else None
  return Checkpoint(weights, read_tensors(weights), config)


def read_config(directory: pathlib.Path) -> dict:
  path = directory / 'config.json'
  if not path.is_file():
    raise WeightsError(f'{directory}: no config.json (a Hugging Face model directory needs one)')
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise WeightsError(f'{path}: not valid JSON ({e})') from None


def find_weights(directory: pathlib.Path) -> pathlib.Path:
  for name in WEIGHT_FILES:
    if (directory / name).is_file():
      return directory / name
  raise WeightsError(f'{directory}: no weights file (looked for {", ".join(WEIGHT_FILES)})')


def read_tensors(path: pathlib.Path) -> dict:
  """{name: np.ndarray} from one weights file, or from every shard an index.json lists."""
  path = pathlib.Path(path)
  if path.name.endswith('.index.json'):
    try:
      shards = sorted(set(json.loads(path.read_text())['weight_map'].values()))
    except (json.JSONDecodeError, KeyError) as e:
      raise WeightsError(f'{path}: not a valid shard index ({e})') from None
    tensors = {}
    for shard in shards:
      tensors.update(read_tensors(path.parent / shard))
    return tensors
  if not path.is_file():
    raise WeightsError(f'{path}: no such file')
  if path.suffix == '.safetensors':
    return _read_safetensors(path)
  if path.suffix in ('.bin', '.pth', '.pt', '.ckpt'):
    return torch_pickle.load(path)
  if path.suffix in ('.h5', '.hdf5', '.keras'):
    return read_keras_h5(path)
  if path.suffix == '.npz':
    return read_npz(path)
  raise WeightsError(f'{path}: unknown weights format {path.suffix!r} '
                     '(expected .safetensors, .bin, .pth, .pt, .h5 or .npz)')


_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


def _read_safetensors(path):
  """The safetensors layout: u64 header size, a JSON header of {name: dtype, shape, offsets}, then
  the raw little-endian bytes. Read directly so that bf16 tensors come back as ml_dtypes.bfloat16."""
  data = path.read_bytes()
  try:
    (size,) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + size])
    header.pop('__metadata__', None)
    tensors = {}
    for name, info in header.items():
      begin, end = info['data_offsets']
      dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']])
      if 8 + size + end > len(data):
        raise ValueError(f'tensor {name} runs past the end of the file')
      tensors[name] = np.frombuffer(data, dtype, offset=8 + size + begin,
                                    count=(end - begin) // dtype.itemsize).reshape(info['shape'])
    return tensors
  except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise WeightsError(f'{path}: corrupt or truncated safetensors file ({e})') from None


def read_keras_h5(path):
  """{key: np.ndarray} from Keras weights in HDF5 (h5py only, no Keras needed).

  Keras 2 / legacy files (`save_weights('x.h5')`, `model.save('x.h5')`, the Keras applications
  downloads) list their layers in order; their keys come out as '<layer>/<variable>', e.g.
  'conv1_conv/kernel'. Keras 3 `.weights.h5` files store no variable names, only each layer's
  variables by index; their keys are the stored paths, e.g. 'layers/conv2d_3/vars/0'. A `.keras`
  archive is a zip holding a model.weights.h5."""
  try:
    import h5py
  except ImportError:
    raise WeightsError(f'{path}: reading Keras .h5 weights needs h5py (pip install h5py)') from None
  if path.suffix == '.keras':
    import io
    import zipfile
    try:
      with zipfile.ZipFile(path) as archive:
        return read_keras_h5(io.BytesIO(archive.read('model.weights.h5')))
    except (zipfile.BadZipFile, KeyError) as e:
      raise WeightsError(f'{path}: not a .keras archive with model.weights.h5 ({e})') from None
  try:
    with h5py.File(path, 'r') as f:
      root = f['model_weights'] if 'model_weights' in f else f
      tensors = {}
      if 'layer_names' in root.attrs:
        for layer in root.attrs['layer_names']:
          layer = layer.decode() if isinstance(layer, bytes) else str(layer)
          for name in root[layer].attrs.get('weight_names', ()):
            name = name.decode() if isinstance(name, bytes) else str(name)
            tensors[f'{layer}/{name.split("/")[-1].removesuffix(":0")}'] = np.asarray(
                root[layer][name])
      else:
        root.visititems(lambda key, item: tensors.__setitem__(key, np.asarray(item))
                        if isinstance(item, h5py.Dataset) else None)
      return tensors
  except OSError as e:
    raise WeightsError(f'{path}: not a readable HDF5 file ({e})') from None


def read_npz(path):
  """{key: np.ndarray} from a numpy .npz, as JAX projects save params (big_vision, the original ViT
  and AugReg releases): one array per '/'-joined param path. Pickled objects are refused."""
  import zipfile
  if not zipfile.is_zipfile(path):  # Else np.load reads it as a pickle or a bare .npy array.
    raise WeightsError(f'{path}: not a .npz archive (no zip directory: corrupt, truncated or '
                       'another format)')
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise WeightsError(f'{path}: not a readable .npz archive ({e})') from None
