"""Class-conditional DDPM and classifier-free guidance (Issue 7), end to end across the modules.

Guidance (Ho & Salimans 2022, eq. 6): eps~ = (1 + w) eps(x, y) - w eps(x, null), in every sampler, as ONE batched
network call per step; w = 0 is the conditional model. The null label (index num_classes) is never a real class;
label dropout trains it at the configured rate; unconditional models and checkpoints are untouched (no label
parameters, same samples). Also the digit-classifier check of
`bench/digit_classifier.py` on real labelled digits.

Cheap fake networks stand in for the U-Net wherever only the wiring is tested; the real (configs/test.py-sized)
U-Net is compiled a handful of times only.
"""

import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart_cond
from configs import test as test_config
from ddpm_jax import checkpointing
from ddpm_jax import config_validation
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import errors
from ddpm_jax import images as images_lib
from ddpm_jax import input_pipeline
from ddpm_jax import models
from ddpm_jax import sample
from ddpm_jax import samplers
from ddpm_jax import sharding
from ddpm_jax import run
from ddpm_jax import train_state as train_state_lib
from tests.helpers import random_params

NUM_CLASSES = 10
NULL = NUM_CLASSES
B = 8  # samples per test batch (one per fake device)
SHAPE = (B, 4, 4, 1)  # fake-network sampling shape
# (method, respacing) for "every sampler": ancestral, DDIM, respaced ancestral, respaced DDIM. T = 20.
SAMPLERS = [('ancestral', ''), ('ddim', ''), ('ancestral', '7'), ('ddim', 'ddim5')]


def _config(num_classes=0, **sample):
  config = test_config.get_config()
  config.model.num_classes = num_classes
  for k, v in sample.items():
    config.sample[k] = v
  return config


def _diffusion():
  return diffusion_lib.from_config(_config().diffusion)


def _num_steps(respacing):
  return len(samplers.space_timesteps(20, respacing)) if respacing else 20


def _fake_eps(x, t, y):
  """A cheap label-dependent 'network': elementwise, so every batch composition gives bit-identical values."""
  scale = 0.3 + 0.15 * jnp.asarray(y, jnp.float32)  # the null label (10) has its own, distinct scale
  return jnp.tanh(x * scale.reshape(-1, 1, 1, 1) + 0.02 * t.astype(jnp.float32).reshape(-1, 1, 1, 1))


class _CallLog:
  """Counts network calls at trace time (Python) and at run time (jax.debug.callback), with their batch sizes."""

  def __init__(self):
    self.traced, self.executed = [], []

  def wrap(self, fn):
    def logged(x, t, y):
      self.traced.append(x.shape[0])
      jax.debug.callback(lambda xb: self.executed.append(xb.shape[0]), x)
      return fn(x, t, y)
    return logged


def _labels():
  return jnp.asarray(np.arange(B) % NUM_CLASSES, jnp.int32)


# ------------------------------------------------------------------------------------------ guidance, samplers


@pytest.mark.parametrize('method,respacing', SAMPLERS)
def test_guidance_in_every_sampler(method, respacing):
  diffusion, labels, log = _diffusion(), _labels(), _CallLog()
  model = log.wrap(_fake_eps)
  steps = _num_steps(respacing)

  @jax.jit
  def guided(rng, w):
    fn = samplers.classifier_free_guidance(model, labels, NULL, w)
    return samplers.sample(diffusion, fn, SHAPE, rng, method=method, respacing=respacing, eta=0.5)

  @jax.jit
  def conditional(rng):
    return samplers.sample(diffusion, lambda x, t: model(x, t, labels), SHAPE, rng, method=method,
                           respacing=respacing, eta=0.5)

  rng = jax.random.key(3)
  out_w0 = np.asarray(guided(rng, 0.0))
  assert log.traced == [2 * B]  # ONE network call in the (scanned) step, on the doubled batch
  assert log.executed == [2 * B] * steps  # ... i.e. exactly one call per sampling step at run time
  out_cond = np.asarray(conditional(rng))
  assert log.traced == [2 * B, B] and log.executed[steps:] == [B] * steps
  # w = 0 IS the conditional model: the same samples from the same rng.
  np.testing.assert_array_equal(out_w0, out_cond)
  # w > 0 changes them (same compiled program: w is traced).
  out_w2 = np.asarray(guided(rng, 2.0))
  assert np.abs(out_w2 - out_cond).max() > 1e-2
  assert log.traced == [2 * B, B]  # no retrace for a new w
  assert np.all(np.isfinite(out_w2))


