"""An independent float64 NumPy implementation of the DDPM equations, the oracle of the diffusion tests.

Written from the papers' equations (Ho et al. 2020 eqs. 1-14; Nichol & Dhariwal 2021 Sec. 3; Song et al. 2021
eqs. 12, 16) and the reference code's documented semantics, WITHOUT importing anything from ddpm_jax. Where the
library uses a numerically careful form, this file deliberately uses the textbook one (cumprod, 1 - x, CDF
differences through scipy's cdf/sf), so the two do not share mistakes. Timestep indices are 0-based: index t is the
paper's step t + 1. Images are (B, ..., C); per-example reductions average over every non-batch axis.
"""

import math

import numpy as np
from scipy import stats

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------ schedules


def betas(name, num_timesteps, beta_start=1e-4, beta_end=0.02):
  """beta_1..beta_T of the named schedule, written out entry by entry."""
  T = num_timesteps
  out = np.empty(T, dtype=np.float64)
  for i in range(T):
    frac = i / (T - 1) if T > 1 else 0.0
    if name == 'linear':
      out[i] = beta_start + (beta_end - beta_start) * frac
    elif name == 'quad':
      out[i] = (math.sqrt(beta_start) + (math.sqrt(beta_end) - math.sqrt(beta_start)) * frac) ** 2
    elif name == 'const':
      out[i] = beta_end
    elif name == 'jsd':
      out[i] = min(1.0 / (T - i), 0.999)  # 1/T, 1/(T-1), ..., 1 (clipped like cosine: the final 1 is singular)
    elif name in ('warmup10', 'warmup50'):
      n_warm = int(T * (0.1 if name == 'warmup10' else 0.5))
      if i < n_warm:
        out[i] = beta_start + (beta_end - beta_start) * (i / (n_warm - 1) if n_warm > 1 else 0.0)
      else:
        out[i] = beta_end
    elif name == 'cosine':
      f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
      out[i] = min(1.0 - f((i + 1) / T) / f(i / T), 0.999)
    else:
      raise KeyError(name)
  return out


class Process:
  """Schedule constants of eqs. 4, 6, 7 from betas, by the direct formulas."""

  def __init__(self, betas_, mean_type='eps', var_type='fixedlarge'):
    b = np.asarray(betas_, dtype=np.float64)
    self.T = len(b)
    self.mean_type, self.var_type = mean_type, var_type
    self.beta = b
    self.alpha = 1.0 - b
    self.abar = np.cumprod(self.alpha)
    self.abar_prev = np.concatenate([[1.0], self.abar[:-1]])
    self.post_var = b * (1.0 - self.abar_prev) / (1.0 - self.abar)
    first = self.post_var[1] if self.T > 1 else b[0]
    self.post_logvar = np.log(np.where(np.arange(self.T) == 0, first, self.post_var))
    self.large_logvar = np.log(np.where(np.arange(self.T) == 0, first, b))

  def _at(self, a, t, x):
    return np.asarray(a)[np.asarray(t)].reshape((-1,) + (1,) * (np.ndim(x) - 1))

  # eq. 4
  def q_mean_variance(self, x0, t):
    ab = self._at(self.abar, t, x0)
    return np.sqrt(ab) * x0, (1 - ab) * np.ones_like(x0), np.log(1 - ab) * np.ones_like(x0)

  def q_sample(self, x0, t, eps):
    ab = self._at(self.abar, t, x0)
    return np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps

  # eqs. 6-7
  def q_posterior(self, x0, xt, t):
    ab, abp = self._at(self.abar, t, x0), self._at(self.abar_prev, t, x0)
    beta, alpha = self._at(self.beta, t, x0), self._at(self.alpha, t, x0)
    mean = np.sqrt(abp) * beta / (1 - ab) * x0 + np.sqrt(alpha) * (1 - abp) / (1 - ab) * xt
    return mean, self._at(self.post_var, t, x0) * np.ones_like(x0), self._at(self.post_logvar, t, x0) * np.ones_like(x0)

  def x0_from_eps(self, xt, t, eps):
    ab = self._at(self.abar, t, xt)
    return (xt - np.sqrt(1 - ab) * eps) / np.sqrt(ab)

  def eps_from_x0(self, xt, t, x0):
    ab = self._at(self.abar, t, xt)
    return (xt - np.sqrt(ab) * x0) / np.sqrt(1 - ab)

  def x0_from_xprev(self, xt, t, xprev):
    ab, abp = self._at(self.abar, t, xt), self._at(self.abar_prev, t, xt)
    beta, alpha = self._at(self.beta, t, xt), self._at(self.alpha, t, xt)
    c1, c2 = np.sqrt(abp) * beta / (1 - ab), np.sqrt(alpha) * (1 - abp) / (1 - ab)
    return (xprev - c2 * xt) / c1

  def x0_from_v(self, xt, t, v):
    # x_t = a x0 + s eps, v = a eps - s x0 with a^2 + s^2 = 1  =>  a x_t - s v = x0.
    ab = self._at(self.abar, t, xt)
    return np.sqrt(ab) * xt - np.sqrt(1 - ab) * v

  def v_target(self, x0, t, eps):
    ab = self._at(self.abar, t, x0)
    return np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0

  def p_mean_variance(self, output, xt, t, clip=False):
    C = xt.shape[-1]
    if self.var_type in ('learned', 'learned_range'):
      mean_out, var_out = output[..., :C], output[..., C:]
    else:
      mean_out, var_out = output, None
    if self.var_type == 'learned':
      logvar = var_out
    elif self.var_type == 'learned_range':
      w = (var_out + 1) / 2
      logvar = w * np.log(self._at(self.beta, t, xt)) + (1 - w) * self._at(self.post_logvar, t, xt)
    elif self.var_type == 'fixedlarge':
      logvar = self._at(self.large_logvar, t, xt) * np.ones_like(xt)
    else:
      logvar = self._at(self.post_logvar, t, xt) * np.ones_like(xt)
    c = (lambda a: np.clip(a, -1, 1)) if clip else (lambda a: a)
    if self.mean_type == 'xprev':
      return mean_out, logvar, c(self.x0_from_xprev(xt, t, mean_out))
    x0 = {'eps': lambda: self.x0_from_eps(xt, t, mean_out), 'xstart': lambda: mean_out,
          'v': lambda: self.x0_from_v(xt, t, mean_out)}[self.mean_type]()
    x0 = c(x0)
    return self.q_posterior(x0, xt, t)[0], logvar, x0


