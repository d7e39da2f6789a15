"""Training: `train_and_evaluate(config, workdir)` runs (or resumes) a DDPM training run.

Resumes automatically from `<workdir>/checkpoints`, saves on SIGTERM (preemption) and exits cleanly, logs with clu
metric writers (TensorBoard + stdout, process 0 only) and draws EMA sample grids as it goes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import checkpointing
from ddpm_jax import config_validation
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import images as images_lib
from ddpm_jax import input_pipeline
from ddpm_jax import models
from ddpm_jax import sampling
from ddpm_jax import sharding
from ddpm_jax import train_state as train_state_lib

PMAP_AXIS = 'batch'


class TrainingDivergedError(RuntimeError):
  """Too many consecutive non-finite updates: the run stops rather than train on garbage."""


class _PreemptionFlag:
  """Set by SIGTERM; the loop checks it between steps, saves and returns (exit code 0)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning('SIGTERM received: saving a checkpoint and exiting.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config to `<workdir>/config.json` (process 0)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def check_dataset(config: ml_collections.ConfigDict) -> None:
  """Conditional models need labels; raises ConfigError (before compiling) otherwise."""
  if config.model.num_classes:
    info = input_pipeline.dataset_info(config)
    if not info.has_labels:
      raise config_validation.ConfigError(
          f'config.model.num_classes={config.model.num_classes} needs a labelled dataset, but '
          f'config.data.dataset={config.data.dataset!r} has no labels')
    if info.num_classes != config.model.num_classes:
      raise config_validation.ConfigError(
          f'config.model.num_classes={config.model.num_classes} does not match the {info.num_classes} classes of '
          f'config.data.dataset={config.data.dataset!r}')


class Trainer:
  """Builds the model, state, compiled step and checkpoint manager for one run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.pmap = config.training.parallelism == 'pmap'
    self.mesh = sharding.create_mesh()
    self.model = models.create_model(config)
    self.diffusion = diffusion_lib.from_config(config.diffusion)
    self.optimizer = train_state_lib.create_optimizer(config)
    self.streams = train_state_lib.random_streams(config.seed)
    self.state = self._initial_state()
    step_fn = train_state_lib.make_step_fn(self.model, self.diffusion, self.optimizer, config,
                                           axis_name=PMAP_AXIS if self.pmap else None)
    if self.pmap:
      self._step = jax.pmap(step_fn, axis_name=PMAP_AXIS, donate_argnums=0)
    else:
      replicated = sharding.replicated(self.mesh)
      self._step = jax.jit(step_fn, in_shardings=(replicated, sharding.batch_sharded(self.mesh, 1)),
                           out_shardings=(replicated, replicated), donate_argnums=0)

  def _initial_state(self) -> train_state_lib.TrainState:
    """Params are created directly in their final (replicated) layout, never gathered on one host first."""
    side, _, channels = sampling.image_shape(self.config)
    x = jnp.zeros((1, side, side, channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if self.config.model.num_classes else None

    def init(params_rng, train_rng):
      params = self.model.init({'params': params_rng}, x, t, y=y, train=False)['params']
      return train_state_lib.create_train_state(params, self.optimizer, train_rng, self.diffusion)

    return jax.jit(init, out_shardings=sharding.replicated(self.mesh))(self.streams['params'],
                                                                         self.streams['train'])

  # The canonical (checkpointed) state is the single-copy one; under pmap it is replicated per device.
  def host_state(self) -> train_state_lib.TrainState:
    return flax.jax_utils.unreplicate(self.state) if self.pmap else self.state

  def set_state(self, state: train_state_lib.TrainState) -> None:
    self.state = flax.jax_utils.replicate(state) if self.pmap else state

  def step(self, batches: dict[str, np.ndarray]) -> dict[str, Any]:
    """Runs `steps_per_call` steps on host batches stacked as (k, local_batch, ...); returns device metrics."""
    if self.pmap:
      n = jax.local_device_count()
      # (k, B, ...) → (devices, k, B / devices, ...)
      batches = jax.tree.map(
          lambda x: np.moveaxis(x.reshape((x.shape[0], n, x.shape[1] // n) + x.shape[2:]), 1, 0), batches)
      self.state, metrics = self._step(self.state, batches)
      return jax.tree.map(lambda m: m[0], metrics)
    batches = sharding.global_batch_array(batches, sharding.batch_sharded(self.mesh, 1))
    self.state, metrics = self._step(self.state, batches)
    return metrics


def _summarize(metrics: dict[str, np.ndarray]) -> dict[str, float]:
  """Averages metrics over the scanned steps of one call (counters: the last value)."""
  out = {}
  for name, values in metrics.items():
    values = np.asarray(values)
    out[name] = float(values[-1] if name in ('skipped_updates', 'consecutive_skips', 'lr') else values.mean())
  return out


def _params_finite(state: train_state_lib.TrainState) -> bool:
  leaves = jax.tree.leaves((state.params, state.ema_params))
  return bool(jax.device_get(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_state_lib.TrainState:
  """Trains (resuming from the newest readable checkpoint in `workdir`) until `training.num_steps`.

  Returns the final state (single-copy layout).
  """
  config_validation.validate_config(config, jax.device_count())
  check_dataset(config)
  write_config(config, workdir)
  tc = config.training

  trainer = Trainer(config, workdir)
  train_iter = input_pipeline.create_train_iterator(config)
  manager = checkpointing.create_manager(workdir, tc.keep_checkpoints)
  restored_step, state = checkpointing.restore_latest(
      manager, trainer.host_state(), lambda: input_pipeline.checkpoint_restore_args(train_iter))
  trainer.set_state(state)
  if restored_step is not None:
    logging.info('Resumed from the checkpoint at step %d.', restored_step)
  step = int(jax.device_get(trainer.host_state().step))

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if step == 0:
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    writer.write_hparams({'num_params': num_params, **{k: str(v) for k, v in _flat(config).items()}})
  progress = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer,
                                             every_steps=tc.log_every)

  sample_fn = None
  if tc.sample_every:
    sample_fn = sampling.make_sample_fn(config, trainer.model, trainer.diffusion, trainer.mesh,
                                        config.sample.batch_size)

  def save(at_step: int) -> None:
    host_state = trainer.host_state()
    if not _params_finite(host_state):
      raise TrainingDivergedError(f'non-finite parameters at step {at_step}: refusing to checkpoint them')
    checkpointing.save(manager, at_step, host_state, input_pipeline.checkpoint_save_args(train_iter), force=True)

  k = tc.steps_per_call
  last_saved = restored_step
  try:
    with _PreemptionFlag() as preemption, metric_writers.ensure_flushes(writer):
      while step < tc.num_steps:
        if preemption.requested:
          break
        local = [next(train_iter) for _ in range(k)]
        batches = jax.tree.map(lambda *xs: np.stack(xs), *local)
        metrics = trainer.step(batches)
        now = time.time()
        for done in range(step + 1, step + k + 1):  # clu's periodic actions expect every step number once
          progress(done, now)
        step += k

        if step % tc.log_every == 0 or step >= tc.num_steps:
          summary = _summarize(jax.device_get(metrics))
          writer.write_scalars(step, summary)
          if summary['consecutive_skips'] >= tc.max_consecutive_skips:
            raise TrainingDivergedError(
                f'{int(summary["consecutive_skips"])} consecutive non-finite updates at step {step} '
                f'(training.max_consecutive_skips={tc.max_consecutive_skips}); the last good checkpoint is '
                f'kept. Lower optim.lr, check the data, or use a fixed variance.')
        if sample_fn is not None and step % tc.sample_every == 0:
          _write_sample_grid(config, trainer, sample_fn, writer, workdir, step)
        if step % tc.checkpoint_every == 0 or step >= tc.num_steps:
          save(step)
          last_saved = step
      if step != last_saved:
        save(step)  # preempted between checkpoints
  finally:
    manager.wait_until_finished()
    manager.close()
  return trainer.host_state()


def _write_sample_grid(config, trainer: Trainer, sample_fn, writer, workdir: str, step: int) -> None:
  labels = sampling.sample_labels(config, config.sample.batch_size)
  rng = jax.random.fold_in(trainer.streams['sample'], step)
  samples = sampling.generate(sample_fn, trainer.host_state().ema_params, rng, labels, trainer.mesh,
                              config.sample.batch_size)
  grid = images_lib.make_grid(*sampling.grid_layout(config, samples, labels))
  if jax.process_index() == 0:
    images_lib.save_png(grid, os.path.join(workdir, 'samples', f'train_step_{step}.png'))
  writer.write_images(step, {'samples': grid[None]})


def _flat(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out
