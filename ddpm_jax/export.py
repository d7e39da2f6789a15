"""A run directory (trained here or converted) -> a diffusers `DDPMPipeline` folder, for the hub and PyTorch tools.

    python -m ddpm_jax.export --workdir W --out DIR [--ema | --noema] [--step N]

reads the run's recorded config (`W/config.json`) and a checkpoint of `W`, and writes

    DIR/model_index.json                             DDPMPipeline = unet + scheduler
    DIR/unet/config.json                             UNet2DModel arguments (the DDPM U-Net of Ho et al. 2020, App. B)
    DIR/unet/diffusion_pytorch_model.safetensors     float32 weights, torch layout (written with safetensors.numpy)
    DIR/scheduler/scheduler_config.json              DDPMScheduler: betas, T, variance type, clipping, prediction type

so that `diffusers.DDPMPipeline.from_pretrained(DIR)` loads it offline, and `python -m ddpm_jax.convert
--checkpoint DIR` reads it back (the tensor names are `ddpm_jax.convert`'s, inverted). `--ema` (the default) exports
the EMA parameters, which sampling and evaluation use; `--noema` the raw training parameters.

What diffusers cannot represent is refused before anything is written, in one line: `mean_type=xprev` (no
`prediction_type` for the posterior mean), `var_type=learned` (diffusers reads a `learned` output as a variance, ours
is a log-variance), and `resamp_with_conv=False` (UNet2DModel always resamples with convolutions). Beta schedules
with no diffusers name (const, jsd, warmup10, warmup50) are exported as an explicit `trained_betas` list.

Class-conditional models are exported as a UNet2DModel with `num_class_embeds = num_classes + 1` (row
`num_classes` is our null label): `unet(x, t, class_labels=y)` computes our network exactly. What diffusers does not
have is said at export time: `DDPMPipeline` passes no labels, so it cannot sample such a model, and no diffusers
pipeline for UNet2DModel does classifier-free guidance (`sample.guidance_scale`).

The folder appears under its name only when complete: everything is written into a temporary sibling folder that is
renamed onto `DIR` at the end, and removed if anything fails. An existing non-empty `DIR` is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from absl import flags
from absl import logging as absl_logging
from flax import traverse_util
import ml_collections
import numpy as np

from ddpm_jax import checkpointing
from ddpm_jax import command_line
from ddpm_jax import console
from ddpm_jax import convert
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import errors
from ddpm_jax import models
from ddpm_jax import schedules
from ddpm_jax import workdir_config

# The diffusers release the written format was checked against (tests/test_export.py loads it with that release).
DIFFUSERS_VERSION = '0.42.1'
UNET_DIR, SCHEDULER_DIR = 'unet', 'scheduler'
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'

# Our diffusion fields -> DDPMScheduler's names: convert's tables inverted. Missing keys have no diffusers
# equivalent (see the module doc). Schedules without a diffusers name are written out as trained_betas.
PREDICTION_TYPES = {ours: theirs for theirs, ours in convert.DIFFUSERS_PREDICTION_TYPES.items()}
VARIANCE_TYPES = {**{ours: theirs for theirs, ours in convert.DIFFUSERS_FIXED_VARIANCES.items()
                     if not theirs.endswith('_log')}, 'learned_range': 'learned_range'}
NAMED_SCHEDULES = {ours: theirs for theirs, ours in convert.DIFFUSERS_SCHEDULES.items()}


class ExportError(errors.UserError, ValueError):
  """The run cannot be exported (what diffusers cannot represent, a checkpoint that does not fit its config, an
  output folder in the way)."""


# ------------------------------------------------------------------------------------------------- configuration

def unet_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The diffusers `UNet2DModel` config of the U-Net `config` describes (every argument, explicitly).

  Raises ExportError for a network UNet2DModel cannot compute (`model.resamp_with_conv=False`).
  """
  m = config.model
  if not bool(m.resamp_with_conv):
    raise ExportError('model.resamp_with_conv=False cannot be exported: diffusers UNet2DModel always up/downsamples '
                      'with a 3x3 convolution (resamp_with_conv=True)')
  side, _, channels = models.image_shape(config)
  chans = [int(m.ch) * int(c) for c in m.ch_mult]
  attention = [side // 2 ** i in tuple(m.attn_resolutions) for i in range(len(chans))]
  num_classes = int(m.get('num_classes', 0) or 0)
  learned = diffusion_lib.learns_variance(config.diffusion.var_type)
  return {
      '_class_name': 'UNet2DModel', '_diffusers_version': DIFFUSERS_VERSION,
      'sample_size': side, 'in_channels': channels, 'out_channels': channels * (2 if learned else 1),
      'center_input_sample': False, 'time_embedding_type': 'positional', 'time_embedding_dim': None,
      # The original TF network's timestep embedding: [sin, cos] with frequencies exp(-log(1e4) i / (d/2 - 1)).
      'freq_shift': 1, 'flip_sin_to_cos': False,
      'down_block_types': ['AttnDownBlock2D' if a else 'DownBlock2D' for a in attention],
      'mid_block_type': 'UNetMidBlock2D',
      'up_block_types': ['AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attention)],
      'block_out_channels': chans, 'layers_per_block': int(m.num_res_blocks), 'mid_block_scale_factor': 1,
      # TF 'SAME' padding of the stride-2 convs is asymmetric (0 before, 1 after): diffusers' padding=0 branch.
      'downsample_padding': 0, 'downsample_type': 'conv', 'upsample_type': 'conv',
      'dropout': float(m.dropout),  # a training setting; diffusers' eval() ignores it, fine-tuning would use it
      'act_fn': 'silu', 'attention_head_dim': None,  # None: one head of all the channels, as ours
      'norm_num_groups': 32, 'attn_norm_num_groups': None, 'norm_eps': 1e-6,
      'resnet_time_scale_shift': 'default', 'add_attention': True,
      'class_embed_type': None, 'num_class_embeds': num_classes + 1 if num_classes else None,
      'num_train_timesteps': None,  # only for time_embedding_type='learned'
  }


def scheduler_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The diffusers `DDPMScheduler` config of `config.diffusion` (and the sampling fields diffusers keeps there).

  Raises ExportError for a mean or variance type DDPMScheduler has no name for.
  """
  d, s = config.diffusion, config.sample
  if d.mean_type not in PREDICTION_TYPES:
    raise ExportError(f'diffusion.mean_type={d.mean_type!r} cannot be exported: diffusers DDPMScheduler predicts '
                      f'only {", ".join(f"{k} ({v})" for k, v in PREDICTION_TYPES.items())}')
  if d.var_type not in VARIANCE_TYPES:
    raise ExportError(f'diffusion.var_type={d.var_type!r} cannot be exported: diffusers\' variance_type=learned '
                      'reads the output as a variance, ours is a log-variance; exportable: '
                      f'{", ".join(VARIANCE_TYPES)}')
  trained_betas = None
  if d.schedule not in NAMED_SCHEDULES:
    trained_betas = schedules.get_betas(d.schedule, int(d.num_timesteps), float(d.beta_start),
                                        float(d.beta_end)).tolist()
  return {
      '_class_name': 'DDPMScheduler', '_diffusers_version': DIFFUSERS_VERSION,
      'num_train_timesteps': int(d.num_timesteps), 'beta_start': float(d.beta_start), 'beta_end': float(d.beta_end),
      # With trained_betas set, diffusers ignores beta_schedule; 'linear' is only a valid placeholder.
      'beta_schedule': NAMED_SCHEDULES.get(d.schedule, 'linear'), 'trained_betas': trained_betas,
      'variance_type': VARIANCE_TYPES[d.var_type], 'prediction_type': PREDICTION_TYPES[d.mean_type],
      'clip_sample': bool(s.clip_denoised), 'clip_sample_range': 1.0, 'thresholding': False,
      'dynamic_thresholding_ratio': 0.995, 'sample_max_value': 1.0, 'rescale_betas_zero_snr': False,
      # Used by DDPMPipeline(num_inference_steps < T); '' (improved-diffusion respacing) has no diffusers name, and
      # diffusers' default, leading, is what our 'ddimN' strings compute.
      'timestep_spacing': s.get('timestep_spacing', '') or 'leading', 'steps_offset': int(s.get('steps_offset', 0)),
  }


def pipeline_index() -> Dict[str, Any]:
  """`model_index.json` of a DDPMPipeline folder."""
  return {'_class_name': 'DDPMPipeline', '_diffusers_version': DIFFUSERS_VERSION,
          UNET_DIR: ['diffusers', 'UNet2DModel'], SCHEDULER_DIR: ['diffusers', 'DDPMScheduler']}


def limitations(config: ml_collections.ConfigDict) -> List[str]:
  """What the exported folder does not carry over (one line each), for the person exporting."""
  notes = []
  num_classes = int(config.model.get('num_classes', 0) or 0)
  if num_classes:
    notes.append(f'class-conditional model: the UNet2DModel takes class_labels in 0..{num_classes} ({num_classes} '
                 f'= the null label of classifier-free guidance), but DDPMPipeline passes no labels and cannot '
                 'sample it, and no diffusers pipeline for UNet2DModel does classifier-free guidance '
                 f'(sample.guidance_scale={config.sample.get("guidance_scale", 0.0)} is not exported)')
  chosen = [f'sample.{k}={config.sample.get(k)!r}' for k, default in (('method', 'ancestral'), ('respacing', ''))
            if config.sample.get(k, default) != default]
  if chosen:
    notes.append(f'{" and ".join(chosen)}: sampling choices, not part of the folder (DDPMPipeline samples '
                 'ancestrally; pass it num_inference_steps, or swap in a DDIMScheduler for DDIM)')
  return notes


# ------------------------------------------------------------------------------------------------ tensor mapping

def _conv(p) -> Dict[str, np.ndarray]:
  return {'weight': np.transpose(p['kernel'], (3, 2, 0, 1)), 'bias': p['bias']}  # HWIO -> OIHW


def _linear(p, as_conv: bool = False) -> Dict[str, np.ndarray]:
  w = np.transpose(p['kernel'])  # (in, out) -> torch Linear (out, in)
  return {'weight': w[:, :, None, None] if as_conv else w, 'bias': p['bias']}


def _norm(p) -> Dict[str, np.ndarray]:
  return {'weight': p['scale'], 'bias': p['bias']}


def _resnet(p) -> Dict[str, Any]:
  out = {'norm1': _norm(p['norm1']), 'conv1': _conv(p['conv1']), 'time_emb_proj': _linear(p['temb_proj']),
         'norm2': _norm(p['norm2']), 'conv2': _conv(p['conv2'])}
  if 'nin_shortcut' in p:  # diffusers' conv_shortcut is a 1x1 Conv2d
    out['conv_shortcut'] = _linear(p['nin_shortcut'], as_conv=True)
  return out


def _attention(p) -> Dict[str, Any]:
  channels = p['proj_out']['kernel'].shape[0]
  qkv = {}
  for i, name in enumerate(('to_q', 'to_k', 'to_v')):  # our fused qkv Dense is [q | k | v] along its outputs
    qkv[name] = _linear({leaf: p['qkv'][leaf][..., i * channels:(i + 1) * channels] for leaf in ('kernel', 'bias')})
  return {'group_norm': _norm(p['norm']), **qkv, 'to_out': {'0': _linear(p['proj_out'])}}


_KINDS = {'conv': _conv, 'dense': _linear, 'norm': _norm, 'resnet': _resnet, 'attn': _attention}


def state_dict(params: Any, model: models.UNet) -> Dict[str, np.ndarray]:
  """Our U-Net params -> the diffusers UNet2DModel state dict (float32, C-contiguous NumPy, torch layouts).

  The exact inverse of `ddpm_jax.convert.convert_state_dict`: the module names come from the converter's own table,
  so the two directions cannot drift apart. Raises ExportError when `params` are not those of `model`.
  """
  expected = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(models.param_shapes(model), sep='/').items()}
  given = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(params), sep='/').items()}
  if given != expected:
    missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    shapes = [f'{k} {given[k]} vs {expected[k]}' for k in sorted(set(given) & set(expected)) if given[k] != expected[k]]
    detail = '; '.join(part for part in (
        f'missing {", ".join(missing[:5])}' if missing else '', f'unexpected {", ".join(extra[:5])}' if extra else '',
        f'shapes {", ".join(shapes[:5])}' if shapes else '') if part)
    raise ExportError(f'the checkpoint does not hold the network its config.json describes ({detail})')
  params = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(dict(params), sep='/').items()}
  nested = traverse_util.unflatten_dict(params, sep='/')
  # pylint: disable-next=protected-access  (the one name table of both directions lives with the converter)
  tree = {theirs: _KINDS[kind](nested[ours]) for theirs, ours, kind in convert._module_pairs(model)}
  if 'label_emb' in nested:
    tree['class_embedding'] = {'weight': nested['label_emb']['embedding']}
  flat = traverse_util.flatten_dict(tree, sep='.')
  return {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}


# ------------------------------------------------------------------------------------------------ writing

def _write_json(path: str, value: Dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')


def _check_out(out: str) -> None:
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise ExportError(f'--out {out!r} already exists and is not an empty directory: choose a new folder or remove '
                      'it (an export never overwrites)')
  parent = os.path.dirname(os.path.abspath(out))
  if os.path.exists(parent) and not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
    raise ExportError(f'--out {out!r}: cannot write into {parent!r}')


def _write_folder(out: str, files: Dict[str, Any], tensors: Dict[str, np.ndarray]) -> None:
  """Writes the JSON `files` and the weights into a temporary sibling of `out`, then renames it onto `out`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(out))}.partial-', dir=parent)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the folder is meant to be shared
    os.makedirs(os.path.join(tmp, UNET_DIR))
    save_file(tensors, os.path.join(tmp, UNET_DIR, WEIGHTS_NAME), metadata={'format': 'pt'})
    for name, value in files.items():
      _write_json(os.path.join(tmp, name), value)
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked before): the rename needs the name free
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def export(workdir: str, out: str, ema: bool = True, step: Optional[int] = None) -> Dict[str, Any]:
  """Exports the checkpoint `step` (None = the newest readable) of `workdir` as a DDPMPipeline folder `out`.

  `ema` picks the EMA parameters (what sampling uses) over the raw training ones. Everything that can fail (the
  recorded config, what diffusers cannot represent, the checkpoint, the output folder) fails before `out` exists.
  Returns {'step', 'ema', 'notes'}: the step exported and what the folder does not carry over (`limitations`).
  """
  config = workdir_config.read(workdir)
  unet, scheduler = unet_config(config), scheduler_config(config)
  _check_out(out)
  model = models.create_model(config)
  step, params, ema_params = checkpointing.restore_inference_params(workdir, step)
  tensors = state_dict(ema_params if ema else params, model)
  files = {os.path.join(UNET_DIR, 'config.json'): unet,
           os.path.join(SCHEDULER_DIR, 'scheduler_config.json'): scheduler, 'model_index.json': pipeline_index()}
  _write_folder(out, files, tensors)
  return {'step': step, 'ema': ema, 'notes': limitations(config)}


