"""ddpm_jax entry point: parse flags, then hand off to the library.

  python main.py --config=configs/cifar10.py --workdir=runs/cifar10 [--mode=train|sample|eval]
  python main.py --config=configs/cifar10.py --workdir=runs/cifar10 --config.diffusion.loss_type=kl
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to an ml_collections config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, samples and evaluation results.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'What to do with the workdir.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host; auto-detected on TPU '
                  'pods and SLURM, or set the three flags below).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a manual multi-process launch.')
flags.DEFINE_integer('num_processes', None, 'Number of processes, for a manual multi-process launch.')
flags.DEFINE_integer('process_id', None, 'This process index, for a manual multi-process launch.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # TensorFlow (if tfds imports it) must never claim accelerator memory.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed or FLAGS.coordinator_address:
    # Cross-process collectives on CPU devices need gloo; the setting does not affect accelerators. Nothing may
    # touch the backend before initialize().
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from ddpm_jax import config_validation  # pylint: disable=g-import-not-at-top
  from ddpm_jax import run  # pylint: disable=g-import-not-at-top

  logging.info('JAX process %d/%d, %d local / %d global devices', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  try:
    run.run(FLAGS.mode, FLAGS.config, FLAGS.workdir)
  except config_validation.UserError as e:
    # User errors (bad config, missing data or checkpoint) are one line, no traceback.
    print(f'ddpm_jax: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
