"""The PyTorch peer of bench/throughput.py: diffusers' `UNet2DModel` with the released DDPM architecture (Issue 6).

  python bench/peer_torch.py --config=configs/cifar10.py --batch_size=16 [--steps=10] [--dtype=bfloat16]

The network is what users of the released CIFAR-10 model run: diffusers' `UNet2DModel` configured as
google/ddpm-cifar10-32 (35,746,307 parameters for configs/cifar10.py; any ddpm_jax config is mapped to the same
family: block_out_channels = ch * ch_mult, Attn{Down,Up}Block2D at `attn_resolutions`, layers_per_block =
num_res_blocks, GroupNorm(32, eps 1e-6), silu, positional embedding with flip_sin_to_cos=False, freq_shift=1,
downsample_padding=0, dropout).

  * train step: q_sample(x_0, t, noise) -> forward (train mode, dropout) -> MSE to the noise -> backward ->
    clip_grad_norm_(optim.grad_clip) (as ddpm_jax's step and diffusers' train_unconditional.py) -> Adam step ->
    EMA update of a parameter copy (torch._foreach_lerp_, what diffusers' EMAModel(foreach=True) does);
  * forward: `model(x_t, t).sample` in eval mode under torch.inference_mode().
torch.set_num_threads(physical cores) unless --threads is given. Median of `--steps` timed calls after `--warmup`.
FLOPs come from torch.utils.flop_counter (convolutions and matmuls, as XLA's count is dominated by them).

The human-readable table goes first; the LAST line of stdout is one JSON object with the same keys as
bench/throughput.py's (`compile_s` is 0 in eager mode, or the first-call time with --compile).
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
# torchvision's C ops cannot load on this CPU build of torch; diffusers only needs the module to exist.
sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))

import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags (defined only when run as a script; sample.py imports the helpers)."""
  config_flags.DEFINE_config_file('config', 'configs/cifar10.py', 'Path to an ml_collections config file.')
  flags.DEFINE_integer('batch_size', None, 'Batch size (default: config.training.batch_size).')
  flags.DEFINE_integer('steps', 10, 'Timed calls of each program (the median is reported).')
  flags.DEFINE_integer('warmup', 2, 'Untimed calls first.')
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'float32, or bfloat16 autocast (default: '
                    'config.model.dtype).')
  flags.DEFINE_integer('threads', None, 'torch intra-op threads (default: physical cores).')
  flags.DEFINE_enum('adam', 'default', ['default', 'foreach', 'fused'], 'torch.optim.Adam implementation.')
  flags.DEFINE_bool('channels_last', False, 'Use channels_last memory format for the model and inputs.')
  flags.DEFINE_bool('compile', False, 'torch.compile the model (inductor; needs a C++ compiler on CPU).')
  flags.DEFINE_bool('forward', True, 'Also time the forward.')
  flags.DEFINE_bool('train', True, 'Time the train step.')
  flags.DEFINE_float('peak_tflops', None, 'Peak dense TFLOP/s of the device, for `mfu`.')


def physical_cores() -> int:
  """Number of distinct (physical id, core id) pairs in /proc/cpuinfo (os.cpu_count() if unreadable)."""
  try:
    cores, phys = set(), '0'
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('physical id'):
          phys = line.split(':')[1].strip()
        elif line.startswith('core id'):
          cores.add((phys, line.split(':')[1].strip()))
    return len(cores) or os.cpu_count()
  except OSError:
    return os.cpu_count()


