"""FID / IS arithmetic (`ddpm_jax.evaluation.metrics`): Fréchet distance, feature statistics, Inception Score."""

import numpy as np
import pytest
import scipy.linalg

from ddpm_jax.evaluation import metrics


def _random_stats(rng, d, n):
  x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + rng.standard_normal(d)
  return x.mean(0), np.cov(x, rowvar=False)


def _reference_fid(mu1, s1, mu2, s2):
  """Independent float64 reference: Tr (S1 S2)^{1/2} = sum sqrt(eig(S1^{1/2} S2 S1^{1/2})) (a symmetric PSD matrix)."""
  w, v = scipy.linalg.eigh(s1)
  r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = r1 @ s2 @ r1
  tr_sqrt = np.sqrt(np.clip(scipy.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# --------------------------------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_matches_scipy_reference():
  rng = np.random.default_rng(0)
  for d in (8, 64):
    mu1, s1 = _random_stats(rng, d, 4 * d)
    mu2, s2 = _random_stats(rng, d, 4 * d)
    fid = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(fid, float) and fid > 1.0
    np.testing.assert_allclose(fid, _reference_fid(mu1, s1, mu2, s2), rtol=1e-9)
    # Symmetric, and float32 inputs are computed in float64 (same answer to float32 rounding of the inputs).
    np.testing.assert_allclose(metrics.frechet_distance(mu2, s2, mu1, s1), fid, rtol=1e-9)
    f32 = metrics.frechet_distance(*(a.astype(np.float32) for a in (mu1, s1, mu2, s2)))
    np.testing.assert_allclose(f32, fid, rtol=1e-5)


def test_frechet_distance_closed_form():
  # N(0, I) vs N(m, 4 I) in d dims: |m|^2 + d (1 + 4 - 2 * 2) = |m|^2 + d.
  d = 16
  m = np.arange(d) / 4.0
  fid = metrics.frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d))
  np.testing.assert_allclose(fid, m @ m + d, rtol=1e-12)


def test_fid_of_a_set_against_itself_is_zero():
  rng = np.random.default_rng(1)
  feats = rng.standard_normal((600, 128)) * rng.uniform(0.1, 2.0, 128) + 3.0
  mu, sigma = metrics.feature_statistics(feats)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
  # Fewer samples than dimensions (rank-deficient covariance, like 8 images of 2048-d features): still ~0.
  mu, sigma = metrics.feature_statistics(np.abs(rng.standard_normal((8, 128))))
  assert np.linalg.matrix_rank(sigma) == 7
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-4 * np.trace(sigma)
  # ...and a different set is clearly not at distance 0.
  mu2, sigma2 = metrics.feature_statistics(np.abs(rng.standard_normal((8, 128))))
  assert metrics.frechet_distance(mu, sigma, mu2, sigma2) > 0.1 * np.trace(sigma)


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='mismatched'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# -------------------------------------------------------------------------------------------------- statistics
def test_feature_statistics_float64_unbiased():
  rng = np.random.default_rng(2)
  f = rng.standard_normal((50, 6)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(f)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10)


def test_accumulator_with_mask_and_resume_equals_one_pass(tmp_path):
  rng = np.random.default_rng(3)
  d = 32
  feats = rng.standard_normal((103, d)) * 2 + 50.0  # a large common offset: the shift keeps digits
  mu_ref, sigma_ref = metrics.feature_statistics(feats)

  # Batches of 16 with the last one padded to a full batch and masked, as the eval iterator delivers them.
  padded = np.concatenate([feats, np.full((9, d), 1e6)])
  mask = np.arange(len(padded)) < len(feats)
  acc = metrics.FeatureStatsAccumulator(d)
  for i in range(0, 64, 16):
    acc.update(padded[i:i + 16], mask[i:i + 16])
  np.savez(tmp_path / 'acc.npz', **acc.state_dict())  # interrupted here (as evaluate's progress file) ...
  with np.load(tmp_path / 'acc.npz') as z:
    resumed = metrics.FeatureStatsAccumulator.from_state_dict(dict(z))
  for i in range(64, len(padded), 16):  # ... and resumed
    resumed.update(padded[i:i + 16], mask[i:i + 16])
  assert resumed.count == len(feats)
  mu, sigma = resumed.finalize()
  np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
  np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)

  # An all-padding batch changes nothing; too few samples is an error, not a NaN.
  empty = metrics.FeatureStatsAccumulator(d).update(feats[:4], np.zeros(4, bool))
  assert empty.count == 0
  with pytest.raises(ValueError):
    empty.finalize()


def test_statistics_cache_checks_protocol(tmp_path):
  path = str(tmp_path / 'stats' / 'cifar10_train.npz')
  protocol = {'weights_sha256': 'abc', 'resize': 'tf_bilinear_legacy', 'input_range': '[-1, 1)',
              'feature_layer': 'pool3'}
  assert metrics.load_statistics(path, protocol) is None
  metrics.save_statistics(path, np.ones(3), np.eye(3), 50_000, protocol)
  mu, sigma, n = metrics.load_statistics(path, protocol)
  assert n == 50_000 and np.array_equal(mu, np.ones(3)) and np.array_equal(sigma, np.eye(3))
  assert metrics.load_statistics(path, dict(protocol, resize='torch_bilinear_half_pixel')) is None


def test_metric_name_marks_sample_count():
  assert metrics.metric_name('fid', 50_000) == 'fid'
  assert metrics.metric_name('fid', 5_000) == 'fid@5000'


# ------------------------------------------------------------------------------------------- Inception Score
def _openai_is(probs, splits):
  """OpenAI inception_score.py's arithmetic (N divisible by splits)."""
  scores = []
  n = probs.shape[0]
  for i in range(splits):
    part = probs[(i * n // splits):((i + 1) * n // splits), :]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return np.mean(scores), np.std(scores)


def test_inception_score_uniform_predictions_is_one():
  mean, std = metrics.inception_score(np.zeros((100, 1008)), splits=10)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_balanced_predictions_is_num_classes():
  k = 10
  logits = np.full((200, 1008), -1e4)
  logits[np.arange(200), np.arange(200) % k] = 0.0  # one-hot p(y|x), uniform over k classes within every split
  mean, std = metrics.inception_score(logits, splits=10)
  assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_openai_arithmetic_and_probs_input():
  rng = np.random.default_rng(4)
  logits = rng.standard_normal((120, 1008)) * 3
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  ref = _openai_is(probs, 10)
  np.testing.assert_allclose(metrics.inception_score(logits, splits=10), ref, rtol=1e-10)
  np.testing.assert_allclose(metrics.inception_score(probs=probs, splits=10), ref, rtol=1e-10)
  assert ref[0] > 1.5  # not the trivial value
  with pytest.raises(ValueError):
    metrics.inception_score(logits, probs=probs)
