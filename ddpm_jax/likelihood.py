"""Bits/dim of data under the model: the full discrete variational bound of Ho et al. 2020 (eq. 5).

  -log p(x_0) <= L = L_T + sum_{t>1} L_{t-1} + L_0,
  L_T     = KL(q(x_T | x_0) || N(0, I))                         (the prior term, ~1e-5 bits/dim for the linear schedule)
  L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))  (eq. 6-7 against eq. 1)
  L_0     = -log p_theta(x_0 | x_1)                              (the discretised decoder, eq. 13)
each in bits per dimension (nats / log 2, mean over all dimensions of an example). This is the discrete bound the
paper reports (3.70-3.75 on CIFAR-10), not the probability-flow ODE likelihood of score-based models.

Here: the terms (`normal_kl`, `discretized_gaussian_log_likelihood`, `vb_terms_bpd`, `prior_bpd`; the training
losses in `ddpm_jax.losses` reuse them), `bpd_terms` (the terms at a list of timesteps, one compiled scan) and
`calc_bpd_loop`, the whole bound of a batch in one compiled scan.
"""

import math
from typing import Callable, Dict

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax.diffusion import Diffusion, mean_flat

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

LOG2 = math.log(2.0)


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (the Gaussian KLs of eq. 5).

  0.5 (log s2^2/s1^2 + s1^2/s2^2 - 1 + (m1 - m2)^2 / s2^2), with the -1 folded into expm1 so that nearly equal
  variances (the common case: beta~_t vs beta_t late in the chain) do not cancel, and equal Gaussians give 0 exactly.
  """
  log_ratio = logvar1 - logvar2
  return 0.5 * (jnp.expm1(log_ratio) - log_ratio + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log_normal_mass(lower: Array, upper: Array) -> Array:
  """log(Phi(upper) - Phi(lower)) for lower < upper, accurate in both tails.

  Computed on the side of 0 where the interval's mass lies in a lower tail (mirroring by Phi(-x) = 1 - Phi(x)),
  as log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))), so no difference of two numbers close to 1 is formed.
  """
  mirror = (lower + upper) > 0
  a = jnp.where(mirror, -upper, lower)
  b = jnp.where(mirror, -lower, upper)
  log_b = log_ndtr(b)
  log_a = log_ndtr(a)
  return log_b + jnp.log(jnp.maximum(-jnp.expm1(log_a - log_b), 1e-12))


def discretized_gaussian_log_likelihood(x: Array, means: Array, log_scales: Array) -> Array:
  """log p(x_0 | x_1) of the discretised Gaussian decoder (Ho et al. 2020, eq. 13), elementwise, in nats.

  x holds data scaled to [-1, 1] on the 256-level grid (x = 2 k / 255 - 1). Each level owns the bin
  [x - 1/255, x + 1/255] of width 2/255; the edge bins are open: (-inf, -1 + 1/255] and [1 - 1/255, inf). The
  probabilities of the 256 bins therefore sum to 1. Uses the exact normal CDF (the reference code uses a tanh
  approximation of it).
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  plus_in = inv_stdv * (centered + 1.0 / 255.0)
  min_in = inv_stdv * (centered - 1.0 / 255.0)
  log_cdf_plus = log_ndtr(plus_in)  # lowest bin: log Phi(upper edge)
  log_one_minus_cdf_min = log_ndtr(-min_in)  # highest bin: log(1 - Phi(lower edge))
  log_mid = _log_normal_mass(min_in, plus_in)
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_mid))


def vb_terms_bpd(diffusion: Diffusion, model_output: Array, x_start: Array, x_t: Array, t: Array,
                 clip_denoised: bool = False) -> Dict[str, Array]:
  """The bound term L_{t-1} of eq. 5 in bits/dim, (B,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and
  the decoder NLL -log p(x_0|x_1) (eq. 13) at t = 0. Also returns 'pred_xstart' and the p_mean_variance dict."""
  true_mean, _, true_log_variance = diffusion_lib.q_posterior_mean_variance(diffusion, x_start, x_t, t)
  out = diffusion_lib.p_mean_variance(diffusion, model_output, x_t, t, clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_variance, out['mean'], out['log_variance'])) / LOG2
  decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, out['mean'], 0.5 * out['log_variance']))
  decoder_nll = decoder_nll / LOG2
  return dict(output=jnp.where(t == 0, decoder_nll, kl), pred_xstart=out['pred_xstart'], p_mean_var=out)


