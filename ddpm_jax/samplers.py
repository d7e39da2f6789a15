"""Samplers of the reverse process, each ONE compiled loop (`lax.scan`): ancestral (Ho et al. 2020, Algorithm 2),
DDIM (Song et al. 2021, eq. 12), timestep respacing (Nichol & Dhariwal 2021, Sec. 4; improved-diffusion's
space_timesteps / SpacedDiffusion) and classifier-free guidance (Ho & Salimans 2022).

A sampler takes any `model_fn(x_t, t) -> output` and is meant to run under `jax.jit` with `shape`, `method`,
`respacing`, `clip_denoised` and `num_progress` static, e.g.

  @functools.partial(jax.jit, static_argnames=('shape',))
  def generate(params, rng, shape):
    return samplers.sample(diffusion, lambda x, t: model.apply({'params': params}, x, t), shape, rng)

The loop over timesteps is traced once (the network once), so one call is one device program: no per-step host
round trip, and new parameters or keys of the same shapes reuse the compiled program.
"""

import functools
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax.diffusion import Diffusion, extract

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

METHODS = ('ancestral', 'ddim')
_RESPACING_HELP = ("allowed values: '' (all steps), 'N' (N evenly spaced steps), 'ddimN' (DDIM's integer stride "
                   "giving exactly N steps), 'N1,N2,...' (N_i steps from the i-th of equal sections)")


def _bad_respacing(respacing: Any, num_timesteps: int, why: str) -> ValueError:
  return ValueError(f'sample.respacing={respacing!r} is invalid for T={num_timesteps} ({why}); {_RESPACING_HELP}')


def space_timesteps(num_timesteps: int, respacing: Union[str, Sequence[int]]) -> List[int]:
  """The sorted original timesteps kept by a respacing (improved-diffusion's space_timesteps semantics).

  'ddimN': the timesteps 0, s, 2s, ... of the smallest stride s in 1..T-1 that gives exactly N of them. Otherwise
  comma-separated counts: the T steps are cut into len(counts) equal sections (the first T mod len(counts) one step
  longer) and count_i steps are taken from section i at evenly spaced, rounded fractional positions, including both
  ends of the section (positions are a running float sum of the stride, rounded, as the reference code). '250' on
  T = 1000 therefore keeps 0, 4, 8, 12, 16, ..., 995, 999 (stride 999 / 249).
  """
  spec = respacing
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


def respace(diffusion: Diffusion, respacing: Union[str, Sequence[int]]) -> Diffusion:
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
              clip_denoised: bool = True) -> Tuple[Array, Array]:
  """One DDIM step (Song et al. 2021, eq. 12):

    x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_hat + sigma_t z,
    sigma_t = eta sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_{t-1})   (eq. 16)

  sigma_t^2 equals eta^2 beta~_t (eq. 7), which is what is computed (no 1 - alpha_bar_t / alpha_bar_{t-1}
  cancellation in float32). eps_hat is re-derived from the (possibly clipped) x0_hat, as improved-diffusion, so
  every mean type works. eta = 0 is deterministic; eta = 1 has the ancestral sampler's fixedsmall variance.

  Returns (x_{t-1}, predicted x_0)."""
  out = diffusion_lib.p_mean_variance(diffusion, model_output, x_t, t, clip_denoised=clip_denoised)
  pred_xstart = out['pred_xstart']
  eps = diffusion_lib.predict_eps_from_xstart(diffusion, x_t, t, pred_xstart)
  sigma_sq = (eta ** 2) * extract(diffusion.posterior_variance, t, x_t)
  direction = jnp.sqrt(jnp.maximum(extract(diffusion.one_minus_alphas_cumprod_prev, t, x_t) - sigma_sq, 0.0))
  mean = extract(diffusion.sqrt_alphas_cumprod_prev, t, x_t) * pred_xstart + direction * eps
  return mean + _nonzero_mask(t, x_t) * jnp.sqrt(sigma_sq) * noise, pred_xstart


def progress_steps(num_steps: int, num_progress: int) -> np.ndarray:
  """Loop iterations (0 = the first, at t = T-1) whose predicted x_0 is recorded: `num_progress` evenly spaced,
  the first and the last included."""
  if not 0 <= num_progress <= num_steps:
    raise ValueError(f'num_progress={num_progress!r} is invalid; allowed values: 0..{num_steps} (the number of '
                     'sampling steps)')
  return np.round(np.linspace(0, num_steps - 1, num_progress)).astype(np.int64)


def progress_timesteps(diffusion: Diffusion, respacing: str, num_progress: int) -> np.ndarray:
  """Original timestep index of every recorded x_0 prediction of `sample(..., num_progress=k)` (for figures)."""
  spaced = respace(diffusion, respacing)
  steps = progress_steps(spaced.num_timesteps, num_progress)
  return np.asarray(spaced.timestep_map)[spaced.num_timesteps - 1 - steps]


