"""TensorBoard event files written without TensorFlow, behind clu's `MetricWriter` interface.

clu's `SummaryWriter` is `tf.summary`, which makes TensorFlow (1.4 GB) a runtime dependency of a JAX project that
only needs it to write a few protos. `TensorBoardWriter` writes the same events: one `Event` per value with the
summary protos `tf.summary` v2 writes (plugin name, data class, tensor layout), so TensorBoard shows scalars,
images and hparams as before:

* scalars: a float32 scalar tensor, plugin `scalars`, `DATA_CLASS_SCALAR` (`tf.summary.scalar` casts to float32 too);
* images: a string tensor [width, height, png_1, ..., png_N], plugin `images`, `DATA_CLASS_BLOB_SEQUENCE`, PNGs by
  Pillow; float images in [0, 1] are quantised like `tf.image.convert_image_dtype(..., saturate=True)`;
* hparams: the hparams plugin's `session_start_info` under `_hparams_/session_start_info` (tensorboard's own
  `hparams_pb`, what `clu` writes through `hparams_api.hparams`), nested dicts flattened with '.' as clu does;
* texts and histograms as `tf.summary.text` / `tf.summary.histogram` (tensorboard's `text_pb` / `histogram_pb`).

The records are framed by tensorboard's `RecordWriter` (length, masked CRC32C, data, masked CRC32C), into
`events.out.tfevents.<time>.<host>.<pid>.<n>.v2` as TensorFlow names them. Nothing here imports TensorFlow, even
where it is installed (tensorboard's own `EventFileWriter` would: it goes through `tensorboard.compat.tf`).
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import os
import socket
import sys
import time
from typing import Any, Mapping, Optional

from absl import logging
from flax import traverse_util
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util


def _clu_interface():
  """`clu.metric_writers.interface`, loaded without running `clu/metric_writers/__init__.py`.

  That `__init__` imports clu's `SummaryWriter`, hence TensorFlow, so `from clu.metric_writers import interface`
  fails where TensorFlow is not installed and costs seconds where it is. The interface module itself imports only
  abc, typing, numpy and jax.numpy. It is registered under its own name, so a later `import clu.metric_writers`
  (where TensorFlow is installed) reuses it and clu's writers and this one share one `MetricWriter` class.
  """
  name = 'clu.metric_writers.interface'
  if name not in sys.modules:
    clu = importlib.util.find_spec('clu')
    if clu is None or not clu.submodule_search_locations:
      raise ImportError('clu is not installed (pip install -r requirements.txt)')
    path = os.path.join(list(clu.submodule_search_locations)[0], 'metric_writers', 'interface.py')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
      spec.loader.exec_module(module)
    except BaseException:
      del sys.modules[name]
      raise
  return sys.modules[name]


interface = _clu_interface()
MetricWriter = interface.MetricWriter

_file_counter = itertools.count()  # TensorFlow numbers the event files of one process the same way


def _metadata(plugin_name: str, data_class: int, content: bytes = b'') -> summary_pb2.SummaryMetadata:
  return summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin_name, content=content),
      data_class=data_class)


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format='PNG')
  return buffer.getvalue()


def images_to_uint8(images: Any) -> np.ndarray:
  """(N, H, W, C) or (H, W, C) uint8 or float images -> (N, H, W, C) uint8, as `tf.summary.image` stores them:
  uint8 unchanged; floats (meant in [0, 1]) as `tf.image.convert_image_dtype(x, tf.uint8, saturate=True)`,
  i.e. clip(x * 255.5, 0, 255) truncated. C must be 1 (grey), 3 (RGB) or 4 (RGBA)."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
    raise ValueError(f'images must be (N, H, W, C) or (H, W, C) with C in 1, 3, 4; got shape {images.shape}')
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'images must be uint8 or float in [0, 1]; got {images.dtype}')
  return np.clip(images.astype(np.float64) * 255.5, 0, 255).astype(np.uint8)


