"""`main.py` as a tired person meets it: every mistake is one line `ddpm_jax: error: ...`, exit code 2, no
traceback, before anything compiles; a diverged run is one line and exit code 1."""

import errno
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from configs import test as test_config
from ddpm_jax import checkpointing
from ddpm_jax import command_line
from ddpm_jax import errors
from ddpm_jax import run
from ddpm_jax import workdir_config
from ddpm_jax import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, 'tests', 'run_main_under_mock_data.py')


def _main(*args, runner=False, timeout=300):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  script = RUNNER if runner else 'main.py'
  start = time.monotonic()
  proc = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=env)
  return proc, time.monotonic() - start


def _assert_one_line_error(proc, *fragments, code=2):
  assert proc.returncode == code, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors_printed = [line for line in proc.stderr.splitlines() if line.startswith('ddpm_jax: error: ')]
  assert len(errors_printed) == 1, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors_printed[0], errors_printed[0]


@pytest.fixture(scope='module')
def broken_config_file():
  with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f:
    f.write('def get_config(:\n  pass\n')
  yield f.name
  os.remove(f.name)


@pytest.mark.parametrize('args,fragments', [
    (['--config=configs/nope.py'], ['--config=configs/nope.py', 'No such file']),
    (['--config=BROKEN'], ['cannot load the config file', 'SyntaxError']),
    (['--config=configs/test.py', '--config.model.foo=1'], ['--config.model.foo', "no field 'foo'"]),
    (['--config=configs/test.py', '--config.modle.ch=64'], ['--config.modle.ch', "no field 'modle'"]),
    (['--config=configs/test.py', '--config.model.ch=abc'], ['--config.model.ch=abc']),
    (['--config=configs/test.py', '--mode=train_more'], ['--mode']),
    (['--mode=sample', '--config.sample.num_samples=8'], ['--config.sample.num_samples', 'no --config is given']),
])
def test_flag_and_config_file_errors_are_one_line(tmp_path, broken_config_file, args, fragments):
  args = [a.replace('BROKEN', broken_config_file) for a in args]
  proc, _ = _main(*args, f'--workdir={tmp_path / "run"}')
  _assert_one_line_error(proc, *fragments)
  assert not (tmp_path / 'run').exists()


def test_an_unprepared_dataset_is_the_only_line_printed(tmp_path):
  # TFDS warns about the empty version folder it probes (twice); our error already says the dataset is not there.
  proc, _ = _main('--config=configs/test.py', f'--workdir={tmp_path / "w"}',
                  f'--config.data.data_dir={tmp_path / "tfds"}')
  _assert_one_line_error(proc, "config.data.dataset='cifar10'", 'not prepared')
  assert proc.stderr.strip().count('\n') == 0, proc.stderr
  assert not (tmp_path / 'w').exists()


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(capsys):
  # main.py, figures, export and convert all run through this (main.py's own case: tests/test_train.py).
  def interrupted():
    raise KeyboardInterrupt
  with pytest.raises(SystemExit) as exit_info:
    command_line.run_interruptible('ddpm_jax.figures', interrupted)
  assert exit_info.value.code == 130
  assert capsys.readouterr().err == 'ddpm_jax.figures: error: interrupted (Ctrl-C)\n'
  assert command_line.run_interruptible('ddpm_jax.export', lambda: 7) == 7


def test_missing_workdir_flag_is_one_line():
  proc, _ = _main('--config=configs/test.py')
  _assert_one_line_error(proc, '--workdir')


def test_unwritable_workdir_is_named(tmp_path, monkeypatch):
  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, 'Read-only file system')
  monkeypatch.setattr(tempfile, 'NamedTemporaryFile', read_only)
  with pytest.raises(errors.WorkdirError, match=f'--workdir={tmp_path} is not writable .Read-only file system'):
    run.check_workdir(str(tmp_path), 'train')


