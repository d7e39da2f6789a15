"""Where the compiled train step's time goes, per kind of XLA op, from a profiler trace (Issue 6).

  python bench/profile_step.py --config=configs/cifar10.py --batch_size=16 [--steps=2] [--top=15]

Runs `train.Trainer(config).step` (the same program as bench/throughput.py) under `jax.profiler.trace`, then maps
every op the XLA runtime executed (the trace's thunk events) back to its instruction in the compiled HLO and sums
the wall time per category:
  * conv: convolutions (on the CPU oneDNN's custom calls for the 3x3 ones, models/onednn.py, and XLA's for the
    strided ones; without oneDNN XLA's YNNPACK or Eigen kernels for the forward and input gradient);
  * GEMM: matrix products (attention, 1x1 projections; without oneDNN the GEMM weight gradients of models/ops.py);
  * elementwise: XLA's loop fusions and library elementwise kernels (GroupNorm, swish, Adam, EMA, losses);
  * layout: transposes, copies, pads, slices, concatenations (fusions whose root only moves data);
  * RNG: random-bit generation (dropout masks, noise, timesteps);
  * other: everything else the runtime executed (small ops, loop control, reductions).
Ops that run at the same time are each counted in full, so the categories can add up to more than the step;
"overlap" says by how much, and "gaps" is the time with no op running (dispatch, synchronisation). The step time is
from the first op's start to the last op's end over --steps steps run back to back; every figure is per step.
The LAST line of stdout is one JSON object.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
CATEGORIES = ('conv', 'GEMM', 'elementwise', 'layout', 'RNG', 'other')
_LAYOUT_OPS = ('transpose', 'copy', 'pad', 'slice', 'dynamic-slice', 'dynamic-update-slice', 'concatenate',
               'bitcast', 'reshape', 'broadcast', 'reverse', 'parameter', 'constant', 'tuple', 'get-tuple-element')
_CONTAINERS = ('while', 'call', 'conditional')  # their bodies' ops are events of their own


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, str]]:
  """(instruction name -> its line, computation name -> its body) of a compiled module's text."""
  instructions, bodies, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      current = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      continue
    match = re.match(r'\s+(?:ROOT )?%([\w.\-]+) = ', line)
    if match and current is not None:
      instructions[match.group(1)] = line
      bodies[current].append(line)
  return instructions, {name: '\n'.join(lines) for name, lines in bodies.items()}


def _opcodes(lines: str) -> list[str]:
  return re.findall(r'= (?:\([^=]*?\)|\S+) ([a-z][\w\-]*)\(', lines)


def categorize(line: str, bodies: dict[str, str]) -> str:
  """The category of one executed HLO instruction (see the module docstring)."""
  called = re.search(r'calls=%([\w.\-]+)', line)
  body = bodies.get(called.group(1), '') if called else ''
  ops = _opcodes(body) if body else _opcodes(line)
  text = body or line
  if 'threefry' in text or 'rng-bit-generator' in ops or '_bernoulli' in text or 'random_bits' in text:
    return 'RNG'
  if 'convolution' in ops or 'custom_call_target="ddpm_conv3x3' in text:
    return 'conv'
  if 'dot' in ops:
    return 'GEMM'
  if ops and all(op in _LAYOUT_OPS for op in ops):
    return 'layout'
  if called or 'fusion' in line:
    return 'elementwise'
  return 'other'


