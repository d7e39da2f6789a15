"""The U-Net of Ho, Jain & Abbeel 2020 ("Denoising Diffusion Probabilistic Models", arXiv:2006.11239, §4, App. B).

A Flax Linen port of `diffusion_tf/models/unet.py` (the `unet2d16b2` family of the released code): a PixelCNN++-style
U-Net with a sinusoidal timestep embedding (Transformer positional encoding, §3.5 of Vaswani et al.), wide ResNet
blocks with GroupNorm(32) and swish, single-head self-attention at `attn_resolutions`, and skip connections from
every down-path block to the up path. With the same config it also computes exactly what diffusers' `UNet2DModel`
computes for the converted DDPM checkpoints (`ddpm_jax.convert`): `flip_sin_to_cos=False`, `freq_shift=1`,
`downsample_padding=0` (TF 'SAME' padding of a stride-2 3x3 conv = pad 0 before, 1 after), GroupNorm eps 1e-6,
attention scale C^-1/2.

Layout: NHWC everywhere (`nn.Conv`), 1x1 convolutions and attention projections as `nn.Dense` over the channel axis
(a plain matmul), attention with two einsums over the flattened H*W axis. The convolutions and projections take
their ops from `models/ops.py`, which picks the weight-gradient kernel per platform when the program is lowered.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models import group_norm
from ddpm_jax.models import ops

Dtype = Any

# tf.contrib.layers.group_norm defaults used by the original code (and norm_eps of the released diffusers configs).
GROUPNORM_GROUPS = 32
GROUPNORM_EPS = 1e-6


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """The original `nn.default_init`: variance scaling, fan_avg, uniform; scale 0 means 1e-10 (not exactly zero).

  The last conv of every ResNet block, the attention output projection and the output conv use scale 0, so each
  block starts as the identity and the freshly initialised network outputs ~0 (Ho et al. 2020, released code).
  """
  return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, 'fan_avg', 'uniform')


def _qkv_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
  """Initialises the fused (C, 3C) q/k/v kernel as three separate (C, C) `default_init()` kernels (as the original)."""
  c_in, c_out3 = shape
  init = default_init(1.0)
  return jnp.concatenate([init(k, (c_in, c_out3 // 3), dtype) for k in jax.random.split(key, 3)], axis=1)


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int) -> jax.Array:
  """Sinusoidal timestep embedding of the original code (`nn.get_timestep_embedding`, from tensor2tensor/Fairseq).

  emb[:, i] = sin(t * 10000^(-i / (d/2 - 1))) for i < d/2, then the matching cosines; zero-padded when d is odd.
  This is diffusers' `get_timestep_embedding(flip_sin_to_cos=False, downscale_freq_shift=1)`.

  Args:
    timesteps: (B,) integer or float timesteps.
    embedding_dim: d.

  Returns:
    (B, d) float32.
  """
  if timesteps.ndim != 1:
    raise ValueError(f'timesteps must have shape (B,), got {timesteps.shape}')
  half_dim = embedding_dim // 2
  # Frequencies are a trace-time constant; computed in float32 in the same order as the reference implementations.
  exponent = np.arange(half_dim, dtype=np.float32) * np.float32(-np.log(10000.0)) / np.float32(half_dim - 1)
  freqs = jnp.asarray(np.exp(exponent), jnp.float32)
  emb = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _group_norm(channels: int, dtype: Dtype, name: str) -> group_norm.GroupNorm:
  # 32 groups as the paper; gcd keeps tiny test/quickstart widths (C % 32 != 0) usable and equals 32 whenever
  # C is a multiple of 32 (every paper config). Statistics are reduced in float32 even for bf16 activations.
  return group_norm.GroupNorm(num_groups=int(np.gcd(GROUPNORM_GROUPS, channels)), epsilon=GROUPNORM_EPS,
                              dtype=dtype, name=name)


def _dense(features: int, dtype: Dtype, name: str, kernel_init: nn.initializers.Initializer) -> nn.Dense:
  # A 1x1 convolution over the channel axis (ops: its weight gradient is computed by the platform's best kernel).
  return nn.Dense(features, kernel_init=kernel_init, dtype=dtype, name=name, dot_general=ops.dot_general)


def _conv3x3(features: int, dtype: Dtype, name: str, init_scale: float = 1.0, stride: int = 1,
             padding=((1, 1), (1, 1))) -> nn.Conv:
  # ops only changes how the weight gradient is computed (per platform), never the parameters or the forward.
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=padding, kernel_init=default_init(init_scale),
                 dtype=dtype, name=name, conv_general_dilated=ops.conv_general_dilated)


class ResnetBlock(nn.Module):
  """ResNet block: GN, swish, conv3x3, + Dense(swish(temb)), GN, swish, dropout, conv3x3 (zero-init), + shortcut.

  The shortcut is a 1x1 conv (`nin_shortcut`, a Dense over channels) when the channel count changes.
  `temb_act` is swish(temb), computed once by the caller (the original applies the same swish in every block).
  """
  out_ch: int
  dropout: float
  deterministic: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb_act: jax.Array) -> jax.Array:
    c_in = x.shape[-1]
    h = nn.swish(_group_norm(c_in, self.dtype, 'norm1')(x))
    h = _conv3x3(self.out_ch, self.dtype, 'conv1')(h)
    # Add in the timestep embedding, broadcast over H, W.
    h = h + nn.Dense(self.out_ch, kernel_init=default_init(), dtype=self.dtype, name='temb_proj')(temb_act)[
        :, None, None, :]
    h = nn.swish(_group_norm(self.out_ch, self.dtype, 'norm2')(h))
    if self.dropout > 0:
      h = nn.Dropout(rate=self.dropout, deterministic=self.deterministic)(h)
    h = _conv3x3(self.out_ch, self.dtype, 'conv2', init_scale=0.0)(h)
    if c_in != self.out_ch:
      x = _dense(self.out_ch, self.dtype, 'nin_shortcut', default_init())(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H*W positions with a residual connection (scale C^-1/2).

  q, k, v come from one fused (C, 3C) projection (one matmul instead of three); the output projection is zero-init.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = _group_norm(c, self.dtype, 'norm')(x)
    qkv = _dense(3 * c, self.dtype, 'qkv', _qkv_init)(h)
    qkv = qkv.reshape(b, hgt * wid, 3 * c)   # merges contiguous axes: no data movement
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    # Scaling q (HW*C values) is cheaper than scaling the (HW, HW) logits.
    w = jnp.einsum('bic,bjc->bij', q * jnp.asarray(c ** -0.5, q.dtype), k)
    # Softmax in float32 also for bf16 activations (as diffusers' upcast_softmax).
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum('bij,bjc->bic', w, v).reshape(b, hgt, wid, c)
    h = _dense(c, self.dtype, 'proj_out', default_init(0.0))(h)
    return x + h


def _upsample_nearest(x: jax.Array) -> jax.Array:
  """2x nearest-neighbour upsampling (TF's align_corners nearest resize at exactly 2x is the same repeat)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def _avg_pool2(x: jax.Array) -> jax.Array:
  """2x2 average pooling, stride 2 (tf.nn.avg_pool(x, 2, 2, 'SAME') on even sizes)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class UNet(nn.Module):
  """The DDPM U-Net (Ho et al. 2020, App. B; `diffusion_tf/models/unet.py`), optionally class-conditional.

  Attributes:
    ch: base channel count; the timestep embedding has 4*ch channels.
    out_ch: output channels (C, or 2C for learned variances).
    ch_mult: channel multiplier per resolution level.
    num_res_blocks: ResNet blocks per level on the down path (num_res_blocks + 1 on the up path).
    attn_resolutions: feature-map sides with self-attention after each ResNet block.
    dropout: dropout rate inside the ResNet blocks (active only with train=True).
    resamp_with_conv: strided/after-upsample 3x3 convs (True) or avg-pool/nearest only (False).
    image_size: input side; fixes the resolution of every level (and so where attention goes).
    in_ch: input channels.
    num_classes: 0 = unconditional (no label parameters at all); > 0 adds `label_emb` with num_classes + 1 rows,
      row num_classes being the null label of classifier-free guidance.
    dtype: compute dtype of the activations; parameters stay float32 and the output is float32.
    remat: rematerialise (gradient-checkpoint) every ResNet and attention block in the backward pass.
  """
  ch: int
  out_ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  dropout: float
  resamp_with_conv: bool
  image_size: int
  in_ch: int
  num_classes: int = 0
  dtype: Dtype = jnp.float32
  remat: bool = False

  def _check_inputs(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array]) -> None:
    if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, self.in_ch):
      raise ValueError(f'U-Net expects x of shape (B, {self.image_size}, {self.image_size}, {self.in_ch}) (NHWC), '
                       f'got {x.shape}')
    if t.shape != (x.shape[0],):
      raise ValueError(f'U-Net expects t of shape ({x.shape[0]},), got {t.shape}')
    if self.image_size % (2 ** (len(self.ch_mult) - 1)):
      raise ValueError(f'image_size {self.image_size} is not divisible by 2^(len(ch_mult) - 1) = '
                       f'{2 ** (len(self.ch_mult) - 1)}')
    if y is not None:
      if self.num_classes == 0:
        raise ValueError('labels y were passed to an unconditional model (model.num_classes = 0)')
      if y.shape != (x.shape[0],):
        raise ValueError(f'U-Net expects y of shape ({x.shape[0]},), got {y.shape}')

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
    """Predicts eps (or x_0 / the posterior mean, and optionally variance values) for x_t at timesteps t.

    Args:
      x: (B, H, W, C) float, x_t in [-1, 1] (NHWC).
      t: (B,) int32 timesteps in [0, T).
      y: (B,) int32 labels in [0, num_classes] (num_classes = null label) or None (all null); conditional only.
      train: enables dropout (needs rngs={'dropout': key}).

    Returns:
      (B, H, W, out_ch) float32.
    """
    t = jnp.asarray(t)
    self._check_inputs(x, t, y)
    dt = self.dtype
    num_levels = len(self.ch_mult)
    resnet_cls = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    attn_cls = nn.remat(AttnBlock) if self.remat else AttnBlock

    def resnet(h, out_ch, name):
      return resnet_cls(out_ch=out_ch, dropout=self.dropout, deterministic=not train, dtype=dt, name=name)(h, temb)

    def attn(h, name):
      return attn_cls(dtype=dt, name=name)(h)

    # Timestep embedding: sinusoids -> Dense(4ch) -> swish -> Dense(4ch).
    temb = get_timestep_embedding(t, self.ch)
    temb = nn.Dense(self.ch * 4, kernel_init=default_init(), dtype=dt, name='temb_dense0')(temb)
    temb = nn.Dense(self.ch * 4, kernel_init=default_init(), dtype=dt, name='temb_dense1')(nn.swish(temb))
    if self.num_classes > 0:
      labels = jnp.full((x.shape[0],), self.num_classes, jnp.int32) if y is None else y.astype(jnp.int32)
      temb = temb + nn.Embed(self.num_classes + 1, self.ch * 4, dtype=dt, name='label_emb')(labels)
    # Every block uses swish(temb); compute it once.
    temb = nn.swish(temb)

    # Downsampling.
    hs = [_conv3x3(self.ch, dt, 'conv_in')(x)]
    for i_level in range(num_levels):
      resolution = self.image_size // 2 ** i_level
      for i_block in range(self.num_res_blocks):
        h = resnet(hs[-1], self.ch * self.ch_mult[i_level], f'down_{i_level}_block_{i_block}')
        if resolution in self.attn_resolutions:
          h = attn(h, f'down_{i_level}_attn_{i_block}')
        hs.append(h)
      if i_level != num_levels - 1:
        if self.resamp_with_conv:
          # TF 'SAME' padding for a stride-2 3x3 conv on an even size: 0 before, 1 after.
          hs.append(_conv3x3(hs[-1].shape[-1], dt, f'down_{i_level}_downsample', stride=2,
                             padding=((0, 1), (0, 1)))(hs[-1]))
        else:
          hs.append(_avg_pool2(hs[-1]))

    # Middle.
    h = hs[-1]
    h = resnet(h, h.shape[-1], 'mid_block_1')
    h = attn(h, 'mid_attn_1')
    h = resnet(h, h.shape[-1], 'mid_block_2')

    # Upsampling, consuming the skip connections in reverse.
    for i_level in reversed(range(num_levels)):
      resolution = self.image_size // 2 ** i_level
      for i_block in range(self.num_res_blocks + 1):
        h = resnet(jnp.concatenate([h, hs.pop()], axis=-1), self.ch * self.ch_mult[i_level],
                   f'up_{i_level}_block_{i_block}')
        if resolution in self.attn_resolutions:
          h = attn(h, f'up_{i_level}_attn_{i_block}')
      if i_level != 0:
        h = _upsample_nearest(h)
        if self.resamp_with_conv:
          h = _conv3x3(h.shape[-1], dt, f'up_{i_level}_upsample')(h)
    assert not hs

    # End.
    h = nn.swish(_group_norm(h.shape[-1], dt, 'norm_out')(h))
    h = _conv3x3(self.out_ch, dt, 'conv_out', init_scale=0.0)(h)
    return h.astype(jnp.float32)
