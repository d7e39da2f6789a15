"""Training objectives of diffusion models and the sampling of their timesteps.

Losses (per example, mean over all non-batch dimensions):
  mse           L_simple, Ho et al. 2020 eq. 14: ||target - network output||^2 (target eps, x_0, mu~ or v).
  l1            L_simple's target with the absolute error |target - output| (denoising-diffusion-pytorch's 'l1').
  huber         L_simple's target with the Huber loss, delta 1: 0.5 d^2 if |d| < 1 else |d| - 0.5, d = target -
                output (denoising-diffusion-pytorch's 'huber', PyTorch's smooth_l1_loss with beta = 1).
  kl            the variational bound term L_{t-1} (eq. 5) in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
                for t > 0 and the discretised Gaussian decoder NLL -log p(x_0|x_1) (Sec. 3.3) at t = 0.
  hybrid        L_simple + lambda * L_vlb (Nichol & Dhariwal 2021, Sec. 3.1), L_vlb estimated as T * L_{t-1} with a
                stop-gradient on the mean, so the bound trains only the variance. lambda = `hybrid_lambda`.
  rescaled_mse  as improved-diffusion: L_simple, plus the stop-gradient bound term * T / 1000 when the variance
                is learned (for a learned variance the same objective as `hybrid` with lambda = 0.001).
  rescaled_kl   the bound term * T (a one-sample estimate of the whole bound L_vlb).
With a learned variance, `mse` (and likewise `l1` and `huber`) adds the stop-gradient bound term with weight 1
(improved-diffusion's MSE), so the variance channels are trained; with fixed variances `mse` is exactly L_simple.
Config validation only admits a learned variance with the bound losses (kl, hybrid, rescaled_kl).

Timestep sampling: `uniform`, or `importance` (improved-diffusion's loss-second-moment resampler, Nichol &
Dhariwal 2021 Sec. 3.3: p_t proportional to sqrt(E[L_t^2]) over the last 10 losses of each t, uniform until every t
has 10, mixed with 1e-3 uniform); weights 1 / (T p_t) keep the objective unbiased. The sampler state is a pytree
that is updated inside the jitted train step with the global batch's t and (unweighted) losses.
"""

from typing import Callable, Dict, Tuple

import flax.struct
import jax
import jax.numpy as jnp

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import likelihood
from ddpm_jax.diffusion import Diffusion, mean_flat

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

HISTORY_PER_TERM = 10
UNIFORM_PROB = 1e-3


def mean_target(diffusion: Diffusion, x_start: Array, x_t: Array, t: Array, noise: Array) -> Array:
  """What the mean channels regress onto in L_simple (eq. 14): eps, x_0, mu~_t(x_t, x_0) (eq. 7) or v."""
  if diffusion.mean_type == 'eps':
    return noise
  if diffusion.mean_type == 'xstart':
    return x_start
  if diffusion.mean_type == 'xprev':
    return diffusion_lib.q_posterior_mean_variance(diffusion, x_start, x_t, t)[0]
  return diffusion_lib.velocity(diffusion, x_start, t, noise)


def training_losses(diffusion: Diffusion, model_fn: ModelFn, x_start: Array, t: Array,
                    noise: Array) -> Dict[str, Array]:
  """Per-example training losses at timesteps t for `diffusion.loss_type` (see the module docstring).

  Args:
    model_fn: model_fn(x_t, t) -> network output (x's shape, or 2C channels for learned variances).
    x_start: (B, ..., C) data in [-1, 1].
    t: (B,) int timestep indices.
    noise: standard normal noise of x_start's shape (eps of Algorithm 1).

  Returns:
    dict of (B,) arrays: 'loss' (unweighted: feed it to `update_timestep_sampler`, and minimise its mean weighted
    by `sample_timesteps`' importance weights 1 / (T p_t)), 'mse' (L_simple term), 'l1' (mean absolute error on
    the same target), 'huber' (mean Huber loss, delta 1, on the same target), 'vb' (the bound term L_{t-1} in
    bits/dim, unscaled; zeros when the loss does not need it).
  """
  loss_type = diffusion.loss_type
  x_t = diffusion_lib.q_sample(diffusion, x_start, t, noise)
  model_output = model_fn(x_t, t).astype(diffusion.dtype)
  mean_output, var_output = diffusion_lib.split_model_output(diffusion, model_output, x_start.shape[-1])
  error = mean_target(diffusion, x_start, x_t, t, noise) - mean_output
  mse = mean_flat(jnp.square(error))
  abs_error = jnp.abs(error)
  l1 = mean_flat(abs_error)
  huber = mean_flat(jnp.where(abs_error < 1.0, 0.5 * jnp.square(error), abs_error - 0.5))

  needs_vb = loss_type in ('kl', 'rescaled_kl', 'hybrid') or diffusion.learns_variance
  if needs_vb:
    if loss_type in ('kl', 'rescaled_kl'):
      vb_output = model_output  # the bound trains the mean and the variance
    else:
      # Nichol & Dhariwal 2021, Sec. 3.1: the bound only guides the variance; L_simple is the mean's objective.
      frozen_mean = jax.lax.stop_gradient(mean_output)
      vb_output = frozen_mean if var_output is None else jnp.concatenate([frozen_mean, var_output], axis=-1)
    vb = likelihood.vb_terms_bpd(diffusion, vb_output, x_start, x_t, t, clip_denoised=False)['output']
  else:
    vb = jnp.zeros_like(mse)

  num_timesteps = diffusion.num_timesteps
  if loss_type == 'kl':
    loss = vb
  elif loss_type == 'rescaled_kl':
    loss = vb * num_timesteps
  elif loss_type == 'hybrid':
    loss = mse + diffusion.hybrid_lambda * num_timesteps * vb
  elif loss_type == 'rescaled_mse':
    loss = mse + vb * (num_timesteps / 1000.0) if diffusion.learns_variance else mse
  else:  # mse, l1, huber
    simple = {'mse': mse, 'l1': l1, 'huber': huber}[loss_type]
    loss = simple + vb if diffusion.learns_variance else simple
  return dict(loss=loss, mse=mse, l1=l1, huber=huber, vb=vb)


