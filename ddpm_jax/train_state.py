"""The train state and the train step (Ho et al. 2020, Algorithm 1 with the configured loss; Adam; EMA).

The step is one pure function of (state, global batch): under `jax.jit` over the device mesh XLA shards it by the
batch's sharding. Its randomness is `fold_in(train stream, state.step)` (`random_streams`), never stored, so a
resumed run draws exactly what the uninterrupted run would have drawn.

`parallelism='pmap'` runs the same function on each device's slice of the batch with `axis_name` set: the step key
is folded with the device index (each device draws its own timesteps and noise), and the gradients, the loss and
the per-example losses are combined over the axis. It follows the jit update rule exactly; its draws differ, so
the two agree statistically, and bit for bit when given the same draws (`apply_step`).
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
from ddpm_jax import random_streams

# Large enough that optax.apply_if_finite never applies a non-finite update itself: the host stops the run after
# `training.max_consecutive_skips` instead.
_NEVER = 2**30


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue bit-exactly (with the data-iterator state saved beside it)."""
  step: jax.Array          # int32 scalar: optimizer steps taken; the step's key is fold_in(train stream, step).
  params: Any
  ema_params: Any          # Exponential moving average of params, used for sampling and evaluation.
  opt_state: Any           # optax.apply_if_finite(clip + Adam) state; counts skipped (non-finite) updates.
  t_sampler: Any           # Loss history for importance sampling of t; None for uniform sampling.


