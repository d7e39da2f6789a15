"""The TensorBoard writer without TensorFlow: what it writes is read back by TensorBoard's own event reader with the
values written, and neither a training nor an evaluation process imports TensorFlow."""

import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

from ddpm_jax import tensorboard_writer
from tests import fake_datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _accumulator(logdir):
  """The event accumulator TensorBoard's server reads runs with (tensors of every plugin kept)."""
  acc = plugin_event_accumulator.EventAccumulator(logdir, size_guidance={plugin_event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def _decode_png(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)))


def test_scalars_images_and_hparams_read_back_equal(tmp_path):
  grid = np.arange(2 * 6 * 5 * 3, dtype=np.uint8).reshape(2, 6, 5, 3)
  grey = np.array([[0.0, 0.5], [1.0, 2.0], [-1.0, 0.25]], np.float32)[..., None]  # (H=3, W=2, 1), out of range too
  with tensorboard_writer.TensorBoardWriter(str(tmp_path)) as writer:
    writer.write_hparams({'num_params': 1112801, 'model': {'ch': 32, 'name': 'unet'}, 'ema': True, 'lr': 2e-4})
    writer.write_scalars(10, {'loss': 0.125, 'lr': np.float64(1e-4), 'steps_per_sec': 5})
    writer.write_scalars(20, {'loss': np.float32(0.0625)})
    writer.write_images(20, {'samples': grid, 'grey': grey})
    writer.write_texts(20, {'note': 'hello *markdown*'})
    writer.write_histograms(20, {'weights': np.arange(10.0)}, {'weights': 5})
  assert len(glob.glob(str(tmp_path / 'events.out.tfevents.*.v2'))) == 1

  acc = _accumulator(str(tmp_path))
  tags = acc.Tags()['tensors']
  assert sorted(tags) == sorted(['_hparams_/session_start_info', 'loss', 'lr', 'steps_per_sec', 'samples', 'grey',
                                 'note', 'weights'])
  assert acc.PluginTagToContent('scalars').keys() == {'loss', 'lr', 'steps_per_sec'}
  assert acc.PluginTagToContent('images').keys() == {'samples', 'grey'}

  loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors('loss')]
  assert loss == [(10, 0.125), (20, 0.0625)]
  lr = tensor_util.make_ndarray(acc.Tensors('lr')[0].tensor_proto)
  assert lr.dtype == np.float32 and lr == np.float32(1e-4)  # float32, as tf.summary.scalar stores it
  assert float(tensor_util.make_ndarray(acc.Tensors('steps_per_sec')[0].tensor_proto)) == 5.0

  samples = tensor_util.make_ndarray(acc.Tensors('samples')[0].tensor_proto)
  assert acc.Tensors('samples')[0].step == 20
  assert list(samples[:2]) == [b'5', b'6']  # width, height, then one PNG per image
  assert len(samples) == 4
  for i in range(2):
    np.testing.assert_array_equal(_decode_png(samples[2 + i]), grid[i])
  grey_png = tensor_util.make_ndarray(acc.Tensors('grey')[0].tensor_proto)
  # tf.image.convert_image_dtype(saturate=True): clip(x * 255.5, 0, 255) truncated.
  np.testing.assert_array_equal(_decode_png(grey_png[2]), [[0, 127], [255, 255], [0, 63]])

  assert tensor_util.make_ndarray(acc.Tensors('note')[0].tensor_proto) == b'hello *markdown*'
  buckets = tensor_util.make_ndarray(acc.Tensors('weights')[0].tensor_proto)
  assert buckets.shape == (5, 3) and buckets[:, 2].sum() == 10 and buckets[0, 0] == 0 and buckets[-1, 1] == 9

  content = acc.PluginTagToContent('hparams')['_hparams_/session_start_info']
  start = hparams_metadata.parse_session_start_info_plugin_data(content)
  assert start.hparams['num_params'].number_value == 1112801
  assert start.hparams['model.ch'].number_value == 32  # nested dicts flattened with '.', as clu does
  assert start.hparams['model.name'].string_value == 'unet'
  assert start.hparams['ema'].bool_value is True
  assert start.hparams['lr'].number_value == 2e-4


