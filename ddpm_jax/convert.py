"""Released DDPM weights in diffusers format -> ddpm_jax parameters and an inference checkpoint.

The released models of Ho et al. 2020 (google/ddpm-cifar10-32, google/ddpm-celebahq-256, google/ddpm-church-256,
google/ddpm-bedroom-256, google/ddpm-cat-256, ...) are distributed as a diffusers `UNet2DModel`: a `config.json` and
`diffusion_pytorch_model.safetensors` (or `.bin`, a `torch.save` pickle), at the top of the directory or under `unet/`.
Their config reproduces the original TF network exactly (`flip_sin_to_cos=False`, `freq_shift=1`,
`downsample_padding=0`, `norm_eps=1e-6`, single-head attention), which is what `ddpm_jax.models.UNet` computes.

    python -m ddpm_jax.convert --checkpoint DIR --out WORKDIR [--config configs/cifar10.py] [--step 0]

writes `<WORKDIR>/checkpoints/<step>/` (params = ema_params = the released weights, which are the EMA weights) and
`<WORKDIR>/config.json` (the full resolved config, as training writes it, with the model fields of the checkpoint).
Then `python main.py --config=configs/cifar10.py --workdir=WORKDIR --mode=sample` (or `--mode=eval`).

Nothing here imports torch: `.safetensors` files are read with `safetensors.numpy`, `.bin` files with
`ddpm_jax.torch_checkpoint` (which runs no code from the file).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from absl import flags
from absl import logging
from flax import traverse_util
import ml_collections
from ml_collections import config_flags
import numpy as np

from ddpm_jax import command_line
from ddpm_jax import config_validation
from ddpm_jax import console
from ddpm_jax import default_config
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import errors
from ddpm_jax import schedules
from ddpm_jax import torch_checkpoint
from ddpm_jax import workdir_config

WEIGHT_NAMES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
SCHEDULER_CONFIGS = ('scheduler_config.json', os.path.join('scheduler', 'scheduler_config.json'))

# `UNet2DModel.__init__` defaults (diffusers 0.42): a config.json omits the arguments it was saved without, and
# diffusers fills them in from these, so the converter must too.
DIFFUSERS_UNET2D_DEFAULTS = {
    'sample_size': None, 'in_channels': 3, 'out_channels': 3, 'center_input_sample': False,
    'time_embedding_type': 'positional', 'time_embedding_dim': None, 'freq_shift': 0, 'flip_sin_to_cos': True,
    'down_block_types': ('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
    'mid_block_type': 'UNetMidBlock2D',
    'up_block_types': ('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
    'block_out_channels': (224, 448, 672, 896), 'layers_per_block': 2, 'mid_block_scale_factor': 1,
    'downsample_padding': 1, 'downsample_type': 'conv', 'upsample_type': 'conv', 'dropout': 0.0, 'act_fn': 'silu',
    'attention_head_dim': 8, 'norm_num_groups': 32, 'attn_norm_num_groups': None, 'norm_eps': 1e-5,
    'resnet_time_scale_shift': 'default', 'add_attention': True, 'class_embed_type': None, 'num_class_embeds': None,
}

# diffusers DDPMScheduler beta_schedule -> our diffusion.schedule (scaled_linear is the original code's 'quad').
DIFFUSERS_SCHEDULES = {'linear': 'linear', 'scaled_linear': 'quad', 'squaredcos_cap_v2': 'cosine'}
# diffusers' scheduler names -> ours (export.py inverts them). Fixed variance types (the *_log ones are the same variance computed in log space).
DIFFUSERS_FIXED_VARIANCES = {'fixed_small': 'fixedsmall', 'fixed_small_log': 'fixedsmall', 'fixed_large': 'fixedlarge',
                             'fixed_large_log': 'fixedlarge'}
DIFFUSERS_PREDICTION_TYPES = {'epsilon': 'eps', 'sample': 'xstart', 'v_prediction': 'v'}


class ConversionError(errors.UserError, ValueError):
  """The checkpoint cannot be converted (missing files, unsupported architecture, mismatched tensors)."""


# ------------------------------------------------------------------------------------------------ reading weights

def load_state_dict(weights_path: str) -> Dict[str, np.ndarray]:
  """Reads `.safetensors` (safetensors.numpy) or `.bin` (`torch.save`, read without torch) weights into NumPy
  arrays; an unreadable file is a ConversionError naming it."""
  if weights_path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(weights_path))
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f'{weights_path}: unreadable safetensors file ({errors.one_line(e)})') from None
  try:
    return torch_checkpoint.read_torch_file(weights_path)
  except torch_checkpoint.TorchFileError as e:
    raise ConversionError(str(e)) from None


def find_checkpoint_files(checkpoint_dir: str) -> Tuple[str, str, Optional[str]]:
  """(config.json, weights file, scheduler_config.json or None) of a diffusers UNet2DModel directory.

  Accepts the model directory itself or a pipeline directory with the model under `unet/`.
  """
  if not os.path.isdir(checkpoint_dir):
    raise ConversionError(f'--checkpoint {checkpoint_dir!r} is not a directory')
  candidates = [checkpoint_dir, os.path.join(checkpoint_dir, 'unet')]
  for model_dir in candidates:
    weights = [os.path.join(model_dir, n) for n in WEIGHT_NAMES if os.path.isfile(os.path.join(model_dir, n))]
    config_path = os.path.join(model_dir, 'config.json')
    if weights and os.path.isfile(config_path):
      scheduler = None
      for base in (checkpoint_dir, model_dir):
        for name in SCHEDULER_CONFIGS:
          if scheduler is None and os.path.isfile(os.path.join(base, name)):
            scheduler = os.path.join(base, name)
      return config_path, weights[0], scheduler  # safetensors preferred over .bin
  raise ConversionError(f'{checkpoint_dir!r} holds no diffusers UNet2DModel: expected config.json and one of '
                        f'{", ".join(WEIGHT_NAMES)} (in the directory or in unet/)')


# ------------------------------------------------------------------------------------------------- configuration

def model_overrides_from_diffusers(unet_config: Mapping[str, Any],
                                   scheduler_config: Optional[Mapping[str, Any]] = None) -> Dict[str, Dict[str, Any]]:
  """Maps a diffusers UNet2DModel config (and DDPMScheduler config) to our config fields.

  Returns {'model': {...}, 'data': {...}, 'diffusion': {...}}. Raises ConversionError when the network is not the
  DDPM U-Net (a setting our model does not implement), naming the setting.
  """
  cls = unet_config.get('_class_name', 'UNet2DModel')
  if cls != 'UNet2DModel':
    raise ConversionError(f'config.json describes a {cls}, not a UNet2DModel')
  cfg = dict(DIFFUSERS_UNET2D_DEFAULTS)
  cfg.update({k: v for k, v in unet_config.items() if not k.startswith('_')})

  required = {
      'time_embedding_type': 'positional', 'flip_sin_to_cos': False, 'freq_shift': 1, 'downsample_padding': 0,
      'downsample_type': 'conv', 'upsample_type': 'conv', 'act_fn': 'silu', 'norm_num_groups': 32,
      'resnet_time_scale_shift': 'default', 'add_attention': True, 'center_input_sample': False,
      'mid_block_type': 'UNetMidBlock2D', 'mid_block_scale_factor': 1, 'class_embed_type': None,
      'num_class_embeds': None, 'time_embedding_dim': None,
  }
  bad = [f'{k}={cfg[k]!r} (need {v!r})' for k, v in required.items() if cfg[k] != v]
  if cfg['attn_norm_num_groups'] not in (None, 32):
    bad.append(f'attn_norm_num_groups={cfg["attn_norm_num_groups"]!r} (need None or 32)')
  if abs(float(cfg['norm_eps']) - 1e-6) > 1e-12:
    bad.append(f'norm_eps={cfg["norm_eps"]!r} (need 1e-06)')
  chans = [int(c) for c in cfg['block_out_channels']]
  ch = chans[0]
  if any(c % ch for c in chans):
    bad.append(f'block_out_channels={chans} (each must be a multiple of the first)')
  heads_dim = cfg['attention_head_dim']
  down, up = list(cfg['down_block_types']), list(cfg['up_block_types'])
  if not (len(down) == len(up) == len(chans)):
    bad.append(f'{len(down)} down blocks, {len(up)} up blocks, {len(chans)} block_out_channels')
  down_attn = []
  for i, t in enumerate(down):
    if t not in ('DownBlock2D', 'AttnDownBlock2D'):
      bad.append(f'down_block_types[{i}]={t!r}')
    down_attn.append(t == 'AttnDownBlock2D')
  up_attn = []
  for i, t in enumerate(up):
    if t not in ('UpBlock2D', 'AttnUpBlock2D'):
      bad.append(f'up_block_types[{i}]={t!r}')
    up_attn.append(t == 'AttnUpBlock2D')
  if down_attn != up_attn[::-1]:
    bad.append(f'attention at different levels on the down ({down}) and up ({up}) paths')
  # Single-head attention: head dim None (= channels) or equal to the channels of every attention level.
  attn_chans = [c for c, a in zip(chans, down_attn) if a] + [chans[-1]]
  if heads_dim is not None and any(int(heads_dim) != c for c in attn_chans):
    bad.append(f'attention_head_dim={heads_dim!r} (multi-head attention; need None)')
  sample_size = cfg['sample_size']
  if isinstance(sample_size, (list, tuple)):
    if len(set(sample_size)) != 1:
      bad.append(f'sample_size={sample_size!r} (need square images)')
    sample_size = sample_size[0]
  if not isinstance(sample_size, int) or sample_size <= 0:
    bad.append(f'sample_size={sample_size!r} (need a positive int)')
  in_ch, out_ch = int(cfg['in_channels']), int(cfg['out_channels'])
  if out_ch not in (in_ch, 2 * in_ch):
    bad.append(f'out_channels={out_ch} with in_channels={in_ch} (need C or 2C)')
  if bad:
    raise ConversionError('unsupported diffusers UNet2DModel (not the DDPM U-Net): ' + '; '.join(bad))

  learned = out_ch == 2 * in_ch
  model = {
      'ch': ch,
      'ch_mult': tuple(c // ch for c in chans),
      'num_res_blocks': int(cfg['layers_per_block']),
      'attn_resolutions': tuple(sample_size // 2 ** i for i, a in enumerate(down_attn) if a),
      'resamp_with_conv': True,
      'learned_variance': learned,
      'num_classes': 0,
  }  # dropout is a training setting, not part of the network: the base config keeps its own
  overrides = {'model': model, 'data': {'image_size': sample_size, 'num_channels': in_ch}, 'diffusion': {}}

  overrides['diffusion'] = diffusion_overrides_from_scheduler(scheduler_config or {}, learned)
  if scheduler_config and 'clip_sample' in scheduler_config:
    overrides['sample'] = {'clip_denoised': bool(scheduler_config['clip_sample'])}
  return overrides


def diffusion_overrides_from_scheduler(sched: Mapping[str, Any], learned: bool) -> Dict[str, Any]:
  """Our `config.diffusion` fields for a diffusers DDPMScheduler/DDIMScheduler config ({} when there is none).

  Maps beta_schedule (with num_train_timesteps, beta_start, beta_end; `trained_betas` when they equal one of our
  schedules), variance_type and prediction_type; raises ConversionError naming the setting it cannot represent.
  """
  if not sched:
    return {}
  diffusion: Dict[str, Any] = {}
  for src, dst in (('num_train_timesteps', 'num_timesteps'), ('beta_start', 'beta_start'), ('beta_end', 'beta_end')):
    if src in sched:
      diffusion[dst] = sched[src]
  bad = []
  if sched.get('trained_betas') is not None:
    betas = np.asarray(sched['trained_betas'], np.float64)
    matches = [name for name in schedules.SCHEDULES if len(betas) == diffusion.get('num_timesteps', len(betas)) and
               np.allclose(schedules.get_betas(name, len(betas), diffusion.get('beta_start', 1e-4),
                                               diffusion.get('beta_end', 0.02)), betas, rtol=1e-6, atol=0)]
    if matches:
      diffusion['schedule'], diffusion['num_timesteps'] = matches[0], len(betas)
    else:
      bad.append(f'trained_betas ({len(betas)} values, none of our schedules {list(schedules.SCHEDULES)})')
  elif 'beta_schedule' in sched:
    if sched['beta_schedule'] in DIFFUSERS_SCHEDULES:
      diffusion['schedule'] = DIFFUSERS_SCHEDULES[sched['beta_schedule']]
    else:
      bad.append(f'beta_schedule={sched["beta_schedule"]!r} (need one of {sorted(DIFFUSERS_SCHEDULES)})')
  variance = sched.get('variance_type', 'fixed_small')
  if learned:
    # A 2C-channel network: 'learned' reads the output as a log-variance, anything else as improved DDPM's range.
    diffusion['var_type'] = 'learned' if variance == 'learned' else 'learned_range'
  elif variance in DIFFUSERS_FIXED_VARIANCES:
    diffusion['var_type'] = DIFFUSERS_FIXED_VARIANCES[variance]
  else:
    bad.append(f'variance_type={variance!r} for a network with no variance output (need one of '
               f'{sorted(DIFFUSERS_FIXED_VARIANCES)})')
  prediction = sched.get('prediction_type', 'epsilon')
  if prediction in DIFFUSERS_PREDICTION_TYPES:
    diffusion['mean_type'] = DIFFUSERS_PREDICTION_TYPES[prediction]
  else:
    bad.append(f'prediction_type={prediction!r} (need one of {sorted(DIFFUSERS_PREDICTION_TYPES)})')
  if sched.get('thresholding'):
    bad.append('thresholding=True (dynamic thresholding is not implemented)')
  if sched.get('clip_sample', True) and float(sched.get('clip_sample_range', 1.0)) != 1.0:
    bad.append(f'clip_sample_range={sched["clip_sample_range"]!r} (need 1.0: samples are clipped to [-1, 1])')
  if bad:
    raise ConversionError('unsupported diffusers scheduler config: ' + '; '.join(bad))
  return diffusion


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Mapping[str, Any]]) -> ml_collections.ConfigDict:
  """A copy of `config` with the fields of `overrides` ({'model': {...}, 'data': {...}, 'diffusion': {...}}) set.

  The image side goes to `data.pad_to` instead of `data.image_size` when the config pads (MNIST-like data).
  """
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked deep copy
  for section, fields in overrides.items():
    for key, value in fields.items():
      if section == 'data' and key == 'image_size' and (config.data.get('pad_to', 0) or 0) > 0:
        key = 'pad_to'
      config[section][key] = value
  learned = config.model.learned_variance
  if learned is False and diffusion_lib.learns_variance(config.diffusion.var_type):
    config.diffusion.var_type = 'fixedlarge'  # a C-channel network has no variance output (the paper's choice)
  if learned and config.diffusion.loss_type not in diffusion_lib.BOUND_LOSS_TYPES:
    config.diffusion.loss_type = 'hybrid'  # the only losses that train a learned variance (validation requires it)
  return config


def model_from_overrides(overrides: Mapping[str, Mapping[str, Any]]):
  """The float32 `ddpm_jax.models.UNet` that `overrides` (from `model_overrides_from_diffusers`) describes."""
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  m, d = overrides['model'], overrides['data']
  return models.UNet(ch=m['ch'], out_ch=d['num_channels'] * (2 if m['learned_variance'] else 1),
                     ch_mult=tuple(m['ch_mult']), num_res_blocks=m['num_res_blocks'],
                     attn_resolutions=tuple(m['attn_resolutions']), dropout=0.0,
                     resamp_with_conv=m['resamp_with_conv'], image_size=d['image_size'], in_ch=d['num_channels'],
                     num_classes=m['num_classes'])


# ------------------------------------------------------------------------------------------------ tensor mapping

_LEGACY_ATTENTION = re.compile(r'(attentions\.\d+)\.(query|key|value|proj_attn)\.')
_LEGACY_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def _rename_legacy(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Old diffusers attention names (query/key/value/proj_attn, as in the first DDPM uploads) -> current ones."""
  return {_LEGACY_ATTENTION.sub(lambda m: f'{m.group(1)}.{_LEGACY_NAMES[m.group(2)]}.', k): v
          for k, v in state.items()}


