"""Ancestral and DDIM samplers, respacing and classifier-free guidance against the NumPy reference and oracles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import samplers
from ddpm_jax import schedules
from tests import numpy_reference as ref
from tests.helpers import assert_one_line_error
from tests.helpers import compilations

SHAPE = (2, 3, 3, 1)


# ------------------------------------------------------------------------------------------------ respacing


@pytest.mark.parametrize('num_timesteps,spec', [(1000, '250'), (1000, 'ddim50'), (300, '10,15,20'), (11, '3,4'),
                                                (10, '10'), (100, '1'), (10, 'ddim10'), (7, '1,1,1'), (1000, '4')])
def test_space_timesteps_matches_reference(num_timesteps, spec):
  kept = samplers.space_timesteps(num_timesteps, spec)
  assert kept == ref.space_timesteps(num_timesteps, spec)
  assert kept == sorted(set(kept)) and kept[0] == 0


def test_space_timesteps_documented_examples():
  # improved-diffusion's docstring: 300 steps as [10, 15, 20] strides the first 100 steps to 10, the next 100 to
  # 15 and the final 100 to 20; each section keeps both of its ends.
  kept = samplers.space_timesteps(300, '10,15,20')
  assert len(kept) == 45
  assert kept[:10] == list(range(0, 100, 11)) and kept[10] == 100 and kept[24] == 199 and kept[-1] == 299
  assert samplers.space_timesteps(1000, 'ddim50') == list(range(0, 1000, 20))


def test_bad_respacing_and_method_raise_one_line_value_errors():
  for spec in ('abc', 'ddimx', 'ddim999', '0', '2000', '5,,3', '-1', '600,600'):
    assert_one_line_error(lambda: samplers.space_timesteps(1000, spec), 'sample.respacing', 'allowed values')
  d = diffusion_lib.make_diffusion(schedules.get_betas('linear', 10))
  model_fn = lambda x, t: x
  assert_one_line_error(lambda: samplers.sample(d, model_fn, SHAPE, jax.random.key(0), method='plms'), 'sample.method',
                  'ancestral, ddim')
  assert_one_line_error(lambda: samplers.sample(d, model_fn, SHAPE, jax.random.key(0), respacing=5), 'sample.respacing')
  assert_one_line_error(lambda: samplers.sample(d, model_fn, SHAPE, jax.random.key(0), respacing='11'),
                  'sample.respacing')
  assert_one_line_error(lambda: samplers.sample(d, model_fn, SHAPE, jax.random.key(0), num_progress=11), 'num_progress')


def test_respaced_betas_match_reference_and_keep_the_marginals():
  betas = schedules.get_betas('cosine', 100)
  d = diffusion_lib.make_diffusion(betas, var_type='learned_range', mean_type='v')
  for spec in ('10', 'ddim25', '5,10,3'):
    spaced = samplers.respace(d, spec)
    kept = ref.space_timesteps(100, spec)
    np.testing.assert_allclose(spaced.betas64, ref.respaced_betas(betas, kept), rtol=1e-12)
    assert spaced.timestep_map == tuple(kept)
    assert (spaced.mean_type, spaced.var_type) == ('v', 'learned_range')
    # q(x_{k_i} | x_0) is unchanged: the new alpha_bar_i is the old alpha_bar at the kept step.
    np.testing.assert_allclose(spaced.alphas_cumprod, np.cumprod(1 - betas)[kept], rtol=1e-6)
  # Respacing a respaced process composes the maps back to the ORIGINAL indices.
  twice = samplers.respace(samplers.respace(d, '50'), '10')
  original = np.asarray(ref.space_timesteps(100, '50'))[ref.space_timesteps(50, '10')]
  assert twice.timestep_map == tuple(original.tolist()) and len(original) == 10
  np.testing.assert_allclose(twice.alphas_cumprod, np.cumprod(1 - betas)[original], rtol=1e-6)


def test_respacing_with_all_steps_reproduces_the_original_process():
  betas = schedules.get_betas('linear', 8, beta_start=1e-3, beta_end=0.3)
  d = diffusion_lib.make_diffusion(betas, var_type='fixedsmall')
  for spec in ('8', 'ddim8', '4,4'):
    spaced = samplers.respace(d, spec)
    np.testing.assert_allclose(spaced.betas64, betas, rtol=1e-9)
    assert spaced.timestep_map == tuple(range(8))

  @functools.partial(jax.jit, static_argnames=('respacing',))
  def draw(rng, respacing):
    return samplers.sample(d, lambda x, t: 0.3 * x + 0.01 * t[:, None, None, None], SHAPE, rng,
                           respacing=respacing)

  np.testing.assert_allclose(draw(jax.random.key(1), ''), draw(jax.random.key(1), '8'), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- single steps


@pytest.mark.parametrize('x64', [True, False])
def test_ancestral_and_ddim_steps_match_reference(x64):
  tol = 1e-6 if x64 else 1e-5
  T = 9
  betas = schedules.get_betas('linear', T, beta_start=1e-3, beta_end=0.2)
  rs = np.random.RandomState(2)
  x_t, z = rs.randn(T, 2, 2, 3), rs.randn(T, 2, 2, 3)
  outputs = {'fixedlarge': rs.randn(T, 2, 2, 3),
             'learned_range': np.concatenate([rs.randn(T, 2, 2, 3), np.tanh(rs.randn(T, 2, 2, 3))], -1)}
  t = np.arange(T)
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    cast = lambda a: jnp.asarray(a, dtype)
    for mean_type, var_type in (('eps', 'fixedlarge'), ('xstart', 'learned_range')):
      d = diffusion_lib.make_diffusion(betas, mean_type=mean_type, var_type=var_type, dtype=dtype)
      proc = ref.Process(betas, mean_type, var_type)
      out = outputs[var_type]
      got, got_x0 = samplers.p_sample_step(d, cast(out), cast(x_t), jnp.asarray(t, jnp.int32), cast(z))
      want, want_x0 = ref.ancestral_step(proc, out, x_t, t, z)
      assert ref.rel_err(got, want) <= tol and ref.rel_err(got_x0, want_x0) <= tol
      for eta in (0.0, 0.5, 1.0):
        got, _ = samplers.ddim_step(d, cast(out), cast(x_t), jnp.asarray(t, jnp.int32), cast(z), eta=eta)
        want, _ = ref.ddim_step(proc, out, x_t, t, z, eta)
        assert ref.rel_err(got, want) <= tol, (mean_type, eta)


# ------------------------------------------------------------------------------------------------ full loops


def _reference_loop(proc_full, spec, model, x_T, step, noises):
  """The reference chain: respaced process, the model fed original timesteps."""
  kept = ref.space_timesteps(proc_full.T, spec) if spec else list(range(proc_full.T))
  proc = ref.Process(ref.respaced_betas(proc_full.beta, kept), proc_full.mean_type, proc_full.var_type)
  x = x_T
  for i, s in enumerate(reversed(range(proc.T))):
    t = np.full(x.shape[0], s)
    x, _ = step(proc, model(x, np.full(x.shape[0], kept[s])), x, t, noises[i])
  return x


def _toy_model(x, t, xp=jnp):
  return 0.4 * xp.tanh(x) + 0.002 * xp.reshape(t, (-1, 1, 1, 1)) - 0.1


def test_full_loops_match_reference_in_float64():
  T, spec = 12, '3,2'
  betas = schedules.get_betas('cosine', T)
  with jax.enable_x64(True):
    d = diffusion_lib.make_diffusion(betas, mean_type='eps', var_type='fixedlarge', dtype=jnp.float64)
    rng = jax.random.key(3)

    @functools.partial(jax.jit, static_argnames=('method',))
    def run(rng, method):
      return samplers.sample(d, _toy_model, SHAPE, rng, method=method, respacing=spec, eta=0.0)

    ancestral, ddim = run(rng, 'ancestral'), run(rng, 'ddim')
    # The documented keys: x_T from split(rng)[0], the noise of iteration i from fold_in(split(rng)[1], i).
    init_key, step_key = jax.random.split(rng)
    x_T = np.asarray(jax.random.normal(init_key, SHAPE, jnp.float64))
    noises = np.asarray(jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(step_key, i), SHAPE,
                                                                     jnp.float64)))(jnp.arange(5)))
  proc = ref.Process(betas, 'eps', 'fixedlarge')
  model = functools.partial(_toy_model, xp=np)
  want_ancestral = _reference_loop(proc, spec, model, x_T, ref.ancestral_step, noises)
  want_ddim = _reference_loop(proc, spec, model, x_T, lambda *a: ref.ddim_step(*a, eta=0.0), noises)
  assert ref.rel_err(ancestral, want_ancestral) <= 1e-6
  assert ref.rel_err(ddim, want_ddim) <= 1e-6
  assert not np.allclose(ancestral, ddim)


def test_ddim_eta0_is_deterministic_and_eta1_is_not(caplog):
  d = diffusion_lib.make_diffusion(schedules.get_betas('linear', 10, beta_start=1e-3, beta_end=0.2))

  @jax.jit
  def ddim_sample(rng, x_T, eta):
    return samplers.sample(d, _toy_model, SHAPE, rng, method='ddim', eta=eta, x_T=x_T)

  x_T = jax.random.normal(jax.random.key(4), SHAPE)
  with compilations(caplog, 'ddim_sample') as compiled:
    a = ddim_sample(jax.random.key(5), x_T, 0.0)
    b = ddim_sample(jax.random.key(6), x_T, 0.0)
    c = ddim_sample(jax.random.key(5), x_T, 1.0)
    e = ddim_sample(jax.random.key(6), x_T, 1.0)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(c, e) and not np.allclose(a, c)
  assert len(compiled) == 1, compiled  # eta is traced: no recompilation


@pytest.mark.parametrize('method,respacing', [('ancestral', ''), ('ddim', 'ddim5'), ('ancestral', '7,3')])
def test_oracle_model_recovers_a_one_point_dataset(method, respacing):
  # For data = {x*}, the exact noise prediction is eps(x_t, t) = (x_t - sqrt(alpha_bar_t) x*) / sqrt(1 -
  # alpha_bar_t) with t the ORIGINAL timestep, so every sampler must land on x*.
  T = 20
  betas = schedules.get_betas('cosine', T)
  d = diffusion_lib.make_diffusion(betas)
  abar = np.cumprod(1 - betas)
  point = jnp.asarray(np.random.RandomState(7).uniform(-0.9, 0.9, (1,) + SHAPE[1:]), jnp.float32)

  def oracle(x_t, t):
    a = jnp.asarray(abar, jnp.float32)[t].reshape(-1, 1, 1, 1)
    return (x_t - jnp.sqrt(a) * point) / jnp.sqrt(1 - a)

  x0, progress = jax.jit(lambda rng: samplers.sample(d, oracle, SHAPE, rng, method=method, respacing=respacing,
                                                     num_progress=3))(jax.random.key(8))
  np.testing.assert_allclose(x0, np.broadcast_to(point, SHAPE), atol=1e-4)
  assert progress.shape == (3,) + SHAPE
  np.testing.assert_allclose(progress, np.broadcast_to(point, (3,) + SHAPE), atol=1e-3)
  timesteps = samplers.progress_timesteps(d, respacing, 3)
  kept = ref.space_timesteps(T, respacing) if respacing else list(range(T))
  assert timesteps[0] == kept[-1] and timesteps[-1] == 0


def test_progress_records_predictions_at_evenly_spaced_steps():
  d = diffusion_lib.make_diffusion(schedules.get_betas('linear', 9))
  # A model whose x_0 prediction encodes the timestep it was called with (xstart type, no clipping).
  d = d.replace(mean_type='xstart')
  model = lambda x, t: jnp.broadcast_to(t.reshape(-1, 1, 1, 1).astype(jnp.float32), x.shape)
  x0, progress = samplers.sample(d, model, SHAPE, jax.random.key(9), clip_denoised=False, num_progress=4)
  np.testing.assert_array_equal(progress[:, 0, 0, 0, 0], [8, 5, 3, 0])
  np.testing.assert_array_equal(samplers.progress_timesteps(d, '', 4), [8, 5, 3, 0])
  np.testing.assert_array_equal(x0, 0.0)  # the last step's mean is the x_0 prediction at t = 0


def test_sampler_is_one_compiled_loop_and_does_not_recompile():
  d = diffusion_lib.make_diffusion(schedules.get_betas('linear', 16))
  traces = []

  @functools.partial(jax.jit, static_argnames=('shape',))
  def generate(params, rng, shape):
    def model_fn(x, t):
      traces.append(1)
      return params * x
    return samplers.sample(d, model_fn, shape, rng, method='ddim', respacing='8')

  a = generate(jnp.float32(0.1), jax.random.key(10), SHAPE)
  b = generate(jnp.float32(0.2), jax.random.key(11), SHAPE)
  assert len(traces) == 1  # the network is traced once (not once per step), and so compiled once
  assert not np.allclose(a, b)
  # One device program: the steps are a single scan inside it, with no host callbacks.
  jaxpr = str(jax.make_jaxpr(lambda p, r: generate(p, r, SHAPE))(jnp.float32(0.1), jax.random.key(0)))
  assert jaxpr.count('scan[') == 1 and 'callback' not in jaxpr


# ------------------------------------------------------------------------------------------------- guidance


@pytest.mark.parametrize('channels_out', [1, 2])
def test_classifier_free_guidance_is_one_batched_call(channels_out):
  calls = []
  rs = np.random.RandomState(12)
  weights = jnp.asarray(rs.randn(4, channels_out), jnp.float32)

  def model_fn_xty(x, t, y):
    calls.append(x.shape[0])
    return x * weights[y].reshape(-1, 1, 1, channels_out) + 0.01 * t.reshape(-1, 1, 1, 1)

  labels = jnp.asarray([0, 2])
  x = jnp.asarray(rs.randn(*SHAPE), jnp.float32)
  t = jnp.asarray([3, 5])
  guided = samplers.classifier_free_guidance(model_fn_xty, labels, null_label=3, guidance_scale=2.0)(x, t)
  assert calls == [4]  # conditional and unconditional halves in ONE network call
  conditional = np.asarray(model_fn_xty(x, t, labels))
  unconditional = np.asarray(model_fn_xty(x, t, jnp.asarray([3, 3])))
  expected_eps = 3.0 * conditional[..., :1] - 2.0 * unconditional[..., :1]
  np.testing.assert_allclose(guided[..., :1], expected_eps, rtol=1e-6, atol=1e-6)
  if channels_out == 2:  # learned variance: the variance channels are the conditional ones
    np.testing.assert_allclose(guided[..., 1:], conditional[..., 1:], rtol=1e-6)
  assert guided.shape == SHAPE[:-1] + (channels_out,)
