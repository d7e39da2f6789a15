"""Run directories -> diffusers DDPMPipeline folders (ddpm_jax.export): (a) diffusers -> ddpm_jax -> diffusers gives
back the same tensors and config, (b) a model of ours exported and run by diffusers computes our outputs, and the
folder loads with DDPMPipeline.from_pretrained; what diffusers cannot represent is refused in one line. torch and
diffusers are the test oracle only (the export itself needs neither)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.numpy import load_file

from configs import default
from ddpm_jax import checkpointing
from ddpm_jax import convert
from ddpm_jax import export
from ddpm_jax import models
from ddpm_jax import schedules
from ddpm_jax import workdir_config
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The released DDPM family (google/ddpm-cifar10-32's settings), two levels, attention at 8x8: fast.
DIFFUSERS_UNET = {
    'act_fn': 'silu', 'attention_head_dim': None, 'block_out_channels': [32, 64], 'center_input_sample': False,
    'down_block_types': ['DownBlock2D', 'AttnDownBlock2D'], 'downsample_padding': 0, 'flip_sin_to_cos': False,
    'freq_shift': 1, 'in_channels': 3, 'layers_per_block': 1, 'mid_block_scale_factor': 1, 'norm_eps': 1e-06,
    'norm_num_groups': 32, 'out_channels': 3, 'sample_size': 16, 'time_embedding_type': 'positional',
    'resnet_time_scale_shift': 'default', 'up_block_types': ['AttnUpBlock2D', 'UpBlock2D'],
}
# Fields the round trip does not carry: the version stamp, and dropout (a training setting our run keeps its own of).
NOT_ROUND_TRIPPED = ('_diffusers_version', '_name_or_path', '_use_default_values', 'dropout')


def _random_diffusers_unet(config, seed=0):
  """A UNet2DModel whose every tensor (the zero-initialised output conv too) holds random non-zero values."""
  torch.manual_seed(seed)
  net = UNet2DModel(**config).eval()
  with torch.no_grad():
    for name, p in net.named_parameters():
      if p.ndim > 1:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
      else:
        p.copy_((1.0 if 'norm' in name and name.endswith('weight') else 0.0) + 0.1 * torch.randn_like(p))
  return net


def _config(**model):
  """A tiny recorded run config: 16x16 RGB, ch 32, two levels, attention at 8x8."""
  config = default.get_config()
  config.data.image_size = 16
  config.model.update(dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0))
  config.model.update(model)
  return config


def _workdir(tmp_path, config, name='run', step=7):
  """A run directory as training leaves one: config.json and a checkpoint with distinct params and EMA params."""
  workdir = str(tmp_path / name)
  workdir_config.write(config, workdir)
  model = models.create_model(config)
  params, ema_params = helpers.random_params(model, seed=1), helpers.random_params(model, seed=2)
  checkpointing.save_inference_checkpoint(workdir, step, params, ema_params)
  return workdir, model, params, ema_params


# ------------------------------------------------------------------------------ (a) diffusers -> ours -> diffusers

@pytest.mark.parametrize('variant', ['fixed', 'learned_range'])
def test_diffusers_round_trip_gives_identical_tensors_and_config(tmp_path, variant):
  unet_args = dict(DIFFUSERS_UNET, out_channels=6 if variant == 'learned_range' else 3)
  scheduler_args = {'beta_schedule': 'linear', 'beta_start': 1e-4, 'beta_end': 0.02, 'num_train_timesteps': 1000,
                    'clip_sample': True, 'prediction_type': 'epsilon',
                    'variance_type': 'learned_range' if variant == 'learned_range' else 'fixed_large'}
  net = _random_diffusers_unet(unet_args)
  net.save_pretrained(tmp_path / 'hub')
  DDPMScheduler(**scheduler_args).save_pretrained(tmp_path / 'hub')
  convert.convert_checkpoint(str(tmp_path / 'hub'), str(tmp_path / 'ours'))
  export.export(str(tmp_path / 'ours'), str(tmp_path / 'back'))

  original = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  back = load_file(str(tmp_path / 'back' / 'unet' / 'diffusion_pytorch_model.safetensors'))
  assert sorted(back) == sorted(original)
  differing = [k for k in original if back[k].dtype != np.float32 or not np.array_equal(back[k], original[k])]
  assert differing == []  # bit for bit: the mapping only transposes and splits

  exported = json.loads((tmp_path / 'back' / 'unet' / 'config.json').read_text())
  reference = {k: v for k, v in net.config.items() if k not in NOT_ROUND_TRIPPED}
  assert {k: exported[k] for k in reference} == {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in reference.items()}
  scheduler = json.loads((tmp_path / 'back' / 'scheduler' / 'scheduler_config.json').read_text())
  assert {k: scheduler[k] for k in scheduler_args} == scheduler_args


# ----------------------------------------------------------------------------- (b) ours -> diffusers computes ours

def _ours_vs_diffusers(model, params, unet, x, t, y=None):
  """max |ours - diffusers| / max |diffusers|, float32, on NCHW `x`."""
  with torch.no_grad():
    labels = None if y is None else torch.from_numpy(np.asarray(y, np.int64))
    ref = unet(torch.from_numpy(x), torch.from_numpy(np.asarray(t, np.int64)), class_labels=labels).sample
  ref = ref.numpy().transpose(0, 2, 3, 1)
  ours = np.asarray(jax.jit(lambda p, x, t, y: model.apply({'params': p}, x, t, y))(
      params, x.transpose(0, 2, 3, 1), jnp.asarray(t, jnp.int32), None if y is None else jnp.asarray(y, jnp.int32)))
  assert ours.shape == ref.shape
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_exported_model_computes_our_outputs_and_loads_as_a_pipeline(tmp_path):
  config = _config()
  config.diffusion.update(schedule='cosine', var_type='fixedsmall', mean_type='v')
  config.sample.clip_denoised = False
  workdir, model, params, ema_params = _workdir(tmp_path, config)
  assert export.main(['--workdir', workdir, '--out', str(tmp_path / 'ema')]) == 0
  assert export.main(['--workdir', workdir, '--out', str(tmp_path / 'raw'), '--noema']) == 0

  x = np.random.RandomState(0).uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32)
  t = [0, 417, 999]
  ema_unet = UNet2DModel.from_pretrained(tmp_path / 'ema' / 'unet').eval()
  raw_unet = UNet2DModel.from_pretrained(tmp_path / 'raw' / 'unet').eval()
  assert _ours_vs_diffusers(model, ema_params, ema_unet, x, t) <= 1e-5  # the default is the EMA parameters
  assert _ours_vs_diffusers(model, params, raw_unet, x, t) <= 1e-5
  assert _ours_vs_diffusers(model, params, ema_unet, x, t) > 0.1  # (the two sets differ)
  # ...and the converter reads the folder back to the very same parameters and diffusion.
  back, overrides = convert.load_diffusers_checkpoint(str(tmp_path / 'ema'))
  same = jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b), back, ema_params)
  assert all(jax.tree_util.tree_leaves(same))
  assert overrides['diffusion']['schedule'] == 'cosine' and overrides['model']['ch_mult'] == (1, 2)

  pipe = DDPMPipeline.from_pretrained(tmp_path / 'ema')
  assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDPMScheduler)
  sc = pipe.scheduler.config
  assert (sc.num_train_timesteps, sc.beta_schedule, sc.variance_type, sc.prediction_type, sc.clip_sample) == (
      1000, 'squaredcos_cap_v2', 'fixed_small', 'v_prediction', False)
  ours = schedules.get_betas('cosine', 1000)
  assert np.abs(pipe.scheduler.betas.numpy() - ours).max() <= 1e-6  # diffusers' cosine is ours, in float32
  images = pipe(batch_size=1, num_inference_steps=2, output_type='np', generator=torch.Generator().manual_seed(0))
  assert images.images.shape == (1, 16, 16, 3) and np.isfinite(images.images).all()


def test_class_conditional_model_exports_its_labels_and_says_what_diffusers_lacks(tmp_path, capsys):
  config = _config(num_classes=3)
  config.diffusion.var_type = 'learned_range'
  workdir, model, _, ema_params = _workdir(tmp_path, config)
  assert export.main(['--workdir', workdir, '--out', str(tmp_path / 'out')]) == 0
  printed = capsys.readouterr().out
  assert 'note: class-conditional model' in printed and 'classifier-free guidance' in printed

  unet = UNet2DModel.from_pretrained(tmp_path / 'out' / 'unet').eval()
  assert unet.config.num_class_embeds == 4 and unet.config.out_channels == 6
  x = np.random.RandomState(1).uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32)
  # Every label, the null label 3 included, computes the same network in diffusers.
  assert _ours_vs_diffusers(model, ema_params, unet, x, [5, 100, 500, 999], y=[0, 1, 2, 3]) <= 1e-5


def test_schedules_without_a_diffusers_name_are_exported_as_trained_betas(tmp_path):
  config = _config()
  config.diffusion.update(schedule='warmup10', beta_end=0.02, num_timesteps=100)
  workdir, *_ = _workdir(tmp_path, config)
  export.export(workdir, str(tmp_path / 'out'))
  scheduler = DDPMScheduler.from_pretrained(tmp_path / 'out' / 'scheduler')
  np.testing.assert_allclose(scheduler.betas.numpy(), schedules.get_betas('warmup10', 100, 1e-4, 0.02), rtol=1e-6)
  assert json.loads((tmp_path / 'out' / 'model_index.json').read_text())['unet'] == ['diffusers', 'UNet2DModel']


# ------------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize('field, value, needle', [
    ('diffusion.mean_type', 'xprev', "diffusion.mean_type='xprev' cannot be exported"),
    ('diffusion.var_type', 'learned', "diffusion.var_type='learned' cannot be exported"),
    ('model.resamp_with_conv', False, 'model.resamp_with_conv=False cannot be exported'),
])
def test_what_diffusers_cannot_represent_is_one_line_before_anything_is_written(tmp_path, capsys, field, value,
                                                                                 needle):
  config = _config()
  section, key = field.split('.')
  config[section][key] = value
  workdir = str(tmp_path / 'run')
  workdir_config.write(config, workdir)  # no checkpoint needed: the config alone is refused
  assert export.main(['--workdir', workdir, '--out', str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('ddpm_jax.export: error: ') and needle in err, err
  assert not os.path.exists(tmp_path / 'out')


def test_bad_flags_missing_config_and_occupied_output_are_one_line(tmp_path, capsys):
  config = _config()
  workdir, *_ = _workdir(tmp_path, config)
  (tmp_path / 'taken').mkdir()
  (tmp_path / 'taken' / 'keep.txt').write_text('mine')
  cases = [
      (['--out', str(tmp_path / 'x')], '--workdir'),
      (['--workdir', workdir, '--out', str(tmp_path / 'x'), '--step=-1'], '--step'),
      (['--workdir', workdir, '--out', str(tmp_path / 'x'), '--colour=blue'], 'colour'),
      (['--workdir', workdir, '--out', str(tmp_path / 'x'), 'stray'], 'unexpected arguments'),
      (['--workdir', str(tmp_path / 'nothing'), '--out', str(tmp_path / 'x')], 'nothing does not exist'),
      (['--workdir', workdir, '--out', str(tmp_path / 'x'), '--step=3'], 'no checkpoint for step 3'),
      (['--workdir', workdir, '--out', str(tmp_path / 'taken')], 'already exists and is not an empty directory'),
  ]
  for argv, needle in cases:
    assert export.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and needle in err, (argv, err)
  assert not os.path.exists(tmp_path / 'x')
  assert os.listdir(tmp_path / 'taken') == ['keep.txt']


def test_a_checkpoint_that_does_not_fit_its_config_is_refused(tmp_path):
  workdir, *_ = _workdir(tmp_path, _config())
  workdir_config.write(_config(ch=64), workdir)  # config.json now describes another network
  helpers.assert_one_line_error(lambda: export.export(workdir, str(tmp_path / 'out')),
                                'does not hold the network its config.json describes', error=export.ExportError)
  assert not os.path.exists(tmp_path / 'out')


def test_a_failed_write_leaves_no_folder(tmp_path, monkeypatch):
  workdir, *_ = _workdir(tmp_path, _config())
  (tmp_path / 'empty').mkdir()  # an existing empty --out is allowed, and must stay as it was

  def disk_full(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr('safetensors.numpy.save_file', disk_full)
  for out in ('out', 'empty'):
    with pytest.raises(OSError):
      export.export(workdir, str(tmp_path / out))
  assert sorted(os.listdir(tmp_path)) == ['empty', 'run']  # no half folder, no temporary left behind
  assert os.listdir(tmp_path / 'empty') == []


def test_command_line(tmp_path):
  workdir, *_ = _workdir(tmp_path, _config())
  out = tmp_path / 'published'
  proc = subprocess.run([sys.executable, '-m', 'ddpm_jax.export', f'--workdir={workdir}', f'--out={out}'],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ''  # no library chatter (orbax's read-only manager notes) on the console
  assert f'wrote {out}' in proc.stdout and 'EMA parameters of step 7' in proc.stdout
  assert sorted(os.listdir(out)) == ['model_index.json', 'scheduler', 'unet']
  assert sorted(os.listdir(out / 'unet')) == ['config.json', 'diffusion_pytorch_model.safetensors']
