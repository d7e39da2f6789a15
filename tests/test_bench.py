"""Smoke test of the benchmark scripts (bench/throughput.py, peer_torch.py, sample.py, profile_step.py,
cpu_kernels.py): each runs on configs/test.py with one timed call and prints one JSON object as its last line with
the documented keys and sane values."""

import json
import os
import subprocess
import sys

import pytest

from configs import test as test_config
from ddpm_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ['--config=configs/test.py', '--steps=1', '--warmup=0']
COMMANDS = {
    'throughput': ['bench/throughput.py'] + COMMON,
    'peer_torch': ['bench/peer_torch.py'] + COMMON + ['--batch_size=4'],
    'sample': ['bench/sample.py'] + COMMON + ['--batch_size=4', '--num_steps_override=2', '--ddim_steps=4'],
    'profile': ['bench/profile_step.py', '--config=configs/test.py', '--steps=1', '--batch_size=4', '--top=5'],
    'cpu_kernels': ['bench/cpu_kernels.py', '--config=configs/test.py', '--batch_size=4', '--rounds=1', '--calls=1'],
}
THROUGHPUT_KEYS = ('train_img_per_s', 'fwd_img_per_s', 'train_steps_per_s', 'compile_s', 'flops_per_train_step',
                   'mfu', 'device')


@pytest.fixture(scope='module')
def results():
  """Runs the scripts concurrently (they are mostly single-threaded compile/Python work) on one device."""
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # one CPU device, as a user runs them (conftest asks for 8 fake ones)
  procs = {name: subprocess.Popen([sys.executable] + cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, cmd in COMMANDS.items()}
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f'{name} failed:\n{stderr[-3000:]}'
    out[name] = json.loads(stdout.strip().splitlines()[-1])
  return out


def _test_config_param_count():
  """The U-Net of configs/test.py, counted from its parameter shapes (the count itself: tests/test_unet.py)."""
  return models.count_params(models.param_shapes(models.create_model(test_config.get_config())))


def test_throughput_json(results):
  res = results['throughput']
  for key in THROUGHPUT_KEYS:
    assert key in res, key
  assert res['train_img_per_s'] > 0 and res['fwd_img_per_s'] > 0 and res['compile_s'] > 0
  assert res['train_img_per_s'] == pytest.approx(res['train_steps_per_s'] * res['batch_size'])
  # XLA's count for forward + backward + optimizer is about 3x the forward's.
  assert 2 * res['flops_per_forward'] < res['flops_per_train_step'] < 5 * res['flops_per_forward']
  assert res['num_params'] == _test_config_param_count()
  assert res['mfu'] is None and res['device'].startswith('cpu')  # no known peak for a CPU


def test_cpu_kernels_json(results):
  res = results['cpu_kernels']
  for name in ('xla', 'onednn'):
    assert res[f'{name}_img_per_s'] == pytest.approx(res['batch_size'] / res[f'{name}_step_s'])
    assert len(res[f'{name}_rounds_s']) == 1
  assert res['onednn_speedup'] == pytest.approx(res['xla_step_s'] / res['onednn_step_s'])


def test_peer_json(results):
  res = results['peer_torch']
  for key in THROUGHPUT_KEYS:
    assert key in res, key
  assert res['train_img_per_s'] > 0 and res['fwd_img_per_s'] > 0
  assert res['num_params'] == _test_config_param_count()  # the same architecture as ours
  assert res['flops_per_train_step'] > 2 * res['flops_per_forward']


def test_sample_json(results):
  res = results['sample']
  for method, steps in (('ancestral', 20), ('ddim', 4)):
    row = res[method]
    assert row['steps_target'] == steps and row['steps_run'] == 2 and row['kind'] == 'extrapolated'
    assert res[f'{method}_img_per_s'] == pytest.approx(4 / (row['run_s'] / 2 * steps))


def test_profile_json(results):
  res = results['profile']
  categories = [res[f'{c}_ms'] for c in ('conv', 'GEMM', 'elementwise', 'layout', 'RNG', 'other')]
  assert all(c >= 0 for c in categories)
  assert res['conv_ms'] > 0 and res['GEMM_ms'] > 0 and res['elementwise_ms'] > 0
  assert res['sum_of_ops_ms'] == pytest.approx(sum(categories))
  # The union of the op intervals (sum minus overlap) fits in the step; the rest of the step is gaps.
  busy = res['sum_of_ops_ms'] - res['overlap_ms']
  assert 0 < busy <= res['step_ms'] * 1.001
  assert res['gaps_ms'] == pytest.approx(max(res['step_ms'] - busy, 0.0), abs=1e-6)
  top = [op['ms'] for op in res['top_ops']]
  assert len(top) == 5 and top == sorted(top, reverse=True) and top[0] <= res['sum_of_ops_ms']
