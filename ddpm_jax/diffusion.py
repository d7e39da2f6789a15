"""The Gaussian diffusion process of Ho et al. 2020: schedule constants, forward process, posterior, p(x_{t-1}|x_t).

Notation (0-based indices, as the released code): index t in [0, T) is the paper's step t + 1, so `t = 0` is the
first noising step and the decoder step of the reverse process. alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t}
alpha_s (eq. 4), alpha_bar_prev_t = alpha_bar_{t-1} with alpha_bar_prev_0 = 1.

`Diffusion` is a pytree: its arrays are the schedule constants, derived in float64 and cast ONCE (float32 by
default), and its static fields (mean/variance/loss types, the float64 betas, the timestep map of a respaced
process) are pytree aux data, so a `Diffusion` can be passed into `jax.jit` and only a change of settings retraces.
Every function here is pure and works on batches: x of shape (B, ...) and integer t of shape (B,).
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import schedules

MEAN_TYPES = ('eps', 'xstart', 'xprev', 'v')
VAR_TYPES = ('fixedlarge', 'fixedsmall', 'learned', 'learned_range')
LOSS_TYPES = ('mse', 'kl', 'hybrid', 'rescaled_mse', 'rescaled_kl', 'l1', 'huber')
T_SAMPLINGS = ('uniform', 'importance')
LEARNED_VAR_TYPES = ('learned', 'learned_range')
# The losses with the bound's terms: the only ones that train a learned variance (L_simple has no variance term).
BOUND_LOSS_TYPES = ('kl', 'hybrid', 'rescaled_kl')

Array = jax.Array


def learns_variance(var_type: str) -> bool:
  """Whether `var_type` has the network output the variance as well as the mean (2C channels)."""
  return var_type in LEARNED_VAR_TYPES


def _static(**kwargs):
  return flax.struct.field(pytree_node=False, **kwargs)


@flax.struct.dataclass
class Diffusion:
  """Schedule constants (arrays of shape (T,)) and static settings of a diffusion process.

  Build with `make_diffusion` or `from_config`; never by hand (the constants must agree with `betas64`).
  """
  betas: Array
  log_betas: Array
  alphas_cumprod: Array  # alpha_bar_t, eq. 4
  alphas_cumprod_prev: Array  # alpha_bar_{t-1}, 1 at t = 0
  sqrt_alphas_cumprod: Array
  sqrt_alphas_cumprod_prev: Array
  one_minus_alphas_cumprod: Array  # variance of q(x_t | x_0), eq. 4
  one_minus_alphas_cumprod_prev: Array
  sqrt_one_minus_alphas_cumprod: Array
  log_one_minus_alphas_cumprod: Array
  sqrt_recip_alphas_cumprod: Array  # 1 / sqrt(alpha_bar_t), eq. 11 / 15
  sqrt_recipm1_alphas_cumprod: Array  # sqrt(1 / alpha_bar_t - 1)
  posterior_variance: Array  # beta~_t, eq. 7 (0 at t = 0)
  posterior_log_variance_clipped: Array  # log beta~_t with beta~_1 at t = 0 (log 0 would be -inf)
  posterior_mean_coef1: Array  # coefficient of x_0 in mu~_t, eq. 7
  posterior_mean_coef2: Array  # coefficient of x_t in mu~_t, eq. 7
  fixedlarge_log_variance: Array  # log beta_t, with beta~_1 at t = 0 for a better decoder likelihood
  xprev_recip_coef1: Array  # 1 / coef1: x_0 from x_{t-1} prediction
  xprev_coef2_over_coef1: Array  # coef2 / coef1
  num_timesteps: int = _static()
  mean_type: str = _static(default='eps')
  var_type: str = _static(default='fixedlarge')
  loss_type: str = _static(default='mse')
  hybrid_lambda: float = _static(default=0.001)
  t_sampling: str = _static(default='uniform')
  # float64 betas (for respacing, which re-derives betas from the float64 alpha_bar) and, for a respaced process,
  # the original timestep index of every step (the network is always called with original indices).
  betas64: Tuple[float, ...] = _static(default=(), repr=False)
  timestep_map: Tuple[int, ...] = _static(default=(), repr=False)

  @property
  def learns_variance(self) -> bool:
    """True when the network outputs 2C channels: C for the mean, C for the variance (Nichol & Dhariwal 2021)."""
    return learns_variance(self.var_type)

  @property
  def dtype(self):
    return self.betas.dtype


def _check_choice(field: str, value: Any, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(f'{field}={value!r} is invalid; allowed values: {", ".join(allowed)}')


def schedule_constants(betas: np.ndarray) -> Dict[str, np.ndarray]:
  """All derived schedule constants in float64 (Ho et al. 2020, eqs. 4, 6, 7, 11).

  1 - alpha_bar is computed as -expm1(sum log(1 - beta)), not 1 - prod(1 - beta), which would lose ~12 digits at
  t = 0 where alpha_bar = 1 - 1e-4.
  """
  betas = np.asarray(betas, dtype=np.float64)
  num_timesteps = betas.shape[0]
  log_alphas_cumprod = np.cumsum(np.log1p(-betas))
  alphas_cumprod = np.exp(log_alphas_cumprod)
  one_minus_alphas_cumprod = -np.expm1(log_alphas_cumprod)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  one_minus_alphas_cumprod_prev = np.append(0.0, one_minus_alphas_cumprod[:-1])
  posterior_variance = betas * one_minus_alphas_cumprod_prev / one_minus_alphas_cumprod
  # beta~ at t = 0 is exactly 0 (x_0 is known given x_1); substitute beta~ of the next step so that the log and the
  # KL of eq. 5 stay finite (diffusion_utils_2.posterior_log_variance_clipped). With T = 1 there is no next step.
  first_variance = posterior_variance[1] if num_timesteps > 1 else betas[0]
  posterior_log_variance_clipped = np.log(np.append(first_variance, posterior_variance[1:]))
  coef1 = betas * np.sqrt(alphas_cumprod_prev) / one_minus_alphas_cumprod
  coef2 = one_minus_alphas_cumprod_prev * np.sqrt(1.0 - betas) / one_minus_alphas_cumprod
  return dict(
      betas=betas,
      log_betas=np.log(betas),
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_alphas_cumprod_prev=np.sqrt(alphas_cumprod_prev),
      one_minus_alphas_cumprod=one_minus_alphas_cumprod,
      one_minus_alphas_cumprod_prev=one_minus_alphas_cumprod_prev,
      sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus_alphas_cumprod),
      log_one_minus_alphas_cumprod=np.log(one_minus_alphas_cumprod),
      sqrt_recip_alphas_cumprod=np.exp(-0.5 * log_alphas_cumprod),
      sqrt_recipm1_alphas_cumprod=np.sqrt(one_minus_alphas_cumprod / alphas_cumprod),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=posterior_log_variance_clipped,
      posterior_mean_coef1=coef1,
      posterior_mean_coef2=coef2,
      fixedlarge_log_variance=np.log(np.append(first_variance, betas[1:])),
      xprev_recip_coef1=1.0 / coef1,
      xprev_coef2_over_coef1=coef2 / coef1,
  )


def make_diffusion(betas: np.ndarray, *, mean_type: str = 'eps', var_type: str = 'fixedlarge',
                   loss_type: str = 'mse', hybrid_lambda: float = 0.001, t_sampling: str = 'uniform',
                   dtype: Any = jnp.float32, timestep_map: Optional[Sequence[int]] = None) -> Diffusion:
  """Builds a `Diffusion` from float64 betas: constants derived in float64, then cast once to `dtype`.

  Args:
    betas: (T,) betas in (0, 1), e.g. from `schedules.get_betas`.
    mean_type: what the network predicts: eps (eq. 11), xstart (x_0), xprev (mu~, the posterior mean), v
      (alpha-weighted velocity sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0).
    var_type: fixedlarge (beta_t), fixedsmall (beta~_t), learned (network outputs log-variance), learned_range
      (network outputs v in [-1, 1], log-variance = v' log beta_t + (1 - v') log beta~_t with v' = (v + 1) / 2;
      Nichol & Dhariwal 2021, Sec. 3.1).
    loss_type, hybrid_lambda, t_sampling: see `ddpm_jax.losses`.
    dtype: float32 (default) or float64 (requires `jax.enable_x64`).
    timestep_map: original timestep index of every step (respaced processes); identity by default.

  Raises:
    ValueError: an invalid setting, with one line naming the field and the allowed values.
  """
  _check_choice('diffusion.mean_type', mean_type, MEAN_TYPES)
  _check_choice('diffusion.var_type', var_type, VAR_TYPES)
  _check_choice('diffusion.loss_type', loss_type, LOSS_TYPES)
  _check_choice('diffusion.t_sampling', t_sampling, T_SAMPLINGS)
  if not (isinstance(hybrid_lambda, (int, float)) and hybrid_lambda >= 0):
    raise ValueError(f'diffusion.hybrid_lambda={hybrid_lambda!r} is invalid; allowed values: a float >= 0')
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
    raise ValueError(f'dtype={dtype} is invalid; allowed values: float32, float64')
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError('dtype=float64 is invalid without 64-bit mode; allowed values: float32, or float64 inside '
                     'jax.enable_x64(True)')
  betas = np.asarray(betas, dtype=np.float64)
  schedules.check_betas(betas)
  num_timesteps = int(betas.shape[0])
  if timestep_map is None:
    timestep_map = range(num_timesteps)
  timestep_map = tuple(int(i) for i in timestep_map)
  if len(timestep_map) != num_timesteps:
    raise ValueError(f'timestep_map has {len(timestep_map)} entries; allowed values: one per beta ({num_timesteps})')
  arrays = {k: jnp.asarray(v, dtype=dtype) for k, v in schedule_constants(betas).items()}
  return Diffusion(**arrays, num_timesteps=num_timesteps, mean_type=mean_type, var_type=var_type,
                   loss_type=loss_type, hybrid_lambda=float(hybrid_lambda), t_sampling=t_sampling,
                   betas64=tuple(float(b) for b in betas), timestep_map=timestep_map)


def from_config(config: Any, dtype: Any = jnp.float32) -> Diffusion:
  """The `Diffusion` described by the `config.diffusion` section (see ddpm_jax/default_config.py)."""
  betas = schedules.get_betas(config.schedule, config.num_timesteps, beta_start=config.beta_start,
                              beta_end=config.beta_end)
  return make_diffusion(betas, mean_type=config.mean_type, var_type=config.var_type, loss_type=config.loss_type,
                        hybrid_lambda=config.hybrid_lambda, t_sampling=config.t_sampling, dtype=dtype)


def extract(constants: Array, t: Array, x: Array) -> Array:
  """constants[t] reshaped to (B, 1, ..., 1) so that it broadcasts against x of shape (B, ...)."""
  values = jnp.take(constants, t, axis=0)
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def mean_flat(x: Array) -> Array:
  """Mean over all non-batch dimensions: (B, ...) -> (B,)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------- forward process


