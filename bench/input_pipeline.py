"""Input pipeline throughput (images/s) of `create_train_iterator` on cifar10-shaped data.

Usage (from the repository root):
  python bench/input_pipeline.py                      # batch 128 and 16, 0 workers
  python bench/input_pipeline.py --num_workers=2 --batch_sizes=128

Two sources, both 32x32x3 uint8 with labels, through the full training pipeline (shuffle, flip, batch, [-1, 1]):
  mock   `tfds.testing.mock_data` cifar10 (random examples made by TFDS on access, no decoding).
  array  a prepared TFDS cifar10 in ArrayRecord files with PNG-encoded random images
         (`tests/fake_datasets.prepare_fake_cifar10`): the real read path, PNG decoding included, with random images
         instead of the real CIFAR-10 files (which need network to build).
"""

import os
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default as default_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests import fake_datasets  # pylint: disable=g-import-not-at-top,wrong-import-position

_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['128', '16'], 'Global batch sizes to time.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 20_000, 'Images timed per measurement (after a warm-up).')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', 0, 'config.data.num_workers.')
_ARRAY_EXAMPLES = flags.DEFINE_integer('array_examples', 10_000, 'Size of the fake ArrayRecord train split.')


def _images_per_second(config) -> float:
  it = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
  batch_size = config.training.batch_size
  for _ in range(max(3, 512 // batch_size)):  # warm-up: reader threads, first epoch permutation
    next(it)
  num_batches = max(1, _NUM_IMAGES.value // batch_size)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(it)
  elapsed = time.perf_counter() - start
  assert batch['image'].shape == (batch_size, 32, 32, 3)
  return num_batches * batch_size / elapsed


def main(argv):
  del argv
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = default_config.get_config()
  config.data.num_workers = _NUM_WORKERS.value
  print(f'cpu_count={os.cpu_count()} num_workers={_NUM_WORKERS.value}')
  print('| source | global batch | images/s |')
  print('| --- | ---: | ---: |')
  for batch_size in map(int, _BATCH_SIZES.value):
    config.training.batch_size = batch_size
    with tfds.testing.mock_data(num_examples=50_000):
      print(f'| cifar10 mock_data | {batch_size} | {_images_per_second(config):,.0f} |', flush=True)
  with tempfile.TemporaryDirectory() as data_dir:
    start = time.perf_counter()
    fake_datasets.prepare_fake_cifar10(data_dir, num_train=_ARRAY_EXAMPLES.value, num_test=10)
    print(f'(prepared {_ARRAY_EXAMPLES.value} fake ArrayRecord examples in {time.perf_counter() - start:.1f} s)')
    config.data.data_dir = data_dir
    for batch_size in map(int, _BATCH_SIZES.value):
      config.training.batch_size = batch_size
      print(f'| cifar10 ArrayRecord+PNG | {batch_size} | {_images_per_second(config):,.0f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
