"""PyTorch weight files read into NumPy without torch: `torch.save` state dicts and TorchScript archives.

Used by the diffusers converter (`diffusion_pytorch_model.bin`) and by the FID Inception weights (`default_1.pt`, a
TorchScript archive; pytorch-fid's `.pth`, a state dict).

Two on-disk formats:
* zip (torch >= 1.6, and every TorchScript archive): `<root>/data.pkl` is a pickle that refers to tensor storages
  `<root>/data/<key>` by persistent id; `<root>/byteorder` says the storages' endianness.
* legacy (`torch.save(..., _use_new_zipfile_serialization=False)`): a magic number, the protocol version and the
  system info, the object pickle, the list of storage keys, then each storage as an 8-byte element count and its
  raw bytes.

Loading runs no code from the file: the unpickler resolves only the handful of globals such files use (tensor
rebuild functions, storage types, `OrderedDict`, TorchScript's typed lists, TorchScript module classes as inert
attribute bags) and refuses any other.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import struct
import zipfile
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ddpm_jax import errors


class TorchFileError(errors.UserError, ValueError):
  """A PyTorch weights file that cannot be read (corrupt, not a torch file, or pickling more than tensors)."""


_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16, 'CharStorage': np.int8,
    'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


def _storage_dtype(name: str) -> np.dtype:
  if name == 'BFloat16Storage':
    import ml_dtypes  # pylint: disable=g-import-not-at-top  (a jax dependency; NumPy has no bfloat16)
    return np.dtype(ml_dtypes.bfloat16)
  if name not in _STORAGE_DTYPES:
    raise TorchFileError(f'unsupported tensor storage type torch.{name}')
  return np.dtype(_STORAGE_DTYPES[name])


@dataclasses.dataclass
class _StorageType:
  """Stands in for `torch.FloatStorage` etc. inside the pickle: only carries the dtype."""
  name: str

  @property
  def dtype(self) -> np.dtype:
    return _storage_dtype(self.name)


@dataclasses.dataclass
class _Storage:
  """A storage reference from the pickle; `array` is filled in once its bytes are read (after the pickle, in the
  legacy format)."""
  key: str
  dtype: np.dtype
  array: Optional[np.ndarray] = None


class _LazyTensor:
  """A tensor view (storage, offset, size, stride), materialised once every storage is read."""

  def __init__(self, storage: _Storage, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

  def materialize(self) -> np.ndarray:
    base = self.storage.array
    if base is None:
      raise TorchFileError(f'tensor storage {self.storage.key} was not found in the file')
    if not self.size:
      return np.array(base[self.offset])
    needed = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
    if min(self.size) > 0 and needed > base.size:
      raise TorchFileError(f'a tensor view exceeds its storage {self.storage.key}')
    view = np.lib.stride_tricks.as_strided(base[self.offset:], shape=self.size,
                                           strides=tuple(s * base.itemsize for s in self.stride), writeable=False)
    return np.array(view, order='C')  # an owned, C-contiguous copy (a transposed view would otherwise stay F)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


class _ScriptObject:
  """Inert stand-in for a TorchScript module class (`__torch__.*`): keeps the pickled attribute dict."""
  _qualname = '?'

  def __setstate__(self, state):
    self.__dict__['_state'] = state if isinstance(state, dict) else {'_state': state}


_TENSOR_REBUILDERS = {'_rebuild_tensor_v2': _rebuild_tensor_v2, '_rebuild_tensor': _rebuild_tensor,
                      '_rebuild_parameter': _rebuild_parameter, '_rebuild_parameter_with_state': _rebuild_parameter}
_TYPED_LISTS = ('build_intlist', 'build_floatlist', 'build_boollist', 'build_doublelist', 'build_tensorlist')


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals PyTorch weight files use; anything else is refused (no code runs from the file)."""

  def __init__(self, file, storages: Dict[str, _Storage]):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module: str, name: str):
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils' and name in _TENSOR_REBUILDERS:
      return _TENSOR_REBUILDERS[name]
    if module == 'torch.jit._pickle':  # TorchScript's typed lists (e.g. a List[int] padding attribute)
      if name in _TYPED_LISTS:
        return list
      if name == 'restore_type_tag':
        return lambda value, type_str: value
    if module == 'torch' and name.endswith('Storage'):
      return _StorageType(name)
    if module.startswith('__torch__'):
      return type(name, (_ScriptObject,), {'_qualname': f'{module}.{name}'})
    raise TorchFileError(f'refusing to unpickle {module}.{name} (a weights file holds only tensors and module '
                         'attributes; loading runs no code from it)')

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel[, view_metadata])
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage':
      raise TorchFileError(f'unsupported persistent id {pid!r}')
    storage_type, key = pid[1], str(pid[2])
    if len(pid) > 5 and pid[5] is not None:
      raise TorchFileError('storage views (legacy torch.save view_metadata) are not supported')
    dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else np.dtype(np.uint8)
    if key not in self._storages:
      self._storages[key] = _Storage(key, dtype)
    return self._storages[key]