def _module_pairs(model) -> list:
  """(diffusers module prefix, our module name, kind) for every module of the U-Net, in order."""
  levels = len(model.ch_mult)
  pairs = [('conv_in', 'conv_in', 'conv'), ('time_embedding.linear_1', 'temb_dense0', 'dense'),
           ('time_embedding.linear_2', 'temb_dense1', 'dense')]
  for i in range(levels):
    attn = model.image_size // 2 ** i in model.attn_resolutions
    for j in range(model.num_res_blocks):
      pairs.append((f'down_blocks.{i}.resnets.{j}', f'down_{i}_block_{j}', 'resnet'))
      if attn:
        pairs.append((f'down_blocks.{i}.attentions.{j}', f'down_{i}_attn_{j}', 'attn'))
    if i != levels - 1:
      pairs.append((f'down_blocks.{i}.downsamplers.0.conv', f'down_{i}_downsample', 'conv'))
  pairs += [('mid_block.resnets.0', 'mid_block_1', 'resnet'), ('mid_block.attentions.0', 'mid_attn_1', 'attn'),
            ('mid_block.resnets.1', 'mid_block_2', 'resnet')]
  for k in range(levels):
    i = levels - 1 - k  # diffusers numbers the up blocks from the lowest resolution
    attn = model.image_size // 2 ** i in model.attn_resolutions
    for j in range(model.num_res_blocks + 1):
      pairs.append((f'up_blocks.{k}.resnets.{j}', f'up_{i}_block_{j}', 'resnet'))
      if attn:
        pairs.append((f'up_blocks.{k}.attentions.{j}', f'up_{i}_attn_{j}', 'attn'))
    if i != 0:
      pairs.append((f'up_blocks.{k}.upsamplers.0.conv', f'up_{i}_upsample', 'conv'))
  pairs += [('conv_norm_out', 'norm_out', 'norm'), ('conv_out', 'conv_out', 'conv')]
  return pairs