# ------------------------------------------------------------------------------------------------ command line

_PROGRAM = 'ddpm_jax.export'
_HELP_FLAGS = ('-h', '--help', '--helpshort', '--helpfull', '-?')


def _define_flags() -> flags.FlagValues:
  """The command's flags, in a FlagValues of their own (importing this module defines no global flags)."""
  fv = flags.FlagValues()
  flags.DEFINE_string('workdir', None, 'Run directory (trained, or converted) with config.json and checkpoints/.',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'Folder to write the DDPMPipeline into (new, or an empty directory).',
                      flag_values=fv)
  flags.DEFINE_bool('ema', True, 'Export the EMA parameters (default: what sampling uses); --noema exports the raw '
                    'training parameters.', flag_values=fv)
  flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the newest readable).', lower_bound=0,
                       flag_values=fv)
  flags.mark_flags_as_required(['workdir', 'out'], flag_values=fv)
  return fv


def parse_flags(argv: Sequence[str]) -> flags.FlagValues:
  """Parses `argv` (without the program name); an unknown or missing flag or a bad value is a one-line UserError."""
  fv = _define_flags()
  command_line.parse(fv, [_PROGRAM] + list(argv))
  return fv


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m ddpm_jax.export --workdir W --out DIR [--ema|--noema] [--step N]` (`argv` without the program name;
  default sys.argv[1:]). Returns the exit code: 0, or 2 with one line on stderr for anything the user can fix."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if any(a in _HELP_FLAGS for a in argv):
    print(f'{__doc__}\nflags:\n{_define_flags().get_help()}')
    return 0
  try:
    fv = parse_flags(argv)
    result = export(fv.workdir, fv.out, fv.ema, fv.step)
  except errors.UserError as e:
    return command_line.report(_PROGRAM, e)
  which = 'EMA' if result['ema'] else 'raw (non-EMA)'
  print(f'wrote {fv.out}: DDPMPipeline ({UNET_DIR}/ + {SCHEDULER_DIR}/) with the {which} parameters of step '
        f'{result["step"]}; load it with diffusers.DDPMPipeline.from_pretrained({fv.out!r})')
  for note in result['notes']:
    print(f'note: {note}')
  return 0


def entry() -> None:
  """`python -m ddpm_jax.export ...`: exits with `main`'s code."""
  # Orbax's notes about its read-only checkpoint manager are not for the person exporting (console.py).
  absl_logging.use_absl_handler()
  console.setup()
  sys.exit(command_line.run_interruptible(_PROGRAM, main))


if __name__ == '__main__':
  entry()
