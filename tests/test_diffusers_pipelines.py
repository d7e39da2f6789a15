"""Our samplers against diffusers' DDPMPipeline / DDIMPipeline loops (issue 15, test (c)).

A tiny random diffusers UNet2DModel is converted into our U-Net (ddpm_jax.convert). diffusers runs its pipelines'
loop with its own schedulers' `step()` and a torch generator; the same generator is replayed to give our sampler the
same initial noise and the same per-step noise (`samplers.sample(x_T=..., noise=...)`). Every spacing (leading /
trailing / linspace, steps_offset 0 and 1), clipping on and off, DDIM eta 0 and 1 and both clipped-model-output
conventions must give the same samples to float32 tolerance; each test prints the max difference it measured
(`pytest -s` shows them). torch/diffusers are the test oracle only.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline
from diffusers import DDIMScheduler
from diffusers import DDPMPipeline
from diffusers import DDPMScheduler

from configs import default
from ddpm_jax import config_validation
from ddpm_jax import convert
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import errors
from ddpm_jax import samplers
from ddpm_jax import schedules
from tests import helpers
from tests.helpers import assert_one_line_error

T = 1000
BATCH, SIDE, CHANNELS = 2, 8, 3
# Three steps: T // 3 = 333 is not T / 3, so diffusers' DDIM previous timestep (t - 333) differs from the next visited
# one for trailing (999 -> 666 -> 332) and linspace (999 -> 500 -> 0); trailing's last step is at t = 332 > 0.
NUM_STEPS = 3
# steps_offset only moves 'leading' (diffusers ignores it for 'trailing' / 'linspace', and the timesteps are all
# the samplers take from it: test_diffusers_spacing_gives_set_timesteps checks every offset there).
SPACINGS = [('leading', 0), ('leading', 1), ('trailing', 0), ('linspace', 0)]
# Float32 tolerance, relative to max(1, max |sample|): diffusers' float32 cumprod gives alpha_bar to 3.6e-7 relative
# (ours are float64-derived), and the first step's x0_hat = (x_T - sqrt(1 - a) eps) / sqrt(a) multiplies any
# rounding by 1 / sqrt(alpha_bar_999) = 157. The measured differences are at most 4e-5 (clipped samples, in [-1, 1])
# and 5e-7 relative (unclipped ones, which this random network drives to |x| ~ 600); a wrong convention differs by
# 1e-2 or (much) more.
TOLERANCE = 1e-4
# One compile per static sampler configuration (~5 s): the quick loop (-m 'not slow') runs a representative subset
# covering every convention; CI runs the whole matrix.
FAST = {('ancestral', 'trailing', 0, True), ('ancestral', 'linspace', 0, False), ('ddim', 'linspace', 0, True, False),
        ('ddim', 'trailing', 0, False, False), ('ddim', 'leading', 1, True, True)}


def _matrix(method, rows):
  return [pytest.param(*row, marks=() if (method,) + row in FAST else pytest.mark.slow) for row in rows]
UNET_CONFIG = dict(
    sample_size=SIDE, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=(32, 32), layers_per_block=1,
    down_block_types=('DownBlock2D', 'AttnDownBlock2D'), up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6, norm_num_groups=32,
    attention_head_dim=None, act_fn='silu', time_embedding_type='positional')


@pytest.fixture(scope='module')
def nets():
  """(diffusers UNet, our model_fn) with the same random weights, every tensor non-zero (zero-initialised output
  convolutions would make every sampler agree trivially)."""
  unet = helpers.random_diffusers_unet(UNET_CONFIG, seed=0)
  overrides = convert.model_overrides_from_diffusers(dict(UNET_CONFIG, _class_name='UNet2DModel'))
  model = convert.model_from_overrides(overrides)
  state = {k: v.detach().numpy().copy() for k, v in unet.state_dict().items()}
  params = jax.tree_util.tree_map(jnp.asarray, convert.convert_state_dict(state, model))
  return unet, lambda x, t: model.apply({'params': params}, x, t)


def _scheduler(cls, spacing, offset, clip, variance_type='fixed_small'):
  kwargs = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule='linear', clip_sample=clip,
                steps_offset=offset, timestep_spacing=spacing)
  if cls is DDPMScheduler:
    kwargs['variance_type'] = variance_type
  return cls(**kwargs)


def _diffusers_chain(unet, scheduler, seed, ddim_eta=None, use_clipped_model_output=False, timesteps=None):
  """The loop of DDPMPipeline.__call__ (ddim_eta None) or DDIMPipeline.__call__, before its final [0, 1] mapping.

  Returns (x_0 NHWC, x_T NHWC, per-step noise (steps, B, H, W, C)) where the noise is what the scheduler drew from
  the generator at each step, found by replaying a generator with the same seed (zeros where it drew none)."""
  shape = (BATCH, CHANNELS, SIDE, SIDE)
  generator, replay = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
  image = torch.randn(shape, generator=generator)  # diffusers' randn_tensor on the CPU
  x_T = torch.randn(shape, generator=replay)
  if timesteps is None:
    scheduler.set_timesteps(NUM_STEPS)
  else:
    scheduler.set_timesteps(timesteps=list(timesteps))
  noises = []
  with torch.no_grad():
    for t in scheduler.timesteps:
      model_output = unet(image, t).sample
      if ddim_eta is None:
        image = scheduler.step(model_output, t, image, generator=generator).prev_sample
        draws = int(t) > 0  # DDPMScheduler draws noise only for t > 0
      else:
        image = scheduler.step(model_output, t, image, eta=ddim_eta, use_clipped_model_output=use_clipped_model_output,
                               generator=generator).prev_sample
        draws = ddim_eta > 0
      noises.append(torch.randn(shape, generator=replay) if draws else torch.zeros(shape))
  nhwc = lambda a: np.asarray(a.numpy()).transpose(0, 2, 3, 1)
  return nhwc(image), nhwc(x_T), np.stack([nhwc(z) for z in noises])


@functools.lru_cache(maxsize=None)
def _ours(model_fn, method, respacing, clip, var_type, use_clipped_model_output):
  """Our sampler for one static configuration, jitted once (eta, x_T and the noise are arguments)."""
  diffusion = diffusion_lib.make_diffusion(schedules.get_betas('linear', T), var_type=var_type)

  @jax.jit
  def run(eta, x_T, noise):
    return samplers.sample(diffusion, model_fn, (BATCH, SIDE, SIDE, CHANNELS), jax.random.key(0), method=method,
                           respacing=respacing, eta=eta, clip_denoised=clip, x_T=x_T, noise=noise,
                           use_clipped_model_output=use_clipped_model_output)
  return run


def _assert_same_samples(ours, theirs, label):
  """Asserts float32 agreement and prints the max difference (the numbers issue 15 asks for)."""
  difference, scale = float(np.abs(np.asarray(ours) - theirs).max()), float(np.abs(theirs).max())
  print(f'\n{label}: max |ours - diffusers| = {difference:.2e} (max |sample| {scale:.2f})')
  assert difference <= TOLERANCE * max(1.0, scale), label


@pytest.mark.parametrize('spacing,offset,clip',
                         _matrix('ancestral', [(s, o, c) for s, o in SPACINGS for c in (True, False)]))
def test_ancestral_sampler_is_ddpm_pipeline(nets, spacing, offset, clip):
  unet, model_fn = nets
  theirs, x_T, noise = _diffusers_chain(unet, _scheduler(DDPMScheduler, spacing, offset, clip), seed=1)
  run = _ours(model_fn, 'ancestral', samplers.DiffusersSpacing(spacing, NUM_STEPS, offset), clip, 'fixedsmall', True)
  _assert_same_samples(run(0.0, x_T, noise), theirs, f'DDPMPipeline {spacing} steps_offset={offset} clip_sample={clip}')


@pytest.mark.parametrize('spacing,offset', [('trailing', 0), ('leading', 1)])
def test_ancestral_sampler_is_ddpm_pipeline_with_fixed_large_variance(nets, spacing, offset):
  # fixed_large: diffusers adds sqrt(beta') noise at a last step whose timestep is not 0 (332, or 1 with the offset).
  unet, model_fn = nets
  scheduler = _scheduler(DDPMScheduler, spacing, offset, True, variance_type='fixed_large')
  theirs, x_T, noise = _diffusers_chain(unet, scheduler, seed=2)
  run = _ours(model_fn, 'ancestral', samplers.DiffusersSpacing(spacing, NUM_STEPS, offset), True, 'fixedlarge', True)
  _assert_same_samples(run(0.0, x_T, noise), theirs,
                       f'DDPMPipeline fixed_large {spacing} steps_offset={offset} clip_sample=True')
  # That last noise is what makes them agree: without it the samples differ by far more than the tolerance.
  noiseless_last = np.concatenate([noise[:-1], np.zeros_like(noise[-1:])])
  assert np.abs(np.asarray(run(0.0, x_T, noiseless_last)) - theirs).max() > 10 * TOLERANCE


def test_ancestral_sampler_is_ddpm_pipeline_with_explicit_timesteps(nets):
  unet, model_fn = nets
  timesteps = (999, 700, 420, 10)
  theirs, x_T, noise = _diffusers_chain(unet, _scheduler(DDPMScheduler, 'leading', 0, True), seed=3,
                                        timesteps=timesteps)
  run = _ours(model_fn, 'ancestral', samplers.ExplicitTimesteps(timesteps), True, 'fixedsmall', True)
  _assert_same_samples(run(0.0, x_T, noise), theirs, f'DDPMPipeline timesteps={list(timesteps)} clip_sample=True')


@pytest.mark.parametrize('eta', [0.0, 1.0], ids=['eta0', 'eta1'])  # traced: both etas share one compile
@pytest.mark.parametrize('spacing,offset,clip,use_clipped', _matrix('ddim', [
    (s, o, c, u) for s, o in SPACINGS for c, u in ((True, False), (True, True), (False, False))]))
def test_ddim_sampler_is_ddim_pipeline(nets, spacing, offset, clip, use_clipped, eta):
  unet, model_fn = nets
  theirs, x_T, noise = _diffusers_chain(unet, _scheduler(DDIMScheduler, spacing, offset, clip), seed=4,
                                        ddim_eta=eta, use_clipped_model_output=use_clipped)
  run = _ours(model_fn, 'ddim', samplers.DiffusersSpacing(spacing, NUM_STEPS, offset), clip, 'fixedsmall',
              use_clipped)
  _assert_same_samples(run(eta, x_T, noise), theirs, f'DDIMPipeline {spacing} steps_offset={offset} clip_sample={clip} '
                       f'use_clipped_model_output={use_clipped} eta={eta}')


def test_diffusers_ddim_previous_timestep_is_needed(nets):
  """DDIM on linspace with improved-diffusion's rule (step to the next visited timestep, as ExplicitTimesteps of the
  same timesteps does) is a different sampler from DDIMScheduler's t - T // N: the convention is not a no-op."""
  unet, model_fn = nets
  scheduler = _scheduler(DDIMScheduler, 'linspace', 0, True)
  theirs, x_T, noise = _diffusers_chain(unet, scheduler, seed=4, ddim_eta=0.0)
  visited = tuple(scheduler.timesteps.tolist())
  run = _ours(model_fn, 'ddim', samplers.ExplicitTimesteps(visited), True, 'fixedsmall', False)
  difference = float(np.abs(np.asarray(run(0.0, x_T, noise)) - theirs).max())
  print(f'\nDDIM linspace, next-visited-timestep rule: max |ours - diffusers| = {difference:.2e}')
  assert difference > 100 * TOLERANCE


