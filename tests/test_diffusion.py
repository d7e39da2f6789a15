"""Forward process, posterior and p(x_{t-1} | x_t) against the float64 NumPy reference and exact identities."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import schedules
from tests import numpy_reference as ref
from tests.helpers import assert_one_line_error
from tests.helpers import compilations

T = 12
SHAPE = (T, 2, 2, 3)  # one example per timestep: t = arange(T) covers both ends


def _inputs(seed, channels=3):
  rs = np.random.RandomState(seed)
  x0 = rs.uniform(-1, 1, SHAPE).astype(np.float32)
  noise = rs.randn(*SHAPE).astype(np.float32)
  other = rs.randn(*SHAPE[:-1], channels).astype(np.float32)
  return x0, noise, other


def _make(dtype, schedule='cosine', **kw):
  return diffusion_lib.make_diffusion(schedules.get_betas(schedule, T), dtype=dtype, **kw)


@pytest.mark.parametrize('x64', [True, False])
def test_forward_posterior_and_conversions_match_reference(x64):
  tol = 1e-6 if x64 else 1e-5
  proc = ref.Process(schedules.get_betas('cosine', T))
  x0, noise, x_t = _inputs(0)
  f64 = lambda a: np.asarray(a, np.float64)
  t = np.arange(T)
  with jax.enable_x64(x64):
    d = _make(jnp.float64 if x64 else jnp.float32)
    dt = d.dtype
    jx0, jnoise, jxt = (jnp.asarray(a, dt) for a in (x0, noise, x_t))
    jt = jnp.asarray(t, jnp.int32)
    got = {
        'q_mean_variance': diffusion_lib.q_mean_variance(d, jx0, jt),
        'q_sample': diffusion_lib.q_sample(d, jx0, jt, jnoise),
        'q_posterior': diffusion_lib.q_posterior_mean_variance(d, jx0, jxt, jt),
        'x0_from_eps': diffusion_lib.predict_xstart_from_eps(d, jxt, jt, jnoise),
        'eps_from_x0': diffusion_lib.predict_eps_from_xstart(d, jxt, jt, jx0),
        'x0_from_xprev': diffusion_lib.predict_xstart_from_xprev(d, jxt, jt, jnoise),
        'x0_from_v': diffusion_lib.predict_xstart_from_v(d, jxt, jt, jnoise),
        'v': diffusion_lib.velocity(d, jx0, jt, jnoise),
    }
    for value in jax.tree.leaves(got):
      assert value.dtype == dt
  want = {
      'q_mean_variance': proc.q_mean_variance(f64(x0), t),
      'q_sample': proc.q_sample(f64(x0), t, f64(noise)),
      'q_posterior': proc.q_posterior(f64(x0), f64(x_t), t),
      'x0_from_eps': proc.x0_from_eps(f64(x_t), t, f64(noise)),
      'eps_from_x0': proc.eps_from_x0(f64(x_t), t, f64(x0)),
      'x0_from_xprev': proc.x0_from_xprev(f64(x_t), t, f64(noise)),
      'x0_from_v': proc.x0_from_v(f64(x_t), t, f64(noise)),
      'v': proc.v_target(f64(x0), t, f64(noise)),
  }
  for key in want:
    for g, w in zip(jax.tree.leaves(got[key]), jax.tree.leaves(want[key])):
      g = np.broadcast_to(np.asarray(g), np.shape(w))
      assert ref.rel_err(g, w) <= tol, key


@pytest.mark.parametrize('x64', [True, False])
def test_p_mean_variance_all_mean_and_variance_types(x64):
  tol = 1e-6 if x64 else 1e-5
  betas = schedules.get_betas('linear', T, beta_start=1e-3, beta_end=0.2)
  x0, noise, x_t = _inputs(1)
  _, _, wide = _inputs(2, channels=6)
  # learned_range outputs live in [-1, 1]; learned outputs are log-variances.
  range_out = np.concatenate([noise, np.tanh(wide[..., 3:])], axis=-1)
  log_var_out = np.concatenate([noise, -3 + 0.5 * wide[..., 3:]], axis=-1)
  outputs = {'fixedlarge': noise, 'fixedsmall': noise, 'learned': log_var_out, 'learned_range': range_out}
  t = np.arange(T)
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    for mean_type, var_type, clip in itertools.product(diffusion_lib.MEAN_TYPES, diffusion_lib.VAR_TYPES,
                                                       (False, True)):
      d = diffusion_lib.make_diffusion(betas, mean_type=mean_type, var_type=var_type, dtype=dtype)
      out = diffusion_lib.p_mean_variance(d, jnp.asarray(outputs[var_type], dtype), jnp.asarray(x_t, dtype),
                                          jnp.asarray(t, jnp.int32), clip_denoised=clip)
      proc = ref.Process(betas, mean_type, var_type)
      mean, log_var, x0_hat = proc.p_mean_variance(np.float64(outputs[var_type]), np.float64(x_t), t, clip)
      label = (mean_type, var_type, clip)
      assert ref.rel_err(out['mean'], mean) <= tol, label
      assert ref.rel_err(out['log_variance'], np.broadcast_to(log_var, x_t.shape)) <= tol, label
      assert ref.rel_err(out['variance'], np.broadcast_to(np.exp(log_var), x_t.shape)) <= tol, label
      assert ref.rel_err(out['pred_xstart'], x0_hat) <= tol, label
      if clip:
        assert float(jnp.max(jnp.abs(out['pred_xstart']))) <= 1.0


def test_q_sample_moments():
  # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), eq. 4: empirical moments over many noises.
  d = _make(jnp.float32, schedule='linear')
  num_samples = 4000
  x0 = jnp.asarray(np.random.RandomState(3).uniform(-1, 1, (1, 3)), jnp.float32)
  for t_index in (0, T // 2, T - 1):
    noise = jax.random.normal(jax.random.key(t_index), (num_samples, 3))
    t = jnp.full((num_samples,), t_index, jnp.int32)
    x_t = np.asarray(diffusion_lib.q_sample(d, jnp.broadcast_to(x0, (num_samples, 3)), t, noise), np.float64)
    mean, var, _ = (np.asarray(a, np.float64) for a in diffusion_lib.q_mean_variance(d, x0, t[:1]))
    std_err = np.sqrt(var / num_samples)
    assert np.all(np.abs(x_t.mean(0) - mean[0]) < 5 * std_err)
    # The sample variance has standard error var * sqrt(2 / (n - 1)).
    assert np.all(np.abs(x_t.var(0, ddof=1) - var[0]) < 5 * var[0] * np.sqrt(2 / (num_samples - 1)))


def test_posterior_is_bayes_rule_numerically():
  # q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0) (eqs. 2, 4, 6): normalise the
  # product on a fine grid and compare its first two moments with eq. 7.
  betas = schedules.get_betas('linear', T, beta_start=1e-2, beta_end=0.3)
  proc = ref.Process(betas)
  x0_value, xt_value = 0.3, -0.7
  with jax.enable_x64(True):
    d = diffusion_lib.make_diffusion(betas, dtype=jnp.float64)
    t = jnp.arange(1, T, dtype=jnp.int32)
    x0 = jnp.full((T - 1, 1), x0_value, jnp.float64)
    xt = jnp.full((T - 1, 1), xt_value, jnp.float64)
    mean, var, log_var = (np.asarray(a)[:, 0] for a in diffusion_lib.q_posterior_mean_variance(d, x0, xt, t))
    mean0, var0, _ = diffusion_lib.q_posterior_mean_variance(d, x0[:1], xt[:1], jnp.zeros((1,), jnp.int32))
  for i, step in enumerate(range(1, T)):
    prior_mean, prior_var = np.sqrt(proc.abar[step - 1]) * x0_value, 1 - proc.abar[step - 1]
    grid = np.linspace(prior_mean - 12 * np.sqrt(prior_var), prior_mean + 12 * np.sqrt(prior_var), 200001)
    log_density = (-(xt_value - np.sqrt(proc.alpha[step]) * grid) ** 2 / (2 * proc.beta[step])
                   - (grid - prior_mean) ** 2 / (2 * prior_var))
    weights = np.exp(log_density - log_density.max())
    weights /= np.trapezoid(weights, grid)
    bayes_mean = np.trapezoid(weights * grid, grid)
    bayes_var = np.trapezoid(weights * (grid - bayes_mean) ** 2, grid)
    assert mean[i] == pytest.approx(bayes_mean, rel=1e-6, abs=1e-9)
    assert var[i] == pytest.approx(bayes_var, rel=1e-6)
    assert log_var[i] == pytest.approx(np.log(bayes_var), rel=1e-6)
  # At t = 0 (the paper's t = 1) x_0 is determined: mean x_0, variance 0.
  assert float(mean0[0, 0]) == pytest.approx(x0_value, rel=1e-12) and float(var0[0, 0]) == 0.0


def test_diffusion_is_a_pytree_with_static_settings_and_jits_without_recompiling(caplog):
  # Two processes built alike (distinct objects, equal settings) run one traced and compiled program on new
  # inputs; the settings are static (a Python str under tracing), so a new one traces and compiles anew.
  d1 = _make(jnp.float32, var_type='learned_range')
  d2 = _make(jnp.float32, var_type='learned_range')
  traces = []

  @jax.jit
  def posterior_mean(d, x0, x_t, t):
    traces.append(d.var_type)
    return diffusion_lib.q_posterior_mean_variance(d, x0, x_t, t)[0]

  x0, noise, x_t = _inputs(4)
  t = jnp.arange(T, dtype=jnp.int32)
  proc = ref.Process(schedules.get_betas('cosine', T))
  with compilations(caplog, 'posterior_mean') as compiled:
    a = posterior_mean(d1, x0, x_t, t)
    b = posterior_mean(d2, x0 + 1, noise, t)
  assert traces == ['learned_range'] and len(compiled) == 1, compiled
  assert ref.rel_err(a, proc.q_posterior(np.float64(x0), np.float64(x_t), np.arange(T))[0]) <= 1e-5
  assert ref.rel_err(b, proc.q_posterior(np.float64(x0) + 1, np.float64(noise), np.arange(T))[0]) <= 1e-5
  with compilations(caplog, 'posterior_mean') as compiled:
    posterior_mean(_make(jnp.float32, var_type='fixedsmall'), x0, x_t, t)
  assert traces == ['learned_range', 'fixedsmall'] and len(compiled) == 1


def test_bad_settings_raise_one_line_value_errors():
  betas = schedules.get_betas('linear', T)
  assert_one_line_error(lambda: diffusion_lib.make_diffusion(betas, mean_type='noise'), 'diffusion.mean_type',
                  'eps, xstart, xprev, v')
  assert_one_line_error(lambda: diffusion_lib.make_diffusion(betas, var_type='small'), 'diffusion.var_type',
                  'fixedlarge, fixedsmall, learned, learned_range')
  assert_one_line_error(lambda: diffusion_lib.make_diffusion(betas, loss_type='l3'), 'diffusion.loss_type',
                  'mse, kl, hybrid, rescaled_mse, rescaled_kl, l1, huber')
  assert_one_line_error(lambda: diffusion_lib.make_diffusion(betas, t_sampling='loss-second-moment'),
                  'diffusion.t_sampling', 'uniform, importance')
  assert_one_line_error(lambda: diffusion_lib.make_diffusion(betas, hybrid_lambda=-1.0), 'diffusion.hybrid_lambda')
  assert_one_line_error(lambda: diffusion_lib.make_diffusion(betas, dtype=jnp.float64), 'float64', 'enable_x64')
  # A learned-variance process needs 2C output channels.
  d = diffusion_lib.make_diffusion(betas, var_type='learned')
  x = jnp.zeros((2, 2, 2, 3))
  assert_one_line_error(lambda: diffusion_lib.p_mean_variance(d, x, x, jnp.zeros((2,), jnp.int32)), '6')
