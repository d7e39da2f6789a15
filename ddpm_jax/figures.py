"""Figures of the forward and reverse processes (Ho et al. 2020, Fig. 6 and the noising of eq. 4).

  python -m ddpm_jax.figures --config=configs/cifar10.py --workdir=runs/cifar10 [--out=DIR] [--num_images=8]

writes to `<workdir>/figures/` (or `--out`):
* `forward_process.png`: rows are real images of `data.eval_split`; columns are x_t ~ q(x_t | x_0) (eq. 4) at
  t = 0, 100, 250, 500, 750, 999 (code timestep indices, scaled to T), all with the same noise per image;
* `reverse_process.png`: rows are samples from the EMA parameters with `config.sample`'s sampler; columns are the
  predicted x0_hat (eq. 15 / eq. 4 inverted) at evenly spaced steps of the reverse chain, from t = T-1 on the left
  to t = 0, then the final sample (Fig. 6: "x0_hat over time, from left to right");
* `figures.json`: the timestep of every column, the checkpoint step and the sampler settings.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import checkpointing
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import images as images_lib
from ddpm_jax import input_pipeline
from ddpm_jax import models
from ddpm_jax import samplers
from ddpm_jax import sampling
from ddpm_jax import train_state as train_state_lib

# Columns of the forward strip for T = 1000 (scaled to other T).
FORWARD_T = (0, 100, 250, 500, 750, 999)
# fold_in constant of the figures' noise stream (distinct from training/sampling/bits-per-dim streams).
FIGURES_STREAM = 0xF16


def scaled_timesteps(num_timesteps: int, timesteps: Sequence[int] = FORWARD_T) -> list:
  """`timesteps` given for T = 1000 mapped to 0..T-1 (t / 999 of the chain), duplicates removed, ascending."""
  return sorted({int(round(t * (num_timesteps - 1) / 999)) for t in timesteps})


def forward_strip(config: ml_collections.ConfigDict, num_images: int, rng: jax.Array,
                  timesteps: Optional[Sequence[int]] = None) -> tuple[np.ndarray, list]:
  """uint8 (num_images * len(ts), H, W, C) images, row-major: row i = q_sample(x0_i, t) for t in ts (eq. 4).

  x0 are the first `num_images` examples of `data.eval_split`; one noise draw per image is shared by all t, so a
  row shows the same noise growing. Returns (images, ts)."""
  diffusion = diffusion_lib.from_config(config.diffusion)
  ts = list(timesteps) if timesteps is not None else scaled_timesteps(diffusion.num_timesteps)
  it = input_pipeline.create_eval_iterator(config, config.data.eval_split, num_images, process_index=0,
                                           process_count=1, num_examples=num_images)
  batch = next(iter(it))
  x0 = jnp.asarray(batch['image'][np.asarray(batch['mask'], bool)])
  noise = jax.random.normal(rng, x0.shape, x0.dtype)
  columns = [diffusion_lib.q_sample(diffusion, x0, jnp.full((x0.shape[0],), t, jnp.int32), noise) for t in ts]
  strip = jnp.stack(columns, axis=1)  # (N, len(ts), H, W, C)
  return images_lib.to_uint8(np.asarray(strip).reshape((-1,) + strip.shape[2:])), ts


def reverse_strip(config: ml_collections.ConfigDict, params: Any, num_images: int, num_progress: int,
                  rng: jax.Array) -> tuple[np.ndarray, list]:
  """uint8 (num_images * (num_progress + 1), H, W, C), row-major: row i = x0_hat of sample i at the recorded steps
  (samplers.progress_timesteps, from t = T-1 to 0) followed by the final sample. Returns (images, column t's)."""
  model = models.create_model(config)
  diffusion = diffusion_lib.from_config(config.diffusion)
  cfg = config.sample
  shape = (num_images,) + sampling.image_shape(config)
  labels = sampling.sample_labels(config, num_images)

  @jax.jit
  def run(params, rng, labels):
    model_fn = sampling.sampling_model_fn(config, model, params, labels)
    return samplers.sample(diffusion, model_fn, shape, rng, method=cfg.method, respacing=cfg.respacing,
                           eta=cfg.eta, clip_denoised=cfg.clip_denoised, num_progress=num_progress)

  final, progress = run(params, rng, None if labels is None else jnp.asarray(labels))
  strip = jnp.concatenate([jnp.moveaxis(progress, 0, 1), final[:, None]], axis=1)  # (N, k + 1, H, W, C)
  ts = [int(t) for t in samplers.progress_timesteps(diffusion, cfg.respacing, num_progress)]
  return images_lib.to_uint8(np.asarray(strip).reshape((-1,) + strip.shape[2:])), ts + ['sample']


def make_figures(config: ml_collections.ConfigDict, workdir: str, out_dir: Optional[str] = None,
                 num_images: int = 8, num_progress: int = 10, step: Optional[int] = None) -> Dict[str, str]:
  """Draws both strips from the EMA parameters of checkpoint `step` (None: config.sample.step, then the latest).

  Returns {'forward': path, 'reverse': path, 'info': path}."""
  out_dir = out_dir or os.path.join(workdir, 'figures')
  step = step if step is not None else config.sample.step
  ckpt_step, _, ema_params = checkpointing.restore_inference_params(workdir, step)
  diffusion = diffusion_lib.from_config(config.diffusion)
  num_steps = samplers.respace(diffusion, config.sample.respacing).num_timesteps
  num_progress = max(1, min(num_progress, num_steps))
  key = jax.random.fold_in(train_state_lib.random_streams(config.seed)['sample'], FIGURES_STREAM)
  forward_key, reverse_key = jax.random.split(key)

  forward, forward_ts = forward_strip(config, num_images, forward_key)
  reverse, reverse_ts = reverse_strip(config, jax.device_put(ema_params), num_images, num_progress, reverse_key)
  rows = len(forward) // len(forward_ts)
  paths = {
      'forward': images_lib.save_png(images_lib.make_grid(forward, ncol=len(forward_ts)),
                                     os.path.join(out_dir, 'forward_process.png')),
      'reverse': images_lib.save_png(images_lib.make_grid(reverse, ncol=len(reverse_ts)),
                                     os.path.join(out_dir, 'reverse_process.png')),
      'info': os.path.join(out_dir, 'figures.json'),
  }
  info = {'checkpoint_step': ckpt_step, 'params': 'EMA', 'forward_columns_t': forward_ts,
          'forward_rows': rows, 'reverse_columns_t': reverse_ts, 'reverse_rows': num_images,
          'sampler': {k: config.sample[k] for k in ('method', 'respacing', 'eta', 'clip_denoised',
                                                    'guidance_scale', 'class_label')},
          'split': config.data.eval_split, 'seed': config.seed}
  with open(paths['info'], 'w') as f:
    json.dump(info, f, indent=2)
  logging.info('Figures of step %d written to %s', ckpt_step, out_dir)
  return paths


def define_flags() -> None:
  """Command-line flags of `python -m ddpm_jax.figures` (defined only when run as a program)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Path to an ml_collections config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory with checkpoints; figures go to <workdir>/figures.')
  flags.DEFINE_string('out', None, 'Output directory (default <workdir>/figures).')
  flags.DEFINE_integer('num_images', 8, 'Rows of each strip.')
  flags.DEFINE_integer('num_progress', 10, 'Predicted-x0 columns of the reverse strip.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default config.sample.step, then the latest).')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ddpm_jax import config_validation  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    config_validation.validate_config(f.config, jax.device_count())
    paths = make_figures(f.config, f.workdir, f.out, num_images=f.num_images, num_progress=f.num_progress,
                         step=f.step)
  except config_validation.UserError as e:
    raise SystemExit(f'ddpm_jax.figures: error: {e}') from None
  print(json.dumps(paths))


if __name__ == '__main__':
  define_flags()
  app.run(main)
