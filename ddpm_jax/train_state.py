"""The train state and the pure train step (L_simple / L_vlb / hybrid, Adam, EMA), for `jit` and for `pmap`.

The step is one pure function. Under `jax.jit` over a `data` mesh it sees the global batch (sharded by XLA); under
`jax.pmap` it sees one device's slice and averages gradients with `lax.pmean`. Per-example randomness (timesteps,
noise) is drawn for the global batch in both modes, so the two give the same update on the same data.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import losses

# Large enough that optax.apply_if_finite never applies a non-finite update itself: the host stops the run after
# `training.max_consecutive_skips` instead.
_NEVER = 2**30


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue bit-exactly (with the data-iterator state saved beside it)."""
  step: jax.Array          # int32 scalar: optimizer steps taken.
  params: Any
  ema_params: Any          # Exponential moving average of params, used for sampling and evaluation.
  opt_state: Any           # optax.apply_if_finite(clip + Adam) state; counts skipped (non-finite) updates.
  rng: jax.Array           # Typed key of the training stream; step keys are fold_in(rng, step).
  t_sampler: Any           # Loss history for importance sampling of t; None for uniform sampling.


STREAMS = ('params', 'train', 'sample')


def random_streams(seed: int) -> dict[str, jax.Array]:
  """One seed split into named, independent key streams (params init, training steps, sampling)."""
  root = jax.random.key(seed)
  return {name: jax.random.fold_in(root, i) for i, name in enumerate(STREAMS)}


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr` over `optim.warmup_steps`, then constant (the DDPM recipe)."""
  if config.optim.warmup_steps == 0:
    return optax.constant_schedule(config.optim.lr)
  return optax.linear_schedule(0.0, config.optim.lr, config.optim.warmup_steps)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping + Adam(W), wrapped so that non-finite updates are skipped and counted."""
  schedule = learning_rate_schedule(config)
  parts = []
  if config.optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(config.optim.grad_clip))
  parts.append(optax.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps,
                           weight_decay=config.optim.weight_decay))
  return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=_NEVER)


def skip_counts(opt_state: Any) -> tuple[jax.Array, jax.Array]:
  """(consecutive, total) number of skipped non-finite updates recorded in the optimizer state."""
  return opt_state.notfinite_count, opt_state.total_notfinite


def create_train_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array,
                       diffusion: diffusion_lib.Diffusion) -> TrainState:
  """A fresh state at step 0 with EMA params equal to the initial params."""
  # Uniform sampling keeps no state (orbax cannot store the empty history it would have).
  t_sampler = losses.init_timestep_sampler(diffusion) if diffusion.t_sampling == 'importance' else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=optimizer.init(params), rng=rng, t_sampler=t_sampler)


def _global_slice(x: jax.Array, axis_name: Optional[str], local_batch: int) -> jax.Array:
  """This device's part of a global-batch array (identity under jit, where the batch is already global)."""
  if axis_name is None:
    return x
  start = jax.lax.axis_index(axis_name) * local_batch
  return jax.lax.dynamic_slice_in_dim(x, start, local_batch, axis=0)


def _quartile_means(values: jax.Array, t: jax.Array, num_timesteps: int) -> dict[str, jax.Array]:
  """Mean of `values` per quarter of the timestep range (NaN-free: empty quartiles report 0)."""
  quartile = jnp.minimum(t * 4 // num_timesteps, 3)
  out = {}
  for q in range(4):
    mask = (quartile == q).astype(values.dtype)
    out[f'loss_q{q}'] = jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return out


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: flax.linen.Module,
               diffusion: diffusion_lib.Diffusion, optimizer: optax.GradientTransformation,
               config: ml_collections.ConfigDict, axis_name: Optional[str] = None) -> tuple[TrainState, dict]:
  """One optimizer step on `batch` (Ho et al. Algorithm 1, with the configured loss and timestep sampling).

  Args:
    state: the current `TrainState` (replicated).
    batch: {'image': (B, H, W, C) in [-1, 1], 'label'?: (B,)}; the global batch under jit, one device's under pmap.
    axis_name: the pmap axis, or None under jit.
  Returns:
    (new state, metrics). Non-finite losses/gradients leave params, EMA and sampler state unchanged.
  """
  images = batch['image']
  local_batch = images.shape[0]
  num_shards = jax.lax.psum(1, axis_name) if axis_name else 1
  global_batch = local_batch * num_shards

  step_rng = jax.random.fold_in(state.rng, state.step)
  t_rng, noise_rng, dropout_rng, label_rng = jax.random.split(step_rng, 4)
  if axis_name is not None:
    # Dropout masks have the local shape, so they must differ per device.
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

  t_global, weights_global = losses.sample_timesteps(diffusion, state.t_sampler, t_rng, global_batch)
  noise_global = jax.random.normal(noise_rng, (global_batch,) + images.shape[1:], images.dtype)
  t = _global_slice(t_global, axis_name, local_batch)
  weights = _global_slice(weights_global, axis_name, local_batch)
  noise = _global_slice(noise_global, axis_name, local_batch)

  labels = batch.get('label')
  num_classes = config.model.num_classes
  if num_classes:
    # Classifier-free guidance training: drop labels to the null class `num_classes` with this probability.
    drop_global = jax.random.bernoulli(label_rng, config.training.label_dropout, (global_batch,))
    labels = jnp.where(_global_slice(drop_global, axis_name, local_batch), num_classes, labels)
  else:
    labels = None

  def loss_fn(params):
    def model_fn(x_t, timesteps):
      return model.apply({'params': params}, x_t, timesteps, y=labels, train=True, rngs={'dropout': dropout_rng})
    terms = losses.training_losses(diffusion, model_fn, images, t, noise)
    return jnp.mean(terms['loss'] * weights), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    loss = jax.lax.pmean(loss, axis_name)

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = opt_state.last_finite
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - config.training.ema_decay)
  ema_params = jax.tree.map(lambda new, old: jnp.where(finite, new, old), ema_params, state.ema_params)

  per_example = terms['loss']
  if axis_name is not None:
    per_example = jax.lax.all_gather(per_example, axis_name, tiled=True)
  t_sampler = losses.update_timestep_sampler(diffusion, state.t_sampler, t_global, per_example)
  t_sampler = jax.tree.map(lambda new, old: jnp.where(finite, new, old), t_sampler, state.t_sampler)

  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
                            t_sampler=t_sampler)
  consecutive, total = skip_counts(opt_state)
  metrics = {
      'loss': loss,
      'grad_norm': optax.global_norm(grads),
      'param_norm': optax.global_norm(params),
      'lr': jnp.asarray(learning_rate_schedule(config)(state.step), jnp.float32),  # constant_schedule gives a float
      'skipped_updates': total,
      'consecutive_skips': consecutive,
      **_quartile_means(per_example, t_global, diffusion.num_timesteps),
  }
  return new_state, metrics


def multi_step(state: TrainState, batches: dict[str, jax.Array], *, step_fn: Callable) -> tuple[TrainState, dict]:
  """`steps_per_call` steps in one compiled call over the leading axis of `batches`; metrics stacked per step.

  One step is called directly. Several are a fully unrolled `lax.scan`: a rolled scan becomes a while loop, and
  XLA:CPU runs the convolutions inside a while loop about 50x slower than the same program unrolled (measured on the
  quickstart model: 50 s vs 0.95 s per step).
  """
  num_steps = jax.tree.leaves(batches)[0].shape[0]
  if num_steps == 1:
    state, metrics = step_fn(state, jax.tree.map(lambda x: x[0], batches))
    return state, jax.tree.map(lambda m: m[None], metrics)
  return jax.lax.scan(step_fn, state, batches, unroll=True)


def make_step_fn(model, diffusion, optimizer, config, axis_name=None) -> Callable:
  """The train step with everything static bound, taking `steps_per_call` stacked batches."""
  step_fn = functools.partial(train_step, model=model, diffusion=diffusion, optimizer=optimizer, config=config,
                              axis_name=axis_name)
  return functools.partial(multi_step, step_fn=step_fn)
