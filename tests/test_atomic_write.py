"""ddpm_jax.atomic_write: the file under its real name is the old one or the new one, never a partial write."""

import os
import pathlib

import numpy as np
import pytest

from ddpm_jax.atomic_write import atomic_write


def test_numpy_writers_land_under_the_exact_name(tmp_path):
  # np.savez / np.save append .npz / .npy to a name without it: the temporary name must keep the extension.
  path = str(tmp_path / 'new_dir' / 'progress.npz')
  atomic_write(path, lambda tmp: np.savez(tmp, a=np.arange(3)))
  atomic_write(str(tmp_path / 'logits.npy'), lambda tmp: np.save(tmp, np.ones(2)))
  with np.load(path) as z:
    assert z['a'].tolist() == [0, 1, 2]
  assert np.load(tmp_path / 'logits.npy').tolist() == [1.0, 1.0]
  assert sorted(os.listdir(tmp_path)) == ['logits.npy', 'new_dir'] and os.listdir(tmp_path / 'new_dir') == [
      'progress.npz']


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / 'config.json'
  path.write_text('old')

  def half_then_fail(tmp):
    with open(tmp, 'w') as f:
      f.write('{"trunc')
    raise KeyboardInterrupt  # killed mid-write

  with pytest.raises(KeyboardInterrupt):
    atomic_write(str(path), half_then_fail)
  assert path.read_text() == 'old' and os.listdir(tmp_path) == ['config.json']
  atomic_write(str(path), lambda tmp: pathlib.Path(tmp).write_text('new'))
  assert path.read_text() == 'new' and os.listdir(tmp_path) == ['config.json']


def test_each_write_has_its_own_temporary_file_with_the_usual_permissions(tmp_path):
  # Two processes writing the same cache file at once must not write into one temporary file.
  names = []
  for text in ('first', 'second'):
    atomic_write(str(tmp_path / 'stats.npz'), lambda tmp, t=text: names.append(tmp) or pathlib.Path(tmp).write_text(t))
  assert names[0] != names[1] and all(n.endswith('.npz') and os.path.dirname(n) == str(tmp_path) for n in names)
  assert (tmp_path / 'stats.npz').read_text() == 'second'
  (tmp_path / 'plain.txt').write_text('x')  # what open() gives: 0666 less the umask, not mkstemp's private 0600
  assert os.stat(tmp_path / 'stats.npz').st_mode == os.stat(tmp_path / 'plain.txt').st_mode
