"""ddpm_jax entry point: parse flags, then hand off to the library.

  python main.py --config=configs/cifar10.py --workdir=runs/cifar10 [--mode=train|sample|eval]
  python main.py --config=configs/cifar10.py --workdir=runs/cifar10 --config.diffusion.loss_type=kl
  python main.py --workdir=runs/cifar10 --mode=sample     # sample/eval: the config the workdir recorded

Anything the user can fix (a flag, a config field or file, the workdir, the data, a checkpoint) is one line
`ddpm_jax: error: ...` on stderr and exit code 2, before anything compiles; a diverged run is one line and exit 1.
A first Ctrl-C while training saves a checkpoint and exits as SIGTERM does (exit 0); at any other moment, or a second
Ctrl-C, it stops with one line and exit code 130.
"""

import os

# Where TensorFlow is installed (only `tfds build` needs it), tfds may import it: keep it quiet. These lines only
# silence it; keeping it off the accelerators is data/sources.py's job (it hides the GPUs from TF when TF is loaded).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # TF computes nothing here; this only silences its notice

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from ddpm_jax import command_line
from ddpm_jax import compilation_cache
from ddpm_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to an ml_collections config file (required to train; '
                                'sample/eval default to the config the workdir records).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, samples and evaluation results.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'What to do with the workdir.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host; auto-detected on TPU '
                  'pods and SLURM, or set the three flags below).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a manual multi-process launch.')
flags.DEFINE_integer('num_processes', None, 'Number of processes, for a manual multi-process launch.')
flags.DEFINE_integer('process_id', None, 'This process index, for a manual multi-process launch.')
compilation_cache.define_flag()
flags.mark_flags_as_required(['workdir'])

PROGRAM = 'ddpm_jax'


def main(argv):
  del argv  # command_line.parse leaves none
  config = FLAGS.config  # None for sample/eval without --config: the workdir's own
  from ddpm_jax import console  # pylint: disable=g-import-not-at-top
  console.setup(FLAGS.verbosity)
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed or FLAGS.coordinator_address:
    # Cross-process collectives on CPU devices need gloo; the setting does not affect accelerators. Nothing may
    # touch the backend before initialize().
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from ddpm_jax import errors  # pylint: disable=g-import-not-at-top
  from ddpm_jax import run  # pylint: disable=g-import-not-at-top

  try:
    run.run(FLAGS.mode, config, FLAGS.workdir, compilation_cache_dir=FLAGS.compilation_cache_dir)
  except UserError as e:
    command_line.fail(PROGRAM, e)
  except errors.TrainingDivergedError as e:
    command_line.fail(PROGRAM, e, code=1)
  logging.flush()


def entry() -> None:
  """`python main.py ...`: absl's app.run with one-line flag errors and a one-line Ctrl-C."""
  # Training saves on a first Ctrl-C (train.py); this is any other moment, or a second one.
  command_line.run_interruptible(PROGRAM, lambda: app.run(main, flags_parser=command_line.flags_parser(PROGRAM)),
                                 ': stopped without saving; the checkpoints and files written before it are kept '
                                 '(training resumes from its last checkpoint)')


if __name__ == '__main__':
  entry()
