"""The DDPM U-Net (ddpm_jax.models): parameter counts, shapes, initialisation, conditioning, bf16, remat."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ddpm_jax import models
from ddpm_jax.models import group_norm
from tests.helpers import random_params

# Expected parameter counts. CIFAR-10 is the released checkpoint's count (Ho et al. 2020); the 256x256 count is
# that of diffusers' google/ddpm-{celebahq,church,bedroom,cat}-256 UNet2DModel (the "114M" of the paper).
PARAM_COUNTS = {
    'cifar10': 35_746_307,
    'celeb_a_hq': 113_673_219,
    'lsun_church': 113_673_219,
    'lsun_bedroom': 113_673_219,
    'lsun_cat': 113_673_219,
    'mnist': 6_469_889,
    'test': 702_499,
}


def _config(name):
  return importlib.import_module(f'configs.{name}').get_config()


def _small_config(**model_overrides):
  """ch 32, two levels, attention at 16 (the second level), 32x32x3: compiles in about a second."""
  config = default.get_config()
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0
  for k, v in model_overrides.items():
    config.model[k] = v
  return config


def _inputs(config, batch=2, seed=0):
  side = models.image_shape(config)[0]
  rng = np.random.RandomState(seed)
  x = rng.uniform(-1, 1, (batch, side, side, config.data.num_channels)).astype(np.float32)
  t = rng.randint(0, 1000, (batch,)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(t)


def _apply_fn(model, **kwargs):
  return jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, **kwargs))


@pytest.fixture(scope='module')
def small():
  """(config, model, randomized params) of the small model, shared by the tests that need real weights."""
  config = _small_config()
  model = models.create_model(config)
  return config, model, random_params(model)


@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_param_count_and_output_shape_of_every_config(name):
  config = _config(name)
  model = models.create_model(config)
  shapes = models.param_shapes(model)
  assert models.count_params(shapes) == PARAM_COUNTS[name]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes))
  side = models.image_shape(config)[0]
  x = jax.ShapeDtypeStruct((2, side, side, config.data.num_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  out = jax.eval_shape(lambda p, x, t: model.apply({'params': p}, x, t, train=False), shapes, x, t)
  assert out.shape == (2, side, side, config.data.num_channels)
  assert out.dtype == jnp.float32


def test_cifar10_architecture_from_default_overrides():
  """The acceptance number, from get_config() with the paper's fields written out (not relying on defaults)."""
  config = default.get_config()
  config.model.ch, config.model.ch_mult, config.model.num_res_blocks = 128, (1, 2, 2, 2), 2
  config.model.attn_resolutions, config.model.dropout = (16,), 0.1
  config.data.image_size, config.data.num_channels = 32, 3
  shapes = models.param_shapes(models.create_model(config))
  assert models.count_params(shapes) == PARAM_COUNTS['cifar10']
  # The structure of the original: 4 levels x 2 blocks down, 3 up, attention only at 16x16 (level 1) + middle.
  names = set(shapes)
  assert {f'down_1_attn_{j}' for j in range(2)} | {f'up_1_attn_{j}' for j in range(3)} | {'mid_attn_1'} == {
      n for n in names if 'attn' in n}
  assert 'down_3_downsample' not in names and 'down_2_downsample' in names
  assert 'up_0_upsample' not in names and 'up_1_upsample' in names
  # 1x1 shortcuts exactly where channels change: 128->256 on the down path, every concat on the up path.
  assert 'nin_shortcut' in shapes['down_1_block_0'] and 'nin_shortcut' not in shapes['down_1_block_1']
  assert 'nin_shortcut' not in shapes['down_0_block_0'] and 'nin_shortcut' in shapes['up_0_block_0']
  assert shapes['temb_dense1']['kernel'].shape == (512, 512)
  assert shapes['down_1_attn_0']['qkv']['kernel'].shape == (256, 768)


@pytest.mark.parametrize('var_type,learned_variance,expected', [
    ('fixedlarge', None, 3), ('learned_range', None, 6), ('learned', None, 6), ('learned', True, 6),
    ('fixedsmall', False, 3)])