def test_the_loops_above_are_the_pipelines(nets):
  """The replayed loops are DDPMPipeline / DDIMPipeline themselves: same images from the same generator seed."""
  unet, _ = nets
  ddpm = _scheduler(DDPMScheduler, 'trailing', 0, True)
  theirs, _, _ = _diffusers_chain(unet, ddpm, seed=5)
  images = DDPMPipeline(unet, ddpm)(batch_size=BATCH, generator=torch.Generator().manual_seed(5),
                                   num_inference_steps=NUM_STEPS, output_type='np').images
  np.testing.assert_array_equal(images, np.clip(theirs / 2 + 0.5, 0, 1))
  ddim = _scheduler(DDIMScheduler, 'linspace', 1, True)
  theirs, _, _ = _diffusers_chain(unet, ddim, seed=6, ddim_eta=1.0)
  images = DDIMPipeline(unet, ddim)(batch_size=BATCH, generator=torch.Generator().manual_seed(6), eta=1.0,
                                   num_inference_steps=NUM_STEPS, output_type='np').images
  np.testing.assert_array_equal(images, np.clip(theirs / 2 + 0.5, 0, 1))


def test_use_clipped_model_output_matters_when_clipping():
  """The two DDIM conventions differ when x0_hat is clipped, and True is today's (improved-diffusion's) sampler."""
  d = diffusion_lib.make_diffusion(schedules.get_betas('linear', 10))
  x_t = jnp.full((1, 2, 2, 1), 3.0)
  eps = jnp.full((1, 2, 2, 1), -2.0)  # x0_hat = (3 + 2 sqrt(1 - a)) / sqrt(a) > 1: clipped to 1
  t = jnp.array([9])
  zero = jnp.zeros_like(x_t)
  clipped = samplers.ddim_step(d, eps, x_t, t, zero, use_clipped_model_output=True)[0]
  own_eps = samplers.ddim_step(d, eps, x_t, t, zero, use_clipped_model_output=False)[0]
  a, a_prev = float(d.alphas_cumprod[9]), float(d.alphas_cumprod[8])
  eps_from_clipped = (3.0 - np.sqrt(a)) / np.sqrt(1 - a)
  np.testing.assert_allclose(clipped, np.sqrt(a_prev) + np.sqrt(1 - a_prev) * eps_from_clipped, rtol=1e-5)
  np.testing.assert_allclose(own_eps, np.sqrt(a_prev) - 2.0 * np.sqrt(1 - a_prev), rtol=1e-5)
  unclipped = [samplers.ddim_step(d, eps, x_t, t, zero, clip_denoised=False, use_clipped_model_output=flag)[0]
               for flag in (True, False)]
  np.testing.assert_allclose(unclipped[0], unclipped[1], rtol=1e-5)


