"""End-to-end training under TFDS mock data: resume, exact resume after SIGKILL, SIGTERM, NaN skipping,
jit vs pmap, and two processes vs one."""

import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import test as test_config
from ddpm_jax import checkpointing
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import images as images_lib
from ddpm_jax import input_pipeline
from ddpm_jax import losses
from ddpm_jax import models
from ddpm_jax import random_streams
from ddpm_jax import sample
from ddpm_jax import sharding
from ddpm_jax import train
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, 'tests', 'run_main_under_mock_data.py')
MOCK_EXAMPLES = 64


@pytest.fixture(autouse=True)
def mock_data():
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    yield


def make_config(**training):
  config = test_config.get_config()
  for key, value in training.items():
    config.training[key] = value
  return config


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """A 6-step run without interruption: the reference for resumed runs."""
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    workdir = tmp_path_factory.mktemp('uninterrupted')
    state = train.train_and_evaluate(make_config(num_steps=6), str(workdir))
  return jax.device_get(state)


def test_resume_continues_without_retraining(tmp_path, uninterrupted, monkeypatch):
  workdir = str(tmp_path)
  first = train.train_and_evaluate(make_config(num_steps=4), workdir)
  assert int(first.step) == 4
  assert checkpointing.available_steps(workdir) == [2, 4]
  assert os.path.exists(os.path.join(workdir, 'config.json'))

  calls = []
  original = train.Trainer.step
  monkeypatch.setattr(train.Trainer, 'step', lambda self, b: calls.append(1) or original(self, b))
  second = train.train_and_evaluate(make_config(num_steps=6), workdir)
  assert int(second.step) == 6
  assert len(calls) == 2  # steps 5 and 6 only: nothing before the checkpoint was retrained
  assert checkpointing.available_steps(workdir) == [2, 4, 6]
  # Resuming is exact: same params, EMA, optimizer state as the uninterrupted run.
  assert_trees_equal(jax.device_get(second.params), uninterrupted.params)
  assert_trees_equal(jax.device_get(second.ema_params), uninterrupted.ema_params)
  assert_trees_equal(jax.device_get(second.opt_state), uninterrupted.opt_state)


def _run_main(workdir, *overrides, devices=8, env_extra=None, **popen):
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', 'JAX_PLATFORMS': 'cpu',
         **(env_extra or {})}
  cmd = [sys.executable, RUNNER, '--config=configs/test.py', f'--workdir={workdir}', *overrides]
  return subprocess.Popen(cmd, cwd=REPO, env=env, **popen)


def _wait_for(predicate, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.05)
  return False


@pytest.mark.slow
def test_ten_sigkills_at_random_moments_then_the_model_equals_an_uninterrupted_run(tmp_path, uninterrupted):
  """kill -9 ten times in a row while training with a checkpoint every step: each restart resumes (from the newest
  readable step: a kill mid-save leaves an orbax temporary directory or a step moved aside), and the final model
  equals the uninterrupted run's bit for bit."""
  workdir = str(tmp_path / 'run')
  rng = random.Random(0)
  overrides = ['--config.training.num_steps=6', '--config.training.log_every=1',
               '--config.training.checkpoint_every=1']
  killed_mid_run = 0
  for attempt in range(10):
    log = tmp_path / f'stderr_{attempt}.txt'
    with open(log, 'w') as err:
      proc = _run_main(workdir, *overrides, stdout=subprocess.DEVNULL, stderr=err)
      # A random moment once steps are being taken and saved (before that, a kill only costs start-up time).
      stepping = _wait_for(lambda: re.search(r'Step \d+', log.read_text()) is not None, proc)
      time.sleep(rng.uniform(0.0, 1.5))
      if proc.poll() is None:
        killed_mid_run += stepping
        proc.send_signal(signal.SIGKILL)
      proc.wait()
    assert proc.returncode in (0, -signal.SIGKILL), log.read_text()[-3000:]
  assert killed_mid_run >= 5, killed_mid_run

  proc = _run_main(workdir, *overrides, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert 'Traceback' not in err
  step, params, ema = checkpointing.restore_inference_params(workdir)
  assert step == 6
  assert_trees_equal(params, uninterrupted.params)
  assert_trees_equal(ema, uninterrupted.ema_params)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'Ctrl-C'])
def test_sigterm_or_a_first_ctrl_c_saves_and_exits_zero(tmp_path, signum):
  workdir = str(tmp_path)
  log = tmp_path / 'stderr.txt'
  with open(log, 'w') as err:
    proc = _run_main(workdir, '--config.training.num_steps=100000', '--config.training.log_every=1',
                     '--config.training.checkpoint_every=50000', stdout=subprocess.DEVNULL, stderr=err)
    training = _wait_for(lambda: re.search(r'Step \d+/100000 .*loss', log.read_text()) is not None, proc)
    proc.send_signal(signum)
    proc.wait(timeout=300)
  text = log.read_text()
  assert training, text[-3000:]
  assert proc.returncode == 0, text[-3000:]
  assert 'Traceback' not in text, text[-3000:]
  steps = checkpointing.available_steps(workdir)
  assert len(steps) == 1 and 0 < steps[0] < 50000
  assert f'Step {steps[0]}: checkpoint saved' in text


