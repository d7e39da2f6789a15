"""`main.py`'s persistent compilation cache: a second run reads back the first one's programs and gets the same
numbers; damaged entries are set aside, not read again and again; the flag's bad values are one-line errors."""

import os
import re
import subprocess
import sys
import zlib

import pytest

from ddpm_jax import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, 'tests', 'run_main_under_mock_data.py')
READ_ERROR = 'Error reading persistent compilation cache entry'


def _train(workdir, cache_home, *flags):
  """configs/test.py for 2 steps under mock data; JAX's cache only as `main.py` sets it (not conftest's)."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1', XDG_CACHE_HOME=cache_home)
  proc = subprocess.run(
      [sys.executable, RUNNER, '--config=configs/test.py', f'--workdir={workdir}', '--config.training.num_steps=2',
       '--config.training.checkpoint_every=2', *flags], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _last_loss(proc):
  return re.findall(r'last loss ([0-9.]+)', proc.stderr)[-1]


def _entries(folder):
  return sorted(name for name in os.listdir(folder) if name.endswith('-cache'))


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
  """One training run with the default flag: its cache folder, entries and console."""
  home = str(tmp_path_factory.mktemp('cache_home'))
  proc = _train(str(tmp_path_factory.mktemp('run') / 'a'), home)
  folder = os.path.join(home, 'ddpm_jax', 'jax_compilation', compilation_cache.machine_tag())
  return home, folder, _entries(folder), proc


@pytest.mark.slow
def test_a_second_run_reads_the_first_runs_programs_and_gets_the_same_numbers(first_run, tmp_path):
  home, folder, entries, proc_a = first_run
  assert any(name.startswith('jit_multi_step-') for name in entries), entries  # the train step was kept
  proc_b = _train(str(tmp_path / 'b'), home)
  assert _entries(folder) == entries  # nothing compiled anew: every program came from the cache
  assert READ_ERROR not in proc_b.stderr
  assert _last_loss(proc_b) == _last_loss(proc_a)


@pytest.mark.slow
def test_a_truncated_entry_is_moved_aside_and_compiled_again(first_run, tmp_path):
  home, folder, entries, proc_a = first_run
  step_entry = next(name for name in entries if name.startswith('jit_multi_step-'))
  path = os.path.join(folder, step_entry)
  with open(path, 'rb') as f:
    whole = f.read()
  with open(path, 'wb') as f:
    f.write(whole[:len(whole) // 3])  # what a process killed during JAX's write leaves ...
  checked = os.stat(os.path.join(folder, '.entries_checked')).st_mtime
  os.utime(path, (checked, checked))  # ... in an earlier run, over a minute ago
  proc = _train(str(tmp_path / 'c'), home)
  assert READ_ERROR not in proc.stderr
  assert 'damaged entry moved to' in proc.stderr
  with open(os.path.join(folder, 'damaged', step_entry), 'rb') as f:
    assert f.read() == whole[:len(whole) // 3]  # set aside as it was, not deleted
  with open(path, 'rb') as f:
    assert len(f.read()) > len(whole) // 3  # written again, whole
  assert _last_loss(proc) == _last_loss(proc_a)


def test_empty_flag_turns_the_cache_off(tmp_path):
  home = str(tmp_path / 'home')
  _train(str(tmp_path / 'run'), home, '--compilation_cache_dir=')
  assert not os.path.exists(os.path.join(home, 'ddpm_jax', 'jax_compilation'))


def test_an_unwritable_folder_is_one_line_before_anything_compiles(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  proc = subprocess.run([sys.executable, RUNNER, '--config=configs/test.py', f'--workdir={tmp_path / "run"}',
                         f'--compilation_cache_dir={blocker}/cache'], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=env)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('ddpm_jax: error: ')]
  assert len(errors) == 1 and f'--compilation_cache_dir={blocker}/cache' in errors[0], proc.stderr[-3000:]
  assert 'not writable' in errors[0] and 'Traceback' not in proc.stderr and 'Compiling' not in proc.stderr


def test_each_entry_is_checked_once_a_minute_after_its_write_and_only_damaged_ones_move(tmp_path):
  good = zlib.compress(b'x' * 10000)
  for name, data, mtime in [('checked-cache', good[:20], 100), ('whole-cache', good, 300),
                            ('cut-cache', good[:20], 300), ('unknown-cache', b'not a compressed stream', 300),
                            ('recent-cache', good[:20], 990)]:
    (tmp_path / name).write_bytes(data)
    os.utime(tmp_path / name, (mtime, mtime))
  (tmp_path / '.entries_checked').write_text('')
  os.utime(tmp_path / '.entries_checked', (200, 200))  # 'checked-cache' passed a check before: not read again
  # At t=1000 'recent-cache' (t=990) may still be being written by another process: left for the next check.
  assert compilation_cache.set_aside_damaged_entries(str(tmp_path), now=1000) == ['cut-cache']
  assert sorted(os.listdir(tmp_path / 'damaged')) == ['cut-cache']
  assert {'checked-cache', 'whole-cache', 'unknown-cache', 'recent-cache'} <= set(os.listdir(tmp_path))
  assert compilation_cache.set_aside_damaged_entries(str(tmp_path), now=1100) == ['recent-cache']
  assert compilation_cache.set_aside_damaged_entries(str(tmp_path), now=1200) == []
