"""Bad data and data settings that do not fit the dataset: one line naming the file or the field, before compiling.

Folder images: a file that is not an image is named at start-up (header scan), a truncated one when it is read
(through a real `create_train_iterator`), and `data.skip_bad_images` replaces either by the next readable file.
Dataset checks (`input_pipeline.check_data`): sizes, channels and split names against a real prepared TFDS cifar10
(`prepare_fake_cifar10`: under `tfds.testing.mock_data` TFDS knows no splits, so there would be nothing to check).
"""

import io
import logging
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import test as test_config
from ddpm_jax import input_pipeline
from ddpm_jax.errors import UserError
from ddpm_jax.data import sources
from tests import fake_datasets

SIDE = 16


def _write_png(path, seed):
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(path)


def _truncated_jpeg(path):
  """A JPEG cut in half: its header is fine (the start-up scan passes it), decoding fails."""
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(99).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, 'JPEG')
  data = buffer.getvalue()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


def _folder_config(path, batch_size, **data):
  config = test_config.get_config()
  config.data.dataset, config.data.path, config.data.image_size = 'folder', str(path), SIDE
  config.data.eval_split = 'train'
  config.training.batch_size = batch_size
  for k, v in data.items():
    config.data[k] = v
  return config


def _assert_one_line_naming(error, *parts):
  message = str(error)
  assert isinstance(error, UserError), type(error)
  assert '\n' not in message, message
  for part in parts:
    assert part in message, message


# ----------------------------------------------------------------------------------------------- bad images


def test_truncated_jpeg_among_pngs_is_named_when_read(tmp_path):
  for i in range(7):
    _write_png(tmp_path / f'{i}.png', i)
  _truncated_jpeg(tmp_path / '3b.jpg')
  config = _folder_config(tmp_path, batch_size=8, num_workers=0)  # one batch holds every file
  input_pipeline.check_data(config, {'data.train_split': 'train'})  # only decoding finds truncation
  iterator = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
  with pytest.raises(UserError) as e:
    next(iterator)
  assert isinstance(e.value, sources.BadImageError)
  _assert_one_line_naming(e.value, str(tmp_path / '3b.jpg'), 'truncated', 'config.data.skip_bad_images')


def test_non_image_named_jpg_is_named_at_start_up(tmp_path):
  for i in range(4):
    _write_png(tmp_path / f'{i}.png', i)
  (tmp_path / 'notes.jpg').write_text('not an image')
  config = _folder_config(tmp_path, batch_size=4)
  with pytest.raises(sources.BadImageError) as e:
    input_pipeline.check_data(config, {'data.train_split': 'train'})
  _assert_one_line_naming(e.value, str(tmp_path / 'notes.jpg'), 'not an image')
  with pytest.raises(sources.BadImageError, match='notes.jpg'):  # also without check_data: no iterator is made
    input_pipeline.create_train_iterator(config, process_index=0, process_count=1)


def test_bad_image_error_keeps_its_type_through_pickling():
  # grain's worker processes (num_workers > 0) send exceptions back pickled.
  error = sources.BadImageError('/data/x.jpg', 'OSError: image file is truncated')
  copy = pickle.loads(pickle.dumps(error))
  assert type(copy) is sources.BadImageError and str(copy) == str(error) and copy.file == '/data/x.jpg'


def test_skip_bad_images_replaces_by_the_next_readable_file_and_counts(tmp_path, caplog):
  # Sorted index order: 0.png 1.png 2.jpg (truncated) 3.png 4.jpg (text): 2 -> 3.png, 4 -> wraps to 0.png.
  for i in (0, 1, 3):
    _write_png(tmp_path / f'{i}.png', i)
  _truncated_jpeg(tmp_path / '2.jpg')
  (tmp_path / '4.jpg').write_text('not an image')
  config = _folder_config(tmp_path, batch_size=5, skip_bad_images=True, random_flip=False)
  before = sources.bad_image_count()
  with caplog.at_level(logging.WARNING):
    input_pipeline.check_data(config, {'data.train_split': 'train'})
    batches = list(input_pipeline.create_eval_iterator(config, 'train', 5, process_index=0, process_count=1))
    train = [next(input_pipeline.create_train_iterator(config, process_index=0, process_count=1)) for _ in range(2)]
  assert sources.bad_image_count() - before == 2
  images = np.round((batches[0]['image'] + 1) * 127.5).astype(np.uint8)  # exact for images from uint8
  expected = [np.asarray(Image.open(tmp_path / f'{i}.png')) for i in (0, 1, 3, 3, 0)]
  np.testing.assert_array_equal(images, np.stack(expected))
  warnings = [r.getMessage() for r in caplog.records if 'unreadable image' in r.getMessage()]
  assert len(warnings) == 2 and any('2.jpg' in w for w in warnings) and any('4.jpg' in w for w in warnings)
  assert all('\n' not in w for w in warnings)
  # Deterministic: two fresh iterators give the same first batch.
  np.testing.assert_array_equal(train[0]['image'], train[1]['image'])