# ---------------------------------------------------------------------------------------------- likelihoods


def normal_kl(m1, lv1, m2, lv2):
  """KL(N(m1, e^lv1) || N(m2, e^lv2)) = log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2."""
  v1, v2 = np.exp(lv1), np.exp(lv2)
  return 0.5 * (lv2 - lv1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5


def decoder_log_prob(x, mean, log_scale):
  """log of the Gaussian mass of x's bin (width 2/255, edge bins open), by scipy's cdf and sf."""
  x, mean, log_scale = np.broadcast_arrays(*(np.asarray(a, np.float64) for a in (x, mean, log_scale)))
  s = np.exp(log_scale)
  lo = (x - 1 / 255 - mean) / s
  hi = (x + 1 / 255 - mean) / s
  lower_side = (x - mean) <= 0
  mass = np.where(lower_side, stats.norm.cdf(hi) - stats.norm.cdf(lo), stats.norm.sf(lo) - stats.norm.sf(hi))
  mass = np.where(x < -0.999, stats.norm.cdf(hi), mass)
  mass = np.where(x > 0.999, stats.norm.sf(lo), mass)
  return np.log(mass)


def per_example_mean(a):
  return a.reshape(a.shape[0], -1).mean(axis=1)


def vb_term_bits(proc, output, x0, xt, t, clip=False):
  true_mean, _, true_logvar = proc.q_posterior(x0, xt, t)
  mean, logvar, x0_hat = proc.p_mean_variance(output, xt, t, clip)
  kl = per_example_mean(normal_kl(true_mean, true_logvar, mean, logvar)) / LN2
  nll = -per_example_mean(decoder_log_prob(x0, mean, 0.5 * logvar)) / LN2
  return np.where(np.asarray(t) == 0, nll, kl), x0_hat


def training_losses(proc, output, x0, t, eps, loss_type, hybrid_lambda=0.001):
  """Per-example losses for a given network output at x_t = q_sample(x0, t, eps)."""
  C = x0.shape[-1]
  xt = proc.q_sample(x0, t, eps)
  mean_out = output[..., :C]
  target = {'eps': eps, 'xstart': x0, 'xprev': proc.q_posterior(x0, xt, t)[0],
            'v': proc.v_target(x0, t, eps)}[proc.mean_type]
  mse = per_example_mean((target - mean_out) ** 2)
  d = target - mean_out
  l1 = per_example_mean(np.abs(d))
  huber = per_example_mean(np.where(np.abs(d) < 1, 0.5 * d ** 2, np.abs(d) - 0.5))
  learned = proc.var_type in ('learned', 'learned_range')
  vb = vb_term_bits(proc, output, x0, xt, t)[0]
  T = proc.T
  loss = {'mse': mse + vb if learned else mse,
          'l1': l1 + vb if learned else l1, 'huber': huber + vb if learned else huber,
          'rescaled_mse': mse + vb * T / 1000 if learned else mse,
          'kl': vb, 'rescaled_kl': vb * T, 'hybrid': mse + hybrid_lambda * T * vb}[loss_type]
  return dict(loss=loss, mse=mse, l1=l1, huber=huber, vb=vb)


def prior_bits(proc, x0):
  m, _, lv = proc.q_mean_variance(x0, np.full(x0.shape[0], proc.T - 1))
  return per_example_mean(normal_kl(m, lv, 0.0, 0.0)) / LN2


# ------------------------------------------------------------------------------------------------- sampling


def ancestral_step(proc, output, xt, t, z, clip=True):
  mean, logvar, x0_hat = proc.p_mean_variance(output, xt, t, clip)
  keep = (np.asarray(t) > 0).reshape((-1,) + (1,) * (xt.ndim - 1))
  return mean + keep * np.exp(0.5 * logvar) * z, x0_hat


def ddim_step(proc, output, xt, t, z, eta, clip=True):
  """Song et al. 2021, eq. 12 with sigma of eq. 16, written with alpha_bar ratios."""
  _, _, x0_hat = proc.p_mean_variance(output, xt, t, clip)
  eps_hat = proc.eps_from_x0(xt, t, x0_hat)
  ab, abp = proc._at(proc.abar, t, xt), proc._at(proc.abar_prev, t, xt)
  sigma = eta * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
  keep = (np.asarray(t) > 0).reshape((-1,) + (1,) * (xt.ndim - 1))
  return np.sqrt(abp) * x0_hat + np.sqrt(np.maximum(1 - abp - sigma ** 2, 0)) * eps_hat + keep * sigma * z, x0_hat


def space_timesteps(T, spec):
  """improved-diffusion's respacing, restated: 'ddimN' = range(0, T, s) for the first s giving N entries;
  'a,b,c' = equal sections (remainder to the first ones), count_i rounded evenly spaced points in each."""
  if spec.startswith('ddim'):
    n = int(spec[4:])
    s = next(s for s in range(1, T) if math.ceil(T / s) == n)
    return list(range(0, T, s))
  counts = [int(c) for c in spec.split(',')]
  k = len(counts)
  bounds = [0]
  for i in range(k):
    bounds.append(bounds[-1] + T // k + (1 if i < T % k else 0))
  out = []
  for i, n in enumerate(counts):
    size = bounds[i + 1] - bounds[i]
    step = (size - 1) / (n - 1) if n > 1 else 1
    pos = 0.0
    for _ in range(n):  # accumulate the fractional position the way the reference code does (float sums)
      out.append(bounds[i] + round(pos))
      pos += step
  return sorted(set(out))


def respaced_betas(betas_, kept):
  abar = np.cumprod(1.0 - np.asarray(betas_, np.float64))
  kept_abar = abar[np.asarray(kept)]
  prev = np.concatenate([[1.0], kept_abar[:-1]])
  return 1.0 - kept_abar / prev


# ----------------------------------------------------------------------------------------------- importance


class SecondMomentSampler:
  """improved-diffusion's LossSecondMomentResampler, one loss at a time."""

  def __init__(self, T, history=10, uniform_prob=1e-3):
    self.T, self.history, self.uniform_prob = T, history, uniform_prob
    self.losses = [[] for _ in range(T)]

  def update(self, ts, losses):
    for t, loss in zip(ts, losses):
      self.losses[int(t)] = (self.losses[int(t)] + [float(loss)])[-self.history:]

  def probs(self):
    if any(len(h) < self.history for h in self.losses):
      return np.full(self.T, 1.0 / self.T)
    w = np.array([math.sqrt(np.mean(np.square(h))) for h in self.losses])
    return w / w.sum() * (1 - self.uniform_prob) + self.uniform_prob / self.T

  def history_array(self):
    out = np.zeros((self.T, self.history))
    for t, h in enumerate(self.losses):
      out[t, :len(h)] = h
    return out, np.array([len(h) for h in self.losses])


def rel_err(actual, expected):
  """max |actual - expected| / max |expected| (the error relative to the array's scale)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))
