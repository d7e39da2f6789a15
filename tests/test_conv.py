"""The GEMM weight-gradient convolution (models/conv.py) against lax.conv_general_dilated's own autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import test as test_config
from ddpm_jax import models
from ddpm_jax.models import conv as conv_lib

_DN = ('NHWC', 'HWIO', 'NHWC')


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize('shape', [(2, 8, 8, 5, 7), (3, 6, 10, 16, 4)])
def test_value_and_gradients_match_lax(shape):
  b, h, w, c_in, c_out = shape
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (b, h, w, c_in))
  kernel = jax.random.normal(kw, (3, 3, c_in, c_out))
  g = jax.random.normal(kg, (b, h, w, c_out))
  dn = lax.conv_dimension_numbers(x.shape, kernel.shape, _DN)

  def ref(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)

  def ours(x, k):
    return conv_lib.conv3x3_same(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)

  y_ref, vjp_ref = jax.vjp(ref, x, kernel)
  y, vjp = jax.vjp(ours, x, kernel)
  np.testing.assert_array_equal(y, y_ref)
  for got, want in zip(vjp(g), vjp_ref(g)):
    assert _rel_err(got, want) < 1e-5


def test_other_convolutions_fall_through_to_lax():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  kernel = jax.random.normal(jax.random.key(2), (3, 3, 4, 6))
  dn = lax.conv_dimension_numbers(x.shape, kernel.shape, _DN)
  args = ((2, 2), ((0, 1), (0, 1)))  # the U-Net's strided downsampling conv
  f = lambda k: conv_lib.conv3x3_same(x, k, *args, dimension_numbers=dn).sum()
  f_ref = lambda k: lax.conv_general_dilated(x, k, *args, dimension_numbers=dn).sum()
  jaxpr = str(jax.make_jaxpr(jax.grad(f))(kernel))
  assert 'custom_vjp' not in jaxpr
  np.testing.assert_array_equal(jax.grad(f)(kernel), jax.grad(f_ref)(kernel))


def test_unet_gradients_are_the_same_with_either_wgrad():
  config = test_config.get_config()
  config.data.image_size, config.model.attn_resolutions = 16, (8,)  # every block kind, at a quarter of the pixels
  grads = {}
  for choice in ('xla', 'gemm'):
    config.model.conv_wgrad = choice
    model = models.create_model(config)
    assert model.gemm_wgrad == (choice == 'gemm')
    params = models.init_params(model, jax.random.key(0))
    # The original init zeroes the last conv of every block (and conv_out), which would zero most gradients.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    x = jax.random.normal(jax.random.key(1), (2, model.image_size, model.image_size, model.in_ch))
    t = jnp.array([3, 17])

    def loss(p):
      return jnp.mean(model.apply({'params': p}, x, t, train=False) ** 2)
    grads[choice] = jax.jit(jax.grad(loss))(params)
  assert jax.tree.structure(grads['xla']) == jax.tree.structure(grads['gemm'])
  for got, want in zip(jax.tree.leaves(grads['gemm']), jax.tree.leaves(grads['xla'])):
    assert np.linalg.norm(want) > 0
    assert _rel_err(got, want) < 1e-4


def test_auto_means_gemm_on_cpu_only():
  config = test_config.get_config()
  config.model.conv_wgrad = 'auto'
  assert models.uses_gemm_wgrad(config) == (jax.default_backend() == 'cpu')


@pytest.mark.parametrize('shape', [(2, 4, 4, 6, 5), (3, 7, 9)])
def test_dense_value_and_gradients_match_lax(shape):
  *lead, c_in, c_out = shape
  kx, kw, kg = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (*lead, c_in))
  kernel = jax.random.normal(kw, (c_in, c_out))
  g = jax.random.normal(kg, (*lead, c_out))
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  y_ref, vjp_ref = jax.vjp(lambda x, k: lax.dot_general(x, k, dims), x, kernel)
  y, vjp = jax.vjp(lambda x, k: conv_lib.dense_dot_general(x, k, dims), x, kernel)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.jit(vjp)(g), vjp_ref(g)):
    assert got.shape == want.shape
    assert _rel_err(got, want) < 1e-5


def test_other_dot_generals_fall_through_to_lax():
  x = jax.random.normal(jax.random.key(4), (2, 3, 4))
  y = jax.random.normal(jax.random.key(5), (2, 4, 5))
  dims = (((2,), (1,)), ((0,), (0,)))  # a batched matmul is not a Dense
  f = lambda y: conv_lib.dense_dot_general(x, y, dims).sum()
  assert 'custom_vjp' not in str(jax.make_jaxpr(jax.grad(f))(y))
  np.testing.assert_array_equal(jax.grad(f)(y), jax.grad(lambda y: lax.dot_general(x, y, dims).sum())(y))
