"""Samplers of the reverse process, each ONE compiled loop (`lax.scan`): ancestral (Ho et al. 2020, Algorithm 2),
DDIM (Song et al. 2021, eq. 12), timestep respacing (Nichol & Dhariwal 2021, Sec. 4; improved-diffusion's
space_timesteps / SpacedDiffusion), diffusers' timestep spacings and classifier-free guidance (Ho & Salimans 2022).

A sampler takes any `model_fn(x_t, t) -> output` and is meant to run under `jax.jit` with `shape`, `method`,
`respacing`, `clip_denoised` and `num_progress` static, e.g.

  @functools.partial(jax.jit, static_argnames=('shape',))
  def generate(params, rng, shape):
    return samplers.sample(diffusion, lambda x, t: model.apply({'params': params}, x, t), shape, rng)

The loop over timesteps is traced once (the network once), so one call is one device program: no per-step host
round trip, and new parameters or keys of the same shapes reuse the compiled program.

Which timesteps are visited (`respacing`), and the names diffusers 0.42 (DDPMScheduler / DDIMScheduler
`set_timesteps`, DDPMPipeline / DDIMPipeline) gives the same choice; N = number of steps, T = diffusion steps:

  ours (config `sample.*`)                          diffusers
  respacing=''                                      num_inference_steps=T (any spacing, steps_offset=0)
  respacing='ddimN'                                 timestep_spacing='leading', steps_offset=0, when N divides T
                                                    (otherwise ddimN takes the smallest stride giving N steps,
                                                    leading takes stride T // N: different timesteps)
  respacing='N'                                     timestep_spacing='linspace' for the ancestral sampler, when
                                                    no position k (T - 1) / (N - 1) is a tie .5 (true for N = 10,
                                                    20, 25, 50, 100, 200, 250, 500 at T = 1000; 278 of the N <= 1000
                                                    differ, in one timestep, e.g. N = 21: 499 vs 500). DDIM differs
                                                    (previous timestep, see below)
  respacing='N1,N2,...' or (N1, N2, ...)            no equivalent (improved-diffusion's sections)
  timestep_spacing='leading'|'trailing'|'linspace'  timestep_spacing=the same, num_inference_steps, steps_offset
    + num_inference_steps, steps_offset             (steps_offset is used by 'leading' only, as in diffusers)
  timesteps=(999, 800, ...)                         DDPMScheduler.set_timesteps(timesteps=[999, 800, ...])
  use_clipped_model_output=True (default)           DDIMScheduler.step(use_clipped_model_output=True);
                                                    DDIMPipeline's default is False
  clip_denoised                                     clip_sample (clip_sample_range=1)
  eta                                               DDIMPipeline's eta

With `DiffusersSpacing` (sample.timestep_spacing) or `ExplicitTimesteps` (sample.timesteps) the samplers also take
diffusers' choices where they differ from improved-diffusion's: the ancestral sampler adds noise at the last step
when its timestep is not 0 (DDPMScheduler adds noise whenever t > 0: sqrt(beta'_t) for fixedlarge, 1e-10 for
fixedsmall; learned variances keep the noiseless last step), and with `DiffusersSpacing` DDIM steps from t to
t - T // N (DDIMScheduler's previous timestep, which for 'linspace', and 'trailing' with N not dividing T, is not the
next visited timestep). DDIMScheduler takes no explicit timesteps; with `ExplicitTimesteps` DDIM steps to the next
listed one. tests/test_diffusers_pipelines.py checks these against the diffusers pipelines.

The step functions take an index into the respaced process, `model_fn` sees original timesteps:
`index_to_timestep` and `timestep_to_index` map between the two.
"""

import dataclasses
import functools
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax.diffusion import Diffusion, extract

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

METHODS = ('ancestral', 'ddim')
# sample.timestep_spacing: '' = sample.respacing (improved-diffusion), else diffusers' set_timesteps spacing.
TIMESTEP_SPACINGS = ('', 'leading', 'trailing', 'linspace')
# DDPMScheduler clamps a variance to this before its square root: the ancestral last step's noise with fixedsmall.
_DIFFUSERS_MIN_VARIANCE = 1e-20
_RESPACING_HELP = ("allowed values: '' (all steps), 'N' (N evenly spaced steps), 'ddimN' (DDIM's integer stride "
                   "giving exactly N steps), 'N1,N2,...' (N_i steps from the i-th of equal sections)")