# ------------------------------------------------------------------------------ timesteps and names (no network)


@pytest.mark.parametrize('num_timesteps', [1000, 100])
def test_diffusers_spacing_gives_set_timesteps(num_timesteps):
  for cls in (DDPMScheduler, DDIMScheduler):
    for spacing in ('leading', 'trailing', 'linspace'):
      for offset in (0, 1, 3):
        for n in (1, 3, 7, 10, 50, 64):
          scheduler = cls(num_train_timesteps=num_timesteps, steps_offset=offset, timestep_spacing=spacing)
          scheduler.set_timesteps(n)
          theirs = scheduler.timesteps.tolist()
          spec = samplers.DiffusersSpacing(spacing, n, offset)
          if len(theirs) != n or not 0 <= min(theirs) <= max(theirs) < num_timesteps:
            # diffusers would index its alphas out of range (or from the end): ours is a one-line error.
            with pytest.raises(ValueError, match='sample.(steps_offset|num_inference_steps)=.*allowed values'):
              samplers.diffusers_timesteps(num_timesteps, spec)
          else:
            assert samplers.diffusers_timesteps(num_timesteps, spec) == theirs, (cls.__name__, spacing, offset, n)
  scheduler = DDPMScheduler(num_train_timesteps=num_timesteps)
  scheduler.set_timesteps(timesteps=[99, 50, 7, 0])
  assert samplers.space_timesteps(num_timesteps, samplers.ExplicitTimesteps((99, 50, 7, 0))) == sorted(
      scheduler.timesteps.tolist())


