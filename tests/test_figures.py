"""Forward / reverse process strips (ddpm_jax.figures): layout, content, and `python -m ddpm_jax.figures`."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import test as test_config
from ddpm_jax import checkpointing
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import figures
from ddpm_jax import images as images_lib
from ddpm_jax import input_pipeline
from ddpm_jax import samplers
from tests.test_evaluate import random_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_EXAMPLES = 8
TILE = 34  # 32 px + 2 px padding of make_grid


@pytest.fixture(autouse=True)
def mock_data():
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    yield


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  config = test_config.get_config()
  path = str(tmp_path_factory.mktemp('figures'))
  checkpointing.save_inference_checkpoint(path, 4, random_params(config, 0), random_params(config, 1))
  return path


def tiles(path, ncol):
  with Image.open(path) as image:
    grid = np.asarray(image)
  nrow = (grid.shape[0] - 2) // TILE
  assert grid.shape == (nrow * TILE + 2, ncol * TILE + 2, 3)
  return np.stack([[grid[2 + r * TILE:r * TILE + TILE, 2 + c * TILE:c * TILE + TILE] for c in range(ncol)]
                   for r in range(nrow)]).astype(np.float64)  # (rows, cols, 32, 32, 3)


def test_scaled_timesteps():
  assert figures.scaled_timesteps(1000) == [0, 100, 250, 500, 750, 999]
  assert figures.scaled_timesteps(20) == [0, 2, 5, 10, 14, 19]
  assert figures.scaled_timesteps(2) == [0, 1]


def test_forward_and_reverse_strips(workdir):
  config = test_config.get_config()
  paths = figures.make_figures(config, workdir, num_images=4, num_progress=5)
  assert os.path.dirname(paths['forward']) == os.path.join(workdir, 'figures')
  with open(paths['info']) as f:
    info = json.load(f)
  assert info['checkpoint_step'] == 4 and info['params'] == 'EMA'

  # Forward: row i = q(x_t | x0_i) (eq. 4) for t = 0, 2, 5, 10, 14, 19 (T = 20).
  ts = info['forward_columns_t']
  assert ts == [0, 2, 5, 10, 14, 19]
  forward = tiles(paths['forward'], len(ts))
  assert forward.shape[0] == 4
  real = next(iter(input_pipeline.create_eval_iterator(config, 'test', 4)))['image']
  x0 = images_lib.to_uint8(real).astype(np.float64)
  deviation = [np.abs(forward[:, c] - x0).mean() for c in range(len(ts))]
  assert deviation[0] < 3.0  # t = 0: sqrt(1 - alpha_bar_0) = 0.01, about one grey level of noise
  assert all(a < b for a, b in zip(deviation, deviation[1:]))  # more noise at every later t

  # Reverse: x0_hat at 5 evenly spaced steps from t = T-1 to t = 0, then the sample (Fig. 6).
  diffusion = diffusion_lib.from_config(config.diffusion)
  expected_ts = [int(t) for t in samplers.progress_timesteps(diffusion, '', 5)]
  assert expected_ts[0] == 19 and expected_ts[-1] == 0 and expected_ts == sorted(expected_ts, reverse=True)
  assert info['reverse_columns_t'] == expected_ts + ['sample'] and info['reverse_rows'] == 4
  reverse = tiles(paths['reverse'], 6)
  assert reverse.shape[0] == 4
  change = [np.abs(reverse[:, c] - reverse[:, -1]).mean() for c in range(5)]
  assert change[-1] < change[0]  # the prediction converges to the sample as t decreases
  assert len(np.unique(reverse[:, -1].reshape(4, -1), axis=0)) == 4


def test_command_line(workdir, tmp_path):
  """`python -m ddpm_jax.figures --config=... --workdir=... --out=...` (run under TFDS mock data)."""
  out = str(tmp_path / 'out')
  code = ('import runpy, sys, tensorflow_datasets as tfds\n'
          f'sys.argv = ["figures", "--config=configs/test.py", "--workdir={workdir}", "--out={out}", '
          '"--num_images=2", "--num_progress=3", "--config.sample.respacing=10"]\n'
          f'with tfds.testing.mock_data(num_examples={MOCK_EXAMPLES}):\n'
          '  runpy.run_module("ddpm_jax.figures", run_name="__main__")\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  paths = json.loads(proc.stdout.strip().splitlines()[-1])
  assert sorted(os.listdir(out)) == ['figures.json', 'forward_process.png', 'reverse_process.png']
  assert paths['reverse'] == os.path.join(out, 'reverse_process.png')
  with open(paths['info']) as f:
    info = json.load(f)
  # Respaced to 10 of the 20 steps; the recorded x0_hat carry the original timestep indices.
  assert info['reverse_columns_t'][0] == 19 and info['reverse_columns_t'][-2] == 0
  assert len(info['reverse_columns_t']) == 4 and info['sampler']['respacing'] == '10'
  tiles(paths['reverse'], 4)
  assert tiles(paths['forward'], 6).shape[0] == 2