def profile(config, batch_size: int, steps: int) -> tuple[dict, list]:
  """Traces `steps` train steps; returns (per-category ms per step and totals, top ops by time)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import config_validation  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sharding  # pylint: disable=g-import-not-at-top
  from ddpm_jax import train  # pylint: disable=g-import-not-at-top

  config.training.batch_size = batch_size
  config_validation.validate_config(config, jax.device_count())
  trainer = train.Trainer(config, workdir=tempfile.mkdtemp(prefix='ddpm_profile_'))  # writes nothing there
  batches = throughput.synthetic_batches(config, batch_size)
  compiled = trainer._step.lower(  # pylint: disable=protected-access
      trainer.state, sharding.global_batch_array(batches, sharding.batch_sharded(trainer.mesh, 1))).compile()
  instructions, bodies = parse_hlo(compiled.as_text())
  for _ in range(2):
    trainer.step(batches)
  jax.block_until_ready(trainer.state)

  trace_dir = tempfile.mkdtemp(prefix='ddpm_trace_')
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      trainer.step(batches)
      jax.block_until_ready(trainer.state)
  trace_file = glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'), recursive=True)[0]
  with gzip.open(trace_file) as f:
    trace = json.load(f)
  events = [e for e in (trace['traceEvents'] if isinstance(trace, dict) else trace) if e.get('ph') == 'X']

  ops = [e for e in events if e['name'] in instructions
         and not any(f' {c}(' in instructions[e['name']] for c in _CONTAINERS)]
  per_category = collections.Counter()
  per_op = collections.Counter()
  for e in ops:
    per_category[categorize(instructions[e['name']], bodies)] += e['dur']
    per_op[e['name']] += e['dur']
  # Time with at least one op running (the union of the op intervals).
  busy, end = 0.0, -1.0
  for start, stop in sorted((e['ts'], e['ts'] + e['dur']) for e in ops):
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  # From the first op's start to the last op's end: the traced steps run back to back.
  step_us = max(e['ts'] + e['dur'] for e in ops) - min(e['ts'] for e in ops)
  ms = lambda us: us / 1e3 / steps  # noqa: E731
  summary = {f'{c}_ms': ms(per_category[c]) for c in CATEGORIES}
  summary.update({'step_ms': ms(step_us), 'sum_of_ops_ms': ms(sum(per_category.values())),
                  'overlap_ms': ms(sum(per_category.values()) - busy), 'gaps_ms': ms(max(step_us - busy, 0.0)),
                  'num_ops_per_step': len(ops) / steps})
  top = []
  for name, dur in per_op.most_common(FLAGS.top):
    line = instructions[name]
    shape = re.search(r'= (\S+?)(?:\{[\d,]*\})? ', line)
    op_name = re.search(r'op_name="([^"]+)"', line)
    top.append({'op': name, 'ms': ms(dur), 'category': categorize(line, bodies),
                'shape': shape.group(1) if shape else '', 'source': op_name.group(1) if op_name else ''})
  return summary, top


def main(argv):
  config, batch_size = throughput.config_and_batch_size(argv, lambda c: c.training.batch_size)
  summary, top = profile(config, batch_size, FLAGS.steps)
  res = throughput.machine_info()
  res.update({'config': config_flags.get_config_filename(FLAGS['config']), 'batch_size': batch_size,
              'dtype': config.model.dtype, 'traced_steps': FLAGS.steps, **summary, 'top_ops': top})
  step = summary['step_ms']
  rows = [(f'{c} ms', f'{summary[c + "_ms"]:.1f}  ({100 * summary[c + "_ms"] / step:.0f}%)') for c in CATEGORIES]
  rows += [('sum of ops ms', f'{summary["sum_of_ops_ms"]:.1f}'), ('overlap ms', f'{summary["overlap_ms"]:.1f}'),
           ('gaps ms', f'{summary["gaps_ms"]:.1f}'), ('step ms (traced)', f'{step:.1f}'),
           ('ops per step', f'{summary["num_ops_per_step"]:.0f}')]
  throughput.print_table(f'Train step by op category ({res["config"]}, batch {batch_size}, {res["device"]})', rows)
  print(f'\nTop {len(top)} ops (ms per step)')
  for t in top:
    print(f'  {t["ms"]:8.1f}  {t["category"]:<11} {t["shape"]:<24} {t["source"][-70:]}')
  print(json.dumps(res))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', 'configs/cifar10.py', 'Path to an ml_collections config file.')
  flags.DEFINE_integer('batch_size', None, 'Global batch size (default: config.training.batch_size).')
  flags.DEFINE_integer('steps', 2, 'Traced train steps (the figures are per step).')
  flags.DEFINE_integer('top', 15, 'How many of the slowest ops to list.')
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Activation dtype (default: config.model.dtype).')
  app.run(main)
