"""Checkpoint round trips, retention, inference-only checkpoints (unreadable steps: test_checkpoint_faults.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import checkpointing


def _state(value):
  params = {'w': jnp.full((3, 2), value), 'b': {'c': jnp.arange(4.0) * value}}
  return {'step': jnp.int32(value), 'params': params, 'ema_params': params,
          'opt_state': optax.adam(1e-3).init(params)}


def test_roundtrip_restores_the_newest_step_into_the_optax_structure(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), keep=3)
  for step in (1, 2):
    checkpointing.save(manager, step, _state(float(step)))
  manager.wait_until_finished()
  manager.close()
  # The newest step after two Adam updates: moments, count and EMA that differ from the target's fresh ones.
  params = _state(2.0)['params']
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)
  for _ in range(2):
    _, opt_state = optimizer.update(jax.tree.map(lambda p: p + 1.0, params), opt_state, params)
  saved = {'step': jnp.int32(3), 'params': params, 'ema_params': jax.tree.map(lambda p: 0.5 * p, params),
           'opt_state': opt_state}
  manager = checkpointing.create_manager(str(tmp_path), keep=3)
  checkpointing.save(manager, 3, saved)
  manager.wait_until_finished()
  manager.close()
  manager, step, restored = checkpointing.restore_latest(str(tmp_path), 3, _state(0.0))
  manager.close()
  assert step == 3 and int(restored['step']) == 3
  assert isinstance(restored['opt_state'], tuple)  # restored into the optax structure, not dicts
  assert int(restored['opt_state'][0].count) == 2
  # mu = (1 - b1^2) g after two identical gradients g = params + 1 (b1 = 0.9): 0.19 g.
  np.testing.assert_allclose(restored['opt_state'][0].mu['b']['c'], 0.19 * (np.arange(4.0) * 2 + 1), rtol=1e-6)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_checkpoint_that_still_stores_the_train_key_resumes(tmp_path):
  # Written before the key left the train state (it is fold_in(train stream, step) now): the entry is not read.
  manager = checkpointing.create_manager(str(tmp_path), keep=3)
  legacy = {**_state(3.0), 'rng': jax.random.key_data(jax.random.key(3))}
  checkpointing.save(manager, 3, legacy)
  manager.wait_until_finished()
  manager.close()
  manager, step, restored = checkpointing.restore_latest(str(tmp_path), 3, _state(0.0))
  assert step == 3 and set(restored) == set(_state(0.0))
  np.testing.assert_array_equal(restored['params']['b']['c'], np.arange(4.0) * 3)
  checkpointing.save(manager, 4, restored)  # the same manager still saves (and the new step has no key)
  manager.wait_until_finished()
  manager.close()
  manager, step, restored = checkpointing.restore_latest(str(tmp_path), 3, _state(0.0))
  manager.close()
  assert step == 4 and int(restored['step']) == 3


def test_no_checkpoint_returns_target(tmp_path):
  target = _state(5.0)
  manager, step, restored = checkpointing.restore_latest(str(tmp_path), 1, target)
  manager.close()
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
