"""Validation of a full config before anything is built or compiled.

Every user error becomes one `ConfigError` line naming the field and what is allowed; `main.py` prints it without a
traceback and exits non-zero.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional

import ml_collections

from ddpm_jax import diffusion
from ddpm_jax import input_pipeline
from ddpm_jax import models
from ddpm_jax import samplers
from ddpm_jax import schedules
from ddpm_jax.models import unet
from ddpm_jax.errors import ConfigError

# Allowed values live with the code that gives them meaning; validation reads them from there.
DATASETS = input_pipeline.VALID_DATASETS
SCHEDULES = schedules.SCHEDULES
MEAN_TYPES = diffusion.MEAN_TYPES
VAR_TYPES = diffusion.VAR_TYPES
LOSS_TYPES = diffusion.LOSS_TYPES
T_SAMPLING = diffusion.T_SAMPLINGS
LR_DECAYS = ('none', 'cosine', 'linear')  # optim.lr_decay (train_state.learning_rate_schedule)
PARALLELISM = ('jit', 'pmap')  # training.parallelism (train.Trainer)
DTYPES = tuple(models.DTYPES)
SAMPLE_METHODS = samplers.METHODS
TIMESTEP_SPACINGS = samplers.TIMESTEP_SPACINGS
GROUPNORM_GROUPS = unet.GROUPNORM_GROUPS


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ConfigError(f'config.{field}={value!r} is invalid: {allowed}')


def _one_of(config: ml_collections.ConfigDict, field: str, choices: Iterable[str]) -> None:
  value = _get(config, field)
  choices = tuple(choices)
  _require(value in choices, field, value, f'must be one of {list(choices)}')


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  node = config
  for part in field.split('.'):
    if part not in node:
      raise ConfigError(f'config.{field} is missing (start dataset configs from configs/default.py)')
    node = node[part]
  return node


def _positive_int(config, field: str) -> None:
  value = _get(config, field)
  _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, value,
           'must be a positive integer')


def _in_range(config, field: str, low: float, high: float, *, low_open=False, high_open=True) -> None:
  value = _get(config, field)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok:
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
  interval = f'{"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
  _require(ok, field, value, f'must be a number in {interval}')


def validate_config(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
  """Raises `ConfigError` for the first invalid field; `num_devices` = global device count for batch checks."""
  # data
  _one_of(config, 'data.dataset', DATASETS)
  _positive_int(config, 'data.image_size')
  _one_of(config, 'data.num_channels', (1, 3))
  _require(isinstance(config.data.pad_to, int) and config.data.pad_to >= 0, 'data.pad_to', config.data.pad_to,
           'must be 0 (no padding) or the padded image side')
  if config.data.dataset == 'folder':
    _require(bool(config.data.path), 'data.path', config.data.path,
             "must name a directory of PNG/JPEG images when data.dataset='folder'")
  _require(isinstance(config.data.num_workers, int) and config.data.num_workers >= 0, 'data.num_workers',
           config.data.num_workers, 'must be an integer >= 0')

  # model
  _positive_int(config, 'model.ch')
  ch_mult = tuple(config.model.ch_mult)
  _require(len(ch_mult) > 0 and all(isinstance(m, int) and m > 0 for m in ch_mult), 'model.ch_mult',
           config.model.ch_mult, 'must be a non-empty tuple of positive integers, e.g. (1, 2, 2, 2)')
  _require(all(config.model.ch * m % GROUPNORM_GROUPS == 0 for m in ch_mult), 'model.ch', config.model.ch,
           f'ch * every ch_mult must divide by {GROUPNORM_GROUPS} (GroupNorm groups)')
  _positive_int(config, 'model.num_res_blocks')
  _in_range(config, 'model.dropout', 0.0, 1.0)
  _one_of(config, 'model.dtype', DTYPES)
  num_classes = config.model.num_classes
  _require(isinstance(num_classes, int) and num_classes >= 0, 'model.num_classes', num_classes,
           'must be 0 (unconditional) or the number of classes')
  side = config.data.pad_to or config.data.image_size
  levels = len(ch_mult) - 1
  _require(side % (2 ** levels) == 0, 'data.image_size', side,
           f'must divide by 2**(len(model.ch_mult) - 1) = {2 ** levels} for the U-Net to downsample')
  # The U-Net attends at a level whose feature-map side is listed (models/unet.py); other entries would be ignored.
  sides = [side // 2 ** i for i in range(len(ch_mult))]
  attn = config.model.attn_resolutions
  _require(all(r in sides for r in attn), 'model.attn_resolutions', attn,
           f'every entry must be a feature-map side of the U-Net, one of {sides} (image side {side} halved per '
           f'model.ch_mult level)')

  # diffusion
  _one_of(config, 'diffusion.schedule', SCHEDULES)
  _positive_int(config, 'diffusion.num_timesteps')
  _in_range(config, 'diffusion.beta_start', 0.0, 1.0, low_open=True)
  _in_range(config, 'diffusion.beta_end', 0.0, 1.0, low_open=True)
  _require(config.diffusion.beta_start <= config.diffusion.beta_end, 'diffusion.beta_start',
           config.diffusion.beta_start, f'must be <= diffusion.beta_end ({config.diffusion.beta_end})')
  _one_of(config, 'diffusion.mean_type', MEAN_TYPES)
  _one_of(config, 'diffusion.var_type', VAR_TYPES)
  _one_of(config, 'diffusion.loss_type', LOSS_TYPES)
  _one_of(config, 'diffusion.t_sampling', T_SAMPLING)
  _in_range(config, 'diffusion.hybrid_lambda', 0.0, float('inf'))
  learned = diffusion.learns_variance(config.diffusion.var_type)
  if config.model.learned_variance is not None:
    _require(config.model.learned_variance == learned, 'model.learned_variance',
             config.model.learned_variance,
             f'must agree with diffusion.var_type={config.diffusion.var_type!r} (or leave it unset to derive it)')
  if learned:
    _require(config.diffusion.loss_type in diffusion.BOUND_LOSS_TYPES, 'diffusion.var_type',
             config.diffusion.var_type,
             f"a learned variance is only trained by a loss with the bound (diffusion.loss_type 'kl', 'hybrid' or "
             f"'rescaled_kl'), not {config.diffusion.loss_type!r}")

  # training
  _positive_int(config, 'training.batch_size')
  if num_devices:
    _require(config.training.batch_size % num_devices == 0, 'training.batch_size', config.training.batch_size,
             f'must divide by the number of devices ({num_devices})')
  for field in ('num_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints', 'steps_per_call',
                'max_consecutive_skips'):
    _positive_int(config, f'training.{field}')
  _require(isinstance(config.training.sample_every, int) and config.training.sample_every >= 0,
           'training.sample_every', config.training.sample_every, 'must be an integer >= 0 (0 = never)')
  _in_range(config, 'training.ema_decay', 0.0, 1.0)
  _in_range(config, 'training.label_dropout', 0.0, 1.0)
  _in_range(config, 'training.blowup_factor', 0.0, float('inf'))
  spc = config.training.steps_per_call
  for field in ('num_steps', 'log_every', 'checkpoint_every', 'sample_every'):
    value = config.training[field]
    _require(value % spc == 0, f'training.{field}', value,
             f'must be a multiple of training.steps_per_call ({spc})')
  _one_of(config, 'training.parallelism', PARALLELISM)

  # optim
  _in_range(config, 'optim.lr', 0.0, float('inf'), low_open=True)
  _require(isinstance(config.optim.warmup_steps, int) and config.optim.warmup_steps >= 0, 'optim.warmup_steps',
           config.optim.warmup_steps, 'must be an integer >= 0')
  _one_of(config, 'optim.lr_decay', LR_DECAYS)
  _require(isinstance(_get(config, 'training.ema_warmup'), bool), 'training.ema_warmup',
           config.training.ema_warmup, 'must be True or False')
  _require(config.optim.lr_decay == 'none' or config.training.num_steps > config.optim.warmup_steps,
           'optim.lr_decay', config.optim.lr_decay,
           f'decays from the end of warmup to training.num_steps, so it needs training.num_steps '
           f'({config.training.num_steps}) > optim.warmup_steps ({config.optim.warmup_steps}); lower '
           "optim.warmup_steps or set optim.lr_decay='none'")
  _in_range(config, 'optim.grad_clip', 0.0, float('inf'))
  _in_range(config, 'optim.b1', 0.0, 1.0)
  _in_range(config, 'optim.b2', 0.0, 1.0)
  _in_range(config, 'optim.eps', 0.0, float('inf'), low_open=True)
  _in_range(config, 'optim.weight_decay', 0.0, float('inf'))

  # sample
  _one_of(config, 'sample.method', SAMPLE_METHODS)
  _in_range(config, 'sample.eta', 0.0, float('inf'))
  _require(config.sample.method == 'ddim' or config.sample.eta == 0.0, 'sample.eta', config.sample.eta,
           f"must be 0 with sample.method={config.sample.method!r} (eta is DDIM's; use sample.method='ddim')")
  _positive_int(config, 'sample.num_samples')
  _positive_int(config, 'sample.batch_size')
  _in_range(config, 'sample.guidance_scale', 0.0, float('inf'))
  label = config.sample.class_label
  if num_classes:
    _require(isinstance(label, int) and -1 <= label < num_classes, 'sample.class_label', label,
             f'must be -1 (every class) or a class in [0, {num_classes})')
    _require(config.sample.guidance_scale == 0.0 or config.training.label_dropout > 0, 'sample.guidance_scale',
             config.sample.guidance_scale,
             'needs training.label_dropout > 0 (otherwise the null-class embedding is never trained)')
  else:
    unconditional = 'for an unconditional model (model.num_classes=0)'
    _require(config.sample.guidance_scale == 0.0, 'sample.guidance_scale', config.sample.guidance_scale,
             f'must be 0 {unconditional}')
    _require(label == -1, 'sample.class_label', label, f'must be -1 {unconditional}')
  _validate_respacing(config)

  # eval
  _positive_int(config, 'eval.bpd_batch_size')
  _positive_int(config, 'eval.num_samples')
  _positive_int(config, 'eval.inception_batch_size')
  _require(isinstance(config.eval.bpd_num_examples, int) and config.eval.bpd_num_examples >= 0,
           'eval.bpd_num_examples', config.eval.bpd_num_examples, 'must be 0 (whole split) or a positive count')
  _validate_cache_dir(config.eval.get('cache_dir'))


def _validate_cache_dir(cache_dir: Any) -> None:
  """eval.cache_dir: None (the user's cache home) or a directory that exists and is writable, or can be created."""
  if cache_dir is None:
    return
  allowed = 'must be None (the default cache, ~/.cache/ddpm_jax) or a writable directory'
  _require(isinstance(cache_dir, str) and cache_dir.strip() != '', 'eval.cache_dir', cache_dir, allowed)
  path = os.path.abspath(os.path.expanduser(cache_dir))
  existing = path
  while not os.path.exists(existing):  # the nearest existing ancestor is where the directory would be created
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    _require(False, 'eval.cache_dir', cache_dir, f'{allowed}; {existing} is a file')
  _require(os.access(existing, os.W_OK | os.X_OK), 'eval.cache_dir', cache_dir,
           f'{allowed}; {existing} is not writable')


def _validate_respacing(config: ml_collections.ConfigDict) -> None:
  """sample.respacing / timestep_spacing / num_inference_steps / steps_offset / timesteps (fields recorded before
  the diffusers ones existed take their defaults, as `samplers.config_respacing`)."""
  sample = config.sample
  spacing = sample.get('timestep_spacing', '')
  _require(spacing in TIMESTEP_SPACINGS, 'sample.timestep_spacing', spacing,
           f'must be one of {list(TIMESTEP_SPACINGS)} (\'\' = sample.respacing)')
  timesteps = sample.get('timesteps', None) or ()
  _require(isinstance(timesteps, (tuple, list)), 'sample.timesteps', timesteps,
           'must be a tuple of timesteps, e.g. (999, 800, 600, 400, 200, 0), or () for none')
  clipped_eps = sample.get('use_clipped_model_output', True)
  _require(isinstance(clipped_eps, bool), 'sample.use_clipped_model_output', clipped_eps,
           'must be True (improved-diffusion) or False (diffusers DDIMPipeline)')
  chosen = [f for f, on in (('sample.timesteps', bool(timesteps)), ('sample.timestep_spacing', bool(spacing)),
                            ('sample.respacing', bool(sample.respacing))) if on]
  if len(chosen) > 1:
    _require(False, chosen[0], _get(config, chosen[0]),
             f'give only one of sample.timesteps, sample.timestep_spacing, sample.respacing (also set: {chosen[1]})')
  if not chosen:
    return  # all T steps
  try:
    samplers.space_timesteps(config.diffusion.num_timesteps, samplers.config_respacing(sample))
  except ValueError as e:
    message = str(e)
    raise ConfigError(message if message.startswith('config.') else f'config.{message}') from None
