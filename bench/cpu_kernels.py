"""The train step with oneDNN's convolutions against XLA's own, on the CPU, compiled in one process and alternated.

  python bench/cpu_kernels.py --config=configs/quickstart.py [--batch_size=16 --rounds=5 --calls=10]

Builds `train.Trainer(config)` twice, once with `DDPM_JAX_ONEDNN=0` (XLA's kernels; the 9-GEMM weight gradient) and
once with oneDNN's (`models/onednn.py`), each traced afresh (`jax.clear_caches()`), compiles both steps ahead of
time, then runs `--rounds` rounds of `--calls` calls of each in turn on one synthetic batch. Alternating in one
process keeps the machine's drift out of the ratio. Reported: the median over rounds of each round's median call.
The LAST line of stdout is one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/quickstart.py', 'Path to an ml_collections config file.')
flags.DEFINE_integer('batch_size', None, 'Global batch size (default: config.training.batch_size).')
flags.DEFINE_integer('rounds', 5, 'Rounds; each runs --calls calls of each variant.')
flags.DEFINE_integer('calls', 10, 'Timed calls per variant and round.')


def compiled_step(config, batch_size: int, use_onednn: bool):
  """A function running one call of the Trainer's compiled step (blocking), with the kernels chosen."""
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sharding  # pylint: disable=g-import-not-at-top
  from ddpm_jax import train  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import onednn  # pylint: disable=g-import-not-at-top
  os.environ[onednn.SWITCH_ENV] = '1' if use_onednn else '0'
  jax.clear_caches()  # a fresh trace: JAX would reuse the first variant's, kernel choice included
  trainer = train.Trainer(config, workdir=tempfile.mkdtemp(prefix='ddpm_bench_'))
  batches = sharding.global_batch_array(throughput.synthetic_batches(config, batch_size),
                                        sharding.batch_sharded(trainer.mesh, 1))
  compiled = trainer._step.lower(trainer.state, batches).compile()  # pylint: disable=protected-access
  state = [trainer.state]

  def call():
    state[0] = compiled(state[0], batches)[0]
    jax.block_until_ready(state[0])

  call()
  return call


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  batch_size = FLAGS.batch_size or config.training.batch_size
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import config_validation  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import onednn  # pylint: disable=g-import-not-at-top
  config.training.batch_size = batch_size
  config_validation.validate_config(config, jax.device_count())
  if not onednn.available():
    raise app.UsageError('oneDNN kernels are not available here (see the log line above)')
  variants = {'xla': compiled_step(config, batch_size, False), 'onednn': compiled_step(config, batch_size, True)}
  rounds = {name: [] for name in variants}
  for _ in range(FLAGS.rounds):
    for name, call in variants.items():
      rounds[name].append(statistics.median(throughput.time_calls(call, FLAGS.calls, warmup=0)))
  res = throughput.machine_info()
  res.update({'batch_size': batch_size, 'rounds': FLAGS.rounds, 'calls': FLAGS.calls})
  for name, times in rounds.items():
    res[f'{name}_step_s'] = statistics.median(times)
    res[f'{name}_img_per_s'] = batch_size / res[f'{name}_step_s']
    res[f'{name}_rounds_s'] = times
  res['onednn_speedup'] = res['xla_step_s'] / res['onednn_step_s']
  throughput.print_table(f'Train step, XLA vs oneDNN convolutions (batch {batch_size})',
                         [(f'{n} ms', res[f'{n}_step_s'] * 1e3) for n in variants] +
                         [('speed-up', res['onednn_speedup'])])
  print(json.dumps(res))


if __name__ == '__main__':
  app.run(main)