def test_respacing_strings_against_diffusers_names():
  """The documented table: 'ddimN' is leading (offset 0) exactly when N divides T; 'N' is linspace unless a
  position is a rounding tie (N = 21 at T = 1000: 499.5)."""
  linspace, leading = DDPMScheduler(timestep_spacing='linspace'), DDPMScheduler(timestep_spacing='leading')
  for n in (10, 20, 25, 50, 100, 200, 250, 500):
    leading.set_timesteps(n)
    linspace.set_timesteps(n)
    assert samplers.space_timesteps(T, f'ddim{n}') == sorted(leading.timesteps.tolist())
    assert samplers.space_timesteps(T, str(n)) == sorted(linspace.timesteps.tolist())
  leading.set_timesteps(30)  # stride 1000 // 30 = 33; ddim30 needs stride 34 for exactly 30 steps
  assert samplers.space_timesteps(T, 'ddim30') == list(range(0, 1000, 34)) != sorted(leading.timesteps.tolist())
  linspace.set_timesteps(21)
  differ = set(samplers.space_timesteps(T, '21')) ^ set(linspace.timesteps.tolist())
  assert differ == {499, 500}


def test_index_and_timestep_helpers_are_inverse():
  d = diffusion_lib.make_diffusion(schedules.get_betas('linear', T))
  spaced = samplers.respace(d, samplers.DiffusersSpacing('trailing', 4))
  assert [samplers.index_to_timestep(spaced, i) for i in range(4)] == [249, 499, 749, 999]
  assert samplers.timestep_to_index(spaced, 999) == 3
  np.testing.assert_array_equal(samplers.timestep_to_index(spaced, np.array([249, 749])), [0, 2])
  np.testing.assert_array_equal(samplers.index_to_timestep(spaced, np.array([3, 0])), [999, 249])
  traced = jax.jit(lambda i: samplers.timestep_to_index(spaced, samplers.index_to_timestep(spaced, i)))
  np.testing.assert_array_equal(traced(jnp.arange(4)), np.arange(4))
  with pytest.raises(ValueError, match='timestep 250 is not visited'):
    samplers.timestep_to_index(spaced, 250)