def q_mean_variance(diffusion: Diffusion, x_start: Array, t: Array) -> Tuple[Array, Array, Array]:
  """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (eq. 4)."""
  mean = extract(diffusion.sqrt_alphas_cumprod, t, x_start) * x_start
  variance = extract(diffusion.one_minus_alphas_cumprod, t, x_start)
  log_variance = extract(diffusion.log_one_minus_alphas_cumprod, t, x_start)
  return mean, variance, log_variance


def q_sample(diffusion: Diffusion, x_start: Array, t: Array, noise: Array) -> Array:
  """A sample of q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 4, the reparametrisation of
  Algorithm 1)."""
  return (extract(diffusion.sqrt_alphas_cumprod, t, x_start) * x_start
          + extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)


def q_posterior_mean_variance(diffusion: Diffusion, x_start: Array, x_t: Array,
                              t: Array) -> Tuple[Array, Array, Array]:
  """Mean mu~_t(x_t, x_0), variance beta~_t and clipped log-variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
  mean = (extract(diffusion.posterior_mean_coef1, t, x_t) * x_start
          + extract(diffusion.posterior_mean_coef2, t, x_t) * x_t)
  variance = extract(diffusion.posterior_variance, t, x_t)
  log_variance = extract(diffusion.posterior_log_variance_clipped, t, x_t)
  return mean, variance, log_variance


# ------------------------------------------------------------------------- conversions between parametrisations


def predict_xstart_from_eps(diffusion: Diffusion, x_t: Array, t: Array, eps: Array) -> Array:
  """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (eq. 4 solved for x_0; eq. 15)."""
  return (extract(diffusion.sqrt_recip_alphas_cumprod, t, x_t) * x_t
          - extract(diffusion.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


def predict_eps_from_xstart(diffusion: Diffusion, x_t: Array, t: Array, pred_xstart: Array) -> Array:
  """eps = (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1 / alpha_bar_t - 1), the inverse of `predict_xstart_from_eps`."""
  return ((extract(diffusion.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
          / extract(diffusion.sqrt_recipm1_alphas_cumprod, t, x_t))


def predict_xstart_from_xprev(diffusion: Diffusion, x_t: Array, t: Array, xprev: Array) -> Array:
  """x_0 from the posterior mean mu~_t = coef1 x_0 + coef2 x_t (eq. 7): x_0 = (mu~_t - coef2 x_t) / coef1."""
  return (extract(diffusion.xprev_recip_coef1, t, x_t) * xprev
          - extract(diffusion.xprev_coef2_over_coef1, t, x_t) * x_t)


def predict_xstart_from_v(diffusion: Diffusion, x_t: Array, t: Array, v: Array) -> Array:
  """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v for v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
  (Salimans & Ho 2022, the v-parametrisation; follows from eq. 4)."""
  return (extract(diffusion.sqrt_alphas_cumprod, t, x_t) * x_t
          - extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_t) * v)


def velocity(diffusion: Diffusion, x_start: Array, t: Array, noise: Array) -> Array:
  """The v-target sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 of the `v` mean type."""
  return (extract(diffusion.sqrt_alphas_cumprod, t, x_start) * noise
          - extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start)


# --------------------------------------------------------------------------------------------- reverse process


def split_model_output(diffusion: Diffusion, model_output: Array, num_channels: int) -> Tuple[Array, Optional[Array]]:
  """(mean part, variance part or None): learned variance types output 2C channels, the first C the mean part."""
  expected = 2 * num_channels if diffusion.learns_variance else num_channels
  if model_output.shape[-1] != expected:
    raise ValueError(f'model output has {model_output.shape[-1]} channels; allowed values: {expected} for '
                     f'var_type={diffusion.var_type!r} with {num_channels}-channel images')
  if diffusion.learns_variance:
    return model_output[..., :num_channels], model_output[..., num_channels:]
  return model_output, None


def p_mean_variance(diffusion: Diffusion, model_output: Array, x_t: Array, t: Array,
                    clip_denoised: bool = False) -> Dict[str, Array]:
  """Mean and variance of the reverse step p_theta(x_{t-1} | x_t) = N(mu_theta, Sigma_theta) (eqs. 1, 11, 12).

  Args:
    model_output: the network output at (x_t, t), shape of x_t, or 2C channels for learned variances.
    x_t: (B, ..., C) noisy images.
    t: (B,) int timestep indices.
    clip_denoised: clip the predicted x_0 to [-1, 1] before forming the mean (the data range).

  Returns:
    dict with 'mean', 'variance', 'log_variance' (all x_t's shape) and 'pred_xstart'.
  """
  dtype = diffusion.dtype
  x_t = x_t.astype(dtype)
  mean_output, var_output = split_model_output(diffusion, model_output.astype(dtype), x_t.shape[-1])

  if diffusion.var_type == 'learned':
    log_variance = var_output
  elif diffusion.var_type == 'learned_range':
    # Nichol & Dhariwal 2021, Sec. 3.1: interpolate in log space between beta~_t (min) and beta_t (max).
    frac = (var_output + 1.0) / 2.0
    log_variance = (frac * extract(diffusion.log_betas, t, x_t)
                    + (1.0 - frac) * extract(diffusion.posterior_log_variance_clipped, t, x_t))
  elif diffusion.var_type == 'fixedlarge':
    log_variance = jnp.broadcast_to(extract(diffusion.fixedlarge_log_variance, t, x_t), x_t.shape)
  else:  # fixedsmall
    log_variance = jnp.broadcast_to(extract(diffusion.posterior_log_variance_clipped, t, x_t), x_t.shape)

  def maybe_clip(x):
    return jnp.clip(x, -1.0, 1.0) if clip_denoised else x

  if diffusion.mean_type == 'xprev':
    pred_xstart = maybe_clip(predict_xstart_from_xprev(diffusion, x_t, t, mean_output))
    mean = mean_output
  else:
    if diffusion.mean_type == 'eps':
      pred_xstart = predict_xstart_from_eps(diffusion, x_t, t, mean_output)
    elif diffusion.mean_type == 'xstart':
      pred_xstart = mean_output
    else:  # v
      pred_xstart = predict_xstart_from_v(diffusion, x_t, t, mean_output)
    pred_xstart = maybe_clip(pred_xstart)
    mean, _, _ = q_posterior_mean_variance(diffusion, pred_xstart, x_t, t)
  return dict(mean=mean, variance=jnp.exp(log_variance), log_variance=log_variance, pred_xstart=pred_xstart)
