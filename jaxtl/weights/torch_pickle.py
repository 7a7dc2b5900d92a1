"""Read PyTorch checkpoints (`torch.save` of a state dict) into numpy, without torch and without
executing pickled code.

A torch checkpoint is a pickle whose tensors point at raw storages kept beside it: in a zip archive
(`<name>/data.pkl` + `<name>/data/<key>`, torch >= 1.6) or, in the legacy format, appended after
the pickle in one stream. The unpickler below resolves only the handful of globals a state dict
needs (tensor rebuild functions, storage dtypes, OrderedDict); any other global (`os.system`,
`builtins.eval`, ...) is refused, so a malicious file cannot run code.
"""
import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from jaxtl.errors import WeightsError

_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'UntypedStorage': np.uint8,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _StorageType:
  def __init__(self, name):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Tensor:
  """A tensor to rebuild once its storage's bytes are known (legacy files store them after the
  pickle)."""
  def __init__(self, storage, offset, size, stride, *unused):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def numpy(self):
    flat = self.storage.array
    if not self.size:
      return flat[self.offset:self.offset + 1].reshape(()).copy()
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size, strides=[s * flat.itemsize for s in self.stride])
    return np.ascontiguousarray(view)


class _Storage:
  def __init__(self, array=None):
    self.array = array


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  return data


_ALLOWED = {
    ('torch._utils', '_rebuild_tensor_v2'): _Tensor,
    ('torch._utils', '_rebuild_tensor'): _Tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch', 'Size'): tuple,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, load_storage, path):
    super().__init__(file)
    self._load_storage = load_storage
    self._path = path

  def find_class(self, module, name):
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise WeightsError(f'{self._path}: the pickle asks for {module}.{name}, which a state dict '
                       'never needs; refusing to load it (it could execute code)')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise WeightsError(f'{self._path}: unsupported persistent id {pid!r}')
    _, storage_type, key, _location, numel = pid[:5]
    return self._load_storage(str(key), storage_type.dtype, numel)


def _load_zip(path):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if not pkl:
      raise WeightsError(f'{path}: a zip file without data.pkl is not a torch checkpoint')
    prefix = pkl[0][:-len('data.pkl')]
    def load_storage(key, dtype, numel):
      return _Storage(np.frombuffer(archive.read(f'{prefix}data/{key}'), dtype=dtype))
    return _Unpickler(io.BytesIO(archive.read(pkl[0])), load_storage, path).load()


def _load_legacy(path):
  with open(path, 'rb') as f:
    if f.read(4) == b'PK\x03\x04':  # A zip whose end (its central directory) is missing.
      raise WeightsError(f'{path}: truncated or corrupt torch checkpoint (a zip archive without '
                         'its central directory)')
    f.seek(0)
    # Header: magic number, protocol version, sys info, each a tiny pickle of plain values.
    if _SafeHeader(f, path).load() != _LEGACY_MAGIC:
      raise WeightsError(f'{path}: not a torch checkpoint (no zip archive, no legacy magic number)')
    _SafeHeader(f, path).load(), _SafeHeader(f, path).load()
    storages, dtypes = {}, {}
    def load_storage(key, dtype, numel):
      dtypes[key] = dtype
      return storages.setdefault(key, _Storage())
    result = _Unpickler(f, load_storage, path).load()
    # The raw storages follow in the order of this key list, each an int64 count and its bytes.
    for key in _SafeHeader(f, path).load():
      (count,) = struct.unpack('<q', f.read(8))
      nbytes = count * dtypes[key].itemsize
      data = f.read(nbytes)
      if len(data) != nbytes:
        raise WeightsError(f'{path}: truncated (storage {key} is incomplete)')
      storages[key].array = np.frombuffer(data, dtype=dtypes[key])
  return result


class _SafeHeader(pickle.Unpickler):
  def __init__(self, file, path):
    super().__init__(file)
    self._path = path

  def find_class(self, module, name):
    raise WeightsError(f'{self._path}: not a torch checkpoint (a pickle that asks for '
                       f'{module}.{name} before any torch header; refusing to load it: it could '
                       'execute code)')


def load(path) -> dict:
  """{name: np.ndarray} from a torch checkpoint (zip or legacy); a nested 'state_dict' is unwrapped."""
  path = str(path)
  try:
    if zipfile.is_zipfile(path):
      obj = _load_zip(path)
    else:
      obj = _load_legacy(path)
  except WeightsError:
    raise
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, ValueError,
          struct.error) as e:
    raise WeightsError(f'{path}: corrupt or truncated torch checkpoint ({type(e).__name__}: {e})')
  for wrapper in ('state_dict', 'model', 'model_state_dict'):
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise WeightsError(f'{path}: holds a {type(obj).__name__}, not a state dict')
  return {k: v.numpy() for k, v in obj.items() if isinstance(v, _Tensor)}
