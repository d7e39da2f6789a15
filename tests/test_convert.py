"""diffusers DDPM checkpoints -> our U-Net (ddpm_jax.convert): numerical equivalence with diffusers, file formats,
strictness, the command. torch/diffusers are the test oracle only."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import default
from ddpm_jax import checkpointing
from ddpm_jax import config_validation
from ddpm_jax import convert
from ddpm_jax import models
from ddpm_jax import run
from ddpm_jax import schedules
from ddpm_jax import workdir_config
from tests import helpers
from tests.helpers import assert_one_line_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# config.json of google/ddpm-cifar10-32 (the released CIFAR-10 model of Ho et al. 2020, as converted by diffusers).
CIFAR10_CONFIG = {
    '_class_name': 'UNet2DModel', '_diffusers_version': '0.0.4', 'act_fn': 'silu', 'attention_head_dim': None,
    'block_out_channels': [128, 256, 256, 256], 'center_input_sample': False,
    'down_block_types': ['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'], 'downsample_padding': 0,
    'flip_sin_to_cos': False, 'freq_shift': 1, 'in_channels': 3, 'layers_per_block': 2, 'mid_block_scale_factor': 1,
    'norm_eps': 1e-06, 'norm_num_groups': 32, 'out_channels': 3, 'sample_size': 32,
    'time_embedding_type': 'positional', 'resnet_time_scale_shift': 'default',
    'up_block_types': ['UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'],
}
SCHEDULER_CONFIG = {'_class_name': 'DDPMScheduler', 'beta_end': 0.02, 'beta_schedule': 'linear', 'beta_start': 0.0001,
                    'clip_sample': True, 'num_train_timesteps': 1000, 'trained_betas': None,
                    'variance_type': 'fixed_small'}
# The same family, two levels, attention at 8x8: fast.
SMALL_CONFIG = dict(CIFAR10_CONFIG, block_out_channels=[32, 64], down_block_types=['DownBlock2D', 'AttnDownBlock2D'],
                    up_block_types=['AttnUpBlock2D', 'UpBlock2D'], layers_per_block=1, sample_size=16)


def _diffusers_unet(config, seed=0):
  return helpers.random_diffusers_unet(config, seed)


def _state_dict(net):
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _compare(net, params, overrides, t, seed=0):
  """max |ours - diffusers| / max |diffusers| on random x_t for the timesteps t."""
  side, c = overrides['data']['image_size'], overrides['data']['num_channels']
  x = np.random.RandomState(seed).uniform(-1, 1, (len(t), c, side, side)).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x), torch.from_numpy(np.asarray(t, np.int64))).sample.numpy().transpose(0, 2, 3, 1)
  model = convert.model_from_overrides(overrides)
  out = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t))(params, x.transpose(0, 2, 3, 1),
                                                                  jnp.asarray(t, jnp.int32))
  assert out.shape == ref.shape
  return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


def _save(net, directory, safe=True, scheduler=True):
  net.save_pretrained(directory, safe_serialization=safe)
  if scheduler:
    with open(os.path.join(directory, 'scheduler_config.json'), 'w') as f:
      json.dump(SCHEDULER_CONFIG, f)


@pytest.fixture(scope='module')
def small_net():
  return _diffusers_unet(SMALL_CONFIG)


def test_small_checkpoint_matches_diffusers(small_net, tmp_path):
  _save(small_net, tmp_path)
  assert os.path.isfile(tmp_path / 'diffusion_pytorch_model.safetensors')
  params, overrides = convert.load_diffusers_checkpoint(str(tmp_path))
  assert overrides['model'] == {'ch': 32, 'ch_mult': (1, 2), 'num_res_blocks': 1, 'attn_resolutions': (8,),
                                'resamp_with_conv': True, 'learned_variance': False, 'num_classes': 0}
  assert overrides['data'] == {'image_size': 16, 'num_channels': 3}
  assert overrides['diffusion'] == {'schedule': 'linear', 'num_timesteps': 1000, 'beta_start': 1e-4,
                                    'beta_end': 0.02, 'var_type': 'fixedsmall', 'mean_type': 'eps'}
  assert overrides['sample'] == {'clip_denoised': True}
  assert all(v.dtype == np.float32 for v in jax.tree_util.tree_leaves(params))
  assert models.count_params(params) == sum(p.numel() for p in small_net.parameters())
  assert _compare(small_net, params, overrides, [0, 1, 10, 500, 999]) <= 1e-5


def test_cifar10_released_architecture_matches_diffusers():
  # (The count itself, 35.7M: tests/test_unet.py.)
  net = _diffusers_unet(CIFAR10_CONFIG, seed=1)
  overrides = convert.model_overrides_from_diffusers(CIFAR10_CONFIG, SCHEDULER_CONFIG)
  params = convert.convert_state_dict(_state_dict(net), convert.model_from_overrides(overrides))
  assert models.count_params(params) == sum(p.numel() for p in net.parameters())
  assert _compare(net, params, overrides, [3, 777], seed=1) <= 1e-5
  # The checkpoint is the network of configs/cifar10.py: `--config=configs/cifar10.py` can sample from it.
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  ours = cifar10.get_config()
  merged = convert.apply_overrides(ours, overrides)
  for k in ('ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'resamp_with_conv', 'num_classes'):
    assert tuple(np.atleast_1d(merged.model[k])) == tuple(np.atleast_1d(ours.model[k])), k
  config_validation.validate_config(merged)


def test_bin_reader_matches_torch_without_importing_it(tmp_path):
  base = torch.randn(5, 7)
  tensors = {'transposed': base.t(), 'offset_view': base[1:3, 2:], 'half': torch.randn(3, 4).half(),
             'bf16': torch.randn(4).bfloat16(), 'long': torch.arange(6), 'scalar': torch.tensor(3.5),
             'param': torch.nn.Parameter(torch.ones(2))}
  torch.save(tensors, tmp_path / 'w.bin')
  loaded = convert.load_state_dict(str(tmp_path / 'w.bin'))
  assert set(loaded) == set(tensors)
  for k, v in tensors.items():
    ref = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
    assert loaded[k].shape == ref.shape and loaded[k].flags['C_CONTIGUOUS'], k
    np.testing.assert_array_equal(np.asarray(loaded[k], ref.dtype), ref, err_msg=k)
  # Anything but tensors is refused (a pickle may run arbitrary code).
  torch.save({'w': torch.ones(2), 'evil': {1, 2}.__class__}, tmp_path / 'bad.bin')
  with pytest.raises(convert.ConversionError, match=r'refusing to unpickle \w+\.set') as e:
    convert.load_state_dict(str(tmp_path / 'bad.bin'))
  assert str(e.value).startswith(str(tmp_path / 'bad.bin')) and '\n' not in str(e.value)
  # A truncated download: one line naming the file.
  (tmp_path / 'cut.bin').write_bytes((tmp_path / 'w.bin').read_bytes()[:300])
  with pytest.raises(convert.ConversionError) as e:
    convert.load_state_dict(str(tmp_path / 'cut.bin'))
  assert str(e.value).startswith(str(tmp_path / 'cut.bin')) and '\n' not in str(e.value)


def test_bin_pipeline_layout_and_legacy_attention_names(small_net, tmp_path):
  # A pipeline directory (model under unet/) with .bin weights and the old attention names of the first uploads.
  state = _state_dict(small_net)
  legacy = {}
  for k, v in state.items():
    for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'), ('to_out.0', 'proj_attn')):
      k = k.replace(f'.{new}.', f'.{old}.')
    legacy[k] = torch.from_numpy(v)
  assert any('.proj_attn.' in k for k in legacy) and not any('.to_q.' in k for k in legacy)
  (tmp_path / 'unet').mkdir()
  torch.save(legacy, tmp_path / 'unet' / 'diffusion_pytorch_model.bin')
  with open(tmp_path / 'unet' / 'config.json', 'w') as f:
    json.dump(SMALL_CONFIG, f)
  params, overrides = convert.load_diffusers_checkpoint(str(tmp_path))
  reference = convert.convert_state_dict(state, convert.model_from_overrides(overrides))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, reference)
  assert overrides['diffusion'] == {}  # no scheduler config: the configured schedule stays


@pytest.mark.parametrize('fields,expected', [
    ({'variance_type': 'fixed_large_log', 'prediction_type': 'v_prediction'},
     {'var_type': 'fixedlarge', 'mean_type': 'v'}),
    ({'variance_type': 'fixed_small_log', 'prediction_type': 'sample', 'beta_schedule': 'squaredcos_cap_v2'},
     {'var_type': 'fixedsmall', 'mean_type': 'xstart', 'schedule': 'cosine'}),
    # trained_betas equal to one of our schedules (what export writes for const / jsd / warmup*) is that schedule.
    ({'trained_betas': schedules.get_betas('jsd', 1000, 1e-4, 0.02).tolist()}, {'schedule': 'jsd'}),
])
def test_scheduler_configs_map_to_our_diffusion_fields(fields, expected):
  diffusion = convert.diffusion_overrides_from_scheduler(dict(SCHEDULER_CONFIG, **fields), learned=False)
  assert {k: diffusion[k] for k in expected} == expected
  assert diffusion['num_timesteps'] == 1000


@pytest.mark.parametrize('fields,needle', [
    ({'beta_schedule': 'sigmoid'}, "beta_schedule='sigmoid'"),
    ({'trained_betas': list(np.linspace(1e-3, 0.05, 1000))}, 'trained_betas (1000 values'),
    ({'prediction_type': 'flow'}, "prediction_type='flow'"),
    ({'variance_type': 'learned'}, "variance_type='learned' for a network with no variance output"),
    ({'thresholding': True}, 'thresholding=True'),
    ({'clip_sample_range': 2.0}, 'clip_sample_range=2.0'),
])
def test_scheduler_settings_we_cannot_represent_are_named(fields, needle):
  assert_one_line_error(lambda: convert.diffusion_overrides_from_scheduler(dict(SCHEDULER_CONFIG, **fields), False),
                        'unsupported diffusers scheduler config', needle, error=convert.ConversionError)


def test_missing_unexpected_and_mismatched_tensors_are_listed(small_net):
  state = _state_dict(small_net)
  model = convert.model_from_overrides(convert.model_overrides_from_diffusers(SMALL_CONFIG))
  broken = dict(state)
  del broken['down_blocks.1.resnets.0.conv_shortcut.weight']
  del broken['mid_block.attentions.0.to_k.bias']
  broken['extra.weight'] = np.zeros(3, np.float32)
  broken['conv_out.bias'] = np.zeros(4, np.float32)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_state_dict(broken, model)
  msg = str(e.value)
  for name in ('down_blocks.1.resnets.0.conv_shortcut.weight', 'mid_block.attentions.0.to_k.bias', 'extra.weight',
               'conv_out/bias (4,) vs model (3,)'):
    assert name in msg, (name, msg)


@pytest.mark.parametrize('field,value,message', [
    ('flip_sin_to_cos', True, 'flip_sin_to_cos=True'),
    ('freq_shift', None, 'freq_shift=0'),  # absent: diffusers' default (0) applies, not the DDPM value
    ('downsample_padding', 1, 'downsample_padding=1'),
    ('attention_head_dim', 8, 'multi-head'),
    ('num_class_embeds', 10, 'num_class_embeds=10'),
    ('up_block_types', ['AttnUpBlock2D', 'UpBlock2D', 'UpBlock2D', 'UpBlock2D'], 'different levels'),
    ('_class_name', 'UNet2DConditionModel', 'not a UNet2DModel'),
])
def test_unsupported_architectures_are_refused(field, value, message):
  config = dict(CIFAR10_CONFIG)
  if value is None:
    del config[field]
  else:
    config[field] = value
  with pytest.raises(convert.ConversionError, match=message):
    convert.model_overrides_from_diffusers(config)


def test_learned_variance_and_padded_configs():
  overrides = convert.model_overrides_from_diffusers(dict(CIFAR10_CONFIG, out_channels=6),
                                                     dict(SCHEDULER_CONFIG, variance_type='learned_range'))
  assert overrides['model']['learned_variance'] and overrides['diffusion']['var_type'] == 'learned_range'
  config = convert.apply_overrides(default.get_config(), overrides)
  config_validation.validate_config(config)
  assert models.create_model(config).out_ch == 6
  # ... and a fixed-variance checkpoint under a config asking for a learned one gets the paper's fixedlarge.
  learned_base = default.get_config()
  learned_base.diffusion.var_type, learned_base.diffusion.loss_type = 'learned_range', 'hybrid'
  config = convert.apply_overrides(learned_base, convert.model_overrides_from_diffusers(CIFAR10_CONFIG))
  assert config.diffusion.var_type == 'fixedlarge' and models.create_model(config).out_ch == 3
  config_validation.validate_config(config)
  # Configs that pad 28x28 digits to 32: the checkpoint's side is the padded size (the model's input).
  padded = default.get_config()
  padded.data.image_size, padded.data.pad_to, padded.data.num_channels = 28, 32, 1
  digits = dict(SMALL_CONFIG, in_channels=1, out_channels=1, sample_size=32)
  config = convert.apply_overrides(padded, convert.model_overrides_from_diffusers(digits))
  assert (config.data.image_size, config.data.pad_to, config.data.num_channels) == (28, 32, 1)
  assert models.image_shape(config) == (32, 32, 1)


def test_command_writes_a_restorable_workdir_without_torch(small_net, tmp_path, capsys):
  ckpt, workdir = tmp_path / 'ddpm-small', tmp_path / 'work'
  _save(small_net, ckpt, safe=False)  # .bin: the torch-free reader must handle it
  # Neither torch nor the repository's configs/ importable: the library stands on its own.
  code = ('import sys; sys.modules["torch"] = sys.modules["configs"] = None; from ddpm_jax import convert; '
          f'sys.exit(convert.main(["--checkpoint", {str(ckpt)!r}, "--out", {str(workdir)!r}, "--step", "7"]))')
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert 'checkpoints/7' in proc.stdout
  step, params, ema_params = checkpointing.restore_inference_params(str(workdir))
  assert step == 7
  reference = convert.convert_state_dict(_state_dict(small_net), convert.model_from_overrides(
      convert.model_overrides_from_diffusers(SMALL_CONFIG)))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, reference)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ema_params, reference)
  with open(workdir / 'config.json') as f:
    written = json.load(f)
  assert written['model']['ch_mult'] == [1, 2] and written['data']['image_size'] == 16
  assert written['model']['learned_variance'] is False and written['diffusion']['schedule'] == 'linear'
  # The written config rebuilds the network the checkpoint holds.
  config = default.get_config()
  for section in ('model', 'data', 'diffusion'):
    config[section].update({k: tuple(v) if isinstance(v, list) else v for k, v in written[section].items()})
  config_validation.validate_config(config)
  shapes = models.param_shapes(models.create_model(config))
  assert jax.tree_util.tree_map(lambda s: s.shape, shapes) == jax.tree_util.tree_map(np.shape, params)

  # A config file and an override, as main.py takes them: the written config carries both.
  other = tmp_path / 'work_quickstart'
  assert convert.main(['--checkpoint', str(ckpt), '--out', str(other), '--config', os.path.join(REPO, 'configs',
                       'quickstart.py'), '--config.eval.num_samples=123']) == 0
  with open(other / 'config.json') as f:
    written = json.load(f)
  assert written['training']['num_steps'] == 2800 and written['eval']['num_samples'] == 123
  capsys.readouterr()

  # Bad directories: one line on stderr, exit status 2, nothing written.
  for bad in (str(tmp_path / 'nope'), str(tmp_path)):
    assert convert.main(['--checkpoint', bad, '--out', str(tmp_path / 'out2')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('ddpm_jax.convert: error:') and '\n' not in err and repr(bad) in err
  assert not (tmp_path / 'out2').exists()


def test_flag_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
  broken = tmp_path / 'broken_config.py'
  broken.write_text('def get_config():\n  raise ValueError("no such dataset\\nsecond line")\n')
  config = os.path.join(REPO, 'configs', 'cifar10.py')
  required = ['--checkpoint', str(tmp_path), '--out', str(tmp_path / 'out')]
  for argv, expected in [
      (['--out', str(tmp_path / 'out')], '--checkpoint'),
      (required + ['--stepp=3'], "Unknown command line flag 'stepp'"),
      (required + ['--step=-1'], '--step=-1'),
      (required + [f'--config={tmp_path / "nope.py"}'], 'nope.py'),
      (required + [f'--config={broken}'], 'ValueError: second line'),
      (required + ['--config', config, '--config.model.chh=3'], "--config.model.chh"),
      (required + ['--config', config, '--config.model.ch=abc'], '--config.model.ch=abc'),
      (required + ['extra'], "unexpected arguments: ['extra']"),
  ]:
    assert convert.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith('ddpm_jax.convert: error:') and '\n' not in err and expected in err, (argv, err)
  assert not (tmp_path / 'out').exists()
  assert convert.main(['--help']) == 0 and '--checkpoint' in capsys.readouterr().out


def test_a_converted_workdir_samples_with_no_config(small_net, tmp_path):
  # The scheduler config decides the diffusion (T=10, fixed_large, no clipping); the converter records it all.
  hub, workdir = tmp_path / 'hub', tmp_path / 'run'
  small_net.save_pretrained(hub)
  scheduler = dict(SCHEDULER_CONFIG, num_train_timesteps=10, variance_type='fixed_large', clip_sample=False)
  (hub / 'scheduler_config.json').write_text(json.dumps(scheduler))
  base = default.get_config()
  base.sample.num_samples, base.sample.batch_size = 8, 8
  convert.convert_checkpoint(str(hub), str(workdir), base_config=base)
  recorded = workdir_config.read(str(workdir))
  assert (recorded.diffusion.num_timesteps, recorded.diffusion.var_type) == (10, 'fixedlarge')
  assert recorded.sample.clip_denoised is False
  run.run('sample', None, str(workdir))  # what `main.py --mode=sample --workdir=<converted dir>` calls
  with np.load(workdir / 'samples' / 'step_0' / 'samples.npz') as z:
    assert z['images'].shape == (8, 16, 16, 3) and z['images'].dtype == np.uint8
