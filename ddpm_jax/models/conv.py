"""Convolutions whose weight gradients are computed as explicit matrix products (faster on XLA:CPU).

XLA:CPU (jaxlib 0.10: YNNPACK kernels) runs the forward and input-gradient convolutions of the U-Net's 3x3 layers
at 250-300 GFLOP/s on the benchmark VM, but the weight gradient (JAX's transpose rule: a convolution with a HxW
"kernel" and a 3x3 output) 4-5x slower (`bench/conv_wgrad.py`, BENCHMARKS.md). The weight gradient is a sum over
the 9 kernel offsets of dense products dW[i, j] = sum_{b,h,w} x_pad[b, h+i, w+j, :]^T g[b, h, w, :], each a plain
GEMM; run one after another in a loop they take ~2.5x less time than XLA's convolution-shaped weight gradient at
128 channels.

`conv3x3_same` is a drop-in for `lax.conv_general_dilated` in `flax.linen.Conv` (same parameters, same forward,
gradients equal up to float32 summation order); any other convolution falls through to `lax.conv_general_dilated`.
`dense_dot_general` does the same for `flax.linen.Dense` over the channel axis of (B, H, W, C) activations (the
U-Net's 1x1 shortcut and attention projections): the forward and input gradient are autodiff's, the weight gradient
keeps XLA:CPU from writing g transposed out of its producer fusion (see `_dense_bwd`).

Both are selected by `config.model.conv_wgrad` ('auto': on CPU only; GPUs/TPUs keep their vendor kernels).
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
  # Input gradient: autodiff's own (a forward convolution with the flipped kernel, on XLA's fast path).
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


@jax.custom_vjp
def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_fwd(x, w):
  return _dense(x, w), (x, w)


def _dense_bwd(residuals, g):
  x, w = residuals
  dx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
  # dW = x^T g over all B*H*W rows. Left to autodiff, XLA:CPU lays g out transposed for the GEMM and writes that
  # transpose from inside the fusion that produces g (GroupNorm's backward, a concatenation's split), ~3-5x slower
  # than the same fusion writing rows; the barrier keeps g's producer row-major and the transpose a plain copy.
  g_rows = lax.optimization_barrier(g.reshape(-1, w.shape[1]))
  dw = jnp.dot(g_rows.T, x.reshape(-1, w.shape[0]), preferred_element_type=jnp.float32).T
  return dx, dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`lax.dot_general` for `flax.linen.Dense` (x[..., C_in] @ W[C_in, C_out]) with the weight gradient above."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and not lhs_batch
      and not rhs_batch and precision is None and preferred_element_type is None and not kwargs):
    return _dense(lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)