def test_flush_makes_values_visible_before_close(tmp_path):
  writer = tensorboard_writer.TensorBoardWriter(str(tmp_path))
  writer.write_scalars(1, {'loss': 1.5})
  writer.flush()
  assert [float(tensor_util.make_ndarray(e.tensor_proto)) for e in _accumulator(str(tmp_path)).Tensors('loss')] == [1.5]
  writer.close()
  writer.close()  # closing twice is harmless (a `with` block after an explicit close)


def test_is_a_clu_metric_writer_and_bad_images_are_named(tmp_path):
  # clu's own interface module (`from clu.metric_writers import interface` would run clu's package __init__, which
  # imports TensorFlow), registered under its name so clu's writers and ours share the class.
  interface = sys.modules['clu.metric_writers.interface']
  assert interface is tensorboard_writer.interface
  assert interface.__file__.endswith(os.path.join('clu', 'metric_writers', 'interface.py'))
  assert issubclass(tensorboard_writer.TensorBoardWriter, interface.MetricWriter)
  assert isinstance(tensorboard_writer.create_writer(str(tmp_path / 'other'), enabled=False),
                    interface.MetricWriter)
  assert not (tmp_path / 'other').exists()  # the writer of a non-chief process writes nothing
  with tensorboard_writer.TensorBoardWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match=r'\(N, H, W, C\).*got shape \(4, 5\)'):
      writer.write_images(0, {'bad': np.zeros((4, 5), np.uint8)})
    with pytest.raises(ValueError, match=r"scalar 'v' has shape \(2,\)"):
      writer.write_scalars(0, {'v': np.zeros(2)})


# A process that records, when it exits, which TensorFlow modules it imported, then runs main.py with the argv given.
_TF_AT_EXIT = r"""
import atexit, json, os, sys
out = sys.argv.pop(1)
sys.argv[0] = 'main.py'
def _record():
  with open(out, 'w') as f:
    json.dump(sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.')), f)
atexit.register(_record)
sys.path.insert(0, os.getcwd())
import main
main.entry()
"""


def _run_main_recording_tensorflow(tmp_path, name, *args):
  record = str(tmp_path / f'{name}_tf_modules.json')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  proc = subprocess.run([sys.executable, '-c', _TF_AT_EXIT, record, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(record) as f:
    return json.load(f)


@pytest.mark.slow  # two main.py processes, each compiling its model: ~80 s on a 2-core CPU
def test_training_and_evaluation_never_import_tensorflow(tmp_path):
  # A prepared TFDS cifar10 (ArrayRecord files, the real read path); TensorFlow is installed in the test env, so
  # anything on the way that imports it would show in the subprocess's sys.modules.
  data_dir = str(tmp_path / 'tfds')
  fake_datasets.prepare_fake_cifar10(data_dir, num_train=16, num_test=8)
  common = ['--config=configs/test.py', f'--workdir={tmp_path / "run"}', f'--config.data.data_dir={data_dir}']
  train_tf = _run_main_recording_tensorflow(tmp_path, 'train', *common, '--config.training.num_steps=2')
  assert train_tf == []
  assert glob.glob(str(tmp_path / 'run' / 'events.out.tfevents.*'))
  eval_tf = _run_main_recording_tensorflow(tmp_path, 'eval', *common, '--mode=eval', '--config.eval.fid=False',
                                           '--config.eval.bpd_num_examples=8')
  assert eval_tf == []
  losses = [e.step for e in _accumulator(str(tmp_path / 'run')).Tensors('loss')]
  assert losses == [2]
  assert 'eval/bpd' in _accumulator(str(tmp_path / 'run')).Tags()['tensors']