def test_ctrl_c_to_the_process_group_with_data_workers_saves_and_exits_zero(tmp_path):
  # A terminal's Ctrl-C reaches the grain worker processes too: they must leave it to the training loop.
  log = tmp_path / 'stderr.txt'
  with open(log, 'w') as err:
    proc = _run_main(str(tmp_path), '--config.training.num_steps=100000', '--config.training.log_every=1',
                     '--config.training.checkpoint_every=50000', '--config.data.num_workers=2', devices=1,
                     stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    training = _wait_for(lambda: re.search(r'Step \d+/100000 .*loss', log.read_text()) is not None, proc)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=300)
  text = log.read_text()
  assert training, text[-3000:]
  assert proc.returncode == 0, text[-3000:]
  assert 'Traceback' not in text and 'KeyboardInterrupt' not in text, text[-3000:]
  steps = checkpointing.available_steps(str(tmp_path))
  assert len(steps) == 1 and f'Step {steps[0]}: checkpoint saved' in text, text[-3000:]


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(tmp_path):
  # While sampling (any moment but the training loop, where a first Ctrl-C saves): stop at once, no traceback.
  workdir = helpers.save_random_checkpoint(tmp_path, make_config(), step=3)
  log = tmp_path / 'stderr.txt'
  with open(log, 'w') as err:
    proc = _run_main(workdir, '--mode=sample', '--config.sample.num_samples=100000', devices=1,
                     stdout=subprocess.DEVNULL, stderr=err)
    sampling = _wait_for(lambda: 'sampled batch 2/' in log.read_text(), proc)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
  text = log.read_text()
  assert sampling, text[-3000:]
  assert proc.returncode == 130, text[-3000:]
  assert 'Traceback' not in text, text[-3000:]
  assert [line for line in text.splitlines() if line.startswith('ddpm_jax: error: ')] == [
      'ddpm_jax: error: interrupted (Ctrl-C): stopped without saving; the checkpoints and files written before it '
      'are kept (training resumes from its last checkpoint)'], text[-3000:]
  assert checkpointing.available_steps(workdir) == [3]


def _fixed_batch(config):
  it = input_pipeline.create_train_iterator(config)
  return next(it)


def test_loss_decreases_on_a_fixed_batch(tmp_path):
  config = make_config()
  trainer = train.Trainer(config, str(tmp_path))
  batch = _fixed_batch(config)
  rng = jax.random.key(123)
  t = jax.random.randint(rng, (batch['image'].shape[0],), 0, config.diffusion.num_timesteps)
  noise = jax.random.normal(jax.random.fold_in(rng, 1), batch['image'].shape)

  @jax.jit
  def fixed_loss(params):
    fn = lambda x, ts: trainer.model.apply({'params': params}, x, ts, train=False)
    return jnp.mean(losses.training_losses(trainer.diffusion, fn, batch['image'], t, noise)['loss'])

  before = float(fixed_loss(trainer.host_state().params))
  stacked = jax.tree.map(lambda x: x[None], batch)
  for _ in range(15):
    trainer.step(stacked)
  after = float(fixed_loss(trainer.host_state().params))
  assert after < 0.95 * before, (before, after)


def test_nonfinite_updates_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
  config = make_config(max_consecutive_skips=4, log_every=2, checkpoint_every=2, num_steps=20)
  trainer = train.Trainer(config, str(tmp_path / 'unit'))
  batch = jax.tree.map(lambda x: x[None], _fixed_batch(config))
  before = jax.device_get(trainer.host_state().params)
  bad = dict(batch, image=np.full_like(batch['image'], np.nan))
  metrics = jax.device_get(trainer.step(bad))
  assert int(metrics['skipped_updates'][-1]) == 1 and int(metrics['consecutive_skips'][-1]) == 1
  assert int(trainer.host_state().step) == 1  # the step counter moves on, the params do not
  assert_trees_equal(jax.device_get(trainer.host_state().params), before)
  metrics = jax.device_get(trainer.step(batch))
  assert int(metrics['consecutive_skips'][-1]) == 0 and int(metrics['skipped_updates'][-1]) == 1

  def nan_iterator(cfg, **kwargs):
    it = original(cfg, **kwargs)
    return _NaNImages(it)
  original = input_pipeline.create_train_iterator
  monkeypatch.setattr(input_pipeline, 'create_train_iterator', nan_iterator)
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.TrainingDivergedError, match='consecutive non-finite') as err:
    train.train_and_evaluate(config, workdir)
  assert '\n' not in str(err.value) and 'last good checkpoint is step 2' in str(err.value)
  # Updates are skipped from step 3 on: no checkpoint is written during the streak (step 4), only before it.
  assert checkpointing.available_steps(workdir) == [2]
  _, params, ema = checkpointing.restore_inference_params(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves((params, ema)))