# --------------------------------------------------------------------------------------- timestep sampling


@flax.struct.dataclass
class TimestepSamplerState:
  """Loss history of the importance sampler: loss_history (T, 10) and loss_counts (T,) int32.

  For `uniform` sampling both have a leading size of 0, so the state costs nothing and the train state keeps one
  structure."""
  loss_history: Array
  loss_counts: Array


def init_timestep_sampler(diffusion: Diffusion) -> TimestepSamplerState:
  """An empty loss history (improved-diffusion's LossSecondMomentResampler at construction)."""
  rows = diffusion.num_timesteps if diffusion.t_sampling == 'importance' else 0
  return TimestepSamplerState(loss_history=jnp.zeros((rows, HISTORY_PER_TERM), jnp.float32),
                              loss_counts=jnp.zeros((rows,), jnp.int32))


def timestep_probabilities(diffusion: Diffusion, state: TimestepSamplerState) -> Array:
  """p_t of the importance sampler: uniform until every t has 10 losses, then proportional to sqrt(mean(L_t^2))
  over the history, mixed (1 - 1e-3) : 1e-3 with the uniform distribution (Nichol & Dhariwal 2021, Sec. 3.3)."""
  num_timesteps = diffusion.num_timesteps
  uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps, jnp.float32)
  if diffusion.t_sampling == 'uniform':
    return uniform
  second_moment = jnp.sqrt(jnp.mean(jnp.square(state.loss_history), axis=-1))
  total = jnp.sum(second_moment)
  warmed_up = jnp.all(state.loss_counts == HISTORY_PER_TERM) & (total > 0)
  probs = second_moment / jnp.where(total > 0, total, 1.0) * (1.0 - UNIFORM_PROB) + UNIFORM_PROB / num_timesteps
  return jnp.where(warmed_up, probs, uniform)


def sample_timesteps(diffusion: Diffusion, state: TimestepSamplerState, rng: Array,
                     batch_size: int) -> Tuple[Array, Array]:
  """(t, weights): t (B,) int32 drawn from p_t and the importance weights 1 / (T p_t) (float32, ones if uniform)."""
  num_timesteps = diffusion.num_timesteps
  if diffusion.t_sampling == 'uniform':
    t = jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
    return t, jnp.ones((batch_size,), jnp.float32)
  probs = timestep_probabilities(diffusion, state)
  t = jax.random.choice(rng, num_timesteps, (batch_size,), p=probs).astype(jnp.int32)
  return t, 1.0 / (num_timesteps * probs[t])


def update_timestep_sampler(diffusion: Diffusion, state: TimestepSamplerState, t: Array,
                            losses: Array) -> TimestepSamplerState:
  """Appends each (t_i, loss_i) of the batch, in batch order, to the history of its t, keeping the last 10.

  Equivalent to improved-diffusion's sequential update_with_all_losses, but vectorised (no loop over the batch):
  example i is the r_i-th of the batch with its t, so it lands at position count_t + r_i of the history followed by
  the batch's new losses, of which the last 10 are kept. A no-op for uniform sampling.
  """
  if diffusion.t_sampling == 'uniform':
    return state
  num_timesteps, history = state.loss_history.shape
  t = t.reshape(-1).astype(jnp.int32)
  losses = jax.lax.stop_gradient(losses.reshape(-1)).astype(state.loss_history.dtype)
  same_t = t[:, None] == t[None, :]  # (B, B)
  earlier = jnp.tril(jnp.ones_like(same_t), k=-1)
  rank = jnp.sum(same_t & earlier, axis=1)  # how many earlier examples share my t
  new_per_t = jnp.zeros((num_timesteps,), jnp.int32).at[t].add(1)
  counts = state.loss_counts
  total = counts + new_per_t  # length of (old history ++ new losses) per t
  shift = jnp.maximum(total - history, 0)  # entries dropped from the front
  # Old entries: slot j of the new row takes old position j + shift, if that is an old (valid) entry.
  source = jnp.arange(history)[None, :] + shift[:, None]
  kept_old = jnp.take_along_axis(state.loss_history, jnp.minimum(source, history - 1), axis=1)
  new_history = jnp.where(source < counts[:, None], kept_old, 0.0)
  # New entries: example i goes to slot counts[t_i] + rank_i - shift[t_i]; negative slots were pushed out.
  slot = counts[t] + rank - shift[t]
  slot = jnp.where(slot >= 0, slot, history)  # out of bounds -> dropped
  new_history = new_history.at[t, slot].set(losses, mode='drop')
  return TimestepSamplerState(loss_history=new_history, loss_counts=jnp.minimum(total, history).astype(jnp.int32))