def _linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear (out, in) or 1x1 Conv2d (out, in, 1, 1) weight -> Flax Dense kernel (in, out)."""
  if w.ndim == 4 and w.shape[2:] == (1, 1):
    w = w[:, :, 0, 0]
  return w.T if w.ndim == 2 else w  # anything else is left as is and reported as a shape mismatch


class _Converter:
  """Pulls tensors out of a diffusers state dict, recording which were used."""

  def __init__(self, state: Mapping[str, np.ndarray]):
    self.state = state
    self.used = set()
    self.missing = []

  def get(self, name: str) -> Optional[np.ndarray]:
    if name not in self.state:
      self.missing.append(name)
      return None
    self.used.add(name)
    return np.asarray(self.state[name], dtype=np.float32)

  def conv(self, prefix):
    w, b = self.get(f'{prefix}.weight'), self.get(f'{prefix}.bias')
    if w is not None and w.ndim == 4:
      w = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO (other ranks are reported as shape mismatches)
    return {'kernel': w, 'bias': b}

  def dense(self, prefix):
    w, b = self.get(f'{prefix}.weight'), self.get(f'{prefix}.bias')
    return {'kernel': None if w is None else _linear_kernel(w), 'bias': b}

  def norm(self, prefix):
    return {'scale': self.get(f'{prefix}.weight'), 'bias': self.get(f'{prefix}.bias')}

  def resnet(self, prefix, has_shortcut):
    out = {'norm1': self.norm(f'{prefix}.norm1'), 'conv1': self.conv(f'{prefix}.conv1'),
           'temb_proj': self.dense(f'{prefix}.time_emb_proj'), 'norm2': self.norm(f'{prefix}.norm2'),
           'conv2': self.conv(f'{prefix}.conv2')}
    if has_shortcut:  # a 1x1 conv where the channel count changes
      out['nin_shortcut'] = self.dense(f'{prefix}.conv_shortcut')
    return out

  def attn(self, prefix):
    qkv = [self.dense(f'{prefix}.{n}') for n in ('to_q', 'to_k', 'to_v')]
    fused = {}
    for leaf in ('kernel', 'bias'):
      parts = [p[leaf] for p in qkv]
      fused[leaf] = None if any(p is None for p in parts) else np.concatenate(parts, axis=-1)
    return {'norm': self.norm(f'{prefix}.group_norm'), 'qkv': fused, 'proj_out': self.dense(f'{prefix}.to_out.0')}


def _listing(names, limit: int = 20) -> str:
  names = sorted(names)
  shown = ', '.join(names[:limit])
  return shown + (f', ... ({len(names) - limit} more)' if len(names) > limit else '')


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model) -> Dict[str, Any]:
  """Maps a diffusers UNet2DModel state dict onto the params of `model` (a `ddpm_jax.models.UNet`).

  Strict: every diffusers tensor must be used and every parameter of `model` filled with the right shape;
  otherwise raises ConversionError listing the missing, unexpected and mismatched tensors. Returns float32 NumPy
  arrays in the nested-dict layout of `model.init(...)['params']`.
  """
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  state = _rename_legacy(state_dict)
  expected = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(models.param_shapes(model), sep='/').items()}
  conv = _Converter(state)
  params = {}
  for theirs, ours, kind in _module_pairs(model):
    if kind == 'resnet':
      params[ours] = conv.resnet(theirs, has_shortcut=f'{ours}/nin_shortcut/kernel' in expected)
    else:
      params[ours] = getattr(conv, kind)(theirs)
  converted = traverse_util.flatten_dict(params, sep='/')  # None where a tensor was missing
  flat = {k: v for k, v in converted.items() if v is not None}

  problems = []
  if conv.missing:
    problems.append(f'missing from the checkpoint: {_listing(conv.missing)}')
  unexpected = set(state) - conv.used
  if unexpected:
    problems.append(f'unexpected in the checkpoint: {_listing(unexpected)}')
  unfilled = set(expected) - set(converted)  # only if the mapping above forgot a module
  if unfilled:
    problems.append(f'model parameters not filled: {_listing(unfilled)}')
  extra = set(flat) - set(expected)
  if extra:
    problems.append(f'converted tensors the model does not have: {_listing(extra)}')
  mismatched = [f'{k} {flat[k].shape} vs model {expected[k]}' for k in sorted(set(flat) & set(expected))
                if tuple(flat[k].shape) != expected[k]]
  if mismatched:
    problems.append(f'shape mismatches: {_listing(mismatched)}')
  if problems:
    raise ConversionError('cannot convert the diffusers checkpoint: ' + '; '.join(problems))
  return traverse_util.unflatten_dict(flat, sep='/')


# ------------------------------------------------------------------------------------------------ entry points

def load_diffusers_checkpoint(checkpoint_dir: str) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
  """Reads a diffusers DDPM checkpoint directory into (params, config overrides).

  `overrides` ({'model': ..., 'data': ..., 'diffusion': ...}) describes the network; `apply_overrides(config,
  overrides)` then `models.create_model(...)` rebuilds it. The params are float32 NumPy arrays.
  """
  config_path, weights_path, scheduler_path = find_checkpoint_files(checkpoint_dir)
  try:
    with open(config_path) as f:
      unet_config = json.load(f)
    scheduler_config = None
    if scheduler_path:
      with open(scheduler_path) as f:
        scheduler_config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f'unreadable config in {checkpoint_dir}: {e}') from None
  overrides = model_overrides_from_diffusers(unet_config, scheduler_config)
  model = model_from_overrides(overrides)
  params = convert_state_dict(load_state_dict(weights_path), model)
  return params, overrides


def convert_checkpoint(checkpoint_dir: str, workdir: str, step: int = 0,
                       base_config: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """Converts a diffusers checkpoint into `workdir`: an inference checkpoint at `step` plus `config.json`.

  `base_config` (default: `ddpm_jax.default_config`) supplies everything the checkpoint does not say (dataset, sampling
  and evaluation settings); its model, image and diffusion fields (the latter from the scheduler config) are
  replaced by the checkpoint's, with a warning where they differ.
  Returns the written config.
  """
  from ddpm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  if base_config is None:
    base_config = default_config.get_config()
  params, overrides = load_diffusers_checkpoint(checkpoint_dir)
  config = apply_overrides(base_config, overrides)
  changed = [f'{s}.{k}: {base_config[s][k]!r} -> {config[s][k]!r}' for s in overrides
             for k in overrides[s] if s in base_config and k in base_config[s] and
             _canon(base_config[s][k]) != _canon(config[s][k]) and not (k == 'learned_variance' and
                                                                         base_config[s][k] is None)]
  if changed:
    logging.info('the checkpoint sets, over the base config: %s. %s/config.json records them: sample and '
                 'evaluate with --workdir alone.', '; '.join(changed), workdir)
  config_validation.validate_config(config)  # one-line ConfigError before anything is written
  os.makedirs(workdir, exist_ok=True)
  checkpointing.save_inference_checkpoint(workdir, step, params, params)  # released weights are the EMA ones
  workdir_config.write(config, workdir)  # what --mode=sample|eval read when no --config is given
  return config


def _canon(v):
  return list(v) if isinstance(v, (list, tuple)) else v


_PROGRAM = 'ddpm_jax.convert'
_HELP_FLAGS = ('-h', '--help', '--helpshort', '--helpfull', '-?')


def _define_flags(argv: Sequence[str]) -> flags.FlagValues:
  """The command's flags, in a FlagValues of their own: importing this module defines no global flags, and each
  `main` call parses afresh. `argv` is where ml_collections finds the `--config.<field>=value` overrides."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', None, 'Config file supplying dataset/sampling/eval settings; fields can be overridden with '
      '--config.<field>=value (default: the package defaults, ddpm_jax/default_config.py).', flag_values=fv,
      lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string('checkpoint', None, 'diffusers UNet2DModel (or pipeline) directory.', flag_values=fv)
  flags.DEFINE_string('out', None, 'Workdir to write checkpoints/<step>/ and config.json into.', flag_values=fv)
  flags.DEFINE_integer('step', 0, 'Step number to store the weights under.', lower_bound=0, flag_values=fv)
  flags.mark_flags_as_required(['checkpoint', 'out'], flag_values=fv)
  return fv


