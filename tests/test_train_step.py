"""The train step as a function: jit and pmap follow one update rule, steps_per_call, EMA, warmup, clipping, bf16,
the step key, and no recompilation across calls. A tiny U-Net on 8x8 images (fast to compile)."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import test as test_config
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import models
from ddpm_jax import random_streams
from ddpm_jax import train_state as ts

BATCH = 8
DEVICES = 4


def tiny_config(**optim):
  config = test_config.get_config()
  config.data.image_size = 8
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  config.training.batch_size = BATCH
  config.training.ema_decay = 0.9
  for key, value in optim.items():
    config.optim[key] = value
  return config


def build(config):
  model = models.create_model(config)
  diffusion = diffusion_lib.from_config(config.diffusion)
  optimizer = ts.create_optimizer(config)
  x = jnp.zeros((1, 8, 8, 3))
  params = model.init({'params': random_streams.stream(config.seed, 'params')}, x, jnp.zeros((1,), jnp.int32),
                      train=False)['params']
  return model, diffusion, optimizer, ts.create_train_state(params, optimizer, diffusion)


def images(seed, steps=None):
  """Uniform noise images: (BATCH, 8, 8, 3), or (steps, BATCH, 8, 8, 3) as `steps_per_call` stacked batches."""
  shape = (BATCH, 8, 8, 3) if steps is None else (steps, BATCH, 8, 8, 3)
  return {'image': jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, shape), jnp.float32)}


def flat_images(steps):
  """Images of one grey level each (+-0.5): x0 is easy to predict, so the loss falls within a few dozen steps."""
  levels = np.where(np.arange(BATCH) % 2, 0.5, -0.5).astype(np.float32)
  return {'image': jnp.broadcast_to(jnp.asarray(levels)[None, :, None, None, None], (steps, BATCH, 8, 8, 3))}


def shard(tree):
  """(B, ...) -> (DEVICES, B / DEVICES, ...)."""
  return jax.tree.map(lambda x: x.reshape((DEVICES, x.shape[0] // DEVICES) + x.shape[1:]), tree)


def replicate(tree):
  """One copy per pmapped device, stacked on a leading axis."""
  return jax.tree.map(lambda x: jnp.stack([x] * DEVICES), tree)


def relative_error(a, b):
  a, b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]), np.concatenate([np.ravel(x) for x in
                                                                                      jax.tree.leaves(b)])
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope='module')
def setup():
  config = tiny_config(warmup_steps=0)  # the first step moves the parameters
  return config, *build(config)


def test_pmap_applies_the_jit_update_given_the_same_draws(setup):
  config, model, diffusion, optimizer, state = setup
  batch = images(0)
  draws = ts.draw_step(state, jax.random.key(7), batch['image'], diffusion=diffusion, config=config)
  apply = functools.partial(ts.apply_step, model=model, diffusion=diffusion, optimizer=optimizer, config=config)
  jit_state, jit_metrics = jax.jit(apply)(state, batch, draws)

  devices = jax.local_devices()[:DEVICES]
  replicated = replicate(state)
  # The dropout key is one for the whole batch: given to every device (the other draws are split by example).
  draws_axes = ts.StepDraws(t=0, weights=0, noise=0, drop_label=0, dropout=None)
  pmapped = jax.pmap(functools.partial(apply, axis_name='b'), axis_name='b', devices=devices,
                     in_axes=(0, 0, draws_axes))
  per_example = shard({k: getattr(draws, k) for k in ('t', 'weights', 'noise', 'drop_label')})
  pmap_state, pmap_metrics = pmapped(replicated, shard(batch), draws.replace(**per_example))
  pmap_state = jax.tree.map(lambda x: x[0], pmap_state)

  assert relative_error(pmap_state.params, jit_state.params) < 1e-5
  assert relative_error(pmap_state.ema_params, jit_state.ema_params) < 1e-5
  assert relative_error(pmap_state.opt_state, jit_state.opt_state) < 1e-5
  for name in ('loss', 'grad_norm', 'loss_q0', 'loss_q3'):
    np.testing.assert_allclose(pmap_metrics[name][0], jit_metrics[name], rtol=1e-5)
  # The update moved the parameters (a step that does nothing would also "agree").
  assert relative_error(jit_state.params, state.params) > 1e-4


def test_pmap_loss_curve_tracks_jit(setup):
  config, model, diffusion, optimizer, state = setup
  steps = 40
  batches = flat_images(steps)
  stream = random_streams.stream(config.seed, 'train')
  jit_fn = jax.jit(ts.make_step_fn(model, diffusion, optimizer, config, stream, unroll=False))
  _, jit_metrics = jit_fn(state, batches)

  devices = jax.local_devices()[:DEVICES]
  pmap_fn = jax.pmap(ts.make_step_fn(model, diffusion, optimizer, config, stream, axis_name='b', unroll=False),
                     axis_name='b', devices=devices)
  per_device = jax.tree.map(lambda x: np.moveaxis(x.reshape((steps, DEVICES, -1) + x.shape[2:]), 1, 0), batches)
  _, pmap_metrics = pmap_fn(replicate(state), per_device)
  jit_loss, pmap_loss = np.asarray(jit_metrics['loss']), np.asarray(pmap_metrics['loss'][0])
  assert not np.array_equal(jit_loss, pmap_loss)  # other draws (folded with the device index)...
  # ...the same training: both fall by the same amount (per-step losses are noisy at batch 8: compare means).
  first, last = slice(0, 10), slice(-10, None)
  assert jit_loss[last].mean() < 0.7 * jit_loss[first].mean()
  np.testing.assert_allclose(pmap_loss[last].mean(), jit_loss[last].mean(), rtol=0.3)


def test_steps_per_call_equals_single_steps_and_the_key_is_the_step(setup):
  config, model, diffusion, optimizer, state = setup
  stream = random_streams.stream(config.seed, 'train')
  fn = jax.jit(ts.make_step_fn(model, diffusion, optimizer, config, stream, unroll=True))
  batches = images(2, 3)
  three, metrics3 = fn(state, batches)
  one = state
  losses = []
  for i in range(3):
    one, m = fn(one, jax.tree.map(lambda x, i=i: x[i:i + 1], batches))
    losses.append(float(m['loss'][0]))
  assert int(three.step) == int(one.step) == 3
  np.testing.assert_allclose(np.asarray(metrics3['loss']), losses, rtol=1e-5)
  assert relative_error(three.params, one.params) < 1e-5
  # A step draws from fold_in(stream, step) only: step 2's draws do not depend on how steps 0-1 went.
  key = random_streams.step_key(stream, 2)
  a = ts.draw_step(three.replace(step=jnp.int32(2)), key, batches['image'][0], diffusion=diffusion, config=config)
  b = ts.draw_step(state.replace(step=jnp.int32(2)), key, batches['image'][0], diffusion=diffusion, config=config)
  np.testing.assert_array_equal(a.noise, b.noise)
  np.testing.assert_array_equal(a.t, b.t)


def test_ema_warmup_and_clipping_values():
  clip, lr, warmup = 0.05, 1e-3, 4
  config = tiny_config(grad_clip=clip, lr=lr, warmup_steps=warmup)
  config.training.ema_decay = 0.75
  model, diffusion, optimizer, state = build(config)
  fn = jax.jit(ts.make_step_fn(model, diffusion, optimizer, config, jax.random.key(3)))
  s1, m1 = fn(state, images(3, 1))
  # Warmup: the learning rate of step s is lr * s / warmup, so the first step changes nothing.
  assert float(m1['lr'][0]) == 0.0
  assert relative_error(s1.params, state.params) == 0.0
  s2, m2 = fn(s1, images(4, 1))
  np.testing.assert_allclose(float(m2['lr'][0]), lr / warmup, rtol=1e-6)
  # Clipping: after one step Adam's first moment is (1 - b1) g of the clipped gradient, whose norm is
  # min(||g||, clip) with ||g|| the reported (unclipped) gradient norm.
  assert float(m1['grad_norm'][0]) > clip
  mu = s1.opt_state.inner_state[1][0].mu  # apply_if_finite(chain(clip, adamw = chain(scale_by_adam, ...)))
  np.testing.assert_allclose(float(optax.tree_utils.tree_norm(mu)) / (1 - config.optim.b1), clip, rtol=1e-5)
  # EMA: ema = decay * ema + (1 - decay) * params after every step.
  expected_ema = jax.tree.map(lambda e, p: 0.75 * e + 0.25 * p, s1.ema_params, s2.params)
  assert relative_error(s2.ema_params, expected_ema) < 1e-6
  assert relative_error(s2.ema_params, s2.params) > 0  # not simply the params


@pytest.mark.parametrize('decay', ['cosine', 'linear'])
def test_learning_rate_decays_to_zero_at_the_last_step(decay):
  config = tiny_config(lr=1e-3, warmup_steps=10, lr_decay=decay)
  config.training.num_steps = 110
  schedule = ts.learning_rate_schedule(config)
  lrs = np.asarray([float(schedule(s)) for s in range(111)])
  np.testing.assert_allclose(lrs[:11], 1e-3 * np.arange(11) / 10, rtol=1e-6)  # the warmup is unchanged
  progress = np.arange(100) / 100  # steps 10..109, then 0 at num_steps
  expected = 0.5 * (1 + np.cos(np.pi * progress)) if decay == 'cosine' else 1 - progress
  np.testing.assert_allclose(lrs[10:110], 1e-3 * expected, rtol=1e-5, atol=1e-9)
  assert lrs[110] == 0.0
  config.optim.lr_decay = 'none'  # the paper's constant rate after warmup
  assert float(ts.learning_rate_schedule(config)(109)) == pytest.approx(1e-3)


def test_ema_warmup_averages_with_the_tf_num_updates_rule():
  config = tiny_config(warmup_steps=0)
  config.training.ema_decay = 0.99
  config.training.ema_warmup = True
  model, diffusion, optimizer, state = build(config)
  fn = jax.jit(ts.make_step_fn(model, diffusion, optimizer, config, jax.random.key(5)))
  s1, _ = fn(state, images(5, 1))
  s2, _ = fn(s1, images(6, 1))
  # Update n uses decay min(0.99, (1 + n) / (10 + n)): 0.1 at n = 0, 2/11 at n = 1 (constant 0.99 would barely move).
  for prev, new, decay in ((state, s1, 0.1), (s1, s2, 2 / 11)):
    expected = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * p, prev.ema_params, new.params)
    assert relative_error(new.ema_params, expected) < 1e-6
  assert float(ts.ema_decay(config, jnp.asarray(10_000))) == pytest.approx(0.99)


def test_a_bfloat16_step_follows_the_float32_step():
  config32 = tiny_config()
  config16 = tiny_config()
  config16.model.dtype = 'bfloat16'
  model, diffusion, optimizer, state = build(config32)
  fn32 = jax.jit(ts.make_step_fn(model, diffusion, optimizer, config32, jax.random.key(4)))
  state, _ = fn32(state, images(6, 3))  # at initialisation the output layer is zero: leave it first
  results = []
  for config in (config32, config16):
    model = models.create_model(config)
    fn = jax.jit(ts.make_step_fn(model, diffusion, optimizer, config, jax.random.key(4)))
    new_state, metrics = fn(state, images(5, 1))
    results.append((new_state, {k: float(v[0]) for k, v in metrics.items()}))
  (s32, m32), (s16, m16) = results
  assert jax.tree.leaves(s16.params)[0].dtype == jnp.float32  # params (and their update) stay float32
  np.testing.assert_allclose(m16['loss'], m32['loss'], rtol=0.05)
  np.testing.assert_allclose(m16['grad_norm'], m32['grad_norm'], rtol=0.1)
  assert m16['loss'] != m32['loss']  # the bf16 model did run in bf16


def test_the_step_compiles_once(setup, caplog):
  config, model, diffusion, optimizer, state = setup
  fn = jax.jit(ts.make_step_fn(model, diffusion, optimizer, config, jax.random.key(0), unroll=True),
               donate_argnums=0)
  state = jax.tree.map(jnp.copy, state)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    for i in range(4):
      state, _ = fn(state, images(10 + i, 1))
    jax.block_until_ready(state)
  compiles = [r for r in caplog.records if 'Compiling' in r.getMessage() and 'multi_step' in r.getMessage()]
  assert len(compiles) == 1, [r.getMessage()[:120] for r in compiles]
