"""The U-Net's convolution and dense ops, each pass computed by the kernel its platform runs best.

Each choice is made when the program is lowered (`lax.platform_dependent`), not when the model is built: one model,
one parameter tree, serves CPU and accelerator hosts, and a program lowered for a GPU or TPU contains no trace of
the CPU kernels.

  * Accelerators: XLA's convolutions and autodiff's gradients (cuDNN / the TPU compiler's own kernels).
  * CPU, 3x3 stride-1 'same' float32 convolutions: oneDNN's forward, input-gradient and weight-gradient kernels
    through XLA's FFI (`models/onednn.py`), 2-4x faster than XLA:CPU's at the U-Net's shapes. Where oneDNN is not
    available, XLA's forward and input gradient, and the weight gradient as a sum over the 9 kernel offsets of
    plain GEMMs, dW[i, j] = sum_{b,h,w} x_pad[b, h+i, w+j, :]^T g[b, h, w, :]: XLA:CPU (jaxlib 0.10, YNNPACK) runs
    autodiff's weight gradient (a convolution with an HxW "kernel" and a 3x3 output) 4-5x slower than its forward
    at 128 channels, and the 9 GEMMs one after another ~2.5x faster than that (`bench/conv_wgrad.py`, BENCHMARKS.md).
  * CPU, dense layers over the channel axis (the 1x1 shortcut and attention projections on (B, H, W, C)
    activations): the same x^T g as autodiff's, with g kept row-major (see `_dense_weight_grad_cpu`).

`conv_general_dilated` is a drop-in for `flax.linen.Conv(conv_general_dilated=...)` and `dot_general` for
`flax.linen.Dense(dot_general=...)`: same parameters, same results up to float32 summation order.
Any other convolution or contraction falls through to `lax` unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ddpm_jax.models import onednn

_NHWC_HWIO = ('NHWC', 'HWIO', 'NHWC')


def _conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC_HWIO)


def _conv3x3_weight_grad_autodiff(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
  dw, = jax.vjp(lambda w: _conv3x3(x, w), w)[1](g)
  return dw


def _conv3x3_weight_grad_gemms(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
  # 9 GEMMs (C_out x BHW) @ (BHW x C_in) over the shifted, padded input, one per loop iteration: XLA:CPU runs
  # independent ops concurrently, and 9 unrolled GEMMs that each use every core then compete for the cores and
  # caches (1.5x slower at 128 channels, bench/conv_wgrad.py); a loop body runs them one after another.
  c_in, c_out = w.shape[2], w.shape[3]
  batch, height, width = x.shape[:3]
  x_pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  g_t = g.reshape(-1, c_out).T

  def offset_gemm(k, dw):
    shifted = lax.dynamic_slice(x_pad, (0, k // 3, k % 3, 0), (batch, height, width, c_in)).reshape(-1, c_in)
    return dw.at[k].set(jnp.dot(g_t, shifted, preferred_element_type=jnp.float32))

  dw = lax.fori_loop(0, 9, offset_gemm, jnp.zeros((9, c_out, c_in), jnp.float32))  # (9, C_out, C_in)
  return dw.swapaxes(1, 2).reshape(3, 3, c_in, c_out).astype(w.dtype)


def _conv3x3_input_grad_xla(g: jax.Array, w: jax.Array) -> jax.Array:
  # A forward convolution with the flipped kernel.
  return jax.vjp(lambda x: _conv3x3(x, w), jnp.zeros(g.shape[:3] + (w.shape[2],), g.dtype))[1](g)[0]


def _use_onednn(*arrays: jax.Array) -> bool:
  return all(a.dtype == jnp.float32 for a in arrays) and onednn.available()


def _conv3x3_cpu(x: jax.Array, w: jax.Array) -> jax.Array:
  return onednn.conv3x3(x, w) if _use_onednn(x, w) else _conv3x3(x, w)


def _conv3x3_input_grad_cpu(g: jax.Array, w: jax.Array) -> jax.Array:
  return onednn.conv3x3_input_grad(g, w) if _use_onednn(g, w) else _conv3x3_input_grad_xla(g, w)


def _conv3x3_weight_grad_cpu(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
  return onednn.conv3x3_weight_grad(x, g) if _use_onednn(x, w, g) else _conv3x3_weight_grad_gemms(x, w, g)


def _conv3x3_platform(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.platform_dependent(x, w, cpu=_conv3x3_cpu, default=_conv3x3)


@jax.custom_vjp
def _conv3x3_same(x: jax.Array, w: jax.Array) -> jax.Array:
  return _conv3x3_platform(x, w)


def _conv3x3_same_fwd(x, w):
  return _conv3x3_platform(x, w), (x, w)


def _conv3x3_same_bwd(residuals, g):
  x, w = residuals
  dx = lax.platform_dependent(g, w, cpu=_conv3x3_input_grad_cpu, default=_conv3x3_input_grad_xla)
  dw = lax.platform_dependent(x, w, g, cpu=_conv3x3_weight_grad_cpu, default=_conv3x3_weight_grad_autodiff)
  return dx, dw


_conv3x3_same.defvjp(_conv3x3_same_fwd, _conv3x3_same_bwd)


def _is_conv3x3_same(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, batch_group_count, precision, preferred_element_type) -> bool:
  return (lhs.ndim == 4 and rhs.ndim == 4 and rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1)
          and not isinstance(padding, str) and [tuple(p) for p in padding] == [(1, 1), (1, 1)]
          and lhs_dilation in (None, (1, 1)) and rhs_dilation in (None, (1, 1)) and feature_group_count == 1
          and batch_group_count == 1 and precision is None and preferred_element_type is None
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """`lax.conv_general_dilated`; NHWC 3x3 stride-1 'same' convolutions get the per-platform weight gradient."""
  if _is_conv3x3_same(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                      feature_group_count, batch_group_count, precision, preferred_element_type):
    return _conv3x3_same(lhs, rhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                  precision=precision, preferred_element_type=preferred_element_type)


def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_weight_grad_autodiff(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
  dw, = jax.vjp(lambda w: _dense(x, w), w)[1](g)
  return dw


def _dense_weight_grad_cpu(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
  # dW = x^T g over all B*H*W rows. Left to autodiff, XLA:CPU lays g out transposed for the GEMM and writes that
  # transpose from inside the fusion that produces g (GroupNorm's backward, a concatenation's split), ~3-5x slower
  # than the same fusion writing rows; the barrier keeps g's producer row-major and the transpose a plain copy.
  g_rows = lax.optimization_barrier(g.reshape(-1, w.shape[1]))
  dw = jnp.dot(g_rows.T, x.reshape(-1, w.shape[0]), preferred_element_type=jnp.float32).T
  return dw.astype(w.dtype)


@jax.custom_vjp
def _dense_last_axis(x: jax.Array, w: jax.Array) -> jax.Array:
  return _dense(x, w)


def _dense_last_axis_fwd(x, w):
  return _dense(x, w), (x, w)


def _dense_last_axis_bwd(residuals, g):
  x, w = residuals
  dx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
  dw = lax.platform_dependent(x, w, g, cpu=_dense_weight_grad_cpu, default=_dense_weight_grad_autodiff)
  return dx, dw


_dense_last_axis.defvjp(_dense_last_axis_fwd, _dense_last_axis_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`lax.dot_general`; a Dense contraction (x[..., C_in] @ W[C_in, C_out]) gets the per-platform weight gradient."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and not lhs_batch
      and not rhs_batch and precision is None and preferred_element_type is None and not kwargs):
    return _dense_last_axis(lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)