@pytest.mark.parametrize('method', ['ancestral', 'ddim'])
def test_guided_step_matches_manual_combination(method):
  diffusion, labels = _diffusion(), _labels()
  w = 1.5

  def manual_eps(x, t):
    return (1 + w) * _fake_eps(x, t, labels) - w * _fake_eps(x, t, jnp.full_like(labels, NULL))

  x = jax.random.normal(jax.random.key(1), SHAPE)
  t = jnp.full((B,), 13, jnp.int32)
  guided_fn = samplers.classifier_free_guidance(_fake_eps, labels, NULL, w)
  np.testing.assert_allclose(guided_fn(x, t), manual_eps(x, t), rtol=1e-6, atol=1e-6)
  # A whole one-step sampler (respacing '1' keeps only t = 0) from the same x_T: guided model vs the manual eps.
  def run(model_fn):
    return np.asarray(jax.jit(lambda xx: samplers.sample(diffusion, model_fn, SHAPE, jax.random.key(2), method=method,
                                                         respacing='1', x_T=xx))(x))
  out_guided = run(guided_fn)
  np.testing.assert_allclose(out_guided, run(manual_eps), rtol=1e-6, atol=1e-6)
  assert np.abs(out_guided - run(lambda xx, tt: _fake_eps(xx, tt, labels))).max() > 1e-3


class _FakeModel:
  """Stands in for the U-Net in `sample.make_sample_fn`: records every `apply` (trace time) and its labels."""

  def __init__(self):
    self.calls, self.labels_seen = [], []

  def apply(self, variables, x, t, y=None, train=False):
    assert not train
    self.calls.append((x.shape[0], None if y is None else y.shape))
    if y is None:
      return jnp.tanh(x * variables['params']['scale'])
    jax.debug.callback(lambda yy: self.labels_seen.append(np.asarray(yy)), y)
    return _fake_eps(x, t, y) * variables['params']['scale']


@pytest.mark.parametrize('guidance_scale', [0.0, 1.5])
def test_make_sample_fn_conditional_wiring(guidance_scale):
  config = _config(NUM_CLASSES, guidance_scale=guidance_scale, respacing='5')
  config.data.image_size, config.data.num_channels = 4, 1
  mesh = sharding.create_mesh()
  fake, params = _FakeModel(), {'params': {'scale': jnp.float32(1.0)}}
  sample_fn = sample.make_sample_fn(config, fake, _diffusion(), mesh, B)
  labels = sample.sample_labels(config, B)
  out = np.asarray(sample_fn(params['params'], jax.random.key(7), jnp.asarray(labels)))

  factor = 2 if guidance_scale > 0 else 1
  assert fake.calls == [(factor * B, (factor * B,))]  # one network call per step, doubled batch when guided
  assert len(fake.labels_seen) == 5
  want_y = np.concatenate([labels, np.full((B,), NULL)]) if guidance_scale > 0 else labels
  for y in fake.labels_seen:
    np.testing.assert_array_equal(y, want_y)  # the requested labels, then the null label for the guided half

  def model_xty(x, t, y):
    return _fake_eps(x, t, y)
  model_fn = (samplers.classifier_free_guidance(model_xty, jnp.asarray(labels), NULL, guidance_scale)
              if guidance_scale > 0 else functools.partial(model_xty, y=jnp.asarray(labels)))
  want = samplers.sample(_diffusion(), model_fn, SHAPE, jax.random.key(7), respacing='5')
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_make_sample_fn_unconditional_passes_no_labels():
  config = _config(0, respacing='5')
  config.data.image_size, config.data.num_channels = 4, 1
  assert sample.sample_labels(config, B) is None
  fake = _FakeModel()
  sample_fn = sample.make_sample_fn(config, fake, _diffusion(), sharding.create_mesh(), B)
  out = np.asarray(sample_fn({'scale': jnp.float32(0.5)}, jax.random.key(7), None))
  assert fake.calls == [(B, None)]
  want = samplers.sample(_diffusion(), lambda x, t: jnp.tanh(x * 0.5), SHAPE, jax.random.key(7), respacing='5')
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- the real U-Net