def test_learned_variance_doubles_output_channels(var_type, learned_variance, expected):
  config = _config('cifar10')
  config.diffusion.var_type = var_type
  config.model.learned_variance = learned_variance
  model = models.create_model(config)
  shapes = models.param_shapes(model)
  assert shapes['conv_out']['kernel'].shape == (3, 3, 128, expected)
  assert models.count_params(shapes) == PARAM_COUNTS['cifar10'] + (expected - 3) * (9 * 128 + 1)
  out = jax.eval_shape(lambda p, x, t: model.apply({'params': p}, x, t), shapes,
                       jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
  assert out.shape == (1, 32, 32, expected)


def test_mnist_uses_padded_size_and_one_channel():
  model = models.create_model(_config('mnist'))
  assert (model.image_size, model.in_ch, model.out_ch) == (32, 1, 1)
  shapes = models.param_shapes(model)
  assert 'down_2_attn_0' in shapes and 'down_1_attn_0' not in shapes  # attention at 8 = level 2 of 32


def test_timestep_embedding_matches_the_original_formula():
  t = np.array([0, 1, 17, 500, 999])
  for dim in (128, 33):
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    ref = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    if dim % 2:
      ref = np.pad(ref, ((0, 0), (0, 1)))
    emb = np.asarray(models.get_timestep_embedding(jnp.asarray(t, jnp.int32), dim))
    assert emb.shape == (5, dim) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, ref, atol=2e-4)  # float32 sin of arguments up to 999
    assert np.abs(emb[0, :half]).max() == 0 and np.all(emb[0, half:2 * half] == 1)


def test_initialisation_as_the_original():
  # One level at 8x8 with attention (a real init compiles every initializer; keep the network small).
  config = _small_config(ch_mult=(1,), attn_resolutions=(8,))
  config.data.image_size = 8
  model = models.create_model(config)
  params = models.init_params(model, jax.random.PRNGKey(0))
  # Zero-scale layers (variance scale 1e-10, |w| <= sqrt(3e-10 / fan_avg) ~ 3e-6; not exactly 0): the last conv
  # of each ResNet block, the attention output projection, the network output.
  tiny = [p['conv2']['kernel'] for n, p in params.items() if 'block' in n]
  tiny += [p['proj_out']['kernel'] for n, p in params.items() if 'attn' in n] + [params['conv_out']['kernel']]
  assert len(tiny) == 5 + 4 + 1  # ResNet blocks: 1 down, 2 mid, 2 up; attention: 1 down, 1 mid, 2 up
  for k in tiny:
    assert 0 < np.abs(k).max() < 1e-5
  # Others: variance_scaling(1, fan_avg, uniform) -> std sqrt(1 / fan_avg); biases zero, GroupNorm scale one.
  k = np.asarray(params['down_0_block_0']['conv1']['kernel'])  # (3, 3, 32, 32): fan_avg = 288
  assert abs(k.std() - np.sqrt(1 / 288)) < 0.03 * np.sqrt(1 / 288)
  assert np.abs(k).max() <= np.sqrt(3 / 288) + 1e-7
  qkv = np.asarray(params['down_0_attn_0']['qkv']['kernel'])  # three (32, 32) kernels: fan_avg = 32 each
  assert qkv.shape == (32, 96) and np.abs(qkv).max() <= np.sqrt(3 / 32) + 1e-7
  for chunk in np.split(qkv, 3, axis=1):
    assert abs(chunk.std() - np.sqrt(1 / 32)) < 0.06 * np.sqrt(1 / 32)
  assert not np.allclose(qkv[:, :32], qkv[:, 32:64])  # independent draws for q and k
  assert np.all(np.asarray(params['down_0_block_0']['conv1']['bias']) == 0)
  assert np.all(np.asarray(params['norm_out']['scale']) == 1)
  # ... so the freshly initialised network is the identity per block and outputs ~0.
  x, t = _inputs(config)
  out = _apply_fn(model)(params, x, t)
  assert out.shape == (2, 8, 8, 3) and np.abs(np.asarray(out)).max() < 1e-4


