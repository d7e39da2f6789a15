"""The figures (ddpm_jax.figures, figure_data): the numbers behind each figure, and `python -m ddpm_jax.figures`.

Numbers, not pixels: schedule curves against `get_betas`, noising strips against eq. 4, the progressive x0_hat at
t = 0 against the sample, every shared-latent completion starting from the same x_t, the interpolation's lambda = 0
and 1 against plain reconstructions, the partial reverse chain against the samplers, rate-distortion against the
eval json and losses by quartile against what was written to the event files. A tiny U-Net with random weights and
T = 20 (configs/test.py) keeps the compiles small.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import test as test_config
from ddpm_jax import bits_per_dim
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import figure_data
from ddpm_jax import figures
from ddpm_jax import images as images_lib
from ddpm_jax import input_pipeline
from ddpm_jax import models
from ddpm_jax import samplers
from ddpm_jax import schedules
from ddpm_jax import tensorboard_writer
from ddpm_jax import workdir_config
from ddpm_jax.errors import UserError
from tests.helpers import random_params
from tests.helpers import save_random_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_EXAMPLES = 8
TILE = 34  # 32 px + 2 px padding of make_grid
STEP = 4
# Losses by quartile as a training run would log them: {step: (loss_q0, ..., loss_q3)}.
LOGGED_LOSSES = {100: (0.5, 0.25, 0.125, 0.0625), 200: (0.4, 0.2, 0.1, 0.05), 300: (0.3, 0.15, 0.075, 0.0375)}


@pytest.fixture(autouse=True)
def mock_data():
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    yield


def eval_results(num_timesteps=20):
  """An eval json's contents as `bits_per_dim.bpd_results` writes them, from made-up accumulated sums."""
  rng = np.random.default_rng(0)
  state = {'count': np.asarray(10.0), 'total_bpd': np.asarray(35.0), 'total_bpd_sq': np.asarray(125.0),
           'vb': rng.uniform(0.01, 0.5, num_timesteps) * 10, 'prior_bpd': np.asarray(1e-4),
           'xstart_mse': np.linspace(1e-3, 0.9, num_timesteps) * 10, 'eps_mse': np.ones(num_timesteps)}
  return {'step': STEP, **bits_per_dim.bpd_results(state, 'test')}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A run directory: checkpoint, eval json and training event files with loss_q0..loss_q3."""
  config = test_config.get_config()
  path = save_random_checkpoint(tmp_path_factory.mktemp('figures'), config, STEP)
  workdir_config.write(config, path)
  os.makedirs(os.path.join(path, 'eval'))
  with open(os.path.join(path, 'eval', f'step_{STEP}.json'), 'w') as f:
    json.dump(eval_results(), f)
  writer = tensorboard_writer.create_writer(path)  # the writer training uses
  for step, losses in LOGGED_LOSSES.items():
    writer.write_scalars(step, {'loss': float(np.mean(losses)), **{f'loss_q{q}': v for q, v in enumerate(losses)}})
  writer.close()
  return path


@pytest.fixture(scope='module')
def net():
  config = test_config.get_config()
  return figure_data.network(config, random_params(models.create_model(config), 1))


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


def test_paper_t_to_index():
  assert [figure_data.paper_t_to_index(t, 1000) for t in (1, 250, 500, 1000)] == [0, 249, 499, 999]
  assert [figure_data.paper_t_to_index(t, 20) for t in (1, 250, 500, 1000)] == [0, 4, 9, 19]


def test_figure_names():
  assert figures.parse_figure_names('all') == list(figures.FIGURES)
  assert figures.parse_figure_names('loss_by_t,schedules') == ['schedules', 'loss_by_t']
  with pytest.raises(UserError, match=r'--figure=schedule is invalid \(unknown: schedule\); allowed values'):
    figures.parse_figure_names('schedule')


def test_config_is_the_one_the_workdir_records(workdir, tmp_path):
  recorded = figures.load_config(None, workdir, ['progressive'])
  assert recorded.model.ch == 32 and recorded.diffusion.num_timesteps == 20 and recorded.model.ch_mult == (1, 2)
  given = test_config.get_config()
  given.model.ch = 64
  with pytest.raises(UserError, match=r'config.model.ch=64 differs from 32 in .*config.json'):
    figures.load_config(given, workdir, ['progressive'])
  # A directory that records no run draws the schedules with the quickstart's data (offline MNIST digits).
  assert figures.load_config(None, str(tmp_path), ['schedules']).data.dataset == 'mnist5k'
  with pytest.raises(UserError, match=r'config.json does not exist'):
    figures.load_config(None, str(tmp_path), ['schedules', 'forward'])


def test_schedule_curves_equal_get_betas():
  curves = figure_data.schedule_curves(1000)
  assert list(curves) == list(schedules.SCHEDULES)
  for name, curve in curves.items():
    betas = schedules.get_betas(name, 1000)
    np.testing.assert_array_equal(curve['betas'], betas)
    alpha_bar = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(curve['alphas_cumprod'], alpha_bar, rtol=1e-12)
    np.testing.assert_allclose(curve['log_snr'], np.log(alpha_bar / (1.0 - alpha_bar)), rtol=1e-6, atol=1e-9)
  # Known values: linear alpha_bar_1 = 1 - 1e-4; cosine reaches alpha_bar_T ~ 0 (its last beta is clipped at 0.999).
  assert curves['linear']['alphas_cumprod'][0] == pytest.approx(1 - 1e-4, rel=1e-12)
  assert curves['linear']['log_snr'][0] == pytest.approx(np.log((1 - 1e-4) / 1e-4), rel=1e-9)
  assert curves['cosine']['betas'][-1] == pytest.approx(0.999)


def test_noising_strips_follow_eq_4():
  x0 = np.random.default_rng(1).uniform(-1, 1, (8, 8, 1)).astype(np.float32)
  noise = np.random.default_rng(2).standard_normal((8, 8, 1)).astype(np.float32)
  ts = [0, 499, 999]
  strips = figure_data.noising_strips(jnp.asarray(x0), jnp.asarray(noise), ts, ('linear', 'cosine'), 1000)
  assert strips.shape == (2, 3, 8, 8, 1)
  for row, name in enumerate(('linear', 'cosine')):
    alpha_bar = np.cumprod(1.0 - schedules.get_betas(name, 1000))
    for col, t in enumerate(ts):
      expected = np.sqrt(alpha_bar[t]) * x0 + np.sqrt(1.0 - alpha_bar[t]) * noise
      np.testing.assert_allclose(strips[row, col], expected, atol=1e-5)
  # At t = 500 the cosine schedule keeps more of the image than the linear one (alpha_bar 0.49 vs 0.08).
  assert np.abs(strips[1, 1] - x0).mean() < np.abs(strips[0, 1] - x0).mean()


def test_progressive_last_x0_hat_is_the_sample(net):
  config = test_config.get_config()
  final, progress, ts = figure_data.reverse_chain(config, net, (3, 32, 32, 3), 5, jax.random.key(0))
  assert ts[0] == 19 and ts[-1] == 0 and progress.shape == (5, 3, 32, 32, 3)
  np.testing.assert_allclose(progress[-1], final, atol=1e-6)
  assert np.abs(progress[0] - final).mean() > 10 * np.abs(progress[-1] - final).mean()


def test_partial_chain_equals_the_sampler_on_the_first_steps(net):
  """complete_from started at step s is the sampler run on the process of the first s + 1 steps (DDIM, eta = 0:
  deterministic, so the two are comparable without matching noise draws)."""
  config = test_config.get_config()
  config.sample.method = 'ddim'
  process = figure_data.sampler_process(config)
  x_start = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  ours = figure_data.complete_from(config, net, process, x_start, np.array([9, 9]), np.array([0, 1]),
                                   jax.random.key(4))
  prefix = diffusion_lib.make_diffusion(np.asarray(process.betas64[:10]))
  model_fn = net.make_model_fn(net.params, None)
  theirs = jax.jit(lambda x: samplers.sample(prefix, model_fn, x.shape, jax.random.key(5), method='ddim',
                                             x_T=x))(x_start)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_shared_latent_completions_start_from_one_x_t(net):
  config = test_config.get_config()
  x0 = jnp.asarray(next(iter(input_pipeline.create_eval_iterator(config, 'test', 1)))['image'][0])
  encode_key, reverse_key = jax.random.key(6), jax.random.key(7)
  out = figure_data.shared_latent(config, net, x0, (1000, 500, 250), 3, encode_key, reverse_key)
  assert out['t_index'] == [19, 9, 4]
  # Every completion of a row starts from the row's x_t, which is q(x_t | x0) (eq. 4) of the real image.
  noise = jax.random.normal(encode_key, (3,) + x0.shape)
  diffusion = diffusion_lib.from_config(config.diffusion)
  x_t = diffusion_lib.q_sample(diffusion, jnp.broadcast_to(x0, noise.shape), jnp.asarray([19, 9, 4]), noise)
  for row in range(3):
    for k in range(3):
      np.testing.assert_array_equal(out['starts'][row, k], out['x_t'][row])
    np.testing.assert_allclose(out['x_t'][row], x_t[row], atol=1e-6)
  # The completions of one x_t are different samples (independent noise), closer to x0 from a smaller t.
  completions = out['completions']
  assert np.abs(completions[:, 0] - completions[:, 1]).mean(axis=(1, 2, 3)).min() > 1e-3
  distance = np.abs(completions - np.asarray(x0)).mean(axis=(1, 2, 3, 4))
  assert distance[2] < distance[0]


def test_interpolation_endpoints_are_the_reconstructions(net):
  config = test_config.get_config()
  x0 = jnp.asarray(next(iter(input_pipeline.create_eval_iterator(config, 'test', 4)))['image'])
  x0_a, x0_b = x0[:2], x0[2:]
  noise_a = jax.random.normal(jax.random.key(8), x0_a.shape)
  noise_b = jax.random.normal(jax.random.key(9), x0_b.shape)
  key = jax.random.key(10)
  out = figure_data.interpolate(config, net, x0_a, x0_b, 500, (0.0, 0.5, 1.0), noise_a, noise_b, key)
  assert out['t_index'] == 9 and out['decoded'].shape == (2, 3, 32, 32, 3)
  rec_a = figure_data.reconstruct(config, net, x0_a, 500, noise_a, np.arange(2), key)
  rec_b = figure_data.reconstruct(config, net, x0_b, 500, noise_b, np.arange(2), key)
  np.testing.assert_allclose(out['decoded'][:, 0], rec_a, atol=1e-5)
  np.testing.assert_allclose(out['decoded'][:, 2], rec_b, atol=1e-5)
  assert np.abs(out['decoded'][:, 1] - rec_a).mean() > 1e-3 and np.abs(out['decoded'][:, 1] - rec_b).mean() > 1e-3


def test_rate_distortion_values_equal_the_eval_json(workdir):
  results = eval_results()
  table = figure_data.rate_distortion_table(figure_data.eval_json_path(workdir))
  assert table['step'] == STEP and table['num_timesteps'] == 20
  for key in ('t', 'rate_bpd', 'distortion_bpd', 'rmse'):
    assert table[key] == [pair[key] for pair in results['rate_distortion']]
  assert table['t'][0] == 1 and table['t'][-1] == 20


def test_rate_distortion_needs_bits_per_dim(tmp_path):
  with pytest.raises(UserError, match=r'no evaluation results in .*eval .*--mode=eval'):
    figure_data.eval_json_path(str(tmp_path))
  os.makedirs(tmp_path / 'eval')
  with open(tmp_path / 'eval' / 'step_7.json', 'w') as f:
    json.dump({'step': 7, 'fid@16': 300.0}, f)
  with pytest.raises(UserError, match=r'step_7.json has no rate_distortion entries.*eval.bpd=True'):
    figure_data.rate_distortion_table(figure_data.eval_json_path(str(tmp_path)))


def test_loss_by_t_values_equal_what_was_written(workdir, tmp_path):
  data = figure_data.loss_by_quartile(workdir)
  assert data['steps'] == sorted(LOGGED_LOSSES)
  for q in range(4):
    np.testing.assert_allclose(data[f'loss_q{q}'], [LOGGED_LOSSES[s][q] for s in data['steps']], rtol=1e-6)
  with pytest.raises(UserError, match=r'holds no training metrics loss_q0..loss_q3'):
    figure_data.loss_by_quartile(str(tmp_path))


def test_forward_and_reverse_strips(workdir, tmp_path):
  config = test_config.get_config()
  paths = figures.make_figures(config, workdir, str(tmp_path), num_images=4, num_progress=5)
  with open(paths['info']) as f:
    info = json.load(f)
  assert info['reverse']['checkpoint_step'] == STEP and info['reverse']['params'] == 'EMA'

  # Forward: row i = q(x_t | x0_i) (eq. 4) for t = 0, 2, 5, 10, 14, 19 (T = 20).
  ts = info['forward']['columns_t']
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
  assert info['reverse']['columns_t'] == expected_ts + ['sample'] and info['reverse']['rows'] == 4
  reverse = tiles(paths['reverse'], 6)
  assert reverse.shape[0] == 4
  change = [np.abs(reverse[:, c] - reverse[:, -1]).mean() for c in range(5)]
  assert change[-1] < change[0]  # the prediction converges to the sample as t decreases
  assert len(np.unique(reverse[:, -1].reshape(4, -1), axis=0)) == 4


def _run_figures(args, timeout=600):
  """`python -m ddpm_jax.figures ARGS` under TFDS mock data."""
  code = ('import runpy, sys, tensorflow_datasets as tfds\n'
          f'sys.argv = ["figures"] + {list(args)!r}\n'
          f'with tfds.testing.mock_data(num_examples={MOCK_EXAMPLES}):\n'
          '  runpy.run_module("ddpm_jax.figures", run_name="__main__")\n')
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_command_line_draws_every_figure(workdir, tmp_path):
  out = str(tmp_path / 'out')
  proc = _run_figures(['--config=configs/test.py', f'--workdir={workdir}', f'--out={out}', '--figure=all',
                       '--num_images=2', '--num_progress=3', '--num_completions=2', '--num_pairs=1',
                       '--config.sample.respacing=10'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  pngs = ['forward_process.png', 'interpolation.png', 'loss_by_t.png', 'progressive.png', 'rate_distortion.png',
          'reverse_process.png', 'schedules.png', 'shared_latent.png']
  assert sorted(os.listdir(out)) == sorted(pngs + ['figures.json'])
  with open(os.path.join(out, 'figures.json')) as f:
    info = json.load(f)
  assert sorted(info) == sorted(figures.FIGURES)
  # Respaced to 10 of the 20 steps: recorded x0_hat carry original indices; the interpolation starts at a kept step.
  assert info['reverse']['columns_t'][0] == 19 and info['reverse']['columns_t'][-2] == 0
  assert info['reverse']['respacing'] == '10' and info['interpolation']['t_paper'] == 9
  assert info['rate_distortion']['rmse'] == [p['rmse'] for p in eval_results()['rate_distortion']]
  # One caption line per figure saying where its file went.
  for name, png in zip(sorted(figures.FIGURES), ['forward_process.png', 'interpolation.png', 'loss_by_t.png',
                                                 'progressive.png', 'rate_distortion.png', 'reverse_process.png',
                                                 'schedules.png', 'shared_latent.png']):
    assert sum(f'{name}: ' in line and line.rstrip().endswith(')') and os.path.join(out, png) in line
               for line in proc.stderr.splitlines()) == 1, (name, proc.stderr[-3000:])
  tiles(os.path.join(out, 'reverse_process.png'), 4)


@pytest.mark.parametrize('args, message', [
    (['--figure=progresive'], r'--figure=progresive is invalid \(unknown: progresive\)'),
    (['--figure=shared_latent'], r'--figure shared_latent needs a checkpoint and .* has none'),
    (['--figure=rate_distortion'], r'no evaluation results in .*eval'),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
  proc = _run_figures(['--config=configs/test.py', f'--workdir={tmp_path}'] + args, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('ddpm_jax.figures: error: '), proc.stderr[-2000:]
  assert re.search(message, lines[0]), lines[0]
  assert not os.path.exists(tmp_path / 'figures')