# ------------------------------------------------------------------------------------------- dataset checks


@pytest.fixture(scope='module')
def cifar10_dir(tmp_path_factory):
  """A real prepared TFDS cifar10 (16 train, 8 test images): its split metadata is what the checks read."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  fake_datasets.prepare_fake_cifar10(data_dir, num_train=16, num_test=8)
  return data_dir


def _cifar10_config(data_dir, **data):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  for k, v in data.items():
    config.data[k] = v
  return config


def _training_splits(config):
  return {'data.train_split': config.data.train_split, 'data.eval_split': config.data.eval_split}


@pytest.mark.parametrize('data, field', [
    ({'pad_to': 36}, 'config.data.pad_to=36'),
    ({'num_channels': 1}, 'config.data.num_channels=1'),
    ({'train_split': 'validation'}, "config.data.train_split='validation' is not a split of cifar10: available "
                                    "['test', 'train']"),
    ({'eval_split': 'bogus'}, "config.data.eval_split='bogus' is not a split of cifar10: available ['test', 'train']"),
    ({'eval_split': 'test+bogus[:5]'}, "config.data.eval_split='test+bogus[:5]' is not a split of cifar10"),
    ({'train_split': 'train[:1000]'}, "config.data.train_split='train[:1000]' is not a valid TFDS split of cifar10"),
])
def test_check_data_names_the_field(cifar10_dir, data, field):
  config = _cifar10_config(cifar10_dir, **data)
  with pytest.raises(UserError) as e:
    input_pipeline.check_data(config, _training_splits(config))
  _assert_one_line_naming(e.value, field)


def test_check_data_accepts_tfds_split_syntax_and_returns_the_info(cifar10_dir):
  config = _cifar10_config(cifar10_dir, train_split='train[:10]', eval_split='train[:50%]+test')
  info = input_pipeline.check_data(config, _training_splits(config))
  assert info.image_shape == (32, 32, 3) and info.num_classes == 10
  assert info.num_examples(config.data.train_split) == 10


def test_train_iterator_names_the_train_split_field(cifar10_dir):
  with pytest.raises(UserError, match=r"config.data.train_split='validation' is not a split of cifar10"):
    input_pipeline.create_train_iterator(_cifar10_config(cifar10_dir, train_split='validation'), process_index=0,
                                         process_count=1)


def test_check_data_under_mock_data_checks_what_it_can():
  # mock_data mocks the reader, not the split metadata: splits cannot be checked, the sizes still are.
  with tfds.testing.mock_data(num_examples=4):
    config = test_config.get_config()
    assert input_pipeline.check_data(config, _training_splits(config)).image_shape == (32, 32, 3)
    config.data.num_channels = 1
    with pytest.raises(UserError, match='config.data.num_channels=1'):
      input_pipeline.check_data(config, _training_splits(config))


def test_fixed_split_lists_of_mnist5k_and_folder(tmp_path):
  config = test_config.get_config()
  config.data.dataset, config.data.num_channels, config.data.pad_to = 'mnist5k', 1, 32
  with pytest.raises(UserError) as e:
    input_pipeline.check_data(config, {'data.eval_split': 'validation'})
  _assert_one_line_naming(e.value, "config.data.eval_split='validation' is not a split of mnist5k: available "
                          "['all', 'test', 'train']")
  _write_png(tmp_path / 'a.png', 0)
  with pytest.raises(UserError) as e:
    input_pipeline.check_data(_folder_config(tmp_path, batch_size=1), {'config.data.eval_split': 'test'})
  _assert_one_line_naming(e.value, "config.data.eval_split='test' is not a split of folder", "use 'train'")
  # Plain split names (no field known) still work.
  with pytest.raises(UserError, match=r"split 'test' is not a split of folder"):
    input_pipeline.check_data(_folder_config(tmp_path, batch_size=1), ['test'])


def test_check_data_includes_the_label_checks(tmp_path):
  _write_png(tmp_path / 'a.png', 0)
  config = _folder_config(tmp_path, batch_size=1)
  config.model.num_classes = 3
  with pytest.raises(UserError, match=r"config.model.num_classes=3 .*'folder' has no labels"):
    input_pipeline.check_data(config)


def test_runner_stops_on_a_bad_split_before_building_a_model(cifar10_dir, tmp_path, monkeypatch):
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  from ddpm_jax import run  # pylint: disable=g-import-not-at-top

  def no_model(*args, **kwargs):
    raise AssertionError('a model was built before the data checks')

  monkeypatch.setattr(models, 'create_model', no_model)
  config = _cifar10_config(cifar10_dir, eval_split='bogus')
  with pytest.raises(UserError, match=r"config.data.eval_split='bogus' is not a split of cifar10"):
    run.run('train', config, str(tmp_path / 'workdir'))