def test_class_conditioning(small):
  # The parameter tree and the errors for labels: tests/test_conditional.py.
  config, _, params_u = small
  cond = models.create_model(_small_config(num_classes=10))
  x, t = _inputs(config, batch=3)
  # The unconditional weights plus a random label embedding.
  params = dict(params_u, label_emb={'embedding': jax.random.normal(jax.random.PRNGKey(5), (11, 128))})
  apply = jax.jit(lambda p, y: cond.apply({'params': p}, x, t, y=y))
  out_null = np.asarray(jax.jit(lambda p: cond.apply({'params': p}, x, t))(params))  # y=None: all-null labels
  np.testing.assert_allclose(out_null, apply(params, jnp.full((3,), 10, jnp.int32)), rtol=1e-5, atol=1e-5)
  out_a = np.asarray(apply(params, jnp.array([0, 1, 2], jnp.int32)))
  out_b = np.asarray(apply(params, jnp.array([3, 1, 2], jnp.int32)))
  assert np.abs(out_a[0] - out_b[0]).max() > 1e-3          # the label changes the output ...
  np.testing.assert_allclose(out_a[1:], out_b[1:], rtol=1e-5, atol=1e-5)  # ... of its own example only


def test_dropout_only_in_training(small):
  config, _, params = small
  model = models.create_model(_small_config(dropout=0.5))
  x, t = _inputs(config)
  apply = jax.jit(lambda p, key, train: model.apply({'params': p}, x, t, train=train, rngs={'dropout': key}),
                  static_argnums=2)
  a, b = apply(params, jax.random.PRNGKey(1), True), apply(params, jax.random.PRNGKey(2), True)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  np.testing.assert_array_equal(apply(params, jax.random.PRNGKey(1), True), a)
  np.testing.assert_array_equal(apply(params, jax.random.PRNGKey(1), False), apply(params, jax.random.PRNGKey(2),
                                                                                   False))


def test_bfloat16_compute_matches_float32(small):
  config32, model32, params = small
  model16 = models.create_model(_small_config(dtype='bfloat16'))
  shapes16 = models.param_shapes(model16)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes16))  # params stay fp32
  x, t = _inputs(config32, batch=2)
  out32 = np.asarray(_apply_fn(model32)(params, x, t))
  out16 = _apply_fn(model16)(params, x, t)
  assert out16.dtype == jnp.float32
  out16 = np.asarray(out16)
  rel = np.abs(out16 - out32).max() / np.abs(out32).max()
  assert 1e-4 < rel < 5e-2, rel  # really computed in bf16 (8-bit mantissa), yet close


def test_remat_gives_the_same_gradients():
  # One level at 8x8 with attention: both rematerialised block types, and a small graph to differentiate twice.
  overrides = dict(ch_mult=(1,), attn_resolutions=(8,), dropout=0.1)
  config = _small_config(**overrides)
  config.data.image_size = 8
  model = models.create_model(config)
  config_remat = _small_config(remat=True, **overrides)
  config_remat.data.image_size = 8
  model_remat = models.create_model(config_remat)
  params = random_params(model)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(models.param_shapes(model_remat))
  x, t = _inputs(config)

  def loss(m):
    return lambda p: jnp.mean(m.apply({'params': p}, x, t, train=True, rngs={'dropout': jax.random.PRNGKey(3)}) ** 2)

  # remat really rematerialises: one region per ResNet block (1 down, 2 mid, 2 up) and attention (1, 1, 2).
  def num_remat(m):
    jaxpr = str(jax.make_jaxpr(loss(m))(params))
    return jaxpr.count('remat2[') + jaxpr.count('checkpoint[')  # the primitive's name differs between versions
  assert (num_remat(model_remat), num_remat(model)) == (9, 0)
  g, g_remat = jax.jit(jax.grad(loss(model)))(params), jax.jit(jax.grad(loss(model_remat)))(params)
  flat, flat_remat = jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_remat)
  assert min(float(jnp.abs(a).max()) for a in flat) > 0  # every parameter gets a gradient
  for a, b in zip(flat, flat_remat):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_bad_inputs_raise_clear_errors():
  model = models.create_model(_small_config())
  params = models.param_shapes(model)
  with pytest.raises(ValueError, match=r'x of shape \(B, 32, 32, 3\)'):
    jax.eval_shape(lambda p: model.apply({'params': p}, jnp.zeros((1, 28, 28, 3)), jnp.zeros((1,), jnp.int32)),
                   params)
  with pytest.raises(ValueError, match='t of shape'):
    jax.eval_shape(lambda p: model.apply({'params': p}, jnp.zeros((2, 32, 32, 3)), jnp.zeros((), jnp.int32)),
                   params)