def _sample_loop(diffusion: Diffusion, model_fn: ModelFn, shape: Sequence[int], rng: Array,
                 step_fn: Callable[..., Tuple[Array, Array]], num_progress: int,
                 x_T: Optional[Array]) -> Tuple[Array, Optional[Array]]:
  """Runs step_fn from t = T-1 down to 0 in one lax.scan. Keys: x_T ~ N(0, I) from split(rng)[0] (unless x_T is
  given); the noise of loop iteration i from fold_in(split(rng)[1], i)."""
  shape = tuple(shape)
  num_steps = diffusion.num_timesteps
  init_key, step_key = jax.random.split(rng)
  x = (jax.random.normal(init_key, shape, diffusion.dtype) if x_T is None
       else jnp.asarray(x_T, diffusion.dtype).reshape(shape))
  timestep_map = jnp.asarray(diffusion.timestep_map, jnp.int32)
  slots = np.full((num_steps,), -1, np.int32)
  slots[progress_steps(num_steps, num_progress)] = np.arange(num_progress, dtype=np.int32)
  slots = jnp.asarray(slots)
  progress = jnp.zeros((num_progress,) + shape, diffusion.dtype) if num_progress else None

  def body(carry, i):
    x, progress = carry
    t_index = num_steps - 1 - i
    t = jnp.full((shape[0],), t_index, jnp.int32)
    # The network always sees the ORIGINAL timestep (SpacedDiffusion's _WrappedModel).
    model_output = model_fn(x, jnp.full((shape[0],), timestep_map[t_index], jnp.int32))
    noise = jax.random.normal(jax.random.fold_in(step_key, i), shape, diffusion.dtype)
    x, pred_xstart = step_fn(diffusion, model_output, x, t, noise)
    if progress is not None:
      slot = slots[i]
      safe_slot = jnp.maximum(slot, 0)
      value = jnp.where(slot >= 0, pred_xstart, progress[safe_slot])
      progress = jax.lax.dynamic_update_index_in_dim(progress, value, safe_slot, 0)
    return (x, progress), None

  (x, progress), _ = jax.lax.scan(body, (x, progress), jnp.arange(num_steps, dtype=jnp.int32))
  return x, progress


def p_sample_loop(diffusion: Diffusion, model_fn: ModelFn, shape: Sequence[int], rng: Array,
                  clip_denoised: bool = True, num_progress: int = 0, x_T: Optional[Array] = None):
  """Ancestral sampling (Algorithm 2) over all steps of `diffusion` (respace it first for fewer steps).

  Returns x_0, or (x_0, progress) with progress (num_progress, *shape) the predicted x_0 at evenly spaced steps
  (first: t = T-1, last: t = 0) when num_progress > 0."""
  step_fn = functools.partial(p_sample_step, clip_denoised=clip_denoised)
  x, progress = _sample_loop(diffusion, model_fn, shape, rng, step_fn, num_progress, x_T)
  return (x, progress) if num_progress else x


def ddim_sample_loop(diffusion: Diffusion, model_fn: ModelFn, shape: Sequence[int], rng: Array, eta: Any = 0.0,
                     clip_denoised: bool = True, num_progress: int = 0, x_T: Optional[Array] = None):
  """DDIM sampling (Song et al. 2021, eq. 12) over all steps of `diffusion`; returns as `p_sample_loop`."""
  step_fn = functools.partial(ddim_step, eta=eta, clip_denoised=clip_denoised)
  x, progress = _sample_loop(diffusion, model_fn, shape, rng, step_fn, num_progress, x_T)
  return (x, progress) if num_progress else x


def sample(diffusion: Diffusion, model_fn: ModelFn, shape: Sequence[int], rng: Array, method: str = 'ancestral',
           respacing: str = '', eta: Any = 0.0, clip_denoised: bool = True, num_progress: int = 0,
           x_T: Optional[Array] = None):
  """Samples x_0 ~ p_theta with `method` ('ancestral' | 'ddim') over the steps kept by `respacing`.

  Args:
    model_fn: model_fn(x_t, t) -> network output; t holds original timestep indices, (B,) int32.
    shape: (B, H, W, C) of the samples (static under jit).
    rng: PRNG key.
    method, respacing, clip_denoised, num_progress: static settings (see module docstring and `space_timesteps`).
    eta: DDIM's eta (ignored by ancestral sampling); may be traced.
    x_T: optional starting noise of `shape` (default: drawn from rng).

  Returns:
    x_0 of `shape`, or (x_0, progress (num_progress, *shape)) when num_progress > 0.
  """
  if method not in METHODS:
    raise ValueError(f'sample.method={method!r} is invalid; allowed values: {", ".join(METHODS)}')
  if not isinstance(respacing, str):
    raise _bad_respacing(respacing, diffusion.num_timesteps, 'not a string')
  if isinstance(eta, (int, float)) and eta < 0:
    raise ValueError(f'sample.eta={eta!r} is invalid; allowed values: eta >= 0')
  spaced = respace(diffusion, respacing)
  if method == 'ancestral':
    return p_sample_loop(spaced, model_fn, shape, rng, clip_denoised, num_progress, x_T)
  return ddim_sample_loop(spaced, model_fn, shape, rng, eta, clip_denoised, num_progress, x_T)


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
