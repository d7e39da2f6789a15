"""Corrupt checkpoints never stop a run and are never deleted; one training run per workdir.

Each corruption kind a multi-day run meets (a truncated array file, missing metadata, a missing data-iterator file,
an empty step directory, an orbax temporary directory left by a kill) is applied to the newest of two real
training checkpoints (train state + grain iterator state).
"""

import glob
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from configs import test as test_config
from ddpm_jax import checkpointing
from ddpm_jax import input_pipeline
from ddpm_jax import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(value, width=32):
  params = {'w': jnp.full((64, width), value), 'b': {'c': jnp.arange(4.0) * value}}
  return {'step': jnp.int32(value), 'params': params, 'ema_params': params,
          'opt_state': optax.adam(1e-3).init(params)}


def _iterator():
  return input_pipeline.create_train_iterator(test_config.get_config())


@pytest.fixture(scope='module')
def two_checkpoints(tmp_path_factory):
  """A workdir with training checkpoints at steps 2 and 4 (state and data iterator)."""
  workdir = str(tmp_path_factory.mktemp('two_checkpoints'))
  with tfds.testing.mock_data(num_examples=64):
    it = _iterator()
    manager = checkpointing.create_manager(workdir, keep=3)
    for step in (2, 4):
      next(it)
      checkpointing.save(manager, step, _state(float(step)), input_pipeline.checkpoint_save_args(it))
    manager.wait_until_finished()
    manager.close()
  return workdir


def _files(directory):
  return sorted(os.path.relpath(f, directory) for f in glob.glob(os.path.join(directory, '**'), recursive=True)
                if os.path.isfile(f))


def _truncate_the_array_files(step_dir):
  paths = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  assert paths
  for path in paths:
    os.truncate(path, 10)


def _remove(relative):
  return lambda step_dir: os.remove(os.path.join(step_dir, relative))


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


CORRUPTIONS = {
    'truncated_array_file': _truncate_the_array_files,
    'missing_metadata': _remove(os.path.join('state', '_METADATA')),
    'missing_data_iterator_file': _remove(os.path.join('data', 'process_0-of-1.json')),
    'empty_step_directory': _empty,
}


def _restore(workdir, target=None):
  with tfds.testing.mock_data(num_examples=64):
    it = _iterator()
    manager, step, state = checkpointing.restore_latest(
        workdir, 3, _state(0.0) if target is None else target, lambda: input_pipeline.checkpoint_restore_args(it))
    manager.close()
  return step, state


@pytest.mark.parametrize('kind', sorted(CORRUPTIONS))
def test_unreadable_newest_step_is_moved_aside_and_the_previous_one_restored(two_checkpoints, tmp_path, kind):
  workdir = str(tmp_path / 'run')
  shutil.copytree(two_checkpoints, workdir)
  step_dir = os.path.join(checkpointing.checkpoint_dir(workdir), '4')
  CORRUPTIONS[kind](step_dir)
  files_before = _files(step_dir)

  reports = []
  previous_hook, sys.unraisablehook = sys.unraisablehook, reports.append
  try:
    step, state = _restore(workdir)
    time.sleep(0.5)  # tensorstore's late callbacks of the failed read
  finally:
    sys.unraisablehook = previous_hook
  assert not reports, [str(r.exc_value) for r in reports]  # no "Event loop is closed" tracebacks
  assert step == 2
  np.testing.assert_array_equal(state['params']['w'], np.full((64, 32), 2.0))
  aside = step_dir + '.unreadable'
  assert os.path.isdir(aside) and not os.path.exists(step_dir)
  assert _files(aside) == files_before  # moved, not deleted, nothing lost
  assert checkpointing.available_steps(workdir) == [2]

  # Step 4 can be written again, and a later restart finds it; a second bad step 4 goes to `.unreadable-2`.
  manager = checkpointing.create_manager(workdir, keep=3)
  checkpointing.save(manager, 4, _state(4.5))
  manager.wait_until_finished()
  manager.close()
  assert checkpointing.available_steps(workdir) == [2, 4]
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)
  step, _ = _restore(workdir)
  assert step == 2 and os.path.isdir(step_dir + '.unreadable-2') and os.path.isdir(aside)


