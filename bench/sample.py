"""Sampling throughput: the full ancestral sampler (T network calls) and DDIM-50, images/s at a batch (Issue 6).

  python bench/sample.py --config=configs/cifar10.py --batch_size=16 [--num_steps_override=10] [--peer]

What runs is the library's sampler: `ddpm_jax.sample.make_sample_fn` (one compiled `lax.scan` over the
timesteps, `samplers.sample`) with `sample.method` / `sample.respacing` set to
  * ancestral: respacing '' -- all T = diffusion.num_timesteps steps (Ho et al. 2020, Algorithm 2);
  * ddim: respacing 'ddim<--ddim_steps>' (Song et al. 2021, eta = 0).
On a CPU the 1000-step chain of the CIFAR-10 U-Net takes many minutes per batch, so `--num_steps_override=N` runs
an N-step respaced chain of the same sampler instead (same network call and update per step) and EXTRAPOLATES:
  seconds per batch = (measured seconds of the N-step chain / N) x target steps.
Every figure says whether it was `measured` (the full chain ran) or `extrapolated` (from N steps).
Parameters are freshly initialised (speed does not depend on their values).

--peer also times diffusers' UNet2DModel (the same architecture) with DDPMScheduler / DDIMScheduler in a Python loop
(what `DDPMPipeline` / `DDIMPipeline` do), extrapolated the same way.

The human-readable table goes first; the LAST line of stdout is one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import types
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', 'configs/cifar10.py', 'Path to an ml_collections config file.')
  flags.DEFINE_integer('batch_size', None, 'Samples per batch (default: config.sample.batch_size).')
  flags.DEFINE_integer('num_steps_override', 0, 'Run chains of this many steps and extrapolate to the full '
                       'number (0 = run the full chains).')
  flags.DEFINE_integer('ddim_steps', 50, 'DDIM steps.')
  flags.DEFINE_integer('steps', 2, 'Timed runs of each chain (the median is reported).')
  flags.DEFINE_integer('warmup', 0, 'Untimed runs after the compile.')
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Activation dtype (default: config.model.dtype).')
  flags.DEFINE_bool('peer', False, 'Also time diffusers (UNet2DModel + DDPMScheduler / DDIMScheduler, PyTorch).')


def _respacing(num_timesteps: int, steps: int, ddim: bool) -> str:
  """A respacing string giving exactly `steps` steps ('' = all): 'ddimN' where an integer stride exists."""
  from ddpm_jax import samplers  # pylint: disable=g-import-not-at-top
  if steps >= num_timesteps:
    return ''
  if ddim:
    try:
      if len(samplers.space_timesteps(num_timesteps, f'ddim{steps}')) == steps:
        return f'ddim{steps}'
    except ValueError:
      pass
  return str(steps)


_PARAMS = {}


def time_ours(config, batch_size: int, method: str, target_steps: int, run_steps: int, steps: int,
              warmup: int) -> dict[str, Any]:
  """Times `sample.make_sample_fn` for one (method, respacing); returns the row of the result."""
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import diffusion as diffusion_lib  # pylint: disable=g-import-not-at-top
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sample  # pylint: disable=g-import-not-at-top
  from ddpm_jax import samplers  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sharding  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  num_timesteps = config.diffusion.num_timesteps
  config.sample.method = method
  config.sample.respacing = _respacing(num_timesteps, run_steps, ddim=method == 'ddim')
  ran = len(samplers.respace(diffusion_lib.from_config(config.diffusion), config.sample.respacing).timestep_map)
  mesh = sharding.create_mesh()
  model = models.create_model(config)
  if 'params' not in _PARAMS:  # the same parameters for every method
    _PARAMS['params'] = jax.device_put(models.init_params(model, jax.random.key(0)), sharding.replicated(mesh))
  params = _PARAMS['params']
  sample_fn = sample.make_sample_fn(config, model, diffusion_lib.from_config(config.diffusion), mesh, batch_size)
  rng = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = sample_fn.lower(params, rng, None).compile()
  compile_s = time.perf_counter() - t0
  times = throughput.time_calls(lambda: jax.block_until_ready(compiled(params, rng, None)), steps, warmup)
  run_s = statistics.median(times)
  per_call = run_s / ran
  batch_s = per_call * target_steps
  return {'method': method, 'respacing_run': config.sample.respacing, 'steps_run': ran,
          'steps_target': target_steps, 'kind': 'measured' if ran == target_steps else 'extrapolated',
          'compile_s': compile_s, 'run_s': run_s, 'per_network_call_s': per_call, 'batch_s': batch_s,
          'img_per_s': batch_size / batch_s}


def time_peer(config, batch_size: int, method: str, target_steps: int, run_steps: int, steps: int,
              warmup: int) -> dict[str, Any]:
  """diffusers' UNet2DModel + scheduler loop (DDPMPipeline / DDIMPipeline's inner loop), `run_steps` steps."""
  sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # pylint: disable=g-import-not-at-top
  import peer_torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(peer_torch.physical_cores())
  cfg = peer_torch.diffusers_config(config)
  model = UNet2DModel(**cfg).eval()
  d = config.diffusion
  kwargs = dict(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                beta_schedule='linear', clip_sample=True)
  if method == 'ancestral':
    scheduler = DDPMScheduler(variance_type='fixed_large', **kwargs)
    scheduler.set_timesteps(min(run_steps, d.num_timesteps))
  else:
    scheduler = DDIMScheduler(**kwargs)
    scheduler.set_timesteps(run_steps)
  ran = len(scheduler.timesteps)
  bf16 = config.model.dtype == 'bfloat16'

  def run():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, cfg['in_channels'], cfg['sample_size'], cfg['sample_size'], generator=gen)
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
      for t in scheduler.timesteps:
        out = model(x, t).sample.float()
        x = scheduler.step(out, t, x, generator=gen).prev_sample
    return x

  times = throughput.time_calls(run, steps, warmup)
  run_s = statistics.median(times)
  per_call = run_s / ran
  batch_s = per_call * target_steps
  return {'method': method, 'steps_run': ran, 'steps_target': target_steps,
          'kind': 'measured' if ran == target_steps else 'extrapolated', 'run_s': run_s,
          'per_network_call_s': per_call, 'batch_s': batch_s, 'img_per_s': batch_size / batch_s}


def main(argv):
  config, batch_size = throughput.config_and_batch_size(argv, lambda c: c.sample.batch_size)
  num_t = config.diffusion.num_timesteps
  res = throughput.machine_info()
  res.update({'config': config_flags.get_config_filename(FLAGS['config']), 'batch_size': batch_size,
              'dtype': config.model.dtype, 'num_steps_override': FLAGS.num_steps_override, 'timed_runs': FLAGS.steps})
  targets = {'ancestral': num_t, 'ddim': min(FLAGS.ddim_steps, num_t)}
  rows = []
  for method, target in targets.items():
    run_steps = min(FLAGS.num_steps_override, target) if FLAGS.num_steps_override else target
    row = time_ours(config, batch_size, method, target, run_steps, FLAGS.steps, FLAGS.warmup)
    res[method] = row
    res[f'{method}_img_per_s'] = row['img_per_s']
    res[f'{method}_kind'] = row['kind']
    rows.append(('ddpm_jax', row))
    if FLAGS.peer:
      prow = time_peer(config, batch_size, method, target, run_steps, FLAGS.steps, FLAGS.warmup)
      res[f'peer_{method}'] = prow
      res[f'peer_{method}_img_per_s'] = prow['img_per_s']
      rows.append(('diffusers', prow))
  res['load_average_1min_end'] = round(os.getloadavg()[0], 2)

  print(f'Sampling throughput ({res["config"]}, batch {batch_size}, {res["device"]}, load {res["load_average_1min"]})')
  print(f'  {"impl":<10} {"method":<10} {"steps":>6} {"ran":>5} {"s/call":>9} {"s/batch":>10} {"img/s":>9}  kind')
  for impl, row in rows:
    print(f'  {impl:<10} {row["method"]:<10} {row["steps_target"]:>6} {row["steps_run"]:>5} '
          f'{row["per_network_call_s"]:>9.4f} {row["batch_s"]:>10.2f} {row["img_per_s"]:>9.4f}  {row["kind"]}')
  print(json.dumps(res))


if __name__ == '__main__':
  define_flags()
  app.run(main)
