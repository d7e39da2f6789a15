"""models/onednn.py: oneDNN's three convolution passes against XLA's, where the CPU program uses them, the switch,
and the build: once per machine into the cache, and XLA's kernels where it cannot be built."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax import lax

from ddpm_jax.models import onednn
from ddpm_jax.models import ops

_DN = ('NHWC', 'HWIO', 'NHWC')


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _xla_conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)


def _inputs(shape, seed=0):
  b, h, w, c_in, c_out = shape
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kx, (b, h, w, c_in)), jax.random.normal(kw, (3, 3, c_in, c_out)),
          jax.random.normal(kg, (b, h, w, c_out)))


def test_the_kernels_build_and_load_here():
  # requirements.txt installs oneDNN on Linux x86-64, where CI runs: without it the CPU trains 1.4-1.5x slower.
  assert onednn.available()


# Odd sizes, non-square images, one input or one output channel (conv_in / conv_out), the quickstart's widths.
@pytest.mark.parametrize('shape', [(2, 8, 8, 5, 7), (3, 6, 10, 16, 4), (1, 7, 7, 1, 32), (2, 5, 9, 32, 1),
                                   (4, 14, 14, 96, 64)])
def test_each_pass_equals_xlas(shape):
  x, w, g = _inputs(shape)
  y_ref, vjp_ref = jax.vjp(_xla_conv, x, w)
  dx_ref, dw_ref = vjp_ref(g)
  y = jax.jit(onednn.conv3x3)(x, w)
  dx = jax.jit(onednn.conv3x3_input_grad)(g, w)
  dw = jax.jit(onednn.conv3x3_weight_grad)(x, g)
  for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _rel_err(got, want) < 1e-5


def test_under_vmap_each_example_is_one_call():
  x, w, _ = _inputs((2, 6, 6, 3, 4))
  xs = jax.numpy.stack([x, 2 * x + 1, -x])
  np.testing.assert_allclose(jax.vmap(onednn.conv3x3, (0, None))(xs, w),
                             jax.vmap(_xla_conv, (0, None))(xs, w), rtol=1e-5, atol=1e-5)


@pytest.fixture
def fresh_traces():
  # JAX reuses a function's trace, and with it the kernel choice made when it was first traced.
  jax.clear_caches()
  yield
  jax.clear_caches()


def _cpu_program(shape=(2, 8, 8, 4, 6)):
  x, w, g = _inputs(shape)
  conv = lambda x, w: ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)  # noqa: E731

  def step(x, w, g):
    y, vjp = jax.vjp(conv, x, w)
    return y, vjp(g)

  return jax.jit(step).trace(x, w, g).lower(lowering_platforms=('cpu',)).as_text()


@pytest.mark.usefixtures('fresh_traces')
def test_the_cpu_program_calls_onednn_unless_switched_off(monkeypatch):
  program = _cpu_program()
  for name in ('forward', 'input_grad', 'weight_grad'):
    assert f'@ddpm_conv3x3_{name}' in program
  assert 'stablehlo.convolution' not in program
  monkeypatch.setenv(onednn.SWITCH_ENV, '0')
  jax.clear_caches()
  assert not onednn.available()
  program = _cpu_program()
  assert 'ddpm_conv3x3' not in program
  assert 'stablehlo.while' in program  # the weight gradient as 9 GEMMs in a loop


_PROBE = '''
import sys
from absl import logging
logging.set_verbosity(logging.INFO)
from ddpm_jax.models import onednn
print(onednn.available())
'''


def _probe(cache_home, path):
  env = dict(os.environ, XDG_CACHE_HOME=str(cache_home), PATH=str(path))
  env.pop(onednn.SWITCH_ENV, None)
  done = subprocess.run([sys.executable, '-c', _PROBE], env=env, capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 0, done.stderr
  return done.stdout.strip() == 'True', done.stderr


def test_built_once_into_the_cache_and_xlas_kernels_without_a_compiler(tmp_path):
  no_compiler = tmp_path / 'empty_bin'
  no_compiler.mkdir()
  ok, log = _probe(tmp_path / 'cache', no_compiler)
  assert not ok
  assert "CPU convolutions use XLA's kernels (oneDNN's are not used: no g++ to build the kernels with)" in log
  assert not list((tmp_path / 'cache').rglob('*.so*'))  # nothing half-written left behind
  ok, _ = _probe(tmp_path / 'cache', os.environ['PATH'])
  assert ok
  built = list((tmp_path / 'cache' / 'ddpm_jax' / 'kernels').iterdir())
  assert len(built) == 1 and built[0].suffix == '.so'
  ok, log = _probe(tmp_path / 'cache', no_compiler)  # the next process loads the built library: no g++ needed
  assert ok and "XLA's kernels" not in log
  built[0].write_bytes(b'not a shared library')  # damaged after it was written
  ok, log = _probe(tmp_path / 'cache', os.environ['PATH'])
  assert ok and 'could not be loaded' in log
  kept = sorted(p.name for p in built[0].parent.iterdir())
  assert kept[0] == built[0].name and kept[1].startswith(built[0].name + '.unloadable-') and len(kept) == 2
  assert (built[0].parent / kept[1]).read_bytes() == b'not a shared library'  # set aside, not deleted


def test_a_handler_called_with_shapes_that_do_not_fit_fails_instead_of_overrunning_a_buffer():
  x, w, _ = _inputs((2, 8, 8, 5, 7))
  wrong = jax.ffi.ffi_call('ddpm_conv3x3_forward', jax.ShapeDtypeStruct((2, 8, 8, 9), x.dtype))  # 9, not 7
  with pytest.raises(Exception, match="shapes do not fit one 3x3 stride-1 'same' convolution"):
    jax.block_until_ready(jax.jit(wrong)(x, w))