class _ClosedOnExit(MetricWriter):
  """`with writer:` closes it (flushing) on the way out, as `contextlib.closing` would."""

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class TensorBoardWriter(_ClosedOnExit):
  """A clu `MetricWriter` writing TensorBoard event files into `logdir` (see the module docstring).

  Writes go to a buffered file: `flush()` makes them visible to TensorBoard, `close()` flushes and closes (also
  on leaving `with TensorBoardWriter(...)`). Not thread-safe (one writer per training or evaluation loop).
  """

  def __init__(self, logdir: str):
    super().__init__()
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, 'events.out.tfevents.%010d.%s.%d.%d.v2' % (
        time.time(), socket.gethostname(), os.getpid(), next(_file_counter)))
    self._records = RecordWriter(open(self.path, 'wb'))  # pylint: disable=consider-using-with
    self._write_event(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))
    self.flush()  # TensorBoard sees the run as soon as it starts

  def _write_event(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())

  def _write_value(self, step: int, value: summary_pb2.Summary.Value) -> None:
    self._write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(
        value=[value])))

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Raw tensors, each with an optional `SummaryMetadata` (proto or its serialized bytes), as `tf.summary.write`."""
    for key, tensor in values.items():
      md = metadata.get(key) if metadata is not None else None
      if isinstance(md, bytes):
        md = summary_pb2.SummaryMetadata.FromString(md)
      value = summary_pb2.Summary.Value(tag=key, tensor=tensor_util.make_tensor_proto(np.asarray(tensor)))
      if md is not None:
        value.metadata.CopyFrom(md)
      self._write_value(step, value)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Each scalar as a float32 tensor with the scalars plugin's metadata (TensorBoard's Scalars tab)."""
    for key, scalar in scalars.items():
      array = np.asarray(scalar)
      if array.shape != ():
        raise ValueError(f'scalar {key!r} has shape {array.shape}, not ()')
      self._write_value(step, summary_pb2.Summary.Value(
          tag=key, tensor=tensor_util.make_tensor_proto(array.astype(np.float32)),
          metadata=_metadata('scalars', summary_pb2.DATA_CLASS_SCALAR)))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Each (N, H, W, C) or (H, W, C) array as N PNGs under one tag (TensorBoard's Images tab, all N shown)."""
    for key, batch in images.items():
      batch = images_to_uint8(batch)
      strings = [str(batch.shape[2]).encode(), str(batch.shape[1]).encode()] + [_png(im) for im in batch]
      tensor = tensor_util.make_tensor_proto(np.array(strings, dtype=object))
      self._write_value(step, summary_pb2.Summary.Value(
          tag=key, tensor=tensor, metadata=_metadata('images', summary_pb2.DATA_CLASS_BLOB_SEQUENCE)))

  def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
    del step, videos
    logging.log_first_n(logging.WARNING, 'TensorBoardWriter does not write videos (nor does clu\'s SummaryWriter).',
                        1)

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
    raise NotImplementedError('TensorBoardWriter writes no audio: this project has none to write')

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Each text as a string tensor with the text plugin's metadata (markdown rendered by TensorBoard)."""
    for key, text in texts.items():
      value = text_summary.text_pb(key, text).value[0]
      value.metadata.data_class = summary_pb2.DATA_CLASS_TENSOR
      self._write_value(step, value)

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Optional[Mapping[str, int]] = None) -> None:
    """Each array as a (buckets, 3) [left, right, count] tensor (30 buckets unless `num_buckets` says)."""
    for key, array in arrays.items():
      buckets = None if num_buckets is None else num_buckets.get(key)
      value = histogram_summary.histogram_pb(key, np.asarray(array), buckets=buckets).value[0]
      value.metadata.data_class = summary_pb2.DATA_CLASS_TENSOR
      self._write_value(step, value)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The hparams plugin's session start info (TensorBoard's HParams tab); values bool, int, float or str."""
    value = hparams_summary.hparams_pb(traverse_util.flatten_dict(dict(hparams), sep='.')).value[0]
    value.metadata.data_class = summary_pb2.DATA_CLASS_TENSOR
    self._write_value(0, value)

  def flush(self) -> None:
    if not self._records.closed:
      self._records.flush()

  def close(self) -> None:
    if not self._records.closed:
      self._records.close()


class NullWriter(_ClosedOnExit):
  """A `MetricWriter` that writes nothing: the writer of every process but the first in a multi-process run."""

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(logdir: str, *, enabled: bool = True) -> _ClosedOnExit:
  """`TensorBoardWriter(logdir)`, or a `NullWriter` when not `enabled` (processes other than the first); both
  close on leaving a `with` block."""
  return TensorBoardWriter(logdir) if enabled else NullWriter()