def _read_zip(path: str) -> Tuple[Any, Dict[str, _Storage]]:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    # The archive's own data.pkl is at its top (`<root>/data.pkl`); a TorchScript archive nests other pickles.
    pkl = [n for n in names if n == 'data.pkl' or (n.endswith('/data.pkl') and n.count('/') == 1)]
    if len(pkl) != 1:
      raise TorchFileError(f'not a torch checkpoint (expected one data.pkl in the zip archive, found {len(pkl)})')
    root = pkl[0][:-len('data.pkl')]
    big_endian = root + 'byteorder' in names and zf.read(root + 'byteorder').decode().strip() == 'big'
    storages: Dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), storages).load()
    for key, st in storages.items():
      raw = zf.read(f'{root}data/{key}')
      dtype = st.dtype.newbyteorder('>') if big_endian else st.dtype
      st.array = np.frombuffer(raw, dtype=dtype, count=len(raw) // st.dtype.itemsize).astype(st.dtype, copy=False)
  return obj, storages


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def _read_legacy(path: str) -> Tuple[Any, Dict[str, _Storage]]:
  with open(path, 'rb') as f:
    storages: Dict[str, _Storage] = {}

    def load():  # every pickle of the file, the header ones included, goes through the restricted unpickler
      return _RestrictedUnpickler(f, storages).load()

    if load() != _LEGACY_MAGIC:
      raise TorchFileError('not a PyTorch weights file (neither zip nor legacy torch.save)')
    load()  # protocol version
    sys_info = load()
    little = sys_info.get('little_endian', True) if isinstance(sys_info, dict) else True
    obj = load()
    for key in load():
      st = storages[str(key)]
      (numel,) = struct.unpack('<q' if little else '>q', f.read(8))
      dtype = st.dtype.newbyteorder('<' if little else '>')
      st.array = np.frombuffer(f.read(numel * st.dtype.itemsize), dtype=dtype).astype(st.dtype, copy=False)
  return obj, storages


def _flatten(obj: Any, prefix: str, out: Dict[str, Any]) -> None:
  """Modules and dicts -> dotted names; tensors and plain attribute values are the leaves."""
  if isinstance(obj, _ScriptObject):
    obj = obj.__dict__.get('_state', {})
  if isinstance(obj, dict):
    for k, v in obj.items():
      _flatten(v, f'{prefix}.{k}' if prefix else str(k), out)
  elif isinstance(obj, _LazyTensor):
    out[prefix] = obj.materialize()
  elif isinstance(obj, (int, float, bool, str, tuple, list)) or obj is None:
    out[prefix] = obj


def read_torch_file(path: str) -> Dict[str, Any]:
  """Reads a PyTorch file (a `torch.save`d state dict or a TorchScript archive, zip or legacy) without torch.

  Returns {dotted name: value}: tensors as NumPy arrays with their dtype (bfloat16 as `ml_dtypes.bfloat16`),
  C-contiguous and owning their memory; other module attributes (stride, padding, ...) as Python values. A state
  dict's own keys are the names. Raises TorchFileError, one line starting with `path`, for a file that is not
  one of these, is corrupt, or pickles anything but tensors.
  """
  try:
    obj, _ = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    if not isinstance(obj, (dict, _ScriptObject)):
      raise TorchFileError(f'expected a state dict or a TorchScript module, found a pickled {type(obj).__name__}')
    flat: Dict[str, Any] = {}
    _flatten(obj, '', flat)
  except TorchFileError as e:
    raise TorchFileError(f'{path}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except  (a corrupt pickle can fail in any way)
    raise TorchFileError(f'{path}: unreadable PyTorch file ({errors.one_line(e)})') from None
  return flat