def test_param_trees():
  # The unconditional architectures (their counts: tests/test_unet.py) have no label parameters, and conditioning
  # only adds the label table, num_classes + 1 rows (the null label) of width 4 * ch.
  uncond = models.param_shapes(models.create_model(_config(0)))
  cond = models.param_shapes(models.create_model(_config(NUM_CLASSES)))
  assert 'label_emb' not in uncond
  assert set(cond) == set(uncond) | {'label_emb'}
  assert jax.tree.map(lambda s: s.shape, {k: cond[k] for k in uncond}) == jax.tree.map(lambda s: s.shape, uncond)
  assert cond['label_emb']['embedding'].shape == (NUM_CLASSES + 1, 4 * 32)
  assert models.count_params(cond) == models.count_params(uncond) + (NUM_CLASSES + 1) * 4 * 32
  qs = models.param_shapes(models.create_model(quickstart_cond.get_config()))
  assert qs['label_emb']['embedding'].shape == (11, 128)


def test_labels_to_unconditional_model_raise_clear_error():
  config = _config(0)
  model = models.create_model(config)
  params = models.param_shapes(model)
  x, t = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match=r'labels y were passed to an unconditional model \(model.num_classes = 0\)'):
    jax.eval_shape(lambda p: model.apply({'params': p}, x, t, y=jnp.zeros((2,), jnp.int32)), params)
  cond = models.create_model(_config(NUM_CLASSES))
  with pytest.raises(ValueError, match=r'expects y of shape \(2,\)'):
    jax.eval_shape(lambda p: cond.apply({'params': p}, x, t, y=jnp.zeros((3,), jnp.int32)),
                   models.param_shapes(cond))


