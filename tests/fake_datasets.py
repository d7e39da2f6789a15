"""Fake datasets for tests and benchmarks: the real read path of the library without network or real data."""

import numpy as np
from PIL import Image


def prepare_fake_cifar10(data_dir: str, num_train: int, num_test: int, seed: int = 0) -> None:
  """Writes random 32x32 images as a *prepared* TFDS `cifar10` (same version, features, ArrayRecord files).

  The real read path (ArrayRecord + PNG decoding, no mock) with neither network nor TensorFlow: images are handed
  to TFDS as PIL images, which it encodes without TF. Label i % 10 for the i-th example of a split.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class Cifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # name 'cifar10', like the real one
    VERSION = tfds.builder_cls('cifar10').VERSION

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'id': tfds.features.Text(), 'image': tfds.features.Image(shape=(32, 32, 3)),
          'label': tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(num_train, seed), 'test': self._generate_examples(num_test, seed + 1)}

    def _generate_examples(self, n, split_seed):
      rng = np.random.default_rng(split_seed)
      for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        yield i, {'id': f'{split_seed}_{i}', 'image': image, 'label': i % 10}

  Cifar10(data_dir=data_dir, file_format='array_record').download_and_prepare()