def test_orbax_temporary_directory_from_a_kill_is_ignored_and_kept(two_checkpoints, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(two_checkpoints, workdir)
  ckpt = checkpointing.checkpoint_dir(workdir)
  partial = os.path.join(ckpt, '6.orbax-checkpoint-tmp-1796162999')
  shutil.copytree(os.path.join(ckpt, '4'), partial)
  os.remove(os.path.join(partial, 'commit_success.txt'))
  step, state = _restore(workdir)
  assert step == 4
  np.testing.assert_array_equal(state['params']['w'], np.full((64, 32), 4.0))
  assert os.path.isdir(partial)


def test_a_run_resumed_with_another_config_stops_and_moves_nothing(two_checkpoints, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(two_checkpoints, workdir)
  listing = sorted(os.listdir(checkpointing.checkpoint_dir(workdir)))
  with pytest.raises(checkpointing.CheckpointMismatchError) as err:
    _restore(workdir, target=_state(0.0, width=16))  # e.g. another model.ch
  message = str(err.value)
  assert 'step 4' in message and 'params/w has shape (64, 32) in the checkpoint and (64, 16)' in message
  assert '\n' not in message and 'config.json' in message
  assert sorted(os.listdir(checkpointing.checkpoint_dir(workdir))) == listing


def test_sample_and_eval_fall_back_without_touching_checkpoints(two_checkpoints, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(two_checkpoints, workdir)
  ckpt = checkpointing.checkpoint_dir(workdir)
  _truncate_the_array_files(os.path.join(ckpt, '4'))
  listing = sorted(os.listdir(ckpt))
  step, params, ema = checkpointing.restore_inference_params(workdir)
  assert step == 2
  np.testing.assert_array_equal(ema['w'], np.full((64, 32), 2.0))
  assert sorted(os.listdir(ckpt)) == listing  # read-only: nothing moved or written


def test_workdir_lock_names_the_holder_and_is_taken_over_from_a_dead_one(tmp_path, caplog):
  workdir = str(tmp_path)
  with workdir_lock.WorkdirLock(workdir):
    # Another process (a second launch) cannot take it while this one lives.
    code = ('import sys; from ddpm_jax import workdir_lock\n'
            'try:\n  workdir_lock.WorkdirLock(sys.argv[1]).__enter__()\n'
            'except workdir_lock.WorkdirLockedError as e:\n  print(e); sys.exit(3)\n')
    proc = subprocess.run([sys.executable, '-c', code, workdir], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr
    message = proc.stdout.strip()
    assert workdir in message and f'pid {os.getpid()}' in message and '\n' not in message
  # Released cleanly: the record is empty and the next run takes it silently.
  assert pathlib.Path(workdir, workdir_lock.LOCK_FILE).read_text() == ''

  # A holder killed with -9 leaves its record but not the lock: the next run takes over, with a warning.
  proc = subprocess.run([sys.executable, '-c', 'import os, sys; from ddpm_jax import workdir_lock\n'
                         'workdir_lock.WorkdirLock(sys.argv[1]).__enter__(); os._exit(0)', workdir],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert '"pid"' in pathlib.Path(workdir, workdir_lock.LOCK_FILE).read_text()
  with caplog.at_level(logging.WARNING):
    with workdir_lock.WorkdirLock(workdir):
      pass
  assert 'Taking over the workdir lock' in caplog.text and 'pid' in caplog.text


def test_training_resumes_past_a_corrupt_step_saves_it_again_and_a_restart_changes_nothing(tmp_path):
  from ddpm_jax import train  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.training.num_steps = 4
  workdir = str(tmp_path / 'run')
  with tfds.testing.mock_data(num_examples=64):
    first = jax.device_get(train.train_and_evaluate(config, workdir))
    step_dir = os.path.join(checkpointing.checkpoint_dir(workdir), '4')
    _truncate_the_array_files(step_dir)
    # Resumes from step 2, trains steps 3 and 4 again (bit-exactly), and writes step 4 anew.
    second = jax.device_get(train.train_and_evaluate(config, workdir))
    assert checkpointing.available_steps(workdir) == [2, 4] and os.path.isdir(step_dir + '.unreadable')
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params), strict=True):
      np.testing.assert_array_equal(a, b)
    listing = sorted(os.listdir(checkpointing.checkpoint_dir(workdir)))
    third = jax.device_get(train.train_and_evaluate(config, workdir))
  assert int(third.step) == 4
  assert sorted(os.listdir(checkpointing.checkpoint_dir(workdir))) == listing
