"""`--mode=sample` (ddpm_jax.sample.sample_and_export): deterministic in the seed, uint8 NHWC samples of the
requested count (also when it is not a multiple of the batch), and the grid that goes with them."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from configs import test as test_config
from ddpm_jax import checkpointing
from ddpm_jax import errors
from ddpm_jax import models
from ddpm_jax import run
from ddpm_jax import sample
from ddpm_jax import workdir_config
from tests.helpers import assert_one_line_error
from tests.helpers import random_params
from tests.helpers import save_random_checkpoint

STEP = 3


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return save_random_checkpoint(tmp_path_factory.mktemp('sampling'), test_config.get_config(), STEP)


def make_config(num_samples, batch_size=8, seed=0):
  config = test_config.get_config()
  config.sample.num_samples = num_samples
  config.sample.batch_size = batch_size
  config.seed = seed
  return config


def export(config, workdir):
  out_dir = sample.sample_and_export(config, workdir)
  assert out_dir == os.path.join(workdir, 'samples', f'step_{STEP}')
  with np.load(os.path.join(out_dir, 'samples.npz')) as z:
    assert 'labels' not in z.files  # unconditional model
    images = z['images']
  with Image.open(os.path.join(out_dir, 'grid.png')) as grid:
    return images, np.asarray(grid)


def test_samples_are_deterministic_in_the_seed(workdir):
  first, grid = export(make_config(12), workdir)
  # 12 samples in batches of 8: the second batch is trimmed to 4.
  assert first.dtype == np.uint8 and first.shape == (12, 32, 32, 3)
  # make_grid: ceil(sqrt(12)) = 4 columns, 3 rows of 32 px with 2 px padding.
  assert grid.shape == (3 * 34 + 2, 4 * 34 + 2, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[2:34, 2:34], first[0])
  again, _ = export(make_config(12), workdir)
  np.testing.assert_array_equal(first, again)
  other, _ = export(make_config(12, seed=1), workdir)
  assert other.shape == first.shape and np.mean(other != first) > 0.5
  # Sample i does not depend on the number of samples requested: batch i of 8 always has key fold_in(stream, i).
  fewer, _ = export(make_config(5), workdir)
  assert fewer.shape == (5, 32, 32, 3)
  np.testing.assert_array_equal(fewer, first[:5])
  assert len(np.unique(first.reshape(12, -1), axis=0)) == 12  # no two samples alike


def test_samples_use_the_ema_params(workdir):
  images, _ = export(make_config(8), workdir)
  raw_dir = os.path.join(workdir, 'raw')
  config = test_config.get_config()
  # The same checkpoint with the EMA params swapped for the raw ones gives other samples.
  model = models.create_model(config)
  checkpointing.save_inference_checkpoint(raw_dir, STEP, random_params(model, 1), random_params(model, 0))
  swapped = sample.sample_and_export(make_config(8), raw_dir)
  with np.load(os.path.join(swapped, 'samples.npz')) as z:
    assert np.mean(z['images'] != images) > 0.5


def test_a_workdir_samples_with_the_config_it_records(workdir, tmp_path):
  # The recording (as training or convert writes it) is all `--mode=sample --workdir=W` needs.
  recorded_dir = save_random_checkpoint(tmp_path / 'recorded', test_config.get_config(), STEP)
  workdir_config.write(make_config(5), recorded_dir)
  # A recording from before a field existed (here optim.lr_decay) reads with the field's default.
  with open(workdir_config.path(recorded_dir)) as f:
    recording = json.load(f)
  del recording['optim']['lr_decay']
  with open(workdir_config.path(recorded_dir), 'w') as f:
    json.dump(recording, f)
  assert workdir_config.read(recorded_dir).optim.lr_decay == 'none'
  run.run('sample', None, recorded_dir)
  with np.load(os.path.join(recorded_dir, 'samples', f'step_{STEP}', 'samples.npz')) as z:
    from_recording = z['images']
  explicit, _ = export(make_config(5), workdir)  # same params, config given explicitly
  np.testing.assert_array_equal(from_recording, explicit)

  # A config given alongside may change how samples are drawn, not what was trained.
  given = make_config(3, seed=1)
  given.model.dtype = 'bfloat16'
  assert workdir_config.for_inference(recorded_dir, given) is given
  # The fixed reverse variance is the sampler's choice (sigma^2 = beta or beta~); a learned one is the model's.
  given.diffusion.var_type = 'fixedsmall' if given.diffusion.var_type == 'fixedlarge' else 'fixedlarge'
  assert workdir_config.for_inference(recorded_dir, given) is given
  given.diffusion.var_type = 'learned_range'
  assert_one_line_error(lambda: run.run('sample', given, recorded_dir), 'config.diffusion.var_type=',
                        error=errors.ConfigError)
  given.diffusion.var_type = make_config(3).diffusion.var_type
  given.diffusion.num_timesteps = 10
  given.model.ch_mult = (1, 2, 2)
  assert_one_line_error(lambda: run.run('sample', given, recorded_dir), 'config.diffusion.num_timesteps=10',
                        'differs from 20', 'config.json', '1 more: model.ch_mult', error=errors.ConfigError)


def test_a_workdir_without_a_recording_needs_a_config(tmp_path):
  assert_one_line_error(lambda: run.run('eval', None, str(tmp_path)), 'config.json does not exist',
                        'pass the run\'s config with --config', error=errors.UserError)