def test_sample_accepts_every_respacing_that_respace_accepts():
  d = diffusion_lib.make_diffusion(schedules.get_betas('linear', 30))
  model_fn = lambda x, t: 0.1 * x + 1e-3 * t[:, None, None, None]
  run = lambda respacing: samplers.sample(d, model_fn, (1, 2, 2, 1), jax.random.key(0), respacing=respacing)
  np.testing.assert_array_equal(run((3, 2)), run('3,2'))
  np.testing.assert_array_equal(run([3, 2]), run('3,2'))
  kept = tuple(reversed(samplers.space_timesteps(30, '3,2')))
  np.testing.assert_allclose(run(samplers.ExplicitTimesteps(kept)), run('3,2'), rtol=1e-6)
  for bad in (5, ('a',), samplers.ExplicitTimesteps((1, 5)), samplers.DiffusersSpacing('middle', 3)):
    with pytest.raises(ValueError, match='sample.(respacing|timesteps|timestep_spacing)=.*allowed values'):
      run(bad)


def _config(**sample):
  config = default.get_config()
  config.sample.update(sample)
  return config


def test_config_fields_select_the_spacing_and_are_validated():
  assert samplers.config_respacing(_config().sample) == ''
  assert samplers.config_respacing(_config(respacing='ddim50').sample) == 'ddim50'
  assert samplers.config_respacing(_config(timestep_spacing='trailing', num_inference_steps=25,
                                           steps_offset=1).sample) == samplers.DiffusersSpacing('trailing', 25, 1)
  assert samplers.config_respacing(_config(timesteps=(999, 500, 0)).sample) == samplers.ExplicitTimesteps(
      (999, 500, 0))
  config_validation.validate_config(_config(timestep_spacing='leading', num_inference_steps=50, steps_offset=1))
  config_validation.validate_config(_config(method='ddim', use_clipped_model_output=False))
  bad = [
      (dict(timestep_spacing='middle'), 'config.sample.timestep_spacing=', "'leading', 'trailing', 'linspace'"),
      (dict(timestep_spacing='leading', num_inference_steps=2000), 'sample.num_inference_steps=2000', '[1, 1000]'),
      (dict(timestep_spacing='leading', num_inference_steps=1000, steps_offset=1), 'sample.steps_offset=1',
       'steps_offset <= 0'),
      (dict(timestep_spacing='trailing', num_inference_steps=61), 'sample.num_inference_steps=61', 'another'),
      (dict(timesteps=(0, 500)), 'sample.timesteps=(0, 500)', 'strictly decreasing'),
      (dict(timesteps=(1000, 5)), 'sample.timesteps=', '[0, 1000)'),
      (dict(timestep_spacing='leading', respacing='ddim50'), 'sample.timestep_spacing=', 'only one of'),
  ]
  for fields, *needles in bad:
    assert_one_line_error(lambda: config_validation.validate_config(_config(**fields)), *needles,
                          error=errors.ConfigError)


def test_configs_recorded_before_these_fields_keep_their_meaning():
  config = _config(respacing='ddim10')
  for field in ('timestep_spacing', 'num_inference_steps', 'steps_offset', 'timesteps', 'use_clipped_model_output'):
    del config.sample[field]
  config_validation.validate_config(config)
  assert samplers.config_respacing(config.sample) == 'ddim10'
