"""Variance (beta) schedules of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

Ho et al. 2020, eq. 2: the forward process adds Gaussian noise with variances beta_1 < ... < beta_T. The paper uses
the `linear` schedule (1e-4 -> 0.02, T = 1000, App. B); `quad`, `const`, `jsd`, `warmup10` and `warmup50` are the
other schedules of the released code (diffusion_utils_2.get_beta_schedule); `cosine` is Nichol & Dhariwal 2021,
Sec. 3.2: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2) with s = 0.008 and every beta clipped at 0.999.

Every schedule is computed in float64 (the derived constants of `ddpm_jax.diffusion` divide by 1 - alpha_bar_t,
which is ~1e-4 at t = 1) and returned as a NumPy array; casting happens once, in `diffusion.make_diffusion`.
"""

import math
from typing import Callable

import numpy as np

SCHEDULES = ('linear', 'quad', 'const', 'jsd', 'warmup10', 'warmup50', 'cosine')

# Nichol & Dhariwal 2021 (Sec. 3.2): the offset s keeps beta_1 from being vanishingly small, and clipping at 0.999
# prevents the singularity at t = T, where alpha_bar reaches 0.
COSINE_S = 0.008
MAX_BETA = 0.999


def _warmup_betas(beta_start: float, beta_end: float, num_timesteps: int, warmup_frac: float) -> np.ndarray:
  """beta_end everywhere, except a linear ramp beta_start -> beta_end over the first `warmup_frac` of the steps."""
  betas = np.full(num_timesteps, beta_end, dtype=np.float64)
  num_warmup = int(num_timesteps * warmup_frac)
  betas[:num_warmup] = np.linspace(beta_start, beta_end, num_warmup, dtype=np.float64)
  return betas


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = MAX_BETA) -> np.ndarray:
  """Discretises a continuous alpha_bar(s), s in [0, 1], into betas (Nichol & Dhariwal 2021, Sec. 3.2).

  beta_t = 1 - alpha_bar((t + 1) / T) / alpha_bar(t / T) for t = 0..T-1, clipped at `max_beta`, so that the
  cumulative product of (1 - beta) follows alpha_bar at the grid points.
  """
  grid = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  values = np.array([alpha_bar(s) for s in grid], dtype=np.float64)
  return np.minimum(1.0 - values[1:] / values[:-1], max_beta)


def _cosine_alpha_bar(s: float, offset: float = COSINE_S) -> float:
  return math.cos((s + offset) / (1.0 + offset) * math.pi / 2) ** 2


def get_betas(name: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, *,
              cosine_s: float = COSINE_S, max_beta: float = MAX_BETA) -> np.ndarray:
  """The betas beta_1..beta_T (index t-1 holds beta_t) of a named schedule, float64 of shape (T,).

  Ho et al. 2020, eq. 2 and App. B (linear 1e-4 -> 0.02); Nichol & Dhariwal 2021, Sec. 3.2 (cosine).

  Args:
    name: one of `SCHEDULES`.
      linear: evenly spaced beta_start..beta_end. quad: evenly spaced in sqrt(beta), squared.
      const: beta_end at every step. jsd: 1/T, 1/(T-1), ..., 1/2, 1 (the final 1 clipped at `max_beta`, otherwise
        alpha_bar_T = 0 and 1/sqrt(alpha_bar_T) is infinite). warmup10 / warmup50: beta_end, with a linear ramp from
        beta_start over the first 10% / 50% of the steps. cosine: Nichol & Dhariwal's schedule (`cosine_s`,
        `max_beta`); ignores beta_start/beta_end.
    num_timesteps: T > 0.
    beta_start: first beta of linear/quad/warmup schedules.
    beta_end: last beta of linear/quad/warmup schedules and the value of `const`.
    cosine_s: offset s of the cosine schedule.
    max_beta: clip of the cosine and jsd schedules.

  Returns:
    float64 array of shape (num_timesteps,), every entry strictly inside (0, 1).

  Raises:
    ValueError: unknown name, T <= 0, or a resulting beta outside (0, 1) (one line naming the field).
  """
  if name not in SCHEDULES:
    raise ValueError(f'diffusion.schedule={name!r} is invalid; allowed values: {", ".join(SCHEDULES)}')
  if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps <= 0:
    raise ValueError(f'diffusion.num_timesteps={num_timesteps!r} is invalid; allowed values: integers >= 1')
  if not 0.0 < max_beta < 1.0:
    raise ValueError(f'max_beta={max_beta!r} is invalid; allowed values: 0 < max_beta < 1')
  num_timesteps = int(num_timesteps)
  if name == 'linear':
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif name == 'quad':
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
  elif name == 'const':
    betas = np.full(num_timesteps, beta_end, dtype=np.float64)
  elif name == 'jsd':
    betas = np.minimum(1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64), max_beta)
  elif name == 'warmup10':
    betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.1)
  elif name == 'warmup50':
    betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.5)
  else:  # cosine
    betas = betas_for_alpha_bar(num_timesteps, lambda s: _cosine_alpha_bar(s, cosine_s), max_beta)
  check_betas(betas, name)
  return betas


def check_betas(betas: np.ndarray, name: str = 'betas') -> None:
  """Raises ValueError unless `betas` is a finite 1-D array with every entry strictly inside (0, 1).

  beta_t = 0 makes the posterior variance of eq. 7 vanish beyond t = 1 (log-variance -inf); beta_t = 1 makes
  alpha_bar zero from t on, so x_0 can no longer be predicted from x_t (eq. 11 divides by sqrt(alpha_bar_t)).
  """
  betas = np.asarray(betas)
  if betas.ndim != 1 or betas.size == 0:
    raise ValueError(f'{name}: betas must be a non-empty 1-D array, got shape {betas.shape}')
  if not (np.all(np.isfinite(betas)) and np.all(betas > 0.0) and np.all(betas < 1.0)):
    bad = betas[~((betas > 0.0) & (betas < 1.0))]
    raise ValueError(f'diffusion.beta_start/beta_end give schedule {name!r} betas outside (0, 1) (e.g. {bad[0]!r});'
                     ' allowed values: every beta in the open interval (0, 1)')
