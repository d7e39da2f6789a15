"""The FID reference-statistics cache outside the workdir: keyed by what changes the numbers, never trusting a bad
file (moved aside, recomputed), safe with writers running at once, and its directory validated up front."""

import glob
import os
import threading

import numpy as np
import pytest

from configs import quickstart
from ddpm_jax import config_validation
from ddpm_jax import errors
from ddpm_jax.evaluation import cache

PROTOCOL = {'weights_sha256': 'ab' * 32, 'resize': 'tf_bilinear_legacy', 'input_range': '[-1, 1]',
            'feature_layer': 'pool3', 'weights_path': '/somewhere/default_1.pt'}


def _data(**overrides):
  data = dict(quickstart.get_config().data.to_dict())
  data.update(overrides)
  return data


def _stats(dim=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((50, dim))
  return x.mean(0), np.cov(x, rowvar=False)


def test_default_directory_is_under_the_cache_home_and_overridable(monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert cache.statistics_dir(None) == str(tmp_path / 'xdg' / 'ddpm_jax' / 'fid_stats')
  assert cache.statistics_dir(str(tmp_path / 'mine')) == str(tmp_path / 'mine' / 'fid_stats')


def test_key_covers_what_changes_the_statistics():
  base = cache.statistics_key(_data(), 'train', 4500, PROTOCOL)
  path = cache.statistics_path('/c', base)
  assert os.path.basename(path).startswith('mnist5k_train_4500_') and path.endswith('.npz')
  assert cache.statistics_path('/c', cache.statistics_key(_data(), 'train', 4500, dict(PROTOCOL))) == path
  # Where the weights file lies does not change the features; its hash does.
  assert cache.statistics_path('/c', cache.statistics_key(_data(), 'train', 4500,
                                                          dict(PROTOCOL, weights_path='/x.pt'))) == path
  changed = [
      cache.statistics_key(_data(dataset='mnist'), 'train', 4500, PROTOCOL),
      cache.statistics_key(_data(), 'test', 4500, PROTOCOL),
      cache.statistics_key(_data(), 'train', 4000, PROTOCOL),
      cache.statistics_key(_data(image_size=32), 'train', 4500, PROTOCOL),
      cache.statistics_key(_data(pad_to=32), 'train', 4500, PROTOCOL),
      cache.statistics_key(_data(), 'train', 4500, dict(PROTOCOL, weights_sha256='cd' * 32)),
      cache.statistics_key(_data(), 'train', 4500, dict(PROTOCOL, resize='torch_bilinear')),
  ]
  paths = {cache.statistics_path('/c', k) for k in changed}
  assert len(paths) == len(changed) and path not in paths


def test_folder_datasets_are_told_apart_by_their_path(tmp_path):
  a = cache.statistics_key(_data(dataset='folder', path=str(tmp_path / 'a')), 'train', 10, PROTOCOL)
  b = cache.statistics_key(_data(dataset='folder', path=str(tmp_path / 'b')), 'train', 10, PROTOCOL)
  assert cache.statistics_path('/c', a) != cache.statistics_path('/c', b)


def test_round_trip_and_absent_file(tmp_path):
  key = cache.statistics_key(_data(), 'test', 500, PROTOCOL)
  path = cache.statistics_path(str(tmp_path), key)
  assert cache.load_statistics(path, key) is None
  mu, sigma = _stats()
  cache.save_statistics(path, key, mu, sigma, 500)
  got_mu, got_sigma, count = cache.load_statistics(path, key)
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)
  assert count == 500
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'wrong_count', 'wrong_key', 'nan', 'bad_shape'])
def test_a_bad_cache_file_is_moved_aside_not_trusted(tmp_path, damage, caplog):
  key = cache.statistics_key(_data(), 'test', 500, PROTOCOL)
  path = cache.statistics_path(str(tmp_path), key)
  mu, sigma = _stats()
  if damage in ('truncated', 'garbage'):
    cache.save_statistics(path, key, mu, sigma, 500)
    with open(path, 'rb') as f:
      data = f.read()
    with open(path, 'wb') as f:
      f.write(data[:len(data) // 2] if damage == 'truncated' else b'not a zip file at all')
  elif damage == 'wrong_count':
    cache.save_statistics(path, key, mu, sigma, 499)
  elif damage == 'wrong_key':
    cache.save_statistics(path, dict(key, split='train'), mu, sigma, 500)
  elif damage == 'nan':
    cache.save_statistics(path, key, mu * np.nan, sigma, 500)
  else:
    cache.save_statistics(path, key, mu, sigma[:2], 500)
  assert cache.load_statistics(path, key) is None
  assert not os.path.exists(path)
  aside = glob.glob(path + '.corrupt-*')
  assert len(aside) == 1
  assert 'unusable' in caplog.text and aside[0] in caplog.text
  # The statistics computed again replace it, and are read back.
  cache.save_statistics(path, key, mu, sigma, 500)
  assert cache.load_statistics(path, key)[2] == 500


def test_concurrent_writers_leave_one_complete_file(tmp_path):
  key = cache.statistics_key(_data(), 'train', 4500, PROTOCOL)
  path = cache.statistics_path(str(tmp_path), key)
  mu, sigma = _stats(dim=256)
  errors = []

  def writer():
    try:
      for _ in range(10):
        cache.save_statistics(path, key, mu, sigma, 4500)
        got = cache.load_statistics(path, key)  # a reader in between always sees a whole file
        assert got is not None and np.array_equal(got[1], sigma)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  threads = [threading.Thread(target=writer) for _ in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # nothing moved aside, no temporary file left
  assert cache.load_statistics(path, key)[2] == 4500


def test_cache_dir_is_validated_before_anything_runs(tmp_path):
  config = quickstart.get_config()
  config.eval.cache_dir = str(tmp_path / 'new' / 'nested')  # to be created: fine
  config_validation.validate_config(config)
  (tmp_path / 'a_file').write_text('x')
  config.eval.cache_dir = str(tmp_path / 'a_file' / 'sub')
  with pytest.raises(errors.ConfigError, match=r'config\.eval\.cache_dir=.*a_file is a file'):
    config_validation.validate_config(config)
  config.eval.cache_dir = ''
  with pytest.raises(errors.ConfigError, match=r"config\.eval\.cache_dir='' is invalid"):
    config_validation.validate_config(config)
