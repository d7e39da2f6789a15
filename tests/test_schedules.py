"""Beta schedules and the derived schedule constants against the independent NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import schedules
from tests import numpy_reference as ref
from tests.helpers import assert_one_line_error

CONSTANT_FIELDS = [name for name in diffusion_lib.Diffusion.__dataclass_fields__
                   if diffusion_lib.Diffusion.__dataclass_fields__[name].metadata.get('pytree_node', True)]


@pytest.mark.parametrize('name', schedules.SCHEDULES)
@pytest.mark.parametrize('num_timesteps', [1, 2, 7, 1000])
def test_betas_match_reference(name, num_timesteps):
  betas = schedules.get_betas(name, num_timesteps)
  assert betas.dtype == np.float64 and betas.shape == (num_timesteps,)
  expected = ref.betas(name, num_timesteps)
  np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=0)
  assert np.all((betas > 0) & (betas < 1))


def test_paper_linear_schedule_endpoints_and_custom_range():
  # Ho et al. 2020, App. B: beta_1 = 1e-4, beta_T = 0.02, T = 1000.
  betas = schedules.get_betas('linear', 1000)
  assert betas[0] == pytest.approx(1e-4, rel=1e-15) and betas[-1] == pytest.approx(0.02, rel=1e-15)
  np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)  # evenly spaced
  # alpha_bar_t = prod_{s <= t} (1 - beta_s) (eq. 4), in float64; at t = T it is ~4.04e-5 (x_T is nearly pure noise).
  d = diffusion_lib.make_diffusion(betas)
  with jax.enable_x64(True):
    d64 = diffusion_lib.make_diffusion(betas, dtype=jnp.float64)
  product = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
  np.testing.assert_allclose(np.asarray(d64.alphas_cumprod), product, rtol=1e-13)
  np.testing.assert_allclose(np.asarray(d.alphas_cumprod), product, rtol=1e-5)
  assert float(d64.alphas_cumprod[0]) == pytest.approx(0.9999, rel=1e-15)
  assert float(d64.alphas_cumprod[-1]) == pytest.approx(4.0358e-5, rel=1e-4)
  custom = schedules.get_betas('quad', 50, beta_start=1e-3, beta_end=0.05)
  np.testing.assert_allclose(custom, ref.betas('quad', 50, 1e-3, 0.05), rtol=1e-12)
  np.testing.assert_allclose(schedules.get_betas('const', 4, beta_end=0.3), 0.3)


def test_cosine_alpha_bar_follows_closed_form():
  # Nichol & Dhariwal 2021, eq. 17: alpha_bar_t = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi / 2).
  num_timesteps = 100
  alpha_bar = np.cumprod(1 - schedules.get_betas('cosine', num_timesteps))
  grid = np.arange(1, num_timesteps + 1) / num_timesteps
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
  unclipped = slice(0, num_timesteps - 1)  # the last beta is clipped at 0.999
  np.testing.assert_allclose(alpha_bar[unclipped], (f(grid) / f(0.0))[unclipped], rtol=1e-10)
  assert schedules.get_betas('cosine', num_timesteps)[-1] == 0.999


def _expected_constants(betas):
  """Every schedule constant of `diffusion.Diffusion`, by the direct float64 formulas of eqs. 4, 6, 7, 11."""
  proc = ref.Process(betas)
  expected = {
      'betas': proc.beta, 'log_betas': np.log(proc.beta), 'alphas_cumprod': proc.abar,
      'alphas_cumprod_prev': proc.abar_prev, 'sqrt_alphas_cumprod': np.sqrt(proc.abar),
      'sqrt_alphas_cumprod_prev': np.sqrt(proc.abar_prev), 'one_minus_alphas_cumprod': 1 - proc.abar,
      'one_minus_alphas_cumprod_prev': 1 - proc.abar_prev, 'sqrt_one_minus_alphas_cumprod': np.sqrt(1 - proc.abar),
      'log_one_minus_alphas_cumprod': np.log(1 - proc.abar), 'sqrt_recip_alphas_cumprod': 1 / np.sqrt(proc.abar),
      'sqrt_recipm1_alphas_cumprod': np.sqrt(1 / proc.abar - 1), 'posterior_variance': proc.post_var,
      'posterior_log_variance_clipped': proc.post_logvar,
      'posterior_mean_coef1': np.sqrt(proc.abar_prev) * proc.beta / (1 - proc.abar),
      'posterior_mean_coef2': np.sqrt(proc.alpha) * (1 - proc.abar_prev) / (1 - proc.abar),
      'fixedlarge_log_variance': proc.large_logvar,
  }
  expected['xprev_recip_coef1'] = 1 / expected['posterior_mean_coef1']
  expected['xprev_coef2_over_coef1'] = expected['posterior_mean_coef2'] / expected['posterior_mean_coef1']
  assert set(expected) == set(CONSTANT_FIELDS)
  return expected


def _assert_constants(betas, rtol64, rtol32):
  expected = _expected_constants(betas)
  with jax.enable_x64(True):
    d64 = diffusion_lib.make_diffusion(betas, dtype=jnp.float64)
    for key, value in expected.items():
      assert getattr(d64, key).dtype == jnp.float64, key
      assert ref.rel_err(getattr(d64, key), value) <= rtol64, key
  d32 = diffusion_lib.make_diffusion(betas)
  for key, value in expected.items():
    assert getattr(d32, key).dtype == jnp.float32, key
    assert ref.rel_err(getattr(d32, key), value) <= rtol32, key
  return d32


@pytest.mark.parametrize('name', schedules.SCHEDULES)
@pytest.mark.parametrize('num_timesteps', [1, 2, 1000])
def test_every_derived_constant_at_the_extreme_lengths(name, num_timesteps):
  # T = 1 (no next step: the clipped log variance uses beta_1), T = 2, and the paper's T = 1000, where the
  # constants span the widest range (1 / sqrt(alpha_bar_T) ~ 160 for linear, ~ 1e3 to 1e4 for the clipped ones).
  betas = schedules.get_betas(name, num_timesteps)
  d32 = _assert_constants(betas, rtol64=1e-12, rtol32=1e-5)
  first = betas[0] if num_timesteps == 1 else ref.Process(betas).post_var[1]
  assert float(d32.posterior_variance[0]) == 0.0  # beta~_1 = 0: x_0 is known from x_1
  assert float(d32.posterior_log_variance_clipped[0]) == pytest.approx(np.log(first), rel=1e-6)


@pytest.mark.parametrize('name', ['linear', 'cosine', 'jsd', 'warmup10'])
def test_constants_match_reference_float64_and_float32(name):
  _assert_constants(schedules.get_betas(name, 30), rtol64=1e-6, rtol32=1e-5)


def test_from_config_default_section():
  config = default_config.get_config().diffusion
  diffusion = diffusion_lib.from_config(config)
  assert diffusion.num_timesteps == 1000 and diffusion.dtype == jnp.float32
  assert (diffusion.mean_type, diffusion.var_type, diffusion.loss_type, diffusion.t_sampling) == (
      'eps', 'fixedlarge', 'mse', 'uniform')
  assert diffusion.hybrid_lambda == 0.001
  np.testing.assert_allclose(diffusion.betas, ref.betas('linear', 1000), rtol=1e-7)
  assert diffusion.timestep_map == tuple(range(1000))
  config.schedule, config.num_timesteps, config.var_type = 'cosine', 40, 'learned_range'
  diffusion = diffusion_lib.from_config(config)
  np.testing.assert_allclose(diffusion.betas, ref.betas('cosine', 40), rtol=1e-6)
  assert diffusion.learns_variance


def test_bad_schedule_inputs_raise_one_line_value_errors():
  assert_one_line_error(lambda: schedules.get_betas('sigmoid', 10), 'diffusion.schedule', 'linear, quad',
                               'cosine')
  for bad_t in (0, -5, 2.5, True):
    assert_one_line_error(lambda: schedules.get_betas('linear', bad_t), 'diffusion.num_timesteps',
                                 'allowed values')
  assert_one_line_error(lambda: schedules.get_betas('linear', 10, beta_end=1.5), 'beta_end', '(0, 1)')
  assert_one_line_error(lambda: schedules.get_betas('linear', 10, beta_start=0.0), 'beta_start', '(0, 1)')
  assert_one_line_error(lambda: schedules.get_betas('const', 10, beta_end=-0.1), 'beta_end', '(0, 1)')
  assert_one_line_error(lambda: schedules.get_betas('cosine', 10, max_beta=1.0), 'max_beta')
  assert_one_line_error(lambda: diffusion_lib.make_diffusion(np.array([0.1, 1.0])), '(0, 1)')