class _NaNImages:
  """Wraps a train iterator; batches from the 3rd on are NaN (the first two keep a finite checkpoint possible)."""

  def __init__(self, it):
    self._it, self._n = it, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self._n += 1
    return batch if self._n <= 2 else dict(batch, image=np.full_like(batch['image'], np.nan))

  def __getattr__(self, name):
    return getattr(self._it, name)


def _final_params(workdir):
  step, params, _ = checkpointing.restore_inference_params(workdir)
  assert step == 4
  return params


def _assert_console_for_people(stderr, workdir):
  """The default console: the resolved run, progress with ETA, saves and a summary; no library chatter."""
  lines = stderr.strip().splitlines()
  assert any(re.search(r'Model: U-Net, [\d,]+ parameters', line) for line in lines), stderr
  assert any(f'Workdir: {os.path.abspath(workdir)}' in line for line in lines), stderr
  assert any(re.search(r'Step 2/4 \(50%\): loss [\d.]+, [\d.?]+ steps/s, ETA', line) for line in lines), stderr
  assert any('Step 4: checkpoint saved in' in line for line in lines), stderr
  assert re.search(r'Finished at step 4 in .*checkpoints in', lines[-1]), stderr
  for chatter in ('orbax', 'Unable to initialize backend', 'oneDNN', 'Traceback', 'absl::InitializeLog'):
    assert chatter not in stderr, stderr
  assert len(lines) < 20, stderr


@pytest.mark.slow
def test_jit_pmap_and_two_processes_agree(tmp_path):
  """One process × 4 devices under jit and under pmap, and two processes × 2 devices (jax.distributed over CPU
  collectives), train the test config to the same parameters."""
  common = ['--config.training.num_steps=4', '--config.training.checkpoint_every=4']
  runs = {}
  for mode in ('jit', 'pmap'):
    workdir = str(tmp_path / mode)
    proc = _run_main(workdir, *common, f'--config.training.parallelism={mode}', devices=4,
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    runs[mode] = _final_params(workdir)
    if mode == 'jit':
      _assert_console_for_people(err, workdir)

  port = 20000 + os.getpid() % 20000
  workdir = str(tmp_path / 'multihost')
  procs = [_run_main(workdir, *common, f'--coordinator_address=localhost:{port}', '--num_processes=2',
                     f'--process_id={i}', devices=2, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
  runs['multihost'] = _final_params(workdir)

  # Reduction order differs (pmean / cross-process all-reduce vs one program), and Adam turns a gradient that is
  # ~0 up to rounding into a full ±lr step, so parameters with no signal may differ by rounding-sized noise times
  # lr. Any real difference (other data, other timesteps or noise, a missing gradient average) moves parameters by
  # O(lr) = 1e-3 in most entries; atol = 10% of one step separates the two.
  reference = jax.tree.leaves(runs['jit'])
  leaves = jax.tree.leaves(runs['multihost'])
  for a, b in zip(reference, leaves, strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4, err_msg='multihost')
  close = sum(int(np.sum(np.isclose(b, a, rtol=1e-5, atol=1e-7))) for a, b in zip(reference, leaves))
  assert close / sum(a.size for a in reference) > 0.9  # the bulk agrees far more tightly

  # pmap draws its own timesteps and noise per device (its update rule equals jit's on the same draws:
  # test_train_step.py), so it trains to other parameters, but from the same initialisation with the same
  # learning rates: an Adam step moves a parameter by at most lr (1 - b1) / sqrt(1 - b2) = 3.16 lr (Kingma & Ba
  # 2015, Sec. 2.1), and the 4 steps' rates sum to (0 + 0.5 + 1 + 1) 1e-3, in either run. Another initialisation
  # would differ by the kernels' own scale (~0.1).
  pmap = jax.tree.leaves(runs['pmap'])
  largest = max(float(np.max(np.abs(b - a))) for a, b in zip(reference, pmap, strict=True))
  assert 0 < largest <= 2 * 3.17 * 2.5e-3, largest


def test_sample_grids_during_training_come_from_the_ema_params_of_that_step(tmp_path):
  config = make_config(num_steps=4, sample_every=4)
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir)
  path = os.path.join(workdir, 'samples', 'train_step_4.png')
  with Image.open(path) as grid:
    grid = np.asarray(grid)
  # Redraw: the EMA parameters checkpointed at step 4, the sample stream folded with the step.
  _, _, ema = checkpointing.restore_inference_params(workdir, 4)
  mesh = sharding.create_mesh()
  sample_fn = sample.make_sample_fn(config, models.create_model(config),
                                      diffusion_lib.from_config(config.diffusion), mesh, config.sample.batch_size)
  key = jax.random.fold_in(random_streams.stream(config.seed, 'sample'), 4)
  samples = sample.generate(sample_fn, jax.device_put(ema, sharding.replicated(mesh)), key, None, mesh,
                              config.sample.batch_size)
  expected = images_lib.make_grid(*sample.grid_layout(config, samples, None))
  np.testing.assert_array_equal(grid, expected)
  assert samples.std() > 0  # a grid of actual samples, not a blank image