def test_workdir_that_is_a_file_or_missing_for_sampling_is_named(tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('')
  with pytest.raises(errors.WorkdirError, match='is a file'):
    run.check_workdir(str(path), 'train')
  with pytest.raises(errors.WorkdirError, match='does not exist: train first'):
    run.check_workdir(str(tmp_path / 'missing'), 'sample')


def _read_only_bind_mount(source, target):
  os.makedirs(target, exist_ok=True)
  ok = subprocess.run(['mount', '--bind', source, target], capture_output=True).returncode == 0
  if ok and subprocess.run(['mount', '-o', 'remount,bind,ro', target], capture_output=True).returncode != 0:
    subprocess.run(['umount', target], capture_output=True)
    ok = False
  return ok


def test_read_only_workdir_stops_before_compiling(tmp_path):
  """A real read-only file system (bind mount; root can write to a chmod-555 directory)."""
  source, target = str(tmp_path / 'src'), str(tmp_path / 'ro')
  os.makedirs(source)
  if not _read_only_bind_mount(source, target):
    pytest.skip('mount --bind is not permitted here; test_unwritable_workdir_is_named covers the message')
  try:
    proc, _ = _main('--config=configs/test.py', f'--workdir={target}', runner=True)
  finally:
    subprocess.run(['umount', target], capture_output=True)
  _assert_one_line_error(proc, f'--workdir={target} is not writable')


def test_second_launch_on_a_workdir_stops_at_once_naming_the_holder(tmp_path):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with workdir_lock.WorkdirLock(workdir):
    proc, seconds = _main('--config=configs/test.py', f'--workdir={workdir}', runner=True)
  _assert_one_line_error(proc, workdir, 'in use by another training run', f'pid {os.getpid()}', 'since')
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
  assert 'Compiling' not in proc.stderr


def test_divergence_stops_with_one_line_and_no_checkpoint_of_the_blown_up_weights(tmp_path):
  workdir = str(tmp_path / 'run')
  proc, _ = _main('--config=configs/test.py', f'--workdir={workdir}', '--config.optim.lr=1e6',
                  '--config.optim.grad_clip=0', '--config.optim.warmup_steps=0',
                  '--config.training.max_consecutive_skips=3', '--config.training.num_steps=40', runner=True)
  _assert_one_line_error(proc, 'training diverged', 'consecutive non-finite updates', code=1)
  assert 'not saving a checkpoint' in proc.stderr
  assert not os.listdir(os.path.join(workdir, 'checkpoints'))


@pytest.mark.parametrize('mode', ['sample', 'eval'])
def test_sampling_or_evaluating_a_missing_checkpoint_stops_before_loading_anything(tmp_path, mode):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  proc, _ = _main('--config=configs/test.py', f'--workdir={workdir}', f'--mode={mode}', '--config.eval.fid=True',
                  runner=True)
  _assert_one_line_error(proc, f'no checkpoint in {workdir}', 'train first')
  assert 'Inception' not in proc.stderr and 'Compiling' not in proc.stderr, proc.stderr[-3000:]

  checkpointing.save_inference_checkpoint(workdir, 3, {'w': np.zeros(2)}, {'w': np.zeros(2)})
  proc, _ = _main('--config=configs/test.py', f'--workdir={workdir}', f'--mode={mode}', '--config.eval.fid=True',
                  f'--config.{mode}.step=7', runner=True)
  _assert_one_line_error(proc, 'no checkpoint for step 7', 'available: [3]')
  assert 'Inception' not in proc.stderr and 'Compiling' not in proc.stderr, proc.stderr[-3000:]


def test_overrides_apply_to_the_config_a_workdir_recorded(tmp_path):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  workdir_config.write(test_config.get_config(), workdir)
  checkpointing.save_inference_checkpoint(workdir, 3, {'w': np.zeros(2)}, {'w': np.zeros(2)})
  recorded = f'--config=configs/workdir.py:{workdir}'
  # The override reaches the run: the step asked for is looked up (and is absent) before anything compiles.
  proc, _ = _main(recorded, f'--workdir={workdir}', '--mode=sample', '--config.sample.step=7',
                  '--config.sample.num_samples=8', runner=True)
  _assert_one_line_error(proc, 'no checkpoint for step 7', 'available: [3]')
  # Fields the run fixed stay the run's.
  proc, _ = _main(recorded, f'--workdir={workdir}', '--mode=sample', '--config.model.ch=8', runner=True)
  _assert_one_line_error(proc, 'config.model.ch=8 differs from', 'config.json')
  proc, _ = _main(f'--config=configs/workdir.py:{tmp_path / "none"}', f'--workdir={workdir}', '--mode=sample',
                  runner=True)
  _assert_one_line_error(proc, 'configs/workdir.py', 'does not exist')
  # A recording edited by hand into a value of another type is named, not a traceback.
  path = workdir_config.path(workdir)
  with open(path) as f:
    edited = json.load(f)
  edited['model']['ch'] = 1.5
  with open(path, 'w') as f:
    json.dump(edited, f)
  proc, _ = _main(f'--workdir={workdir}', '--mode=sample', runner=True)
  _assert_one_line_error(proc, f'{path} is not a readable config', "'ch'")
