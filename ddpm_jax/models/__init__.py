"""Denoising networks: `create_model(config)` builds the DDPM U-Net (Ho et al. 2020, App. B) from `config.model`."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax import diffusion as diffusion_lib

from ddpm_jax.models.unet import AttnBlock, ResnetBlock, UNet, get_timestep_embedding

__all__ = ['UNet', 'ResnetBlock', 'AttnBlock', 'get_timestep_embedding', 'create_model', 'DTYPES',
           'image_shape', 'init_params', 'param_shapes', 'count_params']

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}  # model.dtype: the activations' dtype


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the images the model sees, samples and is trained on: `data.pad_to` when > 0 (padded digits),
  else `data.image_size`. The input pipeline checks that the dataset's images come out in this shape."""
  side = int(config.data.get('pad_to', 0) or 0) or int(config.data.image_size)
  return side, side, int(config.data.num_channels)


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the U-Net described by `config.model`, `config.data` and `config.diffusion.var_type`.

  Output channels are data.num_channels, doubled for learned variances (mean/eps and the variance interpolation
  values v of Nichol & Dhariwal 2021, eq. 15, or log-variances). Call it as
  `model.apply({'params': p}, x, t, y=None, train=False, rngs={'dropout': key})`.
  """
  m = config.model
  num_channels = int(config.data.num_channels)
  return UNet(
      ch=int(m.ch),
      out_ch=num_channels * (2 if diffusion_lib.learns_variance(config.diffusion.var_type) else 1),
      ch_mult=tuple(int(c) for c in m.ch_mult),
      num_res_blocks=int(m.num_res_blocks),
      attn_resolutions=tuple(int(r) for r in m.attn_resolutions),
      dropout=float(m.dropout),
      resamp_with_conv=bool(m.resamp_with_conv),
      image_size=image_shape(config)[0],
      in_ch=num_channels,
      num_classes=int(m.get('num_classes', 0) or 0),
      dtype=DTYPES[m.dtype],
      remat=bool(m.get('remat', False)),
  )


def _dummy_inputs(model: UNet, batch_size: int = 1):
  x = jnp.zeros((batch_size, model.image_size, model.image_size, model.in_ch), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.int32)
  return x, t


def init_params(model: UNet, rng: jax.Array) -> Any:
  """Initialises the parameters (the original initialisation: fan_avg uniform, zero-scale last convs)."""
  x, t = _dummy_inputs(model)
  # Jitted: initialising op by op dispatches thousands of small computations (slow for the 114M models).
  return jax.jit(lambda key: model.init({'params': key}, x, t, train=False)['params'])(rng)


def param_shapes(model: UNet) -> Any:
  """Parameter pytree of `jax.ShapeDtypeStruct`s, without computing anything."""
  return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))


def count_params(params: Any) -> int:
  """Number of scalar parameters in a pytree of arrays or ShapeDtypeStructs."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
