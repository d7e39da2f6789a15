"""Losses, the discretised decoder, bits/dim and timestep sampling against the float64 NumPy reference."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import likelihood
from ddpm_jax import losses
from ddpm_jax import schedules
from tests import numpy_reference as ref
from tests.helpers import compilations

T = 10
IMAGE = (2, 2, 3)
PIXEL_GRID = np.arange(256) / 255 * 2 - 1  # the 256 data levels in [-1, 1]


def _data(seed, batch=T):
  rs = np.random.RandomState(seed)
  x0 = PIXEL_GRID[rs.randint(0, 256, (batch,) + IMAGE)]
  x0.reshape(-1)[:2] = (-1.0, 1.0)  # both open edge bins are exercised
  return x0.astype(np.float32), rs.randn(batch, *IMAGE).astype(np.float32)


def _betas():
  return schedules.get_betas('linear', T, beta_start=1e-3, beta_end=0.2)


def _toy_model(base, scale=0.5):
  """A deterministic 'network' that depends on x_t and t, so the right x_t and t must reach it."""
  def model_fn(x_t, t, xp=jnp):
    tiles = base.shape[-1] // x_t.shape[-1]
    t_term = xp.reshape(t, (-1,) + (1,) * (x_t.ndim - 1)) * 0.01
    return base + scale * xp.concatenate([x_t] * tiles, axis=-1) + t_term
  return model_fn


def _variance_base(var_type, rs, mean_part=None):
  """Model-output offsets: the mean channels near `mean_part` (a fair network), then the variance channels."""
  noise = rs.randn(T, *IMAGE[:-1], 3) if mean_part is None else mean_part + 0.05 * rs.randn(*mean_part.shape)
  if var_type == 'learned':
    return np.concatenate([noise, -4 + 0.3 * rs.randn(*noise.shape)], -1)
  if var_type == 'learned_range':
    return np.concatenate([noise, np.tanh(rs.randn(*noise.shape))], -1)
  return noise


@pytest.mark.parametrize('x64', [True, False])
def test_normal_kl_matches_reference_and_vanishes_for_equal_gaussians(x64):
  rs = np.random.RandomState(0)
  m1, lv1, m2, lv2 = (rs.randn(50) for _ in range(4))
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    got = likelihood.normal_kl(*(jnp.asarray(a, dtype) for a in (m1, lv1, m2, lv2)))
    same = likelihood.normal_kl(*(jnp.asarray(a, dtype) for a in (m1, lv1, m1, lv1)))
  assert ref.rel_err(got, ref.normal_kl(m1, lv1, m2, lv2)) <= (1e-6 if x64 else 1e-5)
  np.testing.assert_array_equal(np.asarray(same), 0.0)
  assert np.all(np.asarray(got) >= 0)


@pytest.mark.parametrize('x64', [True, False])
def test_discretized_gaussian_matches_reference_and_bins_sum_to_one(x64):
  rs = np.random.RandomState(1)
  x = PIXEL_GRID[rs.randint(0, 256, 2000)]
  x[:20], x[20:40] = -1.0, 1.0
  means = rs.uniform(-1.2, 1.2, x.shape)
  log_scales = rs.uniform(np.log(0.08), np.log(2.0), x.shape)
  grid_means = np.array([-1.1, -0.3, 0.0, 0.5, 1.0])[:, None]
  grid_scales = np.log(np.array([1e-3, 0.02, 0.5, 3.0]))[:, None, None]
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    # One flat batch, one compile: random cases, every mean and scale against all 256 levels, far tails.
    all_x = np.broadcast_to(PIXEL_GRID, (4, 5, 256))
    cases = [(x, means, log_scales),
             (all_x, np.broadcast_to(grid_means, all_x.shape), np.broadcast_to(grid_scales, all_x.shape)),
             ([1.0, -1.0, 0.0], [-1.0, 1.0, 0.9], np.log([1e-3, 1e-3, 1e-3]))]
    flat = [np.concatenate([np.ravel(c[i]) for c in cases]) for i in range(3)]
    values = np.asarray(jax.jit(likelihood.discretized_gaussian_log_likelihood)(
        *(jnp.asarray(a, dtype) for a in flat)))
    got, all_bins, far_tail = values[:x.size], values[x.size:-3].reshape(all_x.shape), values[-3:]
  assert ref.rel_err(got, ref.decoder_log_prob(x, means, log_scales)) <= (1e-6 if x64 else 1e-5)
  totals = np.exp(np.asarray(all_bins, np.float64)).sum(-1)
  np.testing.assert_allclose(totals, 1.0, atol=1e-10 if x64 else 1e-5)
  # Thousands of standard deviations away the log-probability is still finite (log-space CDFs, no log 0).
  assert np.all(np.isfinite(np.asarray(far_tail))) and np.all(np.asarray(far_tail) < -1e4)


@pytest.mark.parametrize('x64', [True, False])
def test_vb_terms_and_training_losses_match_reference(x64):
  tol = 1e-6 if x64 else 1e-5
  x0, noise = _data(2)
  t = np.arange(T)
  rs = np.random.RandomState(3)
  combos = [('eps', 'fixedlarge'), ('xstart', 'fixedsmall'), ('xprev', 'learned'), ('v', 'learned_range')]
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    for (mean_type, var_type), loss_type in itertools.product(combos, diffusion_lib.LOSS_TYPES):
      proc = ref.Process(_betas(), mean_type, var_type)
      x_t = proc.q_sample(np.float64(x0), t, np.float64(noise))
      # A near-perfect network (outputs within ~0.1 of the target), so the decoder term at t = 0 is not
      # hundreds of standard deviations out, where the reference's plain CDF differences underflow.
      target = {'eps': noise, 'xstart': x0, 'xprev': proc.q_posterior(np.float64(x0), x_t, t)[0],
                'v': proc.v_target(np.float64(x0), t, np.float64(noise))}[mean_type]
      base = _variance_base(var_type, rs, mean_part=target - 0.05 * x_t)
      d = diffusion_lib.make_diffusion(_betas(), mean_type=mean_type, var_type=var_type, loss_type=loss_type,
                                       hybrid_lambda=0.01, dtype=dtype)
      model_fn = _toy_model(jnp.asarray(base, dtype), scale=0.05)
      got = losses.training_losses(d, model_fn, jnp.asarray(x0, dtype), jnp.asarray(t, jnp.int32),
                                   jnp.asarray(noise, dtype))
      output = _toy_model(base, scale=0.05)(x_t, t, xp=np)
      want = ref.training_losses(proc, output, np.float64(x0), t, np.float64(noise), loss_type, 0.01)
      label = (mean_type, var_type, loss_type)
      assert ref.rel_err(got['loss'], want['loss']) <= tol, label
      assert ref.rel_err(got['mse'], want['mse']) <= tol, label
      computes_vb = loss_type in ('kl', 'rescaled_kl', 'hybrid') or d.learns_variance
      if computes_vb:
        assert ref.rel_err(got['vb'], want['vb']) <= tol, label
      else:
        np.testing.assert_array_equal(got['vb'], 0.0)
      for key in ('loss', 'mse', 'vb'):
        assert got[key].shape == (T,) and got[key].dtype == dtype
  assert np.all(want['vb'] > 0)  # the last combination computed a real bound


@pytest.mark.parametrize('mean_type', diffusion_lib.MEAN_TYPES)
def test_l1_and_huber_losses_match_numpy_formulas_on_both_huber_branches(mean_type):
  x0, noise = _data(20)
  t = np.arange(T)
  proc = ref.Process(_betas(), mean_type, 'fixedlarge')
  x_t = proc.q_sample(np.float64(x0), t, np.float64(noise))
  target = {'eps': noise, 'xstart': x0, 'xprev': proc.q_posterior(np.float64(x0), x_t, t)[0],
            'v': proc.v_target(np.float64(x0), t, np.float64(noise))}[mean_type]
  rs = np.random.RandomState(21)
  cases = {'both_branches': target + 1.5 * rs.randn(*target.shape),  # errors both below and above 1
           'small': target + 0.3 * np.tanh(rs.randn(*target.shape))}  # every |error| < 1
  for name, base in cases.items():
    output = _toy_model(base, scale=0.05)(x_t, t, xp=np)
    d_ref = np.float64(target) - output
    if name == 'both_branches':
      assert np.any(np.abs(d_ref) < 1) and np.any(np.abs(d_ref) > 1)
    else:
      assert np.all(np.abs(d_ref) < 1)
    want_l1 = np.abs(d_ref).reshape(T, -1).mean(1)
    want_huber = np.where(np.abs(d_ref) < 1, 0.5 * d_ref ** 2, np.abs(d_ref) - 0.5).reshape(T, -1).mean(1)
    got = {}
    for loss_type in ('l1', 'huber', 'mse'):
      d = diffusion_lib.make_diffusion(_betas(), mean_type=mean_type, loss_type=loss_type)
      got[loss_type] = losses.training_losses(d, _toy_model(jnp.asarray(base, jnp.float32), scale=0.05),
                                              jnp.asarray(x0), jnp.asarray(t, jnp.int32), jnp.asarray(noise))
    label = (mean_type, name)
    assert ref.rel_err(got['l1']['loss'], want_l1) <= 1e-5, label
    assert ref.rel_err(got['huber']['loss'], want_huber) <= 1e-5, label
    np.testing.assert_array_equal(got['l1']['vb'], 0.0)
    for loss_type in ('l1', 'huber'):  # every loss type reports all three terms of the same output
      for key in ('mse', 'l1', 'huber'):
        np.testing.assert_allclose(got[loss_type][key], got['mse'][key], rtol=1e-6)
    if name == 'small':
      assert ref.rel_err(got['huber']['loss'], 0.5 * got['mse']['loss']) <= 1e-5, label


def test_hybrid_bound_trains_only_the_variance_and_kl_trains_both():
  x0, noise = _data(4)
  t = jnp.arange(T, dtype=jnp.int32)
  base = jnp.asarray(_variance_base('learned_range', np.random.RandomState(5)), jnp.float32)
  grads = {}
  for loss_type in ('hybrid', 'kl', 'mse'):
    d = diffusion_lib.make_diffusion(_betas(), var_type='learned_range', loss_type=loss_type)
    def total(params, key):
      return jnp.sum(losses.training_losses(d, lambda x_t, t_: params + 0 * x_t.sum(), x0, t, noise)[key])
    grads[loss_type] = jax.grad(total)(base, 'loss')
  grads['hybrid_mse'] = jax.grad(total)(base, 'mse')  # L_simple alone (the same for every loss type)
  mean_part, var_part = slice(0, 3), slice(3, 6)
  # hybrid: the mean channels see only L_simple; the variance channels see only lambda * T * L_vlb.
  np.testing.assert_allclose(grads['hybrid'][..., mean_part], grads['hybrid_mse'][..., mean_part], rtol=1e-6)
  assert float(jnp.max(jnp.abs(grads['hybrid'][..., var_part]))) > 0
  np.testing.assert_allclose(grads['hybrid'][..., var_part], 0.01 * grads['mse'][..., var_part], rtol=1e-4)
  # kl: the bound's gradient reaches the mean as well.
  assert not np.allclose(grads['kl'][..., mean_part], 0.0)
  assert not np.allclose(grads['kl'][..., mean_part] / np.abs(grads['kl'][..., mean_part]).max(),
                         grads['hybrid_mse'][..., mean_part] / np.abs(grads['hybrid_mse'][..., mean_part]).max(),
                         atol=1e-3)


def test_prior_term_is_about_1e5_bits_per_dim_for_the_linear_schedule():
  # Ho et al. 2020, Sec. 4: L_T = D_KL(q(x_T | x_0) || N(0, I)) ~ 1e-5 bits/dim with beta 1e-4 -> 0.02, T = 1000.
  d = diffusion_lib.make_diffusion(schedules.get_betas('linear', 1000))
  x0, _ = _data(6, batch=4)
  prior = np.asarray(likelihood.prior_bpd(d, jnp.asarray(x0)))
  assert np.all((prior > 1e-6) & (prior < 3e-5)), prior
  assert ref.rel_err(prior, ref.prior_bits(ref.Process(schedules.get_betas('linear', 1000)), np.float64(x0))) <= 1e-4


@pytest.mark.parametrize('x64', [True, False])
def test_calc_bpd_loop_matches_reference_in_one_compiled_scan(x64):
  tol = 1e-6 if x64 else 1e-5
  x0, _ = _data(7, batch=3)
  base = _variance_base('learned_range', np.random.RandomState(8))[:3]
  traces = []
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    d = diffusion_lib.make_diffusion(_betas(), mean_type='eps', var_type='learned_range', dtype=dtype)
    toy = _toy_model(jnp.asarray(base, dtype), scale=0.2)

    def model_fn(x_t, t):
      traces.append(1)
      return toy(x_t, t)

    rng = jax.random.key(9)
    bpd_fn = jax.jit(lambda x, key: likelihood.calc_bpd_loop(d, model_fn, x, key))
    got = bpd_fn(jnp.asarray(x0, dtype), rng)
    bpd_fn(jnp.asarray(x0[::-1], dtype), jax.random.key(10))  # new inputs, same shapes
    # The documented noise of step t: normal(fold_in(rng, t)).
    noises = np.asarray(jax.jit(jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(rng, s), x0.shape,
                                                                     dtype)))(jnp.arange(T)), np.float64)
  assert len(traces) == 1  # the network is traced once (a loop, not T calls), and so compiled once
  proc = ref.Process(_betas(), 'eps', 'learned_range')
  vb, xstart_mse, eps_mse = np.zeros((3, T)), np.zeros((3, T)), np.zeros((3, T))
  for s in range(T):
    t = np.full(3, s)
    x_t = proc.q_sample(np.float64(x0), t, noises[s])
    output = _toy_model(base, scale=0.2)(x_t, t, xp=np)
    vb[:, s], x0_hat = ref.vb_term_bits(proc, output, np.float64(x0), x_t, t, clip=True)
    xstart_mse[:, s] = ref.per_example_mean((x0_hat - x0) ** 2)
    eps_mse[:, s] = ref.per_example_mean((proc.eps_from_x0(x_t, t, x0_hat) - noises[s]) ** 2)
  prior = ref.prior_bits(proc, np.float64(x0))
  assert ref.rel_err(got['vb'], vb) <= tol
  assert ref.rel_err(got['xstart_mse'], xstart_mse) <= tol
  assert ref.rel_err(got['mse'], eps_mse) <= tol
  assert ref.rel_err(got['prior_bpd'], prior) <= tol
  assert ref.rel_err(got['total_bpd'], vb.sum(1) + prior) <= tol


def test_training_loss_under_jit_does_not_recompile_on_new_arrays():
  d = diffusion_lib.make_diffusion(_betas(), var_type='learned_range', loss_type='hybrid')
  traces = []

  @jax.jit
  def loss(params, x0, t, noise):
    def model_fn(x_t, t_):
      traces.append(1)
      return params * jnp.concatenate([x_t, x_t], -1)
    return jnp.mean(losses.training_losses(d, model_fn, x0, t, noise)['loss'])

  x0, noise = _data(11)
  t = jnp.arange(T, dtype=jnp.int32)
  first = loss(jnp.float32(0.5), x0, t, noise)
  x1, noise1 = _data(12)
  second = loss(jnp.float32(0.7), x1, t[::-1], noise1)
  assert len(traces) == 1  # one trace for new arrays of the same shapes: one compilation
  assert np.isfinite(first) and np.isfinite(second) and float(first) != float(second)


# ------------------------------------------------------------------------------------------ timestep sampling


def _importance(num_timesteps=5):
  betas = schedules.get_betas('linear', num_timesteps)
  return diffusion_lib.make_diffusion(betas, loss_type='kl', t_sampling='importance')


def test_importance_history_update_matches_sequential_reference_under_jit(caplog):
  d = _importance()
  state = losses.init_timestep_sampler(d)
  reference = ref.SecondMomentSampler(5)

  @jax.jit
  def update(s, t, l):
    return losses.update_timestep_sampler(d, s, t, l)

  rs = np.random.RandomState(13)
  with compilations(caplog, 'update') as compiled:
    for step in range(8):
      # Skewed draws with many duplicates per batch; t = 4 is starved at first, so warm-up takes a while.
      t = rs.choice(5, 16, p=[0.4, 0.3, 0.2, 0.1, 0.0] if step < 5 else [0.2] * 5).astype(np.int32)
      batch_losses = (rs.rand(16) * (1 + t)).astype(np.float32)
      state = update(state, t, batch_losses)
      reference.update(t, batch_losses)
      history, counts = reference.history_array()
      np.testing.assert_array_equal(state.loss_counts, counts)
      np.testing.assert_allclose(state.loss_history, history, rtol=1e-6)
      np.testing.assert_allclose(losses.timestep_probabilities(d, state), reference.probs(), rtol=1e-5)
  assert len(compiled) == 1, compiled
  assert np.all(np.asarray(state.loss_counts) == 10)  # warmed up: the probabilities are no longer uniform
  assert not np.allclose(reference.probs(), 0.2)


def test_importance_sampling_draws_from_p_and_returns_unbiasing_weights():
  d = _importance()
  history = np.tile(np.array([1.0, 2.0, 4.0, 8.0, 16.0])[:, None], (1, 10)).astype(np.float32)
  state = losses.TimestepSamplerState(loss_history=jnp.asarray(history), loss_counts=jnp.full((5,), 10, jnp.int32))
  probs = np.array([1.0, 2.0, 4.0, 8.0, 16.0]) / 31 * (1 - 1e-3) + 1e-3 / 5
  t, weights = jax.jit(lambda s, k: losses.sample_timesteps(d, s, k, 20000))(state, jax.random.key(14))
  t, weights = np.asarray(t), np.asarray(weights)
  assert t.dtype == np.int32 and weights.dtype == np.float32
  freq = np.bincount(t, minlength=5) / t.size
  assert np.all(np.abs(freq - probs) < 5 * np.sqrt(probs * (1 - probs) / t.size))
  np.testing.assert_allclose(weights, 1 / (5 * probs[t]), rtol=1e-5)
  # Unbiased: E_p[w L_t] = mean_t L_t.
  assert np.mean(weights * history[t, 0]) == pytest.approx(history[:, 0].mean(), rel=0.05)
  # Before warm-up (a t with fewer than 10 losses) sampling is uniform with unit weights.
  cold = state.replace(loss_counts=state.loss_counts.at[2].set(9))
  _, cold_weights = losses.sample_timesteps(d, cold, jax.random.key(15), 64)
  np.testing.assert_allclose(cold_weights, 1.0, rtol=1e-6)


def test_uniform_sampler_state_is_empty_and_update_is_a_no_op():
  d = diffusion_lib.make_diffusion(_betas())
  state = losses.init_timestep_sampler(d)
  assert state.loss_history.size == 0 and state.loss_counts.size == 0
  t, weights = losses.sample_timesteps(d, state, jax.random.key(16), 4000)
  assert int(t.min()) == 0 and int(t.max()) == T - 1
  np.testing.assert_array_equal(weights, 1.0)
  assert losses.update_timestep_sampler(d, state, t, weights) is state


def test_importance_update_inside_a_sharded_jit_equals_the_unsharded_update():
  d = _importance()
  devices = np.array(jax.devices()[:8])
  mesh = Mesh(devices, ('data',))
  replicated, batch_sharded = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec('data'))
  rs = np.random.RandomState(17)
  t = rs.randint(0, 5, 32).astype(np.int32)
  batch_losses = rs.rand(32).astype(np.float32)
  state = losses.update_timestep_sampler(d, losses.init_timestep_sampler(d), t, batch_losses)
  sharded_update = jax.jit(lambda s, tt, ll: losses.update_timestep_sampler(d, s, tt, ll),
                           in_shardings=(replicated, batch_sharded, batch_sharded), out_shardings=replicated)
  new_t = rs.randint(0, 5, 32).astype(np.int32)
  new_losses = rs.rand(32).astype(np.float32)
  got = sharded_update(jax.device_put(state, replicated), jax.device_put(new_t, batch_sharded),
                       jax.device_put(new_losses, batch_sharded))
  want = losses.update_timestep_sampler(d, state, new_t, new_losses)
  np.testing.assert_array_equal(got.loss_counts, want.loss_counts)
  np.testing.assert_array_equal(got.loss_history, want.loss_history)
