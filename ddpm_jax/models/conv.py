"""A 3x3 stride-1 convolution whose weight gradient is computed as matrix products (faster on XLA:CPU).

XLA:CPU runs the forward and input-gradient convolutions of the U-Net's 3x3 layers through Eigen's spatial
convolution at a good fraction of peak, but lowers the weight gradient (JAX's transpose rule: a convolution with a
HxW "kernel" and a 3x3 output) to a path that is 3-5x slower than the forward on 128-channel layers
(`bench/throughput.py --breakdown`, BENCHMARKS.md). The weight gradient is a sum over the 9 kernel offsets of
dense products dW[i, j] = sum_{b,h,w} x_pad[b, h+i, w+j, :]^T g[b, h, w, :], each a plain GEMM, which XLA:CPU runs
at ~1.8x the speed of its convolution-shaped weight gradient at 128 channels (bench/conv_wgrad.py).

`conv3x3_same` is a drop-in for `lax.conv_general_dilated` in `flax.linen.Conv` (same parameters, same forward,
gradients equal up to float32 summation order); any other convolution falls through to `lax.conv_general_dilated`.
It is selected by `config.model.conv_wgrad` ('auto': on CPU only; GPUs/TPUs keep their vendor kernels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSION_NUMBERS)


@jax.custom_vjp
def _conv3x3_same(x: jax.Array, w: jax.Array) -> jax.Array:
  return _conv(x, w)


def _fwd(x, w):
  return _conv(x, w), (x, w)


def _bwd(residuals, g):
  x, w = residuals
  c_in, c_out = w.shape[2], w.shape[3]
  # Input gradient: autodiff's own (a forward convolution with the flipped kernel, already on Eigen's fast path).
  dx, = jax.vjp(lambda x: _conv(x, w), x)[1](g)
  # Weight gradient: 9 GEMMs (C_out x BHW) @ (BHW x C_in) over the shifted, padded input, one per loop iteration:
  # XLA:CPU runs independent ops concurrently, and 9 unrolled GEMMs that each use every core then compete for the
  # cores and caches (1.5x slower at 128 channels, bench/conv_wgrad.py); a loop body runs them one after another.
  batch, height, width = x.shape[:3]
  x_pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  g_t = g.reshape(-1, c_out).T

  def offset_gemm(k, dw):
    shifted = lax.dynamic_slice(x_pad, (0, k // 3, k % 3, 0), (batch, height, width, c_in)).reshape(-1, c_in)
    return dw.at[k].set(jnp.dot(g_t, shifted, preferred_element_type=jnp.float32))

  dw = lax.fori_loop(0, 9, offset_gemm, jnp.zeros((9, c_out, c_in), jnp.float32))  # (9, C_out, C_in)
  dw = dw.swapaxes(1, 2).reshape(3, 3, c_in, c_out).astype(w.dtype)
  return dx, dw


_conv3x3_same.defvjp(_fwd, _bwd)


def conv3x3_same(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                 feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with a GEMM weight gradient for NHWC 3x3 stride-1 'same' convolutions."""
  if (lhs.ndim == 4 and rhs.ndim == 4 and rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1)
      and not isinstance(padding, str) and [tuple(p) for p in padding] == [(1, 1), (1, 1)]
      and lhs_dilation in (None, (1, 1)) and rhs_dilation in (None, (1, 1)) and feature_group_count == 1
      and batch_group_count == 1 and precision is None and preferred_element_type is None
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSION_NUMBERS)):
    return _conv3x3_same(lhs, rhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                  precision=precision, preferred_element_type=preferred_element_type)
