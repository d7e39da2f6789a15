"""Training: `train_and_evaluate(config, workdir)` runs (or resumes) a DDPM training run.

Resumes automatically from `<workdir>/checkpoints`, saves on SIGTERM (preemption) or a first Ctrl-C and exits
cleanly, logs with clu metric writers (TensorBoard + stdout, process 0 only) and draws EMA sample grids as it goes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any, Optional

from absl import logging
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import checkpointing
from ddpm_jax import console
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import images as images_lib
from ddpm_jax import input_pipeline
from ddpm_jax import models
from ddpm_jax import random_streams
from ddpm_jax import sample
from ddpm_jax import samplers
from ddpm_jax import sharding
from ddpm_jax import tensorboard_writer
from ddpm_jax import train_state as train_state_lib
from ddpm_jax import workdir_config
from ddpm_jax import workdir_lock
from ddpm_jax.data import sources
from ddpm_jax.errors import TrainingDivergedError

PMAP_AXIS = 'batch'


class _StopRequest:
  """Set by SIGTERM (preemption) or a first Ctrl-C (SIGINT); the loop checks it between steps, saves and returns
  (exit code 0). After the first Ctrl-C a second one interrupts at once (KeyboardInterrupt), without saving."""

  _SIGNALS = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'Ctrl-C'}

  def __init__(self):
    self.requested_by: Optional[str] = None  # 'SIGTERM' or 'Ctrl-C' once requested
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in self._SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = self._SIGNALS[signum]
    if self.requested_by is None:
      again = ' (Ctrl-C again stops at once, without saving)' if signum == signal.SIGINT else ''
      logging.warning('%s received: saving a checkpoint and exiting after this step%s.', name, again)
      self.requested_by = name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])  # the next Ctrl-C interrupts as usual

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


class Trainer:
  """Builds the model, state and compiled step of one run: the step of `train_state` jitted over the mesh, or
  under `parallelism='pmap'` the same step mapped over the local devices (state replicated per device)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.pmap = config.training.parallelism == 'pmap'
    self.mesh = sharding.create_mesh()
    self.model = models.create_model(config)
    self.diffusion = diffusion_lib.from_config(config.diffusion)
    self.optimizer = train_state_lib.create_optimizer(config)
    self.state = self._initial_state()
    step_fn = train_state_lib.make_step_fn(
        self.model, self.diffusion, self.optimizer, config, random_streams.stream(config.seed, 'train'),
        axis_name=PMAP_AXIS if self.pmap else None, unroll=jax.default_backend() == 'cpu')
    if self.pmap:
      self._step = jax.pmap(step_fn, axis_name=PMAP_AXIS, donate_argnums=0)
    else:
      replicated = sharding.replicated(self.mesh)
      self._step = jax.jit(step_fn, in_shardings=(replicated, sharding.batch_sharded(self.mesh, 1)),
                           out_shardings=(replicated, replicated), donate_argnums=0)

  def _initial_state(self) -> train_state_lib.TrainState:
    """Params are created directly in their final (replicated) layout, never gathered on one host first."""
    x = jnp.zeros((1,) + models.image_shape(self.config), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if self.config.model.num_classes else None

    def init(params_key):
      params = self.model.init({'params': params_key}, x, t, y=y, train=False)['params']
      return train_state_lib.create_train_state(params, self.optimizer, self.diffusion)

    return jax.jit(init, out_shardings=sharding.replicated(self.mesh))(
        random_streams.stream(self.config.seed, 'params'))

  # The canonical (checkpointed) state is the single-copy one; under pmap it is replicated per device.
  def host_state(self) -> train_state_lib.TrainState:
    return flax.jax_utils.unreplicate(self.state) if self.pmap else self.state

  def set_state(self, state: train_state_lib.TrainState) -> None:
    self.state = flax.jax_utils.replicate(state) if self.pmap else state

  def step(self, batches: dict[str, np.ndarray]) -> dict[str, Any]:
    """Runs `steps_per_call` steps on host batches stacked as (k, local_batch, ...); returns device metrics."""
    if self.pmap:
      n = jax.local_device_count()
      # (k, B, ...) -> (devices, k, B / devices, ...)
      batches = jax.tree.map(
          lambda x: np.moveaxis(x.reshape((x.shape[0], n, x.shape[1] // n) + x.shape[2:]), 1, 0), batches)
      self.state, metrics = self._step(self.state, batches)
      return jax.tree.map(lambda m: m[0], metrics)
    batches = sharding.global_batch_array(batches, sharding.batch_sharded(self.mesh, 1))
    self.state, metrics = self._step(self.state, batches)
    return metrics


class _MetricWindow:
  """Device metrics of the calls since the last `take()`; averaged on the host only when asked (no per-step sync)."""

  def __init__(self):
    self._calls: list[dict[str, Any]] = []

  def add(self, metrics: dict[str, Any]) -> None:
    self._calls.append(metrics)

  def __bool__(self) -> bool:
    return bool(self._calls)

  def take(self) -> dict[str, float]:
    """Mean of every metric over the steps of the window (counters and lr: their last value); empties it."""
    calls, self._calls = jax.device_get(self._calls), []
    out = {}
    for name in calls[0]:
      values = np.concatenate([np.asarray(c[name]).reshape(-1) for c in calls])
      out[name] = float(values[-1] if name in _LAST_VALUE_METRICS else values.mean())
    return out


_LAST_VALUE_METRICS = ('skipped_updates', 'consecutive_skips', 'lr')


class _Health:
  """Decides whether the weights of the current step are worth a checkpoint (see `training.blowup_factor`).

  Unhealthy: a streak of skipped (non-finite) updates is in progress, the loss of the steps since the last check is
  not finite, it is above `factor` times the lowest such loss seen by this process, or the parameter norm is above
  `factor` times its value when this process started. The last two catch a blow-up whose weights are still finite
  (e.g. a far too high learning rate: the parameters grow by orders of magnitude before anything overflows, and the
  first loss window may already be blown up, so the loss alone has no reference yet).
  """

  def __init__(self, factor: float, initial_param_norm: float):
    self.factor = factor
    self.initial_param_norm = initial_param_norm
    self.best_loss = float('inf')
    self.problem: Optional[str] = None

  def update(self, summary: dict[str, float], step: int) -> None:
    loss, skips, norm = summary['loss'], int(summary['consecutive_skips']), summary['param_norm']
    limit = f'training.blowup_factor={self.factor:g} times'
    if skips:
      self.problem = f'{skips} consecutive skipped (non-finite) updates at step {step}'
    elif not np.isfinite(loss):
      self.problem = f'non-finite loss at step {step}'
    elif self.factor and loss > self.factor * self.best_loss:
      self.problem = f'loss {loss:.4g} at step {step} is over {limit} the lowest so far ({self.best_loss:.4g})'
    elif self.factor and norm > self.factor * self.initial_param_norm:
      self.problem = (f'parameter norm {norm:.4g} at step {step} is over {limit} its value at the start of this '
                      f'run ({self.initial_param_norm:.4g})')
    else:
      self.problem = None
      self.best_loss = min(self.best_loss, loss)


# Compiled once: run eagerly, these per-leaf reductions would compile one small program per leaf shape (seconds).
@jax.jit
def _params_finite(state: train_state_lib.TrainState) -> jax.Array:
  leaves = jax.tree.leaves((state.params, state.ema_params))
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


_global_norm = jax.jit(optax.tree_utils.tree_norm)


def _log_run(config: ml_collections.ConfigDict, workdir: str, num_params: int, restored_step: Optional[int]) -> None:
  """The resolved run, in a few lines: what is trained on what, where it goes."""
  info = input_pipeline.dataset_info(config)
  h, w, c = info.image_shape
  devices = jax.devices()
  logging.info('Data: %s %s, %d training examples (%dx%dx%d)%s', config.data.dataset, config.data.train_split,
               info.num_examples(config.data.train_split), h, w, c,
               f', {info.num_classes} classes' if config.model.num_classes else '')
  logging.info('Model: U-Net, %s parameters, %s; T=%d, %s schedule, %s/%s, loss %s', f'{num_params:,}',
               config.model.dtype, config.diffusion.num_timesteps, config.diffusion.schedule,
               config.diffusion.mean_type, config.diffusion.var_type, config.diffusion.loss_type)
  logging.info('Devices: %d x %s (%d process%s, %s); global batch %d, %d steps', len(devices),
               devices[0].device_kind, jax.process_count(), 'es' if jax.process_count() > 1 else '',
               config.training.parallelism, config.training.batch_size, config.training.num_steps)
  logging.info('Workdir: %s (%s)', os.path.abspath(workdir),
               f'resuming from step {restored_step}' if restored_step is not None else 'new run')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_state_lib.TrainState:
  """Trains (resuming from the newest readable checkpoint in `workdir`) until `training.num_steps`.

  `config` is taken as valid: `run.run` (what `main.py` calls) checks it, the data and the workdir before this is
  called. Holds the workdir's training lock throughout (one run per workdir). Returns the final state (single-copy
  layout). Raises `TrainingDivergedError` after `training.max_consecutive_skips` skipped updates in a row.
  """
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock.WorkdirLock(workdir, jax.process_index()):
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> train_state_lib.TrainState:
  tc = config.training
  started = time.monotonic()

  trainer = Trainer(config, workdir)
  train_iter = input_pipeline.create_train_iterator(config)
  manager, restored_step, state = checkpointing.restore_latest(
      workdir, tc.keep_checkpoints, trainer.host_state(),
      lambda: input_pipeline.checkpoint_restore_args(train_iter))
  trainer.set_state(state)
  if jax.process_index() == 0:  # after the restore: a run resumed with a mismatching config keeps the original's
    workdir_config.write(config, workdir)
  step = int(jax.device_get(trainer.host_state().step))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  _log_run(config, workdir, num_params, restored_step)

  is_chief = jax.process_index() == 0
  writer = tensorboard_writer.create_writer(workdir, enabled=is_chief)
  if step == 0:
    flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
    writer.write_hparams({'num_params': num_params, **{k: str(v) for k, v in flat.items()}})

  sample_fn = None
  if tc.sample_every:
    sample_fn = sample.make_sample_fn(config, trainer.model, trainer.diffusion, trainer.mesh,
                                        config.sample.batch_size)

  log_window, health_window = _MetricWindow(), _MetricWindow()
  health = _Health(tc.blowup_factor, float(_global_norm(trainer.host_state().params)))
  throughput = console.Throughput(tc.num_steps)
  last_saved = restored_step
  last_summary: dict[str, float] = {}

  def check_health() -> None:
    """Updates `health` with the steps since the last check; stops the run on a streak of skipped updates."""
    if not health_window:
      return
    summary = health_window.take()
    health.update(summary, step)
    if summary['consecutive_skips'] >= tc.max_consecutive_skips:
      raise TrainingDivergedError(
          f'training diverged: {int(summary["consecutive_skips"])} consecutive non-finite updates at step {step} '
          f'(training.max_consecutive_skips={tc.max_consecutive_skips}); the last good checkpoint '
          f'{"is step " + str(last_saved) if last_saved is not None else "does not exist"}. Lower optim.lr, set '
          f'optim.grad_clip, check the data, or use a fixed variance')

  def save() -> None:
    nonlocal last_saved
    check_health()
    if health.problem is not None or not bool(_params_finite(trainer.host_state())):
      logging.warning('Step %d: not saving a checkpoint: %s; %s.', step, health.problem or 'non-finite parameters',
                      f'the last one is step {last_saved}' if last_saved is not None else 'none written yet')
      return
    checkpointing.save(manager, step, trainer.host_state(), input_pipeline.checkpoint_save_args(train_iter),
                       force=True)
    last_saved = step
    logging.info('Step %d: checkpoint saved in %s', step, checkpointing.checkpoint_dir(workdir))

  k = tc.steps_per_call
  compiled, in_flight = False, None
  logging.info('Compiling the train step (%d step%s per call)...', k, 's' if k > 1 else '')
  try:
    with _StopRequest() as stop, contextlib.closing(writer):
      while step < tc.num_steps:
        if stop.requested_by:
          logging.warning('%s: stopping at step %d.', stop.requested_by, step)
          break
        local = [next(train_iter) for _ in range(k)]
        batches = jax.tree.map(lambda *xs: np.stack(xs), *local)
        metrics = trainer.step(batches)
        if in_flight is not None:
          # At most two calls queued. Unbounded, async dispatch queues dozens of calls ahead of the device (~33 on
          # the quickstart, 15 s), which a SIGTERM or Ctrl-C waits for before its save; the device still never waits.
          jax.block_until_ready(in_flight)
        in_flight = metrics
        log_window.add(metrics)
        health_window.add(metrics)
        step += k
        if not compiled:
          compiled = True
          jax.block_until_ready(metrics)
          throughput.update(step)
          logging.info('Step %d done, %s after start-up (compiling included).', step,
                       console.format_duration(time.monotonic() - started))

        if step % tc.log_every == 0 or step >= tc.num_steps:
          summary = log_window.take()
          throughput.update(step)
          if throughput.rate is not None:
            summary['steps_per_sec'] = throughput.rate
          writer.write_scalars(step, summary)
          last_summary = summary
          logging.info('Step %d/%d (%d%%): loss %.4f, %s steps/s, ETA %s', step, tc.num_steps,
                       100 * step // tc.num_steps, summary['loss'],
                       f'{throughput.rate:.2f}' if throughput.rate else '?',
                       console.format_duration(throughput.eta()))
          check_health()
        if sample_fn is not None and step % tc.sample_every == 0:
          _write_sample_grid(config, trainer, sample_fn, writer, workdir, step)
        if step % tc.checkpoint_every == 0 or step >= tc.num_steps:
          save()
      if stop.requested_by and step != last_saved:
        save()  # stopped between checkpoints (every other last step was saved, or refused, in the loop)
  finally:
    manager.wait_until_finished()
    manager.close()
  bad_images = sources.bad_image_count()
  logging.info('Finished at step %d in %s%s%s; checkpoints in %s', step,
               console.format_duration(time.monotonic() - started),
               f', last loss {last_summary["loss"]:.4f}' if last_summary else '',
               f', {bad_images} unreadable image(s) skipped' if bad_images else '', checkpointing.checkpoint_dir(workdir))
  return trainer.host_state()


def _write_sample_grid(config, trainer: Trainer, sample_fn, writer, workdir: str, step: int) -> None:
  logging.info('Step %d: drawing %d samples from the EMA parameters (%s sampler, %s steps)...', step,
               config.sample.batch_size, config.sample.method,
               samplers.num_sampling_steps(config.diffusion.num_timesteps, config.sample))
  labels = sample.sample_labels(config, config.sample.batch_size)
  rng = jax.random.fold_in(random_streams.stream(config.seed, 'sample'), step)
  samples = sample.generate(sample_fn, trainer.host_state().ema_params, rng, labels, trainer.mesh,
                              config.sample.batch_size)
  grid = images_lib.make_grid(*sample.grid_layout(config, samples, labels))
  if jax.process_index() == 0:
    path = os.path.join(os.path.abspath(workdir), 'samples', f'train_step_{step}.png')
    images_lib.save_png(grid, path)
    logging.info('Step %d: sample grid (EMA) written to %s', step, path)
  writer.write_images(step, {'samples': grid[None]})