def prior_bpd(diffusion: Diffusion, x_start: Array) -> Array:
  """L_T in bits/dim, (B,): KL(q(x_T | x_0) || N(0, I)); constant in the model parameters."""
  t = jnp.full((x_start.shape[0],), diffusion.num_timesteps - 1, jnp.int32)
  mean, _, log_variance = diffusion_lib.q_mean_variance(diffusion, x_start, t)
  kl = normal_kl(mean, log_variance, jnp.zeros_like(mean), jnp.zeros_like(mean))
  return mean_flat(kl) / LOG2


def bpd_terms(diffusion: Diffusion, model_fn: ModelFn, x_start: Array, rng: Array, timesteps: Array,
              clip_denoised: bool = True) -> Dict[str, Array]:
  """The terms L_t of eq. 5 at the given `timesteps` (K,), in that order, in one compiled `lax.scan` over them.

  At every t the batch is noised with fresh noise (key `fold_in(rng, t)`, so a term depends on t and not on which
  other timesteps are computed with it), the network is called once on the whole batch, and the bound term is
  computed (`vb_terms_bpd`). `calc_bpd_loop` calls it on all T timesteps; an evaluation calls it on chunks of them
  to report progress between chunks (`ddpm_jax.evaluate`).

  Returns:
    dict of (B, K) arrays, column k for timesteps[k]: 'vb' (the decoder NLL at t = 0, else the KL),
    'xstart_mse' = mean((x_0 - predicted x_0)^2), 'mse' = mean((eps - predicted eps)^2).
  """
  batch_size = x_start.shape[0]
  x_start = x_start.astype(diffusion.dtype)

  def body(carry, t_scalar):
    t = jnp.full((batch_size,), t_scalar, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x_start.shape, x_start.dtype)
    x_t = diffusion_lib.q_sample(diffusion, x_start, t, noise)
    terms = vb_terms_bpd(diffusion, model_fn(x_t, t), x_start, x_t, t, clip_denoised=clip_denoised)
    pred_xstart = terms['pred_xstart']
    pred_eps = diffusion_lib.predict_eps_from_xstart(diffusion, x_t, t, pred_xstart)
    return carry, (terms['output'], mean_flat(jnp.square(pred_xstart - x_start)),
                   mean_flat(jnp.square(pred_eps - noise)))

  _, (vb, xstart_mse, eps_mse) = jax.lax.scan(body, None, jnp.asarray(timesteps, jnp.int32))
  return dict(vb=vb.T, xstart_mse=xstart_mse.T, mse=eps_mse.T)  # stacked (K, B) -> (B, K)


def calc_bpd_loop(diffusion: Diffusion, model_fn: ModelFn, x_start: Array, rng: Array,
                  clip_denoised: bool = True) -> Dict[str, Array]:
  """Total bits/dim of a batch (eq. 5) and its per-timestep terms, in ONE compiled `lax.scan` over t (no host loop).

  The equivalent of the released code's calc_bpd_loop (diffusion_utils_2.py): `bpd_terms` at every t, plus the
  prior term L_T.

  Args:
    model_fn: model_fn(x_t, t) -> network output.
    x_start: (B, ..., C) data in [-1, 1] (on the 256-level grid for a meaningful decoder term).
    rng: PRNG key for the noise (use a different one per batch, e.g. fold_in(key, batch_index)).
    clip_denoised: clip predicted x_0 to [-1, 1] (the released code's default for evaluation).

  Returns:
    dict: 'total_bpd' (B,) = prior + sum of 'vb'; 'prior_bpd' (B,); 'vb' (B, T) with vb[:, 0] the decoder NLL;
    'xstart_mse' (B, T) = mean((x_0 - predicted x_0)^2); 'mse' (B, T) = mean((eps - predicted eps)^2).
  """
  # Walk t = T-1 .. 0 like the reverse process; the order does not change any term.
  timesteps = jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  terms = bpd_terms(diffusion, model_fn, x_start, rng, timesteps, clip_denoised=clip_denoised)
  # Columns in reverse-time order -> indexed by t.
  vb, xstart_mse, eps_mse = (jnp.flip(terms[k], axis=1) for k in ('vb', 'xstart_mse', 'mse'))
  prior = prior_bpd(diffusion, x_start.astype(diffusion.dtype))
  return dict(total_bpd=jnp.sum(vb, axis=1) + prior, prior_bpd=prior, vb=vb, xstart_mse=xstart_mse, mse=eps_mse)