def diffusers_config(config) -> dict[str, Any]:
  """UNet2DModel kwargs of the DDPM family for a ddpm_jax config (google/ddpm-cifar10-32 for configs/cifar10.py)."""
  m = config.model
  side = int(config.data.pad_to or config.data.image_size)
  levels = len(m.ch_mult)
  attn = [side // 2 ** i in tuple(m.attn_resolutions) for i in range(levels)]
  out_ch = config.data.num_channels * (2 if config.diffusion.var_type in ('learned', 'learned_range') else 1)
  return dict(
      sample_size=side, in_channels=config.data.num_channels, out_channels=out_ch,
      block_out_channels=[m.ch * c for c in m.ch_mult],
      down_block_types=['AttnDownBlock2D' if a else 'DownBlock2D' for a in attn],
      up_block_types=['AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attn)],
      layers_per_block=m.num_res_blocks, norm_num_groups=32, norm_eps=1e-6, act_fn='silu',
      attention_head_dim=None, time_embedding_type='positional', flip_sin_to_cos=False, freq_shift=1,
      downsample_padding=0, dropout=m.dropout, center_input_sample=False, mid_block_scale_factor=1,
      resnet_time_scale_shift='default')


def count_flops(fn) -> float:
  """FLOPs of one call of fn (torch.utils.flop_counter: convolutions, matmuls, attention)."""
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  with FlopCounterMode(display=False) as counter:
    fn()
  return float(counter.get_total_flops())


def make_train_step(config, model, net, adam: str = 'default'):
  """`step(x0) -> loss`: q_sample, forward, MSE to the noise, backward, clipping, Adam and the EMA lerp of
  `model`'s parameters (`net` is `model`, or its torch.compile)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  betas = np.linspace(config.diffusion.beta_start, config.diffusion.beta_end, config.diffusion.num_timesteps)
  alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas)).float()
  sqrt_ab, sqrt_1mab = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
  num_t = config.diffusion.num_timesteps
  bf16 = config.model.dtype == 'bfloat16'
  kwargs = {'foreach': True} if adam == 'foreach' else {'fused': True} if adam == 'fused' else {}
  opt = torch.optim.Adam(model.parameters(), lr=config.optim.lr, betas=(config.optim.b1, config.optim.b2),
                         eps=config.optim.eps, **kwargs)
  params = [p for p in model.parameters()]
  ema = [p.detach().clone() for p in params]
  decay = config.training.ema_decay
  clip = config.optim.grad_clip

  def train_step(x0):
    model.train()
    t = torch.randint(0, num_t, (x0.shape[0],))
    noise = torch.randn_like(x0)
    x_t = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1mab[t].view(-1, 1, 1, 1) * noise
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
      pred = net(x_t, t).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
      torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - decay)  # pylint: disable=protected-access
    return loss

  return train_step


def benchmark(config, batch_size: int, steps: int, warmup: int, threads: int, adam: str = 'default',
              channels_last: bool = False, compile_model: bool = False, do_train: bool = True,
              do_forward: bool = True, peak_tflops=None) -> dict[str, Any]:
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(config.seed)
  bf16 = config.model.dtype == 'bfloat16'
  res = {
      'framework': 'diffusers UNet2DModel (PyTorch eager)' + (' + torch.compile' if compile_model else ''),
      'device': 'cpu:' + throughput.cpu_model() if not torch.cuda.is_available() else
                'cuda:' + torch.cuda.get_device_name(0),
      'cpu_model': throughput.cpu_model(), 'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
      'load_average_1min': round(os.getloadavg()[0], 2), 'torch': torch.__version__,
      'diffusers': diffusers.__version__, 'batch_size': batch_size, 'dtype': config.model.dtype,
      'adam': adam, 'channels_last': channels_last, 'timed_calls': steps, 'warmup_calls': warmup,
      'steps_per_call': 1,
  }
  cfg = diffusers_config(config)
  res['diffusers_config'] = cfg
  model = UNet2DModel(**cfg)
  res['num_params'] = int(sum(p.numel() for p in model.parameters()))
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  net = torch.compile(model) if compile_model else model

  side, c = cfg['sample_size'], cfg['in_channels']
  x0 = torch.rand(batch_size, c, side, side).mul_(2).sub_(1).contiguous(memory_format=fmt)
  num_t = config.diffusion.num_timesteps

  def autocast():
    return torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16)

  peak = throughput.peak_flops(res['device'], config.model.dtype, peak_tflops)
  if do_train:
    step = make_train_step(config, model, net, adam)
    train_step = lambda: step(x0)  # pylint: disable=unnecessary-lambda-assignment

    t0 = time.perf_counter()
    if compile_model:
      train_step()
      res['compile_s'] = time.perf_counter() - t0
    else:
      # The first eager call doubles as the FLOP count (not timed: the counter slows it down).
      res['flops_per_train_step'] = count_flops(train_step)
      res['compile_s'] = 0.0
    res['first_step_s'] = time.perf_counter() - t0
    times = throughput.time_calls(lambda: train_step().item(), steps, warmup)
    res['train_call_s_median'] = statistics.median(times)
    res['train_call_s_min'] = min(times)
    res['train_steps_per_s'] = 1.0 / res['train_call_s_median']
    res['train_img_per_s'] = batch_size / res['train_call_s_median']
    if not compile_model:
      res['train_tflops'] = res['flops_per_train_step'] * res['train_steps_per_s'] / 1e12
      res['mfu'] = res['train_tflops'] * 1e12 / peak if peak else None
      res['gflops_per_train_image'] = res['flops_per_train_step'] / batch_size / 1e9
    else:
      res['flops_per_train_step'] = res['train_tflops'] = res['mfu'] = None

  if do_forward:
    model.eval()
    t = torch.randint(0, num_t, (batch_size,))

    def forward():
      with torch.inference_mode(), autocast():
        return net(x0, t).sample

    t0 = time.perf_counter()
    if compile_model:
      forward()
    else:
      res['flops_per_forward'] = count_flops(forward)
    res['fwd_first_call_s'] = time.perf_counter() - t0
    times = throughput.time_calls(forward, steps, warmup)
    res['fwd_call_s_median'] = statistics.median(times)
    res['fwd_call_s_min'] = min(times)
    res['fwd_img_per_s'] = batch_size / res['fwd_call_s_median']
    if not compile_model:
      res['fwd_tflops'] = res['flops_per_forward'] / res['fwd_call_s_median'] / 1e12
  res['peak_tflops'] = peak / 1e12 if peak else None
  res['load_average_1min_end'] = round(os.getloadavg()[0], 2)
  return res


def main(argv):
  config, batch_size = throughput.config_and_batch_size(argv, lambda c: c.training.batch_size)
  res = benchmark(config, batch_size, FLAGS.steps, FLAGS.warmup, FLAGS.threads or physical_cores(),
                  adam=FLAGS.adam, channels_last=FLAGS.channels_last, compile_model=FLAGS.compile,
                  do_train=FLAGS.train, do_forward=FLAGS.forward, peak_tflops=FLAGS.peak_tflops)
  res['config'] = config_flags.get_config_filename(FLAGS['config'])
  rows = [(name, res[name]) for name in (
      'device', 'load_average_1min', 'num_params', 'torch_threads', 'batch_size', 'dtype', 'adam',
      'train_call_s_median', 'train_steps_per_s', 'train_img_per_s', 'flops_per_train_step', 'train_tflops',
      'mfu', 'fwd_call_s_median', 'fwd_img_per_s', 'flops_per_forward') if name in res]
  throughput.print_table(f'PyTorch peer ({res["config"]}, torch {res["torch"]}, diffusers {res["diffusers"]})',
                         rows)
  print(json.dumps(res))


if __name__ == '__main__':
  define_flags()
  app.run(main)