def test_real_unet_guided_step_is_one_batched_call_matching_manual():
  config = _config(NUM_CLASSES)
  model = models.create_model(config)
  params = random_params(model)
  n = 4
  x = jax.random.normal(jax.random.key(1), (n, 32, 32, 3))
  t = jnp.asarray([19, 12, 5, 0], jnp.int32)
  labels = jnp.asarray([3, 0, 9, 3], jnp.int32)
  batch_sizes = []

  def apply(p, xx, tt, yy):
    batch_sizes.append(xx.shape[0])
    return model.apply({'params': p}, xx, tt, y=yy, train=False)

  guided = jax.jit(lambda p, w: samplers.classifier_free_guidance(functools.partial(apply, p), labels, NULL, w)(x, t))
  plain = jax.jit(lambda p, yy: apply(p, x, t, yy))
  w = 2.0
  got = np.asarray(guided(params, w))
  assert batch_sizes == [2 * n]  # one network call on the concatenated [conditional; null] batch
  eps_c = np.asarray(plain(params, labels))
  eps_u = np.asarray(plain(params, jnp.full((n,), NULL, jnp.int32)))
  assert np.abs(eps_c - eps_u).max() > 1e-2  # the label matters, so the check below is not vacuous
  np.testing.assert_allclose(got, (1 + w) * eps_c - w * eps_u, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(guided(params, 0.0), eps_c, rtol=1e-5, atol=1e-5)  # w = 0: conditional
  assert np.abs(got - eps_c).max() > 1e-2
  # y=None on a conditional model is the null label.
  none = jax.jit(lambda p: model.apply({'params': p}, x, t))(params)
  np.testing.assert_allclose(none, eps_u, rtol=1e-5, atol=1e-5)


def test_unconditional_checkpoint_loads_and_samples_unchanged(tmp_path):
  config = _config(0, respacing='5')
  model = models.create_model(config)
  params = random_params(model, seed=1)
  checkpointing.save_inference_checkpoint(str(tmp_path), 3, params, params)
  step, _, ema = checkpointing.restore_inference_params(str(tmp_path))
  assert step == 3 and 'label_emb' not in ema
  jax.tree.map(np.testing.assert_array_equal, ema, params)

  mesh = sharding.create_mesh()
  sample_fn = sample.make_sample_fn(config, model, _diffusion(), mesh, B)
  rng = jax.random.key(11)
  got = np.asarray(sample_fn(jax.device_put(ema, sharding.replicated(mesh)), rng, None))
  # The pre-conditioning sampling path: model.apply(params, x, t) with no labels at all.
  want = jax.jit(lambda p: samplers.sample(_diffusion(), lambda x, t: model.apply({'params': p}, x, t, train=False),
                                           (B, 32, 32, 3), rng, respacing='5'))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(got).max() > 0.1


# --------------------------------------------------------------------------------------------- label dropout


class _LabelRecorder(nn.Module):
  """A one-parameter 'network' that reports, through a host callback, the labels the train step gives it."""

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    scale = self.param('scale', nn.initializers.zeros, ())
    if y is None:
      jax.debug.callback(lambda: _SEEN.append(None))
    else:
      # ordered: the steps of one call run as an unrolled program, whose unordered callbacks may interleave.
      jax.debug.callback(lambda yy: _SEEN.append(np.asarray(yy)), y, ordered=True)
    return x * scale


_SEEN = []  # labels received by _LabelRecorder, one entry per forward pass


def _run_train_steps(num_classes, label_dropout, labels):
  """`steps` train steps (one scanned, jitted call) of train_state's step; returns the labels the model saw."""
  steps, batch = labels.shape
  config = _config(num_classes)
  config.training.label_dropout = label_dropout
  config.training.batch_size = batch
  model = _LabelRecorder()
  diffusion = _diffusion()
  optimizer = train_state_lib.create_optimizer(config)
  x = jnp.zeros((batch, 2, 2, 1))
  params = model.init(jax.random.key(0), x, jnp.zeros((batch,), jnp.int32))['params']
  _SEEN.clear()
  state = train_state_lib.create_train_state(params, optimizer, diffusion)
  step_fn = jax.jit(train_state_lib.make_step_fn(model, diffusion, optimizer, config, jax.random.key(5)))
  batches = {'image': jnp.zeros((steps, batch, 2, 2, 1)), 'label': jnp.asarray(labels, jnp.int32)}
  state, _ = step_fn(state, batches)
  jax.block_until_ready(state)
  assert int(state.step) == steps
  return list(_SEEN)


def test_label_dropout_rate_matches_config():
  steps, batch, p = 20, 1024, 0.1
  labels = np.random.RandomState(0).randint(0, NUM_CLASSES, (steps, batch))
  seen = _run_train_steps(NUM_CLASSES, p, labels)
  assert len(seen) == steps  # one forward pass per step (the callback does not run again in the backward pass)
  seen = np.stack(seen)
  dropped = seen == NULL
  kept = ~dropped
  np.testing.assert_array_equal(seen[kept], labels[kept])  # other labels reach the model unchanged
  assert seen.min() >= 0 and seen.max() <= NULL
  n = dropped.size
  sigma = np.sqrt(p * (1 - p) / n)
  assert n >= 20_000 and abs(dropped.mean() - p) < 3 * sigma, (dropped.mean(), sigma)
  # A fresh mask every step (keys are fold_in(rng, step)), not the same positions over and over.
  assert len({m.tobytes() for m in dropped}) == steps
  assert np.std(dropped.mean(axis=1)) > 0


def test_label_dropout_one_and_unconditional():
  labels = np.random.RandomState(1).randint(0, NUM_CLASSES, (2, 64))
  seen = np.stack(_run_train_steps(NUM_CLASSES, 1.0, labels))
  assert np.all(seen == NULL)
  # An unconditional model trained on a labelled dataset never sees the labels.
  assert _run_train_steps(0, 0.1, labels) == [None, None]


# ---------------------------------------------------------------------------- labels: pipeline and sampling


def test_null_label_is_never_a_real_class_mnist5k():
  config = quickstart_cond.get_config()
  config.training.batch_size = 500
  info = input_pipeline.dataset_info(config)
  assert info.has_labels and info.num_classes == config.model.num_classes == NUM_CLASSES
  it = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
  labels = np.concatenate([next(it)['label'] for _ in range(9)])  # one epoch, 4,500 digits
  assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < NUM_CLASSES
  assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [450] * NUM_CLASSES
  ev = input_pipeline.create_eval_iterator(config, 'test', 250, process_index=0, process_count=1)
  test_labels = np.concatenate([b['label'][b['mask']] for b in ev])
  assert test_labels.max() < NUM_CLASSES and np.bincount(test_labels).tolist() == [50] * NUM_CLASSES


def test_null_label_is_never_a_real_class_cifar10_mock():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _config(NUM_CLASSES)
  config.training.batch_size = 64
  with tfds.testing.mock_data(num_examples=128):
    info = input_pipeline.dataset_info(config)
    assert info.has_labels and info.num_classes == NUM_CLASSES
    it = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
    labels = np.concatenate([next(it)['label'] for _ in range(2)])
  assert labels.shape == (128,) and labels.dtype == np.int32
  assert labels.min() >= 0 and labels.max() < NUM_CLASSES


def test_conditional_config_on_unlabelled_data_fails_before_anything_is_built(tmp_path):
  # The data pipeline's own error for this: tests/test_input_pipeline.py (folder datasets).
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for name in ('a.png', 'b.png'):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / name)
  config = _config(NUM_CLASSES)
  config.data.dataset, config.data.path, config.data.image_size = 'folder', str(tmp_path), 16
  config.training.batch_size = 8  # divides by the 8 test devices
  with pytest.raises(errors.UserError, match=r"config.model.num_classes=10 .*'folder' has no labels"):
    run.run('train', config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_sample_labels_never_null_and_one_class_per_grid_row():
  config = _config(NUM_CLASSES, class_label=-1)
  for num in range(1, 260):
    labels = sample.sample_labels(config, num)
    assert labels.shape == (num,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < NUM_CLASSES  # never the null label
    assert np.all(np.diff(labels) >= 0)  # contiguous blocks, classes in order
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if num >= NUM_CLASSES:
      assert counts.min() >= 1 and counts.max() - counts.min() <= 1  # every class, balanced
    if num % NUM_CLASSES == 0:
      # The grid of sampling/train (ncol = num // num_classes) then has exactly one class per row, row i = class i.
      ncol = max(1, num // NUM_CLASSES)
      rows = labels.reshape(-1, ncol)
      assert np.all(rows == np.arange(NUM_CLASSES)[:, None])
  for k in range(NUM_CLASSES):
    config.sample.class_label = k
    np.testing.assert_array_equal(sample.sample_labels(config, 7), np.full((7,), k))
  assert sample.sample_labels(_config(0), 7) is None


def test_quickstart_cond_config_is_valid_and_its_grid_has_one_class_per_row():
  config = quickstart_cond.get_config()
  config_validation.validate_config(config, num_devices=8)
  labels = sample.sample_labels(config, config.sample.num_samples)
  assert np.all(labels.reshape(NUM_CLASSES, -1) == np.arange(NUM_CLASSES)[:, None])


# ---------------------------------------------------------------------------------------- the digit classifier


def test_digit_classifier_on_real_labelled_digits(tmp_path, capsys):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
  try:
    import digit_classifier  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  test_x, test_y = digit_classifier.load_digits('test')
  assert test_x.shape == (500, 28, 28, 1) and test_x.min() == -1.0  # the quickstart digits, unpadded
  uint8 = images_lib.to_uint8(test_x)  # as --mode=sample writes them
  good, wrong, uncond = tmp_path / 'good.npz', tmp_path / 'wrong.npz', tmp_path / 'uncond.npz'
  np.savez(good, images=uint8, labels=test_y)
  np.savez(wrong, images=uint8, labels=(test_y + 1) % NUM_CLASSES)
  np.savez(uncond, images=uint8)

  # knn: the same check, dependency-free and fast (the default MLP is exercised by the script itself).
  result = digit_classifier.run(str(good), method='knn', log=lambda *_: None)
  assert result['test_accuracy'] > 0.9 and result['agreement'] == result['test_accuracy']
  assert result['counts'] == {str(k): 50 for k in range(NUM_CLASSES)}
  assert min(result['per_class'].values()) > 0.75
  assert np.trace(np.asarray(result['confusion'])) == round(result['agreement'] * 500)
  predict = digit_classifier.train_classifier(*digit_classifier.load_digits('train'), method='nearest_mean')
  labels = np.load(wrong)['labels']
  assert digit_classifier.agreement(predict(digit_classifier.load_samples(str(wrong))[0]), labels)['agreement'] < 0.1
  with pytest.raises(ValueError, match='unconditional'):
    digit_classifier.load_samples(str(uncond))


def test_quickstart_quality_classifies_real_digits_confidently_and_noise_not(tmp_path):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
  try:
    import quickstart_quality  # pylint: disable=g-import-not-at-top
    import digit_classifier  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  test_x, test_y = digit_classifier.load_digits('test')
  real = quickstart_quality.classify(images_lib.to_uint8(test_x), confidence=0.9)
  # The 500 held-out digits: 50 per class; the classifier is ~95% right, and mostly sure of itself.
  assert sum(real['class_histogram']) == 500
  assert np.abs(np.asarray(real['class_histogram']) - np.bincount(test_y, minlength=NUM_CLASSES)).sum() < 60
  assert real['confident_fraction'] > 0.8
  assert sum(real['class_histogram_confident']) == round(real['confident_fraction'] * 500)
  # Speckled blobs (what a bad sampler draws) are not confidently any digit.
  noise = np.random.RandomState(0).randint(0, 256, (200, 28, 28, 1)).astype(np.uint8)
  assert quickstart_quality.classify(noise, confidence=0.9)['confident_fraction'] < 0.3