@flax.struct.dataclass
class StepDraws:
  """The random draws of one step for the examples it sees (Algorithm 1, lines 3-4, plus dropout)."""
  t: jax.Array             # (B,) int32 timesteps.
  weights: jax.Array       # (B,) importance weights 1 / (T p_t) (ones for uniform sampling).
  noise: jax.Array         # (B, H, W, C) standard normal eps.
  drop_label: jax.Array    # (B,) bool: label replaced by the null class (classifier-free guidance training).
  dropout: jax.Array       # key of the model's dropout masks.


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr` over `optim.warmup_steps`, then constant (the DDPM recipe), or with
  `optim.lr_decay` 'cosine' / 'linear' down to 0 at `training.num_steps` (a short run ends on a settled model)."""
  lr, warmup, decay = config.optim.lr, config.optim.warmup_steps, config.optim.lr_decay
  if decay == 'none':
    return optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
  if decay == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, config.training.num_steps, end_value=0.0)
  remaining = max(config.training.num_steps - warmup, 1)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, 0.0, remaining)],
                              [warmup])


def ema_decay(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """`training.ema_decay`, or with `training.ema_warmup` min(ema_decay, (1 + n) / (10 + n)) at update n (TF's
  ExponentialMovingAverage with num_updates): the average forgets the random initialisation within a short run."""
  if not config.training.ema_warmup:
    return jnp.asarray(config.training.ema_decay, jnp.float32)
  n = step.astype(jnp.float32)
  return jnp.minimum(config.training.ema_decay, (1.0 + n) / (10.0 + n))


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


def create_train_state(params: Any, optimizer: optax.GradientTransformation,
                       diffusion: diffusion_lib.Diffusion) -> TrainState:
  """A fresh state at step 0 with EMA params equal to the initial params."""
  # Uniform sampling keeps no state (orbax cannot store the empty history it would have).
  t_sampler = losses.init_timestep_sampler(diffusion) if diffusion.t_sampling == 'importance' else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=optimizer.init(params), t_sampler=t_sampler)


def draw_step(state: TrainState, key: jax.Array, images: jax.Array, *, diffusion: diffusion_lib.Diffusion,
              config: ml_collections.ConfigDict) -> StepDraws:
  """Timesteps (from the sampler in `state`), noise, label dropout and the dropout key for `images`."""
  t_key, noise_key, dropout_key, label_key = jax.random.split(key, 4)
  batch = images.shape[0]
  t, weights = losses.sample_timesteps(diffusion, state.t_sampler, t_key, batch)
  drop = jax.random.bernoulli(label_key, config.training.label_dropout, (batch,))
  return StepDraws(t=t, weights=weights, noise=jax.random.normal(noise_key, images.shape, images.dtype),
                   drop_label=drop, dropout=dropout_key)


def _quartile_means(values: jax.Array, t: jax.Array, num_timesteps: int) -> dict[str, jax.Array]:
  """Mean of `values` per quarter of the timestep range (NaN-free: empty quartiles report 0)."""
  quartile = jnp.minimum(t * 4 // num_timesteps, 3)
  out = {}
  for q in range(4):
    mask = (quartile == q).astype(values.dtype)
    out[f'loss_q{q}'] = jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return out


def apply_step(state: TrainState, batch: dict[str, jax.Array], draws: StepDraws, *, model: flax.linen.Module,
               diffusion: diffusion_lib.Diffusion, optimizer: optax.GradientTransformation,
               config: ml_collections.ConfigDict, axis_name: Optional[str] = None) -> tuple[TrainState, dict]:
  """One optimizer step on `batch` with the given draws.

  Args:
    state: the current `TrainState`.
    batch: {'image': (B, H, W, C) in [-1, 1], 'label'?: (B,)}; the global batch, or under pmap this device's part.
    draws: the step's randomness for the examples of `batch`.
    axis_name: the pmap axis over which gradients and losses are combined, or None (jit).
  Returns:
    (new state, metrics). Non-finite losses/gradients leave params, EMA and sampler state unchanged.
  """
  labels = None
  if config.model.num_classes:
    labels = jnp.where(draws.drop_label, config.model.num_classes, batch['label'])

  def loss_fn(params):
    def model_fn(x_t, timesteps):
      return model.apply({'params': params}, x_t, timesteps, y=labels, train=True, rngs={'dropout': draws.dropout})
    terms = losses.training_losses(diffusion, model_fn, batch['image'], draws.t, draws.noise)
    return jnp.mean(terms['loss'] * draws.weights), terms['loss']

  (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  t = draws.t
  if axis_name is not None:  # equal slices: the mean of the per-device means is the global mean
    grads, loss = jax.lax.pmean((grads, loss), axis_name)
    per_example, t = jax.lax.all_gather((per_example, t), axis_name, tiled=True)

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = opt_state.last_finite
  keep_if_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  ema_params = keep_if_finite(optax.incremental_update(params, state.ema_params, 1.0 - ema_decay(config, state.step)),
                              state.ema_params)
  t_sampler = keep_if_finite(losses.update_timestep_sampler(diffusion, state.t_sampler, t, per_example),
                             state.t_sampler)

  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
                            t_sampler=t_sampler)
  consecutive, total = skip_counts(opt_state)
  metrics = {
      'loss': loss,
      'grad_norm': optax.tree_utils.tree_norm(grads),
      'param_norm': optax.tree_utils.tree_norm(params),
      'lr': jnp.asarray(learning_rate_schedule(config)(state.step), jnp.float32),  # constant_schedule gives a float
      'skipped_updates': total,
      'consecutive_skips': consecutive,
      **_quartile_means(per_example, t, diffusion.num_timesteps),
  }
  return new_state, metrics


def train_step(state: TrainState, batch: dict[str, jax.Array], *, train_stream: jax.Array,
               model: flax.linen.Module, diffusion: diffusion_lib.Diffusion, optimizer: optax.GradientTransformation,
               config: ml_collections.ConfigDict, axis_name: Optional[str] = None) -> tuple[TrainState, dict]:
  """Algorithm 1, one step: draws from `fold_in(train_stream, state.step)`, then `apply_step`."""
  key = random_streams.step_key(train_stream, state.step)
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  draws = draw_step(state, key, batch['image'], diffusion=diffusion, config=config)
  return apply_step(state, batch, draws, model=model, diffusion=diffusion, optimizer=optimizer, config=config,
                    axis_name=axis_name)


def multi_step(state: TrainState, batches: dict[str, jax.Array], *, step_fn: Callable,
               unroll: bool) -> tuple[TrainState, dict]:
  """`steps_per_call` steps in one compiled call over the leading axis of `batches`; metrics stacked per step.

  `unroll` (for CPU): a rolled scan becomes a while loop, and XLA:CPU runs the convolutions inside a while loop about
  50x slower than the same program unrolled (quickstart model: 50 s vs 0.95 s per step). Accelerators keep the loop:
  unrolled, the program grows `steps_per_call` times.
  """
  num_steps = jax.tree.leaves(batches)[0].shape[0]
  if num_steps == 1:
    state, metrics = step_fn(state, jax.tree.map(lambda x: x[0], batches))
    return state, jax.tree.map(lambda m: m[None], metrics)
  return jax.lax.scan(step_fn, state, batches, unroll=unroll)


def make_step_fn(model, diffusion, optimizer, config, train_stream: jax.Array, *, axis_name: Optional[str] = None,
                 unroll: bool = True) -> Callable:
  """`(state, batches) -> (state, metrics)`: `steps_per_call` train steps with everything static bound."""
  step_fn = functools.partial(train_step, train_stream=train_stream, model=model, diffusion=diffusion,
                              optimizer=optimizer, config=config, axis_name=axis_name)
  return functools.partial(multi_step, step_fn=step_fn, unroll=unroll)
