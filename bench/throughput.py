"""Training and forward throughput of ddpm_jax's compiled train step and model (Issue 6).

  python bench/throughput.py --config=configs/cifar10.py --batch_size=16 [--steps=10] [--dtype=bfloat16]
  python bench/throughput.py --config=configs/cifar10.py --batch_size=16 --config.training.steps_per_call=4
  python bench/throughput.py --config=configs/cifar10.py --batch_size=16 --breakdown   # where the time goes

What is timed is the library's own code, not a re-implementation:
  * train: `ddpm_jax.train.Trainer(config).step(batches)` -- the jitted `train_state.make_step_fn` with the
    Trainer's shardings and state donation (forward, L_simple, backward, clip, Adam, EMA, metrics), on synthetic
    batches of the config's shape; `steps_per_call` steps per call as the training loop does;
  * forward: `model.apply(params, x_t, t, train=False)` jitted at the same batch (what every sampler step runs).
Each is warmed up, then run `--steps` times; the figure is the MEDIAN time of one call (blocking on the result).
`compile_s` is the ahead-of-time lower + compile of the train step; `flops_per_train_step` comes from XLA's cost
analysis of the step (per device; on the CPU, of the same step lowered for a GPU, whose weight gradients are autodiff's
convolutions: the cost analysis counts the CPU's loop of GEMMs once). `mfu` is given where the peak of the device is
known (table below or --peak_tflops).

The human-readable table goes first; the LAST line of stdout is one JSON object.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags (defined only when run as a script, so that the helpers below can be imported)."""
  config_flags.DEFINE_config_file('config', 'configs/cifar10.py', 'Path to an ml_collections config file.')
  flags.DEFINE_integer('batch_size', None, 'Global batch size (default: config.training.batch_size).')
  flags.DEFINE_integer('steps', 10, 'Timed calls of each program (the median is reported).')
  flags.DEFINE_integer('warmup', 2, 'Untimed calls after compilation.')
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Activation dtype (default: config.model.dtype).')
  flags.DEFINE_bool('forward', True, 'Also time the jitted model forward.')
  flags.DEFINE_bool('train', True, 'Time the train step.')
  flags.DEFINE_bool('breakdown', False, 'Also time the sub-blocks of the U-Net (forward and forward+backward) and '
                    'attribute the network time to conv / GroupNorm / attention / other.')
  flags.DEFINE_float('peak_tflops', None, 'Peak dense TFLOP/s of ONE device at the compute dtype, for `mfu` when '
                     'the device is not in the built-in table (e.g. a CPU).')


# Dense peak TFLOP/s per device (vendor datasheets). float32 on NVIDIA GPUs: XLA's default matmul/conv precision
# uses TF32 tensor cores, so the TF32 peak is the honest denominator.
PEAK_TFLOPS = {
    # device_kind substring: {dtype: peak}
    'H200': {'bfloat16': 989.0, 'float32': 494.0},
    'H100': {'bfloat16': 989.0, 'float32': 494.0},
    'A100': {'bfloat16': 312.0, 'float32': 156.0},
    'L4': {'bfloat16': 121.0, 'float32': 60.0},
    'TPU v6': {'bfloat16': 918.0, 'float32': 918.0},
    'TPU v5p': {'bfloat16': 459.0, 'float32': 459.0},
    'TPU v5 lite': {'bfloat16': 197.0, 'float32': 197.0},
    'TPU v5e': {'bfloat16': 197.0, 'float32': 197.0},
    'TPU v4': {'bfloat16': 275.0, 'float32': 275.0},
    'TPU v3': {'bfloat16': 123.0, 'float32': 123.0},
}


def peak_flops(device_kind: str, dtype: str, override_tflops: Optional[float]) -> Optional[float]:
  """Peak FLOP/s of one device, or None when unknown (CPUs: pass --peak_tflops)."""
  if override_tflops:
    return override_tflops * 1e12
  for key, peaks in PEAK_TFLOPS.items():
    if key.lower() in device_kind.lower():
      return peaks[dtype] * 1e12
  return None


