"""The numbers behind the figures of `python -m ddpm_jax.figures` (drawing lives in `ddpm_jax.figure_plots`).

Every function returns arrays (images in [-1, 1], curves, tables), so the tests check the numbers, not pixels:
* `schedule_curves`, `noising_strips`: beta_t, alpha_bar_t (eq. 4), log-SNR, and x_t ~ q(x_t | x_0) under several
  schedules with one shared noise draw;
* `reverse_chain`: a sample and its predicted x_0 along the reverse chain (Ho et al. 2020, Fig. 6);
* `complete_from`: the reverse process started at a given x_t, per example, with per-example noise streams, from
  which `shared_latent` (Fig. 7) and `interpolate` / `reconstruct` (Fig. 8) are built;
* `rate_distortion_table`: the rate-distortion pairs of an eval json (Fig. 5);
* `loss_by_quartile`: the training losses by timestep quartile from the run's TensorBoard event files.

Times: the paper counts t = 1..T, the code indexes steps 0..T-1 (index t - 1). `paper_t_to_index` maps a paper
time given for T = 1000 to the code index of the configured T.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import types
import functools
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import models
from ddpm_jax import sample
from ddpm_jax import samplers
from ddpm_jax import schedules
from ddpm_jax.errors import UserError

LOSS_QUARTILE_TAGS = ('loss_q0', 'loss_q1', 'loss_q2', 'loss_q3')


def paper_t_to_index(t: int, num_timesteps: int) -> int:
  """Code index (0..T-1) of paper time t given for T = 1000 (t = 1000 -> T - 1, t = 1 -> 0), scaled to T."""
  return int(min(num_timesteps, max(1, round(t * num_timesteps / 1000)))) - 1


# ---------------------------------------------------------------------------------------------- schedules


def schedule_curves(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                    names: Sequence[str] = schedules.SCHEDULES) -> Dict[str, Dict[str, np.ndarray]]:
  """{schedule: {'betas', 'alphas_cumprod', 'log_snr'}}, float64 arrays of shape (T,) indexed by code step.

  betas come from `schedules.get_betas`; alpha_bar_t = prod_{s<=t} (1 - beta_s) (eq. 4); the signal-to-noise ratio
  of q(x_t | x_0) is alpha_bar_t / (1 - alpha_bar_t), its log computed from log alpha_bar and log(1 - alpha_bar)
  (no cancellation near t = 0 where 1 - alpha_bar ~ 1e-4).
  """
  curves = {}
  for name in names:
    betas = schedules.get_betas(name, num_timesteps, beta_start=beta_start, beta_end=beta_end)
    constants = diffusion_lib.schedule_constants(betas)
    curves[name] = {
        'betas': betas,
        'alphas_cumprod': constants['alphas_cumprod'],
        'log_snr': np.log(constants['alphas_cumprod']) - constants['log_one_minus_alphas_cumprod'],
    }
  return curves


def noising_strips(x0: jax.Array, noise: jax.Array, timesteps: Sequence[int], schedule_names: Sequence[str],
                   num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """(len(schedule_names), len(timesteps), H, W, C): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (eq. 4)
  for one image x0 (H, W, C) and ONE noise draw shared by every schedule and t, so rows differ only by schedule."""
  rows = []
  t = jnp.asarray(timesteps, jnp.int32)
  batch_x0 = jnp.broadcast_to(x0, (len(timesteps),) + x0.shape)
  batch_noise = jnp.broadcast_to(noise, (len(timesteps),) + noise.shape)
  for name in schedule_names:
    betas = schedules.get_betas(name, num_timesteps, beta_start=beta_start, beta_end=beta_end)
    rows.append(diffusion_lib.q_sample(diffusion_lib.make_diffusion(betas), batch_x0, t, batch_noise))
  return np.asarray(jnp.stack(rows))


# -------------------------------------------------------------------------------------- reverse processes


class Network(NamedTuple):
  """The denoiser a figure samples from. `make_model_fn(params, labels)` builds the `model_fn(x_t, t)` the samplers
  call; params and labels enter the compiled program as arguments (not as baked-in constants, which would make
  every compile embed the weights)."""
  make_model_fn: Callable[[Any, Optional[jax.Array]], Callable]
  params: Any


def network(config: ml_collections.ConfigDict, params: Any) -> Network:
  """The configured U-Net with `params` (unconditional, conditional or guided as `sample.sampling_model_fn`)."""
  return Network(functools.partial(sample.sampling_model_fn, config, models.create_model(config)),
                 jax.device_put(params))


def _labels(labels: Optional[np.ndarray]) -> Optional[jax.Array]:
  return None if labels is None else jnp.asarray(labels, jnp.int32)


def reverse_chain(config: ml_collections.ConfigDict, net: Network, shape: Sequence[int], num_progress: int,
                  rng: jax.Array, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, list]:
  """Samples with `config.sample`'s sampler, recording the predicted x_0 (eq. 15) at `num_progress` evenly spaced
  steps from t = T-1 to t = 0 (Fig. 6). Returns (samples (B, H, W, C), x0_hat (num_progress, B, H, W, C), the
  code timestep of every recorded x0_hat). At t = 0 no noise is added and the mean's x_t coefficient is 0, so the
  last x0_hat is the sample."""
  diffusion = diffusion_lib.from_config(config.diffusion)
  cfg = config.sample

  @jax.jit
  def run(params, labels, rng):
    return samplers.sample(diffusion, net.make_model_fn(params, labels), tuple(shape), rng, method=cfg.method,
                           respacing=samplers.config_respacing(cfg), eta=cfg.eta, clip_denoised=cfg.clip_denoised,
                           num_progress=num_progress,
                           use_clipped_model_output=cfg.get('use_clipped_model_output', True))

  final, progress = run(net.params, _labels(labels), rng)
  ts = [int(t) for t in samplers.progress_timesteps(diffusion, samplers.config_respacing(cfg), num_progress)]
  return np.asarray(final), np.asarray(progress), ts


def sampler_process(config: ml_collections.ConfigDict) -> diffusion_lib.Diffusion:
  """The process `config.sample`'s sampler walks: the configured diffusion respaced as `config.sample` asks
  (`samplers.config_respacing`)."""
  return samplers.respace(diffusion_lib.from_config(config.diffusion), samplers.config_respacing(config.sample))


def nearest_step(process: diffusion_lib.Diffusion, t_index: int) -> int:
  """The step of `process` (index into its own steps) whose ORIGINAL timestep is nearest to code index t_index
  (a respaced sampler can only start from the timesteps it keeps)."""
  kept = np.asarray(process.timestep_map)
  return int(np.argmin(np.abs(kept - t_index)))


def complete_from(config: ml_collections.ConfigDict, net: Network, process: diffusion_lib.Diffusion,
                  x_start: jax.Array, start_steps: np.ndarray, noise_ids: np.ndarray, rng: jax.Array,
                  labels: Optional[np.ndarray] = None) -> np.ndarray:
  """Runs the reverse process of `config.sample` (ancestral, Algorithm 2, or DDIM) from x_start[b] at step
  start_steps[b] of `process` down to t = 0, for every example b in ONE compiled loop; returns x_0 (B, H, W, C).

  Examples whose start is later in the loop stay frozen at x_start until their step comes. The noise of example b
  at loop step i is normal(fold_in(fold_in(rng, i), noise_ids[b])): examples with the same id get the same noise
  whatever else is in the batch, which is what lets an interpolation at lambda = 0 equal the plain reconstruction,
  and distinct ids give independent completions of the same x_t.
  """
  cfg = config.sample
  start_steps = np.asarray(start_steps, np.int32)
  num_steps = process.num_timesteps
  first = num_steps - 1 - int(start_steps.max())  # iterations before the latest start change nothing: skip them
  if cfg.method == 'ancestral':
    def step_fn(out, x, t, noise):
      return samplers.p_sample_step(process, out, x, t, noise, clip_denoised=cfg.clip_denoised)[0]
  else:
    def step_fn(out, x, t, noise):
      return samplers.ddim_step(process, out, x, t, noise, eta=cfg.eta, clip_denoised=cfg.clip_denoised,
                                use_clipped_model_output=cfg.get('use_clipped_model_output', True))[0]
  timestep_map = jnp.asarray(process.timestep_map, jnp.int32)
  image_shape = tuple(x_start.shape[1:])

  @jax.jit
  def run(params, labels, x, starts, ids, rng):
    model_fn = net.make_model_fn(params, labels)

    def body(x, i):
      t_index = num_steps - 1 - i
      t = jnp.full((x.shape[0],), t_index, jnp.int32)
      output = model_fn(x, jnp.full((x.shape[0],), timestep_map[t_index], jnp.int32))
      step_key = jax.random.fold_in(rng, i)
      noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(step_key, k), image_shape, x.dtype))(ids)
      active = (t_index <= starts).reshape((-1,) + (1,) * len(image_shape))
      return jnp.where(active, step_fn(output, x, t, noise), x), None
    x, _ = jax.lax.scan(body, x, jnp.arange(first, num_steps, dtype=jnp.int32))
    return x

  return np.asarray(run(net.params, _labels(labels), jnp.asarray(x_start, process.dtype), jnp.asarray(start_steps),
                        jnp.asarray(noise_ids, jnp.int32), rng))


def shared_latent(config: ml_collections.ConfigDict, net: Network, x0: jax.Array, paper_ts: Sequence[int],
                  num_completions: int, encode_key: jax.Array, reverse_key: jax.Array,
                  label: Optional[int] = None) -> Dict[str, Any]:
  """Fig. 7: for each paper time t, x_t ~ q(x_t | x0) (eq. 4) is drawn ONCE from the real image x0 (H, W, C) and
  completed `num_completions` times by the reverse process with independent noise (class `label` for
  conditional models).

  Returns {'t_index': code step of each row (the sampler's nearest kept step), 'x_t': (rows, H, W, C),
  'starts': (rows, K, H, W, C) the x_t each completion started from, 'completions': (rows, K, H, W, C)}."""
  process = sampler_process(config)
  steps = [nearest_step(process, paper_t_to_index(t, config.diffusion.num_timesteps)) for t in paper_ts]
  t_index = [int(process.timestep_map[s]) for s in steps]
  diffusion = diffusion_lib.from_config(config.diffusion)
  rows = len(steps)
  noise = jax.random.normal(encode_key, (rows,) + tuple(x0.shape), diffusion.dtype)
  x_t = diffusion_lib.q_sample(diffusion, jnp.broadcast_to(x0, noise.shape), jnp.asarray(t_index, jnp.int32), noise)
  starts = jnp.repeat(x_t, num_completions, axis=0)  # row-major: (t_0, k_0), (t_0, k_1), ...
  start_steps = np.repeat(np.asarray(steps), num_completions)
  noise_ids = np.arange(rows * num_completions)
  labels = None if label is None else np.full((rows * num_completions,), label)
  completions = complete_from(config, net, process, starts, start_steps, noise_ids, reverse_key, labels)
  grid = (rows, num_completions) + tuple(x0.shape)
  return {'t_index': t_index, 'x_t': np.asarray(x_t), 'starts': np.asarray(starts).reshape(grid),
          'completions': completions.reshape(grid)}


def encode(config: ml_collections.ConfigDict, x0: jax.Array, t_index: int, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (eq. 4): q as a stochastic encoder (Sec. 4.3)."""
  diffusion = diffusion_lib.from_config(config.diffusion)
  return diffusion_lib.q_sample(diffusion, x0, jnp.full((x0.shape[0],), t_index, jnp.int32), noise)


def reconstruct(config: ml_collections.ConfigDict, net: Network, x0: jax.Array, paper_t: int,
                encode_noise: jax.Array, noise_ids: np.ndarray, reverse_key: jax.Array,
                labels: Optional[np.ndarray] = None) -> np.ndarray:
  """x0 (B, H, W, C) encoded to x_t with `encode_noise` and decoded by the reverse process (noise stream ids
  `noise_ids`, class `labels` for conditional models): the reconstructions of Fig. 8 (lambda = 0 and 1)."""
  process = sampler_process(config)
  step = nearest_step(process, paper_t_to_index(paper_t, config.diffusion.num_timesteps))
  x_t = encode(config, x0, int(process.timestep_map[step]), encode_noise)
  return complete_from(config, net, process, x_t, np.full((x0.shape[0],), step), noise_ids, reverse_key, labels)


def interpolate(config: ml_collections.ConfigDict, net: Network, x0_a: jax.Array, x0_b: jax.Array,
                paper_t: int, lambdas: Sequence[float], encode_noise_a: jax.Array, encode_noise_b: jax.Array,
                reverse_key: jax.Array, labels_a: Optional[np.ndarray] = None,
                labels_b: Optional[np.ndarray] = None) -> Dict[str, Any]:
  """Fig. 8: pairs of real images (P, H, W, C) encoded to x_t, x'_t ~ q(x_t | x0) (eq. 4), the latents mixed as
  (1 - lambda) x_t + lambda x'_t and decoded by the reverse process. Every lambda of pair p uses the reverse noise
  stream p (the paper fixes the noise across lambda), so lambda = 0 and 1 are `reconstruct` of x0_a and x0_b.
  Conditional models decode lambda <= 0.5 with the class of x0_a and the rest with that of x0_b.

  Returns {'t_index': the code step decoded from, 'lambdas', 'decoded': (P, len(lambdas), H, W, C)}."""
  process = sampler_process(config)
  step = nearest_step(process, paper_t_to_index(paper_t, config.diffusion.num_timesteps))
  t_index = int(process.timestep_map[step])
  x_t_a = encode(config, x0_a, t_index, encode_noise_a)
  x_t_b = encode(config, x0_b, t_index, encode_noise_b)
  lam = jnp.asarray(lambdas, x_t_a.dtype).reshape((1, -1) + (1,) * (x_t_a.ndim - 1))
  mixed = (1.0 - lam) * x_t_a[:, None] + lam * x_t_b[:, None]  # (P, L, H, W, C)
  pairs, num_l = mixed.shape[:2]
  noise_ids = np.repeat(np.arange(pairs), num_l)
  labels = None
  if labels_a is not None:
    labels = np.where(np.asarray(lambdas)[None] <= 0.5, np.asarray(labels_a)[:, None],
                      np.asarray(labels_b)[:, None]).reshape(-1)
  decoded = complete_from(config, net, process, mixed.reshape((-1,) + mixed.shape[2:]),
                          np.full((pairs * num_l,), step), noise_ids, reverse_key, labels)
  return {'t_index': t_index, 'lambdas': [float(v) for v in lambdas],
          'decoded': decoded.reshape(mixed.shape)}


# ------------------------------------------------------------------------------------------ logged numbers


def eval_json_path(workdir: str, step: Optional[int] = None) -> str:
  """`<workdir>/eval/step_<N>.json` of `step` (None: the highest N present); UserError when there is none."""
  eval_dir = os.path.join(workdir, 'eval')
  if step is not None:
    path = os.path.join(eval_dir, f'step_{step}.json')
    if not os.path.isfile(path):
      raise UserError(f'{path} does not exist: run `python main.py --config=... --workdir={workdir} --mode=eval '
                      f'--config.eval.step={step}` first (the rate_distortion figure plots its bits/dim terms)')
    return path
  found = []
  for path in glob.glob(os.path.join(eval_dir, 'step_*.json')):
    name = os.path.basename(path)[len('step_'):-len('.json')]
    if name.isdigit():
      found.append((int(name), path))
  if not found:
    raise UserError(f'no evaluation results in {eval_dir} (eval/step_<N>.json): run `python main.py --config=... '
                    f'--workdir={workdir} --mode=eval` first (the rate_distortion figure plots its bits/dim terms)')
  return max(found)[1]


def rate_distortion_table(path: str) -> Dict[str, Any]:
  """The rate-distortion pairs of an eval json (Sec. 4.3, Table 4, Fig. 5): {'step', 't', 'rate_bpd',
  'distortion_bpd', 'rmse', 'num_timesteps'}, lists ordered by t; UserError if the file has no bits/dim terms."""
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is not a readable eval json ({type(e).__name__}: {e})') from None
  pairs = results.get('rate_distortion') if isinstance(results, dict) else None
  if not pairs:
    raise UserError(f'{path} has no rate_distortion entries: it was evaluated with eval.bpd=False; run --mode=eval '
                    'with --config.eval.bpd=True')
  pairs = sorted(pairs, key=lambda p: p['t'])
  vb = results.get('bpd_terms', {}).get('vb')
  return {'step': results.get('step'), 'num_timesteps': len(vb) if vb else None,
          **{key: [p[key] for p in pairs] for key in ('t', 'rate_bpd', 'distortion_bpd', 'rmse')}}


def _event_file_loader():
  """tensorboard's event-file reader, on its TensorFlow-free stub: the `tensorboard.compat.notf` marker module is
  what tensorboard's own no-TensorFlow build provides, and makes `tensorboard.compat.tf` resolve to the stub."""
  sys.modules.setdefault('tensorboard.compat.notf', types.ModuleType('tensorboard.compat.notf'))
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  return event_file_loader


def _scalar_value(value) -> Optional[float]:
  if value.HasField('tensor'):
    tensor = value.tensor
    if tensor.float_val:
      return float(tensor.float_val[0])
    if tensor.double_val:
      return float(tensor.double_val[0])
    if tensor.tensor_content:
      dtype = {1: np.float32, 2: np.float64}.get(tensor.dtype)
      return float(np.frombuffer(tensor.tensor_content, dtype)[0]) if dtype else None
    return None
  if value.HasField('simple_value'):
    return float(value.simple_value)
  return None


def read_scalars(workdir: str, tags: Sequence[str]) -> Dict[str, Dict[int, float]]:
  """{tag: {step: value}} of the scalar summaries `tags` in every `events.out.tfevents.*` file directly in
  `workdir` (the training writer's files), read in file-name order: where a resumed run logged a step again, the
  later value wins."""
  loader = _event_file_loader()
  wanted = set(tags)
  values: Dict[str, Dict[int, float]] = {tag: {} for tag in tags}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in loader.EventFileLoader(path).Load():
      if not event.HasField('summary'):
        continue
      for value in event.summary.value:
        if value.tag in wanted:
          scalar = _scalar_value(value)
          if scalar is not None:
            values[value.tag][int(event.step)] = scalar
  return values


def loss_by_quartile(workdir: str) -> Dict[str, Any]:
  """The training loss by timestep quartile (metrics loss_q0..loss_q3: the mean loss of the examples whose t
  falls in each quarter of 0..T-1, averaged over each logging window) against the training step.

  Returns {'steps': sorted steps, 'loss_q0'..'loss_q3': values at those steps (NaN where a tag is missing)};
  UserError when the workdir holds no such metrics."""
  scalars = read_scalars(workdir, LOSS_QUARTILE_TAGS)
  steps = sorted(set().union(*(s.keys() for s in scalars.values())))
  if not steps:
    raise UserError(f'{workdir} holds no training metrics loss_q0..loss_q3 (events.out.tfevents.* files written by '
                    '--mode=train): train in this workdir first, or pass the run directory')
  return {'steps': steps, **{tag: [scalars[tag].get(s, float('nan')) for s in steps] for tag in LOSS_QUARTILE_TAGS}}
