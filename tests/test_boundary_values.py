"""Documented boundary values work end to end: a real tiny training run (TFDS mock data) with every optimizer and
checkpoint boundary at once, and the full sampler with a respacing that keeps all T steps."""

import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import test as test_config
from ddpm_jax import checkpointing
from ddpm_jax import config_validation
from ddpm_jax import sample
from ddpm_jax import train
from tests.helpers import save_random_checkpoint


def _host_copy(tree):
  return jax.tree.map(np.array, jax.device_get(tree))  # a copy: the step donates the state's buffers


def test_training_at_the_optimizer_checkpoint_and_timestep_boundaries(tmp_path, monkeypatch):
  config = test_config.get_config()
  config.optim.warmup_steps = 0        # constant lr from the first step
  config.optim.grad_clip = 0.0         # no clipping
  config.optim.weight_decay = 0.0      # plain Adam
  config.training.keep_checkpoints = 1
  config.diffusion.num_timesteps = 1   # T = 1: every example is at t = 0
  config.training.num_steps = 2
  config.training.log_every = 1
  config.training.checkpoint_every = 1
  config_validation.validate_config(config, jax.device_count())

  metrics, params = [], []
  original = train.Trainer.step

  def recording_step(self, batches):
    if not params:
      params.append(_host_copy(self.host_state().params))
    out = original(self, batches)
    metrics.append(jax.device_get(out))
    if len(params) == 1:
      params.append(_host_copy(self.host_state().params))
    return out

  monkeypatch.setattr(train.Trainer, 'step', recording_step)
  with tfds.testing.mock_data(num_examples=64):
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2 and len(metrics) == 2

  lr = np.float32(config.optim.lr)
  for i, m in enumerate(metrics, start=1):
    assert m['lr'].shape == (1,) and m['lr'][0] == lr, f'step {i}: lr {m["lr"]} != optim.lr {lr} (warmup_steps=0)'
    assert np.isfinite(m['loss']).all() and np.isfinite(m['grad_norm']).all(), f'step {i} (T=1): {m}'
    assert m['skipped_updates'][0] == 0, f'step {i}: a non-finite update was skipped with T=1'
  # Adam's first update is lr * g / (|g| + eps) per parameter: nothing moves by more than lr (no weight decay), and
  # with the full lr at step 1 (no warmup) and unclipped gradients the largest move is lr itself.
  moves = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(params[1]),
                                                                jax.tree.leaves(params[0]), strict=True)])
  assert moves.max() <= lr * (1 + 1e-3), moves.max()
  assert moves.max() >= lr * 0.99, f'first update moved params by at most {moves.max()}, expected ~ optim.lr {lr}'
  assert jax.tree.all(jax.tree.map(lambda x: bool(np.isfinite(x).all()), jax.device_get(state.params)))

  # keep_checkpoints=1: the step-1 checkpoint was deleted once step 2 was written.
  assert checkpointing.available_steps(str(tmp_path)) == [2]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']


@pytest.mark.parametrize('method,respacing', [('ancestral', '20'), ('ddim', 'ddim20')])
def test_respacing_that_keeps_all_steps_samples_as_the_full_chain(tmp_path, method, respacing):
  config = test_config.get_config()
  assert config.diffusion.num_timesteps == 20
  save_random_checkpoint(tmp_path, config, 1)

  def draw(spec):
    config.sample.method, config.sample.respacing = method, spec
    config_validation.validate_config(config, jax.device_count())
    out_dir = sample.sample_and_export(config, str(tmp_path))
    with np.load(os.path.join(out_dir, 'samples.npz')) as z:
      return z['images']

  full, respaced = draw(''), draw(respacing)
  assert full.shape == (8, 32, 32, 3)
  # uint8 images of the same chain: a rounding boundary may flip a level where the float32 constants differ by an ulp.
  assert np.abs(full.astype(int) - respaced.astype(int)).max() <= 1
  assert np.mean(full != respaced) < 0.01