def cpu_model() -> str:
  """`model name` from /proc/cpuinfo (or platform.processor())."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def machine_info() -> dict[str, Any]:
  """Device, host and library versions, logged with every figure."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {
      'device': f'{dev.platform}:{dev.device_kind}',
      'num_devices': jax.device_count(),
      'cpu_model': cpu_model(),
      'cpu_count': os.cpu_count(),
      'load_average_1min': round(os.getloadavg()[0], 2),
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'flax': flax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }


def time_calls(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
  """Wall time of each of `steps` calls of fn (which must block on its result), after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def cost_flops(compiled) -> Optional[float]:
  """FLOPs of a compiled executable from XLA's cost analysis (None where the backend gives none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def accelerator_lowering_flops(step, *args) -> Optional[float]:
  """FLOPs of a jitted step from XLA's cost analysis of its lowering for a GPU, here, without compiling it.

  On the CPU the 3x3 weight gradients are loops of 9 GEMMs (`models/ops.py`), and XLA's cost analysis counts a loop
  body once; lowered for a GPU the same step computes them as autodiff's convolutions, with the same arithmetic.
  """
  return cost_flops(step.trace(*args).lower(lowering_platforms=('cuda',)))


def config_and_batch_size(argv, default_batch_size: Callable[[Any], int]):
  """The shared preamble of the bench scripts' main(): (--config with --dtype applied, --batch_size or default)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if FLAGS.dtype:
    config.model.dtype = FLAGS.dtype
  return config, FLAGS.batch_size or default_batch_size(config)


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
  print(title)
  width = max(len(name) for name, _ in rows)
  for name, value in rows:
    if isinstance(value, float):
      value = f'{value:.4g}'
    print(f'  {name:<{width}}  {value}')


def synthetic_batches(config, batch_size: int) -> dict[str, Any]:
  """What `Trainer.step` takes: `steps_per_call` stacked batches of uniform images (and labels if conditional)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  k = int(config.training.steps_per_call)
  side, _, channels = models.image_shape(config)
  rng = np.random.default_rng(0)
  batches = {'image': rng.uniform(-1, 1, (k, batch_size, side, side, channels)).astype(np.float32)}
  if config.model.num_classes:
    batches['label'] = rng.integers(0, config.model.num_classes, (k, batch_size)).astype(np.int32)
  return batches


def benchmark(config, batch_size: int, steps: int, warmup: int, do_train: bool = True, do_forward: bool = True,
              peak_tflops: Optional[float] = None) -> dict[str, Any]:
  """Times the Trainer's compiled step and the jitted forward; returns the JSON-able result dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import config_validation  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sharding  # pylint: disable=g-import-not-at-top
  from ddpm_jax import train  # pylint: disable=g-import-not-at-top

  config.training.batch_size = batch_size
  config_validation.validate_config(config, jax.device_count())
  k = int(config.training.steps_per_call)
  res = machine_info()
  res.update({'config': config.get('_bench_name', ''), 'batch_size': batch_size, 'dtype': config.model.dtype,
              'steps_per_call': k, 'remat': bool(config.model.remat), 'timed_calls': steps, 'warmup_calls': warmup})

  t0 = time.perf_counter()
  trainer = train.Trainer(config, workdir=tempfile.mkdtemp(prefix='ddpm_bench_'))  # writes nothing there
  jax.block_until_ready(trainer.state)
  res['init_s'] = time.perf_counter() - t0
  res['num_params'] = int(sum(x.size for x in jax.tree.leaves(trainer.state.params)))

  host_batches = synthetic_batches(config, batch_size)
  rng = np.random.default_rng(1)

  peak = peak_flops(jax.devices()[0].device_kind, config.model.dtype, peak_tflops)
  if do_train:
    # Ahead-of-time compile of exactly the program Trainer.step runs (same jit object, shardings, donation);
    # jax's compilation cache then serves Trainer.step's own call.
    device_batches = sharding.global_batch_array(host_batches, sharding.batch_sharded(trainer.mesh, 1))
    t0 = time.perf_counter()
    lowered = trainer._step.lower(trainer.state, device_batches)  # pylint: disable=protected-access
    res['lower_s'] = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    res['compile_s'] = res['lower_s'] + time.perf_counter() - t0
    flops = cost_flops(compiled)
    if jax.default_backend() == 'cpu':
      step = trainer._step  # pylint: disable=protected-access
      flops = accelerator_lowering_flops(step, trainer.state, device_batches)
    # The scan body over steps_per_call is counted once by XLA's cost analysis when the trip count is unknown to
    # it; per-step FLOPs are the k = 1 program's, so report those only when k == 1 (use k = 1 for FLOPs/MFU).
    res['flops_per_train_step'] = flops if k == 1 else None
    t0 = time.perf_counter()
    trainer.step(host_batches)
    jax.block_until_ready(trainer.state)
    res['first_step_s'] = time.perf_counter() - t0

    def train_call():
      trainer.step(host_batches)
      jax.block_until_ready(trainer.state)

    times = time_calls(train_call, steps, warmup)
    per_call = statistics.median(times)
    res['train_call_s_median'] = per_call
    res['train_call_s_min'] = min(times)
    res['train_steps_per_s'] = k / per_call
    res['train_img_per_s'] = k * batch_size / per_call
    if res['flops_per_train_step']:
      achieved = res['flops_per_train_step'] * res['train_steps_per_s']
      res['train_tflops'] = achieved / 1e12
      res['mfu'] = achieved / peak if peak else None
    else:
      res['train_tflops'] = res['mfu'] = None
    res['gflops_per_train_image'] = (res['flops_per_train_step'] / batch_size / 1e9
                                     if res['flops_per_train_step'] else None)

  if do_forward:
    model = trainer.model
    params = trainer.state.params
    batch_sharding = sharding.batch_sharded(trainer.mesh)
    x = jax.device_put(jnp.asarray(host_batches['image'][0]), batch_sharding)
    t = jax.device_put(jnp.asarray(rng.integers(0, config.diffusion.num_timesteps, (batch_size,)), jnp.int32),
                       batch_sharding)
    y = None
    if config.model.num_classes:
      y = jax.device_put(jnp.asarray(host_batches['label'][0]), batch_sharding)
    forward = jax.jit(lambda p, x, t, y: model.apply({'params': p}, x, t, y=y, train=False))
    t0 = time.perf_counter()
    fwd_compiled = forward.lower(params, x, t, y).compile()
    res['fwd_compile_s'] = time.perf_counter() - t0
    # On the CPU the U-Net's convolutions are oneDNN custom calls, which XLA's cost analysis does not count.
    fwd_flops = (accelerator_lowering_flops(forward, params, x, t, y) if jax.default_backend() == 'cpu'
                 else cost_flops(fwd_compiled))
    res['flops_per_forward'] = fwd_flops
    times = time_calls(lambda: jax.block_until_ready(fwd_compiled(params, x, t, y)), steps, warmup)
    res['fwd_call_s_median'] = statistics.median(times)
    res['fwd_call_s_min'] = min(times)
    res['fwd_img_per_s'] = batch_size / res['fwd_call_s_median']
    if fwd_flops:
      res['fwd_tflops'] = fwd_flops / res['fwd_call_s_median'] / 1e12
      res['fwd_mfu'] = fwd_flops / res['fwd_call_s_median'] / peak if peak else None
  res['peak_tflops'] = peak / 1e12 if peak else None
  res['load_average_1min_end'] = round(os.getloadavg()[0], 2)
  return res


# ------------------------------------------------------------------------------------------------- breakdown
def breakdown(config, batch_size: int, steps: int, warmup: int) -> list[tuple[str, int, float, float]]:
  """Times each distinct sub-block of the U-Net alone (forward, and forward+backward w.r.t. params and input).

  Returns rows (name, count in the network, fwd seconds per call, fwd+bwd seconds per call). The network is a
  sum of these blocks plus glue (concats, up/downsampling, embedding), so count x time shows where the time goes.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top

  model = models.create_model(config)
  dt = model.dtype
  temb_ch = model.ch * 4
  # Walk the architecture exactly as UNet.__call__ does, collecting (kind, resolution, c_in, c_out).
  shapes = []
  ch = [model.ch]
  res_ = model.image_size
  shapes.append(('conv_in 3x3', res_, model.in_ch, model.ch))
  for i_level, mult in enumerate(model.ch_mult):
    for _ in range(model.num_res_blocks):
      shapes.append(('resnet', res_, ch[-1], model.ch * mult))
      if res_ in model.attn_resolutions:
        shapes.append(('attn', res_, model.ch * mult, model.ch * mult))
      ch.append(model.ch * mult)
    if i_level != len(model.ch_mult) - 1:
      shapes.append(('downsample conv', res_, ch[-1], ch[-1]))
      ch.append(ch[-1])
      res_ //= 2
  c = ch[-1]
  shapes += [('resnet', res_, c, c), ('attn', res_, c, c), ('resnet', res_, c, c)]
  for i_level in reversed(range(len(model.ch_mult))):
    for _ in range(model.num_res_blocks + 1):
      skip = ch.pop()
      shapes.append(('resnet', res_, c + skip, model.ch * model.ch_mult[i_level]))
      c = model.ch * model.ch_mult[i_level]
      if res_ in model.attn_resolutions:
        shapes.append(('attn', res_, c, c))
    if i_level != 0:
      res_ *= 2
      shapes.append(('upsample conv', res_, c, c))
  shapes.append(('norm_out+conv_out', res_, c, model.out_ch))

  counts: dict[tuple, int] = {}
  for s in shapes:
    counts[s] = counts.get(s, 0) + 1

  class Sub(nn.Module):
    """One sub-block, or one part of a ResNet block, as the U-Net builds it."""
    kind: str
    c_out: int

    @nn.compact
    def __call__(self, x, temb):
      if self.kind == 'resnet':
        return unet.ResnetBlock(out_ch=self.c_out, dropout=model.dropout, deterministic=False, dtype=dt)(x, temb)
      if self.kind == 'attn':
        return unet.AttnBlock(dtype=dt)(x)
      if self.kind == 'groupnorm+swish':
        return nn.swish(unet._group_norm(x.shape[-1], dt, 'gn')(x))  # pylint: disable=protected-access
      if self.kind == 'conv3x3':
        return unet._conv3x3(self.c_out, dt, 'conv')(x)  # pylint: disable=protected-access
      if self.kind == 'downsample conv':
        same_tf = ((0, 1), (0, 1))  # TF 'SAME' for a stride-2 3x3 conv, as the U-Net
        return unet._conv3x3(self.c_out, dt, 'conv', stride=2, padding=same_tf)(x)  # pylint: disable=protected-access
      if self.kind == 'upsample conv':
        return unet._conv3x3(self.c_out, dt, 'conv')(x)  # pylint: disable=protected-access
      if self.kind == 'conv_in 3x3':
        return unet._conv3x3(self.c_out, dt, 'conv')(x)  # pylint: disable=protected-access
      if self.kind == 'norm_out+conv_out':
        h = nn.swish(unet._group_norm(x.shape[-1], dt, 'gn')(x))  # pylint: disable=protected-access
        return unet._conv3x3(self.c_out, dt, 'conv')(h)  # pylint: disable=protected-access
      raise ValueError(self.kind)

  rows = []
  key = jax.random.key(0)

  def time_sub(kind, res, c_in, c_out):
    sub = Sub(kind=kind, c_out=c_out)
    x = jax.random.normal(key, (batch_size, res, res, c_in), jnp.float32).astype(dt)
    temb = jax.random.normal(key, (batch_size, temb_ch), jnp.float32).astype(dt)
    params = sub.init({'params': key, 'dropout': key}, x, temb)['params']
    fwd = jax.jit(lambda p, x: sub.apply({'params': p}, x, temb, rngs={'dropout': key}))

    def loss(p, x):
      return jnp.sum(sub.apply({'params': p}, x, temb, rngs={'dropout': key}).astype(jnp.float32))
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    tf = statistics.median(time_calls(lambda: jax.block_until_ready(fwd(params, x)), steps, warmup))
    tb = statistics.median(time_calls(lambda: jax.block_until_ready(fwd_bwd(params, x)), steps, warmup))
    return tf, tb

  for (kind, res, c_in, c_out), n in counts.items():
    tf, tb = time_sub(kind, res, c_in, c_out)
    rows.append((f'{kind} {res}x{res} {c_in}->{c_out}', n, tf, tb))
    if kind == 'resnet':
      # Parts of this ResNet block: its two GroupNorm+swish and two 3x3 convs.
      for part, pc_in, pc_out in (('groupnorm+swish', c_in, c_in), ('groupnorm+swish', c_out, c_out),
                                  ('conv3x3', c_in, c_out), ('conv3x3', c_out, c_out)):
        tf, tb = time_sub(part, res, pc_in, pc_out)
        rows.append((f'  part: {part} {res}x{res} {pc_in}->{pc_out}', n, tf, tb))
  return rows


def main(argv):
  config, batch_size = config_and_batch_size(argv, lambda c: c.training.batch_size)
  res = benchmark(config, batch_size, FLAGS.steps, FLAGS.warmup, do_train=FLAGS.train, do_forward=FLAGS.forward,
                  peak_tflops=FLAGS.peak_tflops)
  res['config'] = config_flags.get_config_filename(FLAGS['config'])
  res['framework'] = 'ddpm_jax (JAX/Flax/XLA)'

  rows = [(name, res[name]) for name in (
      'device', 'cpu_model', 'load_average_1min', 'num_params', 'batch_size', 'dtype', 'steps_per_call',
      'compile_s', 'train_call_s_median', 'train_steps_per_s', 'train_img_per_s', 'flops_per_train_step',
      'train_tflops', 'mfu', 'fwd_compile_s', 'fwd_call_s_median', 'fwd_img_per_s', 'flops_per_forward')
          if name in res]
  print_table(f'ddpm_jax throughput ({res["config"]}, jax {res["jax"]})', rows)

  if FLAGS.breakdown:
    rows = breakdown(config, batch_size, FLAGS.steps, FLAGS.warmup)
    print(f'\nSub-block breakdown (batch {batch_size}, median of {FLAGS.steps}; ms per call; x count in the net)')
    print(f'  {"block":<48} {"n":>3} {"fwd ms":>9} {"fwd+bwd ms":>11} {"n*fwd":>9} {"n*fwd+bwd":>10}')
    tot_f = tot_b = 0.0
    for name, n, tf, tb in rows:
      part = name.startswith('  part')
      print(f'  {name:<48} {n:>3} {1e3 * tf:>9.2f} {1e3 * tb:>11.2f} {1e3 * n * tf:>9.1f} {1e3 * n * tb:>10.1f}')
      if not part:
        tot_f += n * tf
        tot_b += n * tb
    print(f'  {"sum of blocks":<48} {"":>3} {"":>9} {"":>11} {1e3 * tot_f:>9.1f} {1e3 * tot_b:>10.1f}')
    res['breakdown'] = [{'block': name.strip(), 'count': n, 'fwd_s': tf, 'fwd_bwd_s': tb}
                        for name, n, tf, tb in rows]
  print(json.dumps(res))


if __name__ == '__main__':
  define_flags()
  app.run(main)