def _bad_respacing(respacing: Any, num_timesteps: int, why: str) -> ValueError:
  return ValueError(f'sample.respacing={respacing!r} is invalid for T={num_timesteps} ({why}); {_RESPACING_HELP}')


@dataclasses.dataclass(frozen=True)
class DiffusersSpacing:
  """diffusers' `scheduler.set_timesteps(num_inference_steps)` under `timestep_spacing` (0.42 semantics):

    leading:  k * (T // N) + steps_offset, k = 0 .. N-1
    trailing: round(T, T - T/N, T - 2T/N, ... > 0) - 1
    linspace: round(linspace(0, T - 1, N))          (NumPy rounding: ties to even)

  steps_offset is used by 'leading' only (diffusers ignores it for the others). A respacing value for `sample`,
  `respace` and `space_timesteps`; hashable, so it can be a static argument.
  """
  timestep_spacing: str
  num_inference_steps: int
  steps_offset: int = 0


@dataclasses.dataclass(frozen=True)
class ExplicitTimesteps:
  """An explicit list of original timesteps in the order visited, strictly decreasing (diffusers'
  DDPMScheduler.set_timesteps(timesteps=[...])); the process steps from each to the next, the last to x_0."""
  timesteps: Tuple[int, ...]


Respacing = Union[str, Sequence[int], DiffusersSpacing, ExplicitTimesteps]


def config_respacing(sample_config: Any) -> Respacing:
  """The respacing a `config.sample` section asks for: `sample.timesteps` if given, else `sample.timestep_spacing`
  (with `num_inference_steps`, `steps_offset`) if set, else `sample.respacing`. Fields missing from a config
  recorded before they existed take their defaults (today's behaviour)."""
  timesteps = tuple(sample_config.get('timesteps', None) or ())
  if timesteps:
    return ExplicitTimesteps(tuple(int(t) for t in timesteps))
  spacing = sample_config.get('timestep_spacing', '')
  if spacing:
    return DiffusersSpacing(spacing, sample_config.get('num_inference_steps', 0),
                            sample_config.get('steps_offset', 0))
  return sample_config.respacing


# The `config.sample` fields that define the reverse process a sample comes from (recorded with results).
SAMPLER_FIELDS = ('method', 'respacing', 'timestep_spacing', 'num_inference_steps', 'steps_offset', 'timesteps',
                  'eta', 'clip_denoised', 'use_clipped_model_output', 'guidance_scale', 'class_label')


def sampler_settings(sample_config: Any) -> dict:
  """`SAMPLER_FIELDS` of a `config.sample` section (fields a recorded config predates are left out)."""
  return {k: sample_config[k] for k in SAMPLER_FIELDS if k in sample_config}