def test_pooling_resampling_without_conv():
  """resamp_with_conv=False: the level below gets the 2x2 mean of the level above, and the level above gets the
  level below repeated 2x2 (Ho et al.'s avg-pool / nearest-neighbour option), with no resampling parameters."""
  config = _small_config(resamp_with_conv=False)
  model = models.create_model(config)
  params = random_params(model)
  assert not any('sample' in name for name in params)
  assert models.count_params(params) == PARAM_COUNTS['test'] - (9 * 32 * 32 + 32) - (9 * 64 * 64 + 64)
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and context.module.name in ('down_0_block_0', 'down_1_block_0',
                                                                      'up_1_attn_1', 'up_0_block_0'):
      seen[context.module.name] = (np.asarray(args[0]), np.asarray(out))
    return out

  x, t = _inputs(config)
  with nn.intercept_methods(record):
    out = model.apply({'params': params}, x, t)
  assert out.shape == (2, 32, 32, 3)
  # Level 0 (32x32, one block, no attention) -> level 1 (16x16): the input of level 1 is the mean of 2x2 cells.
  level0 = seen['down_0_block_0'][1].astype(np.float64)
  pooled = level0.reshape(2, 16, 2, 16, 2, 32).mean(axis=(2, 4))
  np.testing.assert_allclose(seen['down_1_block_0'][0], pooled, rtol=1e-6, atol=1e-6)
  # Level 1's last output (after attention) -> level 0: each value fills a 2x2 cell, then the skip is appended.
  level1 = seen['up_1_attn_1'][1]
  up_input = seen['up_0_block_0'][0]
  assert up_input.shape == (2, 32, 32, 64 + 32)
  np.testing.assert_array_equal(up_input[..., :64], np.repeat(np.repeat(level1, 2, axis=1), 2, axis=2))


@pytest.mark.parametrize('shape, groups, dtype', [((2, 5, 6, 64), 32, jnp.float32), ((3, 4, 4, 12), 4, jnp.float32),
                                                  ((2, 7, 48), 16, jnp.float32), ((2, 4, 4, 64), 32, jnp.bfloat16)])
def test_group_norm_matches_flax(shape, groups, dtype):
  """models/group_norm.GroupNorm (per-channel affine form) computes flax's GroupNorm: same params, values, grads."""
  x = (jax.random.normal(jax.random.key(0), shape) * 3 + 1).astype(dtype)
  ours = group_norm.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype)
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype)
  params = ours.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(jax.random.key(1), x))
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
  g = jax.random.normal(jax.random.key(3), shape).astype(dtype)

  def value_and_grads(module):
    y, vjp = jax.vjp(lambda p, x: module.apply(p, x), params, x)
    return y, vjp(g)

  (y, grads), (y_ref, grads_ref) = value_and_grads(ours), value_and_grads(ref)
  assert y.dtype == y_ref.dtype == dtype
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  for got, want in zip(jax.tree.leaves((y, grads)), jax.tree.leaves((y_ref, grads_ref))):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol


def test_group_norm_rejects_channels_not_divisible_by_groups():
  with pytest.raises(ValueError, match='12 channels do not split into 5 groups'):
    group_norm.GroupNorm(num_groups=5, epsilon=1e-6).init(jax.random.key(0), jnp.ones((1, 2, 2, 12)))
