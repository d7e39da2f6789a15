"""models/ops.py: the U-Net's conv and dense ops against `lax`'s own autodiff, and the kernels each platform's
lowering picks (CPU: oneDNN's, or XLA's with the weight gradient as GEMMs; GPU/TPU: XLA's and autodiff's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import test as test_config
from ddpm_jax import models
from ddpm_jax.models import onednn
from ddpm_jax.models import ops

_DN = ('NHWC', 'HWIO', 'NHWC')
_SAME = ((1, 1), (1, 1))


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _conv_inputs(shape, seed=0):
  b, h, w, c_in, c_out = shape
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kx, (b, h, w, c_in)), jax.random.normal(kw, (3, 3, c_in, c_out)),
          jax.random.normal(kg, (b, h, w, c_out)))


def _lax_conv(x, k):
  return lax.conv_general_dilated(x, k, (1, 1), _SAME, dimension_numbers=lax.conv_dimension_numbers(
      x.shape, k.shape, _DN))


def _ops_conv(x, k):
  return ops.conv_general_dilated(x, k, (1, 1), _SAME, dimension_numbers=lax.conv_dimension_numbers(
      x.shape, k.shape, _DN))


@pytest.mark.parametrize('shape', [(2, 8, 8, 5, 7), (3, 6, 10, 16, 4)])
def test_conv_value_and_gradients_match_lax(shape):
  x, kernel, g = _conv_inputs(shape)
  y_ref, vjp_ref = jax.vjp(_lax_conv, x, kernel)
  y, vjp = jax.vjp(_ops_conv, x, kernel)
  np.testing.assert_array_equal(y, y_ref)
  for got, want in zip(jax.jit(vjp)(g), vjp_ref(g)):
    assert got.shape == want.shape
    assert _rel_err(got, want) < 1e-5


def test_other_convolutions_fall_through_to_lax():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  kernel = jax.random.normal(jax.random.key(2), (3, 3, 4, 6))
  dn = lax.conv_dimension_numbers(x.shape, kernel.shape, _DN)
  args = ((2, 2), ((0, 1), (0, 1)))  # the U-Net's strided downsampling conv
  f = lambda k: ops.conv_general_dilated(x, k, *args, dimension_numbers=dn).sum()
  f_ref = lambda k: lax.conv_general_dilated(x, k, *args, dimension_numbers=dn).sum()
  assert 'custom_vjp' not in str(jax.make_jaxpr(jax.grad(f))(kernel))
  np.testing.assert_array_equal(jax.grad(f)(kernel), jax.grad(f_ref)(kernel))


@pytest.mark.parametrize('shape', [(2, 4, 4, 6, 5), (3, 7, 9)])
def test_dense_value_and_gradients_match_lax(shape):
  *lead, c_in, c_out = shape
  kx, kw, kg = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (*lead, c_in))
  kernel = jax.random.normal(kw, (c_in, c_out))
  g = jax.random.normal(kg, (*lead, c_out))
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  y_ref, vjp_ref = jax.vjp(lambda x, k: lax.dot_general(x, k, dims), x, kernel)
  y, vjp = jax.vjp(lambda x, k: ops.dot_general(x, k, dims), x, kernel)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.jit(vjp)(g), vjp_ref(g)):
    assert got.shape == want.shape
    assert _rel_err(got, want) < 1e-5


def test_other_dot_generals_fall_through_to_lax():
  x = jax.random.normal(jax.random.key(4), (2, 3, 4))
  y = jax.random.normal(jax.random.key(5), (2, 4, 5))
  dims = (((2,), (1,)), ((0,), (0,)))  # a batched matmul is not a Dense
  f = lambda y: ops.dot_general(x, y, dims).sum()
  assert 'custom_vjp' not in str(jax.make_jaxpr(jax.grad(f))(y))
  np.testing.assert_array_equal(jax.grad(f)(y), jax.grad(lambda y: lax.dot_general(x, y, dims).sum())(y))


def _lowered_text(fn, platform, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize('platform', ['cuda', 'rocm', 'tpu'])
def test_accelerator_lowering_has_autodiffs_weight_gradients(platform):
  x, kernel, g = _conv_inputs((2, 8, 8, 4, 6))
  conv_wgrad = lambda conv: (lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0])  # noqa: E731
  # On the CPU the weight gradient is oneDNN's (tests/test_onednn.py: or 9 GEMMs without it); for an accelerator,
  # autodiff's one convolution.
  cpu = _lowered_text(conv_wgrad(_ops_conv), 'cpu', x, kernel, g)
  assert '@ddpm_conv3x3_weight_grad' in cpu and 'stablehlo.convolution' not in cpu
  ours, ref = (_lowered_text(conv_wgrad(conv), platform, x, kernel, g) for conv in (_ops_conv, _lax_conv))
  assert 'stablehlo.while' not in ours
  assert ours.count('stablehlo.convolution') == ref.count('stablehlo.convolution') == 1
  # The dense weight gradient: on the CPU behind an optimization barrier; for an accelerator, autodiff's dot.
  dims = (((3,), (0,)), ((), ()))
  dense_wgrad = lambda x, k, g: jax.vjp(lambda k: ops.dot_general(x, k, dims), k)[1](g)[0]  # noqa: E731
  w = jax.random.normal(jax.random.key(6), (4, 6))
  assert 'optimization_barrier' in _lowered_text(dense_wgrad, 'cpu', x, w, g)
  assert 'optimization_barrier' not in _lowered_text(dense_wgrad, platform, x, w, g)


@pytest.fixture(params=['onednn', 'xla'])
def cpu_kernels(request, monkeypatch):
  """The CPU's convolutions: oneDNN's, or XLA's with the 9-GEMM weight gradient (what a CPU without oneDNN runs)."""
  if request.param == 'xla':
    monkeypatch.setenv(onednn.SWITCH_ENV, '0')
  jax.clear_caches()  # JAX reuses traces, and with them the kernel choice made when a function was first traced
  yield request.param
  monkeypatch.undo()
  jax.clear_caches()


