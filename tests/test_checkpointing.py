"""Checkpoint round trips, fallback past an unreadable step, inference-only checkpoints."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import checkpointing


def _state(value):
  params = {'w': jnp.full((3, 2), value), 'b': {'c': jnp.arange(4.0) * value}}
  return {'step': jnp.int32(value), 'params': params, 'ema_params': params,
          'opt_state': optax.adam(1e-3).init(params), 'rng': jax.random.key(int(value))}


def test_roundtrip_and_fallback_past_a_corrupt_latest(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), keep=3)
  for step in (1, 2):
    checkpointing.save(manager, step, _state(float(step)))
  manager.wait_until_finished()
  step, restored = checkpointing.restore_latest(manager, _state(0.0))
  assert step == 2
  np.testing.assert_array_equal(restored['params']['w'], np.full((3, 2), 2.0))
  assert jax.dtypes.issubdtype(restored['rng'].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored['rng']), jax.random.key_data(jax.random.key(2)))
  assert isinstance(restored['opt_state'], tuple)  # restored into the optax structure, not dicts

  files = [f for f in glob.glob(os.path.join(tmp_path, 'checkpoints', '2', '**'), recursive=True)
           if os.path.isfile(f)]
  assert files
  for f in files:
    with open(f, 'wb') as fh:
      fh.write(b'\x00garbage')
  step, restored = checkpointing.restore_latest(manager, _state(0.0))
  assert step == 1
  np.testing.assert_array_equal(restored['params']['w'], np.full((3, 2), 1.0))
  manager.close()


def test_no_checkpoint_returns_target(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), keep=1)
  target = _state(5.0)
  step, restored = checkpointing.restore_latest(manager, target)
  assert step is None and restored is target


def test_keep_last_n(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), keep=2)
  for step in (1, 2, 3, 4):
    checkpointing.save(manager, step, _state(float(step)))
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [3, 4]
  manager.close()


def test_inference_params_from_training_and_inference_checkpoints(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path / 'train'), keep=2)
  checkpointing.save(manager, 7, _state(7.0))
  manager.wait_until_finished()
  manager.close()
  step, params, ema = checkpointing.restore_inference_params(str(tmp_path / 'train'))
  assert step == 7 and isinstance(ema['w'], np.ndarray)
  np.testing.assert_array_equal(ema['b']['c'], np.arange(4.0) * 7)

  p = {'w': np.ones((2,), np.float32)}
  checkpointing.save_inference_checkpoint(str(tmp_path / 'conv'), 0, p, p)
  step, params, ema = checkpointing.restore_inference_params(str(tmp_path / 'conv'))
  assert step == 0
  np.testing.assert_array_equal(params['w'], p['w'])

  with pytest.raises(checkpointing.CheckpointNotFoundError, match='available'):
    checkpointing.restore_inference_params(str(tmp_path / 'conv'), step=5)
  with pytest.raises(checkpointing.CheckpointNotFoundError, match='no checkpoint'):
    checkpointing.restore_inference_params(str(tmp_path / 'empty'))