def num_sampling_steps(num_timesteps: int, sample_config: Any) -> int:
  """How many network evaluations (per sample, without guidance) the reverse chain of `sample_config` takes."""
  return len(space_timesteps(num_timesteps, config_respacing(sample_config)))


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def diffusers_timesteps(num_timesteps: int, spacing: DiffusersSpacing) -> List[int]:
  """The timesteps diffusers' `set_timesteps` gives for `spacing`, in the order visited (decreasing).

  Raises a one-line ValueError naming the config field for what diffusers cannot run (a timestep outside [0, T),
  which it would index out of range)."""
  kind, n, offset = spacing.timestep_spacing, spacing.num_inference_steps, spacing.steps_offset
  if kind not in TIMESTEP_SPACINGS[1:]:
    raise ValueError(f'sample.timestep_spacing={kind!r} is invalid; allowed values: '
                     f'{", ".join(repr(k) for k in TIMESTEP_SPACINGS)}')
  if not (_is_int(n) and 1 <= n <= num_timesteps):
    raise ValueError(f'sample.num_inference_steps={n!r} is invalid; allowed values: an integer in [1, {num_timesteps}]'
                     ' (diffusion.num_timesteps) when sample.timestep_spacing is set')
  if not (_is_int(offset) and offset >= 0):
    raise ValueError(f'sample.steps_offset={offset!r} is invalid; allowed values: an integer >= 0')
  if kind == 'leading':
    timesteps = (np.arange(n) * (num_timesteps // n))[::-1] + offset
  elif kind == 'trailing':
    timesteps = np.round(np.arange(num_timesteps, 0, -num_timesteps / n)).astype(np.int64) - 1
  else:
    timesteps = np.linspace(0, num_timesteps - 1, n).round()[::-1].astype(np.int64)
  timesteps = [int(t) for t in timesteps]
  if kind != 'leading' and (len(timesteps) != n or min(timesteps) < 0):
    # np.arange's float stride can give one element more, timestep -1, which diffusers indexes from the end.
    raise ValueError(f'sample.num_inference_steps={n!r} is invalid for timestep_spacing={kind!r} and T={num_timesteps}'
                     f' (diffusers would visit {len(timesteps)} timesteps, down to {min(timesteps)}); allowed values: '
                     'another number of steps, or an explicit sample.timesteps')
  if max(timesteps) >= num_timesteps:
    raise ValueError(f'sample.steps_offset={offset!r} is invalid for timestep_spacing={kind!r} with N={n} and '
                     f'T={num_timesteps} (gives timesteps {timesteps[:3]}...); allowed values: timesteps in '
                     f'[0, {num_timesteps}), i.e. steps_offset <= {num_timesteps - 1 - (n - 1) * (num_timesteps // n)}')
  return timesteps


def _explicit_timesteps(num_timesteps: int, spec: ExplicitTimesteps) -> List[int]:
  timesteps = list(spec.timesteps)
  ok = (len(timesteps) > 0 and all(_is_int(t) and 0 <= t < num_timesteps for t in timesteps)
        and all(a > b for a, b in zip(timesteps, timesteps[1:])))
  if not ok:
    raise ValueError(f'sample.timesteps={tuple(timesteps)!r} is invalid; allowed values: a non-empty, strictly '
                     f'decreasing tuple of integer timesteps in [0, {num_timesteps}), e.g. (999, 800, 600, 400, 200, '
                     '0)')
  return [int(t) for t in timesteps]


def space_timesteps(num_timesteps: int, respacing: Respacing) -> List[int]:
  """The sorted original timesteps kept by a respacing (improved-diffusion's space_timesteps semantics, or the
  timesteps of a `DiffusersSpacing` / `ExplicitTimesteps`).

  'ddimN': the timesteps 0, s, 2s, ... of the smallest stride s in 1..T-1 that gives exactly N of them. Otherwise
  comma-separated counts: the T steps are cut into len(counts) equal sections (the first T mod len(counts) one step
  longer) and count_i steps are taken from section i at evenly spaced, rounded fractional positions, including both
  ends of the section (positions are a running float sum of the stride, rounded, as the reference code). '250' on
  T = 1000 therefore keeps 0, 4, 8, 12, 16, ..., 995, 999 (stride 999 / 249).
  """
  spec = respacing
  if isinstance(spec, DiffusersSpacing):
    return sorted(diffusers_timesteps(num_timesteps, spec))
  if isinstance(spec, ExplicitTimesteps):
    return sorted(_explicit_timesteps(num_timesteps, spec))
  if isinstance(spec, str) and spec == '':
    return list(range(num_timesteps))
  if not isinstance(spec, (str, list, tuple)):
    raise _bad_respacing(respacing, num_timesteps, 'not a string, a sequence of counts, DiffusersSpacing or '
                         'ExplicitTimesteps')
  if isinstance(spec, str) and spec.startswith('ddim'):
    try:
      desired = int(spec[len('ddim'):])
    except ValueError:
      raise _bad_respacing(respacing, num_timesteps, 'not an integer after ddim') from None
    for stride in range(1, num_timesteps):  # as improved-diffusion: strides 1 .. T-1
      if len(range(0, num_timesteps, stride)) == desired:
        return list(range(0, num_timesteps, stride))
    raise _bad_respacing(respacing, num_timesteps, f'no integer stride gives exactly {desired} steps')
  if isinstance(spec, str):
    try:
      counts = [int(part) for part in spec.split(',')]
    except ValueError:
      raise _bad_respacing(respacing, num_timesteps, 'not comma-separated integers') from None
  else:
    if not all(_is_int(c) for c in spec):
      raise _bad_respacing(respacing, num_timesteps, 'a sequence must hold integer counts')
    counts = [int(c) for c in spec]
  if not counts or min(counts) < 1 or len(counts) > num_timesteps:
    raise _bad_respacing(respacing, num_timesteps, 'every count must be >= 1, at most one section per step')
  size_per, extra = divmod(num_timesteps, len(counts))
  start, kept = 0, []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if count > size:
      raise _bad_respacing(respacing, num_timesteps, f'cannot take {count} steps from a section of {size}')
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    position = 0.0
    for _ in range(count):
      kept.append(start + round(position))
      position += stride
    start += size
  return sorted(set(kept))


def respace(diffusion: Diffusion, respacing: Respacing) -> Diffusion:
  """The process that visits only the kept timesteps, with betas re-derived from the float64 alpha_bar:
  beta'_i = 1 - alpha_bar_{k_i} / alpha_bar_{k_{i-1}} (improved-diffusion's SpacedDiffusion), so the kept marginals
  q(x_{k_i} | x_0) are unchanged. Its `timestep_map` holds the ORIGINAL indices, which the network is called with.

  Works at trace time (everything used is static), so it may be called inside `jax.jit`.
  """
  if isinstance(respacing, str) and respacing == '':
    return diffusion
  kept = space_timesteps(diffusion.num_timesteps, respacing)
  alphas_cumprod = diffusion_lib.schedule_constants(np.asarray(diffusion.betas64))['alphas_cumprod']
  new_betas, last = [], 1.0
  for k in kept:
    new_betas.append(1.0 - alphas_cumprod[k] / last)
    last = alphas_cumprod[k]
  return diffusion_lib.make_diffusion(
      np.asarray(new_betas, dtype=np.float64), mean_type=diffusion.mean_type, var_type=diffusion.var_type,
      loss_type=diffusion.loss_type, hybrid_lambda=diffusion.hybrid_lambda, t_sampling=diffusion.t_sampling,
      dtype=diffusion.dtype, timestep_map=[diffusion.timestep_map[k] for k in kept])


def index_to_timestep(spaced: Diffusion, index: Any) -> Any:
  """The original timestep (what `model_fn` sees) of respaced step `index` (what the step functions take).

  `spaced` is a process from `respace`; works on ints, NumPy arrays and (traced) JAX arrays alike."""
  if isinstance(index, jax.Array):
    return jnp.asarray(spaced.timestep_map, jnp.int32)[index]
  timestep_map = np.asarray(spaced.timestep_map, np.int64)
  result = timestep_map[np.asarray(index)]
  return int(result) if np.ndim(result) == 0 else result


def timestep_to_index(spaced: Diffusion, timestep: Any) -> Any:
  """The respaced step index of original `timestep`, the inverse of `index_to_timestep`.

  Ints and NumPy arrays are checked: a timestep the respacing does not visit raises a one-line ValueError. JAX
  arrays (traced ones included) are mapped by a sorted search, exact for visited timesteps (any other maps to the
  index of the next visited timestep above it).
  """
  if isinstance(timestep, jax.Array):
    return jnp.searchsorted(jnp.asarray(spaced.timestep_map, jnp.int32), timestep).astype(jnp.int32)
  timestep_map = np.asarray(spaced.timestep_map, np.int64)
  values = np.asarray(timestep)
  index = np.searchsorted(timestep_map, values)
  visited = (index < len(timestep_map)) & (timestep_map[np.minimum(index, len(timestep_map) - 1)] == values)
  if not np.all(visited):
    missing = int(np.atleast_1d(values)[~np.atleast_1d(visited)][0])
    shown = ', '.join(str(t) for t in timestep_map[:4]) + (', ...' if len(timestep_map) > 4 else '')
    raise ValueError(f'timestep {missing} is not visited by this respacing; allowed values: its '
                     f'{len(timestep_map)} timesteps ({shown})')
  return int(index) if np.ndim(index) == 0 else index


class DDIMTargets(NamedTuple):
  """Per respaced step, the alpha_bar a DDIM step goes to, as the constants `ddim_step` uses (float64-derived)."""
  sqrt_alphas_cumprod_prev: Array  # sqrt(alpha_bar_prev)
  one_minus_alphas_cumprod_prev: Array  # 1 - alpha_bar_prev
  variance: Array  # sigma^2 / eta^2 = (1 - alpha_bar_prev) / (1 - alpha_bar_t) (1 - alpha_bar_t / alpha_bar_prev)


def ddim_targets(diffusion: Diffusion, spaced: Diffusion, respacing: Respacing) -> Optional[DDIMTargets]:
  """Where each DDIM step of `spaced` (= respace(diffusion, respacing)) goes, when that is not the next visited
  timestep: for a `DiffusersSpacing`, DDIMScheduler's t - T // N (alpha_bar = 1 below 0, `set_alpha_to_one`).
  None for every other respacing (the step goes to the next visited timestep, alpha_bar_{t-1} of `spaced`)."""
  if not isinstance(respacing, DiffusersSpacing):
    return None
  log_alphas_cumprod = np.cumsum(np.log1p(-np.asarray(diffusion.betas64, np.float64)))
  stride = diffusion.num_timesteps // respacing.num_inference_steps
  sqrt_prev, one_minus_prev, variance = [], [], []
  for t in spaced.timestep_map:
    prev = t - stride
    log_prev = log_alphas_cumprod[prev] if prev >= 0 else 0.0
    # 1 - alpha_bar as -expm1(log alpha_bar): no cancellation near t = 0 (as diffusion.schedule_constants).
    one_minus_t, one_minus_p = -np.expm1(log_alphas_cumprod[t]), -np.expm1(log_prev)
    sqrt_prev.append(np.exp(0.5 * log_prev))
    one_minus_prev.append(one_minus_p)
    variance.append(one_minus_p / one_minus_t * -np.expm1(log_alphas_cumprod[t] - log_prev))
  return DDIMTargets(*(jnp.asarray(np.asarray(v), spaced.dtype) for v in (sqrt_prev, one_minus_prev, variance)))


def _diffusers_last_step_std(spaced: Diffusion, respacing: Respacing) -> float:
  """Standard deviation of the noise diffusers' DDPMScheduler adds at the last step (0 when its timestep is 0):
  sqrt(beta'_0) for fixedlarge, sqrt(1e-20) for fixedsmall (its clamp of the zero posterior variance).
  Learned variances keep improved-diffusion's noiseless last step."""
  if not isinstance(respacing, (DiffusersSpacing, ExplicitTimesteps)) or spaced.timestep_map[0] == 0:
    return 0.0
  if spaced.var_type == 'fixedlarge':
    return float(np.sqrt(spaced.betas64[0]))
  if spaced.var_type == 'fixedsmall':
    return float(np.sqrt(_DIFFUSERS_MIN_VARIANCE))
  return 0.0


def _nonzero_mask(t: Array, x: Array) -> Array:
  # No noise is added at the last step (t = 0): its output is the mean, the decoder's most likely image.
  return (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def p_sample_step(diffusion: Diffusion, model_output: Array, x_t: Array, t: Array, noise: Array,
                  clip_denoised: bool = True) -> Tuple[Array, Array]:
  """One ancestral step x_{t-1} = mu_theta(x_t, t) + sigma_t z (Algorithm 2, eq. 11; z = 0 at t = 0).

  Returns (x_{t-1}, predicted x_0)."""
  out = diffusion_lib.p_mean_variance(diffusion, model_output, x_t, t, clip_denoised=clip_denoised)
  sample = out['mean'] + _nonzero_mask(t, x_t) * jnp.exp(0.5 * out['log_variance']) * noise
  return sample, out['pred_xstart']


def ddim_step(diffusion: Diffusion, model_output: Array, x_t: Array, t: Array, noise: Array, eta: Any = 0.0,
              clip_denoised: bool = True, use_clipped_model_output: bool = True,
              targets: Optional[DDIMTargets] = None) -> Tuple[Array, Array]:
  """One DDIM step (Song et al. 2021, eq. 12):

    x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_hat + sigma_t z,
    sigma_t = eta sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_{t-1})   (eq. 16)

  sigma_t^2 equals eta^2 beta~_t (eq. 7), which is what is computed (no 1 - alpha_bar_t / alpha_bar_{t-1}
  cancellation in float32); it is 0 at the last step (alpha_bar_{t-1} = 1). eta = 0 is deterministic; eta = 1 has
  the ancestral sampler's fixedsmall variance.

  Args:
    t: respaced step indices (B,); the network output was computed at their original timesteps.
    use_clipped_model_output: eps_hat re-derived from the clipped x0_hat (True: improved-diffusion, GLIDE, and
      diffusers' DDIMScheduler.step(use_clipped_model_output=True)) or the network's own eps (False: diffusers'
      DDIMPipeline default; for non-eps mean types, eps of the unclipped x0_hat). The same without clipping.
    targets: where the step goes, from `ddim_targets` (None: alpha_bar_{t-1}, the next visited timestep).

  Returns (x_{t-1}, predicted x_0)."""
  out = diffusion_lib.p_mean_variance(diffusion, model_output, x_t, t, clip_denoised=False)
  pred_xstart = out['pred_xstart']
  if use_clipped_model_output or not clip_denoised:
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    eps = diffusion_lib.predict_eps_from_xstart(diffusion, x_t, t, pred_xstart)
  else:
    if diffusion.mean_type == 'eps':  # the network's eps itself, as diffusers (no round trip through x_0)
      eps = diffusion_lib.split_model_output(diffusion, model_output, x_t.shape[-1])[0].astype(x_t.dtype)
    else:
      eps = diffusion_lib.predict_eps_from_xstart(diffusion, x_t, t, pred_xstart)
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
  if targets is None:
    sqrt_prev, one_minus_prev = diffusion.sqrt_alphas_cumprod_prev, diffusion.one_minus_alphas_cumprod_prev
    variance = diffusion.posterior_variance
  else:
    sqrt_prev, one_minus_prev, variance = targets
  sigma_sq = (eta ** 2) * extract(variance, t, x_t)
  direction = jnp.sqrt(jnp.maximum(extract(one_minus_prev, t, x_t) - sigma_sq, 0.0))
  mean = extract(sqrt_prev, t, x_t) * pred_xstart + direction * eps
  return mean + jnp.sqrt(sigma_sq) * noise, pred_xstart


def progress_steps(num_steps: int, num_progress: int) -> np.ndarray:
  """Loop iterations (0 = the first, at t = T-1) whose predicted x_0 is recorded: `num_progress` evenly spaced,
  the first and the last included."""
  if not 0 <= num_progress <= num_steps:
    raise ValueError(f'num_progress={num_progress!r} is invalid; allowed values: 0..{num_steps} (the number of '
                     'sampling steps)')
  return np.round(np.linspace(0, num_steps - 1, num_progress)).astype(np.int64)


def progress_timesteps(diffusion: Diffusion, respacing: Respacing, num_progress: int) -> np.ndarray:
  """Original timestep index of every recorded x_0 prediction of `sample(..., num_progress=k)` (for figures)."""
  spaced = respace(diffusion, respacing)
  steps = progress_steps(spaced.num_timesteps, num_progress)
  return index_to_timestep(spaced, spaced.num_timesteps - 1 - steps)


def _sample_loop(diffusion: Diffusion, model_fn: ModelFn, shape: Sequence[int], rng: Array,
                 step_fn: Callable[..., Tuple[Array, Array]], num_progress: int,
                 x_T: Optional[Array], noise: Optional[Array]) -> Tuple[Array, Optional[Array]]:
  """Runs step_fn from t = T-1 down to 0 in one lax.scan. Keys: x_T ~ N(0, I) from split(rng)[0] (unless x_T is
  given); the noise of loop iteration i from fold_in(split(rng)[1], i) (unless `noise` (T, *shape) is given:
  iteration i, at t = T-1-i, then uses noise[i])."""
  shape = tuple(shape)
  num_steps = diffusion.num_timesteps
  init_key, step_key = jax.random.split(rng)
  x = (jax.random.normal(init_key, shape, diffusion.dtype) if x_T is None
       else jnp.asarray(x_T, diffusion.dtype).reshape(shape))
  if noise is not None:
    noise = jnp.asarray(noise, diffusion.dtype)
    if noise.shape != (num_steps,) + shape:
      raise ValueError(f'noise has shape {noise.shape}; allowed values: {(num_steps,) + shape} (one draw per '
                       'sampling step, in the order the steps run)')
  slots = np.full((num_steps,), -1, np.int32)
  slots[progress_steps(num_steps, num_progress)] = np.arange(num_progress, dtype=np.int32)
  slots = jnp.asarray(slots)
  progress = jnp.zeros((num_progress,) + shape, diffusion.dtype) if num_progress else None

  def body(carry, i):
    x, progress = carry
    t = jnp.full((shape[0],), num_steps - 1 - i, jnp.int32)
    # The network always sees the ORIGINAL timestep (SpacedDiffusion's _WrappedModel).
    model_output = model_fn(x, index_to_timestep(diffusion, t))
    step_noise = (jax.random.normal(jax.random.fold_in(step_key, i), shape, diffusion.dtype) if noise is None
                  else noise[i])
    x, pred_xstart = step_fn(diffusion, model_output, x, t, step_noise)
    if progress is not None:
      slot = slots[i]
      safe_slot = jnp.maximum(slot, 0)
      value = jnp.where(slot >= 0, pred_xstart, progress[safe_slot])
      progress = jax.lax.dynamic_update_index_in_dim(progress, value, safe_slot, 0)
    return (x, progress), None

  (x, progress), _ = jax.lax.scan(body, (x, progress), jnp.arange(num_steps, dtype=jnp.int32))
  return x, progress


def p_sample_loop(diffusion: Diffusion, model_fn: ModelFn, shape: Sequence[int], rng: Array,
                  clip_denoised: bool = True, num_progress: int = 0, x_T: Optional[Array] = None,
                  noise: Optional[Array] = None, last_step_std: float = 0.0):
  """Ancestral sampling (Algorithm 2) over all steps of `diffusion` (respace it first for fewer steps).

  `noise`: optional per-step noise (T, *shape), noise[i] for the i-th step run. `last_step_std`: noise scale of the
  last step, which Algorithm 2 leaves noiseless (z = 0 at t = 1); diffusers' DDPMScheduler does not when that step's
  original timestep is not 0 (see `sample`).

  Returns x_0, or (x_0, progress) with progress (num_progress, *shape) the predicted x_0 at evenly spaced steps
  (first: t = T-1, last: t = 0) when num_progress > 0."""
  def step_fn(diffusion, model_output, x, t, step_noise):
    x, pred_xstart = p_sample_step(diffusion, model_output, x, t, step_noise, clip_denoised=clip_denoised)
    if last_step_std:
      x = x + (1.0 - _nonzero_mask(t, x)) * last_step_std * step_noise
    return x, pred_xstart
  x, progress = _sample_loop(diffusion, model_fn, shape, rng, step_fn, num_progress, x_T, noise)
  return (x, progress) if num_progress else x


def ddim_sample_loop(diffusion: Diffusion, model_fn: ModelFn, shape: Sequence[int], rng: Array, eta: Any = 0.0,
                     clip_denoised: bool = True, num_progress: int = 0, x_T: Optional[Array] = None,
                     noise: Optional[Array] = None, use_clipped_model_output: bool = True,
                     targets: Optional[DDIMTargets] = None):
  """DDIM sampling (Song et al. 2021, eq. 12) over all steps of `diffusion`; returns as `p_sample_loop`.
  `use_clipped_model_output`, `targets`: see `ddim_step`."""
  step_fn = functools.partial(ddim_step, eta=eta, clip_denoised=clip_denoised,
                              use_clipped_model_output=use_clipped_model_output, targets=targets)
  x, progress = _sample_loop(diffusion, model_fn, shape, rng, step_fn, num_progress, x_T, noise)
  return (x, progress) if num_progress else x


def sample(diffusion: Diffusion, model_fn: ModelFn, shape: Sequence[int], rng: Array, method: str = 'ancestral',
           respacing: Respacing = '', eta: Any = 0.0, clip_denoised: bool = True, num_progress: int = 0,
           x_T: Optional[Array] = None, use_clipped_model_output: bool = True, noise: Optional[Array] = None):
  """Samples x_0 ~ p_theta with `method` ('ancestral' | 'ddim') over the steps kept by `respacing`.

  Args:
    model_fn: model_fn(x_t, t) -> network output; t holds original timestep indices, (B,) int32.
    shape: (B, H, W, C) of the samples (static under jit).
    rng: PRNG key.
    method, clip_denoised, num_progress: static settings (see the module docstring).
    respacing: which timesteps to visit: an improved-diffusion string or sequence of section counts
      (`space_timesteps`), a `DiffusersSpacing` (diffusers' conventions, module docstring) or `ExplicitTimesteps`;
      `config_respacing` gives the one a config asks for.
    eta: DDIM's eta (ignored by ancestral sampling); may be traced.
    x_T: optional starting noise of `shape` (default: drawn from rng).
    use_clipped_model_output: DDIM only; see `ddim_step` (True keeps improved-diffusion's numbers).
    noise: optional per-step noise (num_steps, *shape), noise[i] for the i-th step run (default: drawn from rng),
      e.g. to reproduce another implementation's chain.

  Returns:
    x_0 of `shape`, or (x_0, progress (num_progress, *shape)) when num_progress > 0.
  """
  if method not in METHODS:
    raise ValueError(f'sample.method={method!r} is invalid; allowed values: {", ".join(METHODS)}')
  if isinstance(respacing, list):
    respacing = tuple(respacing)
  if isinstance(eta, (int, float)) and eta < 0:
    raise ValueError(f'sample.eta={eta!r} is invalid; allowed values: eta >= 0')
  space_timesteps(diffusion.num_timesteps, respacing)  # a bad respacing: one line naming the field
  spaced = respace(diffusion, respacing)
  if method == 'ancestral':
    return p_sample_loop(spaced, model_fn, shape, rng, clip_denoised, num_progress, x_T, noise,
                         last_step_std=_diffusers_last_step_std(spaced, respacing))
  return ddim_sample_loop(spaced, model_fn, shape, rng, eta, clip_denoised, num_progress, x_T, noise,
                          use_clipped_model_output, ddim_targets(diffusion, spaced, respacing))


def classifier_free_guidance(model_fn_xty: Callable[[Array, Array, Array], Array], labels: Array,
                             null_label: int, guidance_scale: Any) -> ModelFn:
  """A model_fn(x_t, t) giving eps~ = (1 + w) eps(x_t, y) - w eps(x_t, null) (Ho & Salimans 2022, eq. 6).

  The conditional and unconditional halves are ONE batched network call of size 2B per step. For learned-variance
  outputs (2C channels) only the first C (eps) channels are guided; the variance channels are the conditional ones.

  Args:
    model_fn_xty: model_fn_xty(x_t, t, y) -> network output, y (B,) int labels (null_label = no label).
    labels: (B,) int class labels.
    null_label: the label of the unconditional model (num_classes in this code base).
    guidance_scale: w (0 = the conditional model); may be traced.
  """

  def guided(x_t: Array, t: Array) -> Array:
    batch, channels = x_t.shape[0], x_t.shape[-1]
    y = jnp.asarray(labels, jnp.int32)
    output = model_fn_xty(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                          jnp.concatenate([y, jnp.full_like(y, null_label)]))
    conditional, unconditional = output[:batch], output[batch:]
    eps = (1.0 + guidance_scale) * conditional[..., :channels] - guidance_scale * unconditional[..., :channels]
    if output.shape[-1] == 2 * channels:
      return jnp.concatenate([eps, conditional[..., channels:]], axis=-1)
    return eps

  return guided