def test_unet_gradients_equal_those_of_the_accelerator_program(cpu_kernels):
  """The U-Net's gradient as the CPU computes it == the program lowered for a GPU (autodiff's weight gradients)
  compiled and run on this CPU: the kernels give the same gradients from the same model."""
  config = test_config.get_config()
  config.data.image_size, config.model.attn_resolutions = 16, (8,)  # every block kind, at a quarter of the pixels
  model = models.create_model(config)
  params = models.init_params(model, jax.random.key(0))
  # The original init zeroes the last conv of every block (and conv_out), which would zero most gradients.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  x = jax.random.normal(jax.random.key(1), (2, model.image_size, model.image_size, model.in_ch))
  t = jnp.array([3, 17])
  grad_fn = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({'params': p}, x, t, train=False) ** 2)))
  for_gpu = grad_fn.trace(params).lower(lowering_platforms=('cuda',))
  assert 'stablehlo.while' not in for_gpu.as_text()
  for_cpu = grad_fn.trace(params).lower(lowering_platforms=('cpu',)).as_text()
  if cpu_kernels == 'onednn':
    assert '@ddpm_conv3x3_weight_grad' in for_cpu and 'stablehlo.while' not in for_cpu
  else:
    assert 'ddpm_conv3x3' not in for_cpu and 'stablehlo.while' in for_cpu
  grads, grads_xla = grad_fn(params), for_gpu.compile()(params)
  assert jax.tree.structure(grads) == jax.tree.structure(grads_xla)
  # Relative to each leaf, or to 1e-4 of the whole gradient for smaller leaves: the biases of convolutions that feed
  # a GroupNorm, whose gradient is 0 up to rounding (GroupNorm removes each group's mean).
  total = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads_xla)))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_xla)):
    scale = max(np.linalg.norm(np.asarray(want, np.float64)), 1e-4 * total)
    assert np.linalg.norm(np.asarray(got, np.float64) - want) < 1e-4 * scale
