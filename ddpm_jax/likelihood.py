"""Bits/dim of data under the model: the full discrete variational bound of Ho et al. 2020 (eq. 5).

  -log p(x_0) <= L = L_T + sum_{t>1} L_{t-1} + L_0,
  L_T     = KL(q(x_T | x_0) || N(0, I))                         (the prior term, ~1e-5 bits/dim for the linear schedule)
  L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))  (eq. 6-7 against eq. 1)
  L_0     = -log p_theta(x_0 | x_1)                              (the discretised decoder, eq. 13)
each in bits per dimension (nats / log 2, mean over all dimensions of an example). This is the discrete bound the
paper reports (3.70-3.75 on CIFAR-10), not the probability-flow ODE likelihood of score-based models.
"""

from typing import Callable, Dict

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import losses
from ddpm_jax.diffusion import Diffusion, mean_flat

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]


def prior_bpd(diffusion: Diffusion, x_start: Array) -> Array:
  """L_T in bits/dim, (B,): KL(q(x_T | x_0) || N(0, I)); constant in the model parameters."""
  t = jnp.full((x_start.shape[0],), diffusion.num_timesteps - 1, jnp.int32)
  mean, _, log_variance = diffusion_lib.q_mean_variance(diffusion, x_start, t)
  kl = losses.normal_kl(mean, log_variance, jnp.zeros_like(mean), jnp.zeros_like(mean))
  return mean_flat(kl) / losses.LOG2


def calc_bpd_loop(diffusion: Diffusion, model_fn: ModelFn, x_start: Array, rng: Array,
                  clip_denoised: bool = True) -> Dict[str, Array]:
  """Total bits/dim of a batch and its per-timestep terms, in ONE compiled `lax.scan` over t (no host loop).

  At every t the batch is noised with fresh noise (key `fold_in(rng, t)`), the network is called once on the whole
  batch, and the bound term of eq. 5 is computed (`losses.vb_terms_bpd`). The equivalent of the released code's
  calc_bpd_loop (diffusion_utils_2.py).

  Args:
    model_fn: model_fn(x_t, t) -> network output.
    x_start: (B, ..., C) data in [-1, 1] (on the 256-level grid for a meaningful decoder term).
    rng: PRNG key for the noise.
    clip_denoised: clip predicted x_0 to [-1, 1] (the released code's default for evaluation).

  Returns:
    dict: 'total_bpd' (B,) = prior + sum of 'vb'; 'prior_bpd' (B,); 'vb' (B, T) with vb[:, 0] the decoder NLL;
    'xstart_mse' (B, T) = mean((x_0 - predicted x_0)^2); 'mse' (B, T) = mean((eps - predicted eps)^2).
  """
  batch_size = x_start.shape[0]
  x_start = x_start.astype(diffusion.dtype)

  def body(carry, t_scalar):
    t = jnp.full((batch_size,), t_scalar, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x_start.shape, x_start.dtype)
    x_t = diffusion_lib.q_sample(diffusion, x_start, t, noise)
    terms = losses.vb_terms_bpd(diffusion, model_fn(x_t, t), x_start, x_t, t, clip_denoised=clip_denoised)
    pred_xstart = terms['pred_xstart']
    pred_eps = diffusion_lib.predict_eps_from_xstart(diffusion, x_t, t, pred_xstart)
    return carry, (terms['output'], mean_flat(jnp.square(pred_xstart - x_start)),
                   mean_flat(jnp.square(pred_eps - noise)))

  # Walk t = T-1 .. 0 like the reverse process; the order does not change any term.
  timesteps = jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  _, (vb, xstart_mse, eps_mse) = jax.lax.scan(body, None, timesteps)
  # Stacked as (T, B) in reverse-time order -> (B, T) indexed by t.
  vb, xstart_mse, eps_mse = (jnp.flip(a, axis=0).T for a in (vb, xstart_mse, eps_mse))
  prior = prior_bpd(diffusion, x_start)
  return dict(total_bpd=jnp.sum(vb, axis=1) + prior, prior_bpd=prior, vb=vb, xstart_mse=xstart_mse, mse=eps_mse)