def parse_flags(argv: Sequence[str]) -> flags.FlagValues:
  """Parses the command's flags (`argv` without the program name). Every mistake -- an unknown or missing flag, a
  bad value, a config file that does not load, an override of a field the config lacks -- is a one-line
  UserError naming the flag."""
  argv = [_PROGRAM] + list(argv)
  fv = _define_flags(argv)
  command_line.parse(fv, argv)
  return fv


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m ddpm_jax.convert --checkpoint DIR --out WORKDIR [--config FILE] [--step N]` (`argv` without the
  program name; default sys.argv[1:]). Returns the exit code: 0, or 2 with one line on stderr for anything the
  user can fix (a flag, the config, the checkpoint directory or its files)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if any(a in _HELP_FLAGS for a in argv):
    print(f'{__doc__}\nflags:\n{_define_flags([_PROGRAM]).get_help()}')
    return 0
  # What app.run would do before logging (this command parses its own FlagValues): absl's handler, no notice.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  console.setup()
  try:
    fv = parse_flags(argv)
    base = fv.config if fv['config'].present else None
    config = convert_checkpoint(fv.checkpoint, fv.out, fv.step, base)
  except errors.UserError as e:
    return command_line.report(_PROGRAM, e)
  m = config.model
  print(f'wrote {fv.out}/checkpoints/{fv.step} and {fv.out}/config.json: ch={m.ch} ch_mult={tuple(m.ch_mult)} '
        f'num_res_blocks={m.num_res_blocks} attn_resolutions={tuple(m.attn_resolutions)} '
        f'image_size={config.data.pad_to or config.data.image_size} learned_variance={m.learned_variance}')
  return 0


def entry() -> None:
  """`python -m ddpm_jax.convert ...`: exits with `main`'s code."""
  sys.exit(command_line.run_interruptible(_PROGRAM, main))


if __name__ == '__main__':
  entry()
