"""Where a CPU train step's time goes: one 3x3 convolution's forward, input gradient and weight gradient (Issue 6).

  python bench/conv_wgrad.py [--batch_size=16 --side=32 --c_in=128 --c_out=128] [--torch]

Times, for one NHWC 3x3 stride-1 'same' convolution of the U-Net's most common shape (CIFAR-10, batch 16, 32x32,
128 -> 128 channels, 4.8 GFLOP per pass):
  * forward (`lax.conv_general_dilated`);
  * input gradient and weight gradient as JAX's autodiff emits them (two convolutions);
  * the weight gradient as 9 GEMMs (`models/ops.py` on a CPU without oneDNN);
  * oneDNN's three passes (`models/onednn.py`: what the U-Net runs on the CPU), with their error against XLA's;
  * with --torch, the same three passes in PyTorch (oneDNN), at torch.set_num_threads(os.cpu_count()).
Median of --steps calls after 2 warm-up calls, each blocking on its result. Set XLA_FLAGS to try XLA:CPU options
(e.g. --xla_cpu_use_onednn=true). The LAST line of stdout is one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 16, 'Batch size.')
flags.DEFINE_integer('side', 32, 'Feature-map side.')
flags.DEFINE_integer('c_in', 128, 'Input channels.')
flags.DEFINE_integer('c_out', 128, 'Output channels.')
flags.DEFINE_integer('steps', 9, 'Timed calls (median reported).')
flags.DEFINE_bool('torch', False, 'Also time PyTorch on the same shapes.')


def _median_ms(fn, steps: int) -> float:
  return 1e3 * statistics.median(throughput.time_calls(fn, steps, warmup=2))


def time_jax(b: int, side: int, c_in: int, c_out: int, steps: int) -> dict[str, float]:
  """ms per call of XLA's forward, input gradient and autodiff weight gradient, the 9-GEMM weight gradient, and
  oneDNN's three passes (`models/onednn.py`, where available)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import onednn  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import ops  # pylint: disable=g-import-not-at-top

  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (b, side, side, c_in))
  w = jax.random.normal(kw, (3, 3, c_in, c_out)) * 0.05
  g = jax.random.normal(kg, (b, side, side, c_out))
  dn = ('NHWC', 'HWIO', 'NHWC')

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)

  fwd = jax.jit(conv)
  dgrad = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
  wgrad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
  # What models/ops.py runs on a CPU without oneDNN: the weight gradient as 9 GEMMs.
  wgrad_gemm = jax.jit(ops._conv3x3_weight_grad_gemms)  # pylint: disable=protected-access
  rel_err = lambda a, b: float(jax.numpy.linalg.norm(a - b) / jax.numpy.linalg.norm(b))  # noqa: E731
  run = lambda f, *a: _median_ms(lambda: jax.block_until_ready(f(*a)), steps)  # noqa: E731
  res = {'forward_ms': run(fwd, x, w), 'input_grad_ms': run(dgrad, x, w, g),
         'weight_grad_xla_ms': run(wgrad, x, w, g), 'weight_grad_gemm_ms': run(wgrad_gemm, x, w, g),
         'gemm_vs_xla_rel_err': rel_err(wgrad_gemm(x, w, g), wgrad(x, w, g))}
  if onednn.available():  # what models/ops.py runs on the CPU: oneDNN's three passes
    passes = {'onednn_forward': (jax.jit(onednn.conv3x3), (x, w), fwd(x, w)),
              'onednn_input_grad': (jax.jit(onednn.conv3x3_input_grad), (g, w), dgrad(x, w, g)),
              'onednn_weight_grad': (jax.jit(onednn.conv3x3_weight_grad), (x, g), wgrad(x, w, g))}
    for name, (fn, args, xla_value) in passes.items():
      res[f'{name}_ms'] = run(fn, *args)
      res[f'{name}_vs_xla_rel_err'] = rel_err(fn(*args), xla_value)
  return res


def time_torch(b: int, side: int, c_in: int, c_out: int, steps: int) -> dict[str, float]:
  """ms per call of torch's forward, input gradient and weight gradient (oneDNN on CPU)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  x = torch.randn(b, c_in, side, side, requires_grad=True)
  conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
  g = torch.randn(b, c_out, side, side)
  with torch.no_grad():
    fwd_ms = _median_ms(lambda: conv(x), steps)
  y = conv(x)
  grad = lambda *wrt: torch.autograd.grad(y, list(wrt), g, retain_graph=True)  # noqa: E731
  return {'torch_forward_ms': fwd_ms, 'torch_input_grad_ms': _median_ms(lambda: grad(x), steps),
          'torch_weight_grad_ms': _median_ms(lambda: grad(conv.weight), steps), 'torch': torch.__version__}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=g-import-not-at-top
  b, side, c_in, c_out = FLAGS.batch_size, FLAGS.side, FLAGS.c_in, FLAGS.c_out
  gflop = 2 * b * side * side * 9 * c_in * c_out / 1e9
  res = {'shape': [b, side, side, c_in, c_out], 'gflop_per_pass': gflop, 'jax': jax.__version__,
         'xla_flags': os.environ.get('XLA_FLAGS', ''), 'load_average_1min': round(os.getloadavg()[0], 2)}
  res.update(time_jax(b, side, c_in, c_out, FLAGS.steps))
  if FLAGS.torch:
    res.update(time_torch(b, side, c_in, c_out, FLAGS.steps))
  print(f'3x3 conv, batch {b}, {side}x{side}, {c_in} -> {c_out} ({gflop:.2f} GFLOP per pass)')
  for key, value in res.items():
    if key.endswith('_ms'):
      print(f'  {key[:-3]:<22} {value:8.2f} ms  {gflop / value * 1e3:7.1f} GFLOP/s')
  print(json.dumps(res))


if __name__ == '__main__':
  app.run(main)
