"""Config files and validation: every shipped config is valid; bad fields fail fast with one line."""

import importlib
import os
import subprocess
import sys

import pytest

from ddpm_jax import config_validation
from ddpm_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ['default', 'cifar10', 'celeb_a_hq', 'lsun_church', 'lsun_bedroom', 'lsun_cat', 'mnist', 'quickstart',
           'quickstart_cond', 'test']


def load(name):
  return importlib.import_module(f'configs.{name}').get_config()


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('num_devices', [1, 8])
def test_shipped_configs_are_valid(name, num_devices):
  config_validation.validate_config(load(name), num_devices)


def test_cifar10_is_the_paper_recipe():
  c = load('cifar10')
  assert (c.diffusion.num_timesteps, c.diffusion.schedule, c.diffusion.beta_start, c.diffusion.beta_end) == (
      1000, 'linear', 1e-4, 0.02)
  assert (c.diffusion.mean_type, c.diffusion.var_type, c.diffusion.loss_type) == ('eps', 'fixedlarge', 'mse')
  assert (c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip) == (2e-4, 5000, 1.0)
  assert (c.training.batch_size, c.training.ema_decay, c.training.num_steps) == (128, 0.9999, 800_000)
  assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks, tuple(c.model.attn_resolutions)) == (
      128, (1, 2, 2, 2), 2, (16,))
  assert c.model.dropout == 0.1 and c.data.random_flip


def test_256_configs_follow_appendix_b():
  for name in ('celeb_a_hq', 'lsun_church', 'lsun_bedroom', 'lsun_cat'):
    c = load(name)
    assert tuple(c.model.ch_mult) == (1, 1, 2, 2, 4, 4) and c.data.image_size == 256
    assert c.optim.lr == 2e-5 and c.training.batch_size == 64 and c.model.dropout == 0.0
  assert not load('lsun_bedroom').data.random_flip


@pytest.mark.parametrize('field,value,devices', [
    ('diffusion.loss_type', 'l2', 1),
    ('diffusion.schedule', 'sigmoid', 1),
    ('diffusion.mean_type', 'score', 1),
    ('diffusion.var_type', 'learned', 1),      # learned variance needs a bound in the loss
    ('diffusion.num_timesteps', 0, 1),
    ('diffusion.beta_end', 1.5, 1),
    ('data.dataset', 'imagenet', 1),
    ('training.batch_size', 12, 8),            # not divisible by 8 devices
    ('training.ema_decay', 1.0, 1),
    ('training.parallelism', 'pjit', 1),
    ('optim.lr_decay', 'exponential', 1),
    ('training.log_every', 3, 1),              # not a multiple of steps_per_call = 2 (set below)
    ('optim.lr', 0.0, 1),
    ('model.ch_mult', (), 1),
    ('model.dtype', 'float16', 1),
    ('model.ch', 48, 1),                       # GroupNorm(32) needs ch * mult divisible by 32
    ('sample.method', 'dpm', 1),
    ('sample.respacing', 'ddim0', 1),
    ('sample.guidance_scale', 3.0, 1),         # unconditional model
    ('sample.class_label', 3, 1),              # unconditional model
    ('sample.eta', 0.5, 1),                    # eta is DDIM's; the test config samples ancestrally
    ('model.attn_resolutions', (7,), 1),       # the 32/16 test U-Net never reaches side 7
    ('training.num_steps', 5, 1),              # would train 6 steps: not a multiple of steps_per_call = 2
])
def test_invalid_field_is_named(field, value, devices):
  config = load('test')
  if field in ('training.log_every', 'training.num_steps'):
    config.training.steps_per_call = 2
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(errors.ConfigError) as err:
    config_validation.validate_config(config, devices)
  message = str(err.value)
  assert f'config.{field}' in message and '\n' not in message


@pytest.mark.parametrize('loss_type', ['l1', 'huber'])
def test_l1_and_huber_losses_need_a_fixed_variance(loss_type):
  for var_type in ('fixedlarge', 'fixedsmall'):
    config = load('test')
    config.diffusion.loss_type, config.diffusion.var_type = loss_type, var_type
    config_validation.validate_config(config, 1)
  config.diffusion.var_type = 'learned_range'
  with pytest.raises(errors.ConfigError) as err:
    config_validation.validate_config(config, 1)
  message = str(err.value)
  assert message.startswith("config.diffusion.var_type='learned_range' is invalid") and '\n' not in message
  assert repr(loss_type) in message


def _message(config):
  with pytest.raises(errors.ConfigError) as err:
    config_validation.validate_config(config, 1)
  return str(err.value)


def test_unreachable_attention_resolution_lists_the_sides():
  config = load('test')
  config.model.attn_resolutions = (16, 7)
  assert _message(config) == ('config.model.attn_resolutions=(16, 7) is invalid: every entry must be a feature-map '
                              'side of the U-Net, one of [32, 16] (image side 32 halved per model.ch_mult level)')
  mnist = load('mnist')  # padded digits: the sides follow data.pad_to
  mnist.model.attn_resolutions = (28,)
  assert 'one of [32, 16, 8]' in _message(mnist)


def test_sampling_fields_that_would_be_ignored():
  config = load('test')
  config.sample.eta = 1.0
  assert _message(config) == ("config.sample.eta=1.0 is invalid: must be 0 with sample.method='ancestral' "
                              "(eta is DDIM's; use sample.method='ddim')")
  config.sample.method = 'ddim'
  config_validation.validate_config(config, 1)
  config = load('test')
  config.sample.class_label = 0
  assert _message(config) == ('config.sample.class_label=0 is invalid: must be -1 for an unconditional model '
                              '(model.num_classes=0)')


@pytest.mark.parametrize('field,value', [
    ('model.attn_resolutions', ()),            # attention only in the middle block
    ('model.attn_resolutions', (32, 16)),      # every level of the 32/16 test U-Net
    ('training.num_steps', 4),                 # a multiple of steps_per_call = 2 (set below)
    ('optim.warmup_steps', 0),
    ('optim.lr_decay', 'cosine'),
    ('optim.grad_clip', 0.0),
    ('optim.weight_decay', 0.0),
    ('training.keep_checkpoints', 1),
    ('diffusion.num_timesteps', 1),
    ('sample.respacing', '20'),                # = T of the test config
    ('sample.respacing', 'ddim20'),
])
def test_documented_boundary_values_are_valid(field, value):
  config = load('test')
  config.training.steps_per_call = 2
  section, name = field.split('.')
  config[section][name] = value
  config_validation.validate_config(config, 8)


def test_cli_bad_override_is_one_line_without_traceback(tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/test.py', f'--workdir={workdir}',
       '--config.diffusion.loss_type=l3'],
      cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr
  assert "config.diffusion.loss_type='l3' is invalid" in proc.stderr
  assert not (workdir / 'checkpoints').exists()  # failed before anything was built


def test_a_decay_needs_steps_after_the_warmup():
  config = load('quickstart')
  config.training.num_steps = 100  # a quick try of the quickstart (warmup 200, cosine decay)
  assert _message(config) == ("config.optim.lr_decay='cosine' is invalid: decays from the end of warmup to "
                              'training.num_steps, so it needs training.num_steps (100) > optim.warmup_steps (200); '
                              "lower optim.warmup_steps or set optim.lr_decay='none'")
  config.optim.lr_decay = 'none'  # a constant rate after (or within) warmup has no such limit
  config_validation.validate_config(config, 1)
