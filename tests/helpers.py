"""Helpers shared by test modules: one-line error assertions, compile counts, random U-Net parameters."""

import contextlib
import logging

import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing
from ddpm_jax import models


def assert_one_line_error(fn, *needles, error=ValueError):
  """`fn()` raises `error` with a one-line message containing every needle (the field and the allowed values)."""
  with pytest.raises(error) as info:
    fn()
  message = str(info.value)
  assert '\n' not in message
  for needle in needles:
    assert needle in message, (needle, message)


@contextlib.contextmanager
def compilations(caplog, name):
  """Collects, into the list it yields, jax's 'Compiling <name> ...' messages of the block (`jax.log_compiles`):
  one per XLA compilation of a jitted function called `name`, wherever the program then comes from."""
  compiled = []
  start = len(caplog.records)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    yield compiled
  prefixes = (f'Compiling {name} ', f'Compiling jit({name}) ')  # the second: jax >= 0.7
  compiled.extend(r.getMessage() for r in caplog.records[start:] if r.getMessage().startswith(prefixes))


def random_params(model, seed=0):
  """float32 parameters of `model`'s shapes drawn with NumPy (no init program to compile), scaled so every layer
  matters: kernels N(0, 1/fan_in), embeddings N(0, 1), GroupNorm scales 1 + N(0, 0.01), biases N(0, 0.01).

  A fresh init would not do for comparisons: its zero-scale output convolutions make the network output ~0 and
  most layers invisible.
  """
  rng = np.random.RandomState(seed)

  def draw(path, shape):
    name = jax.tree_util.keystr(path[-1:])
    noise = rng.standard_normal(shape.shape).astype(np.float32)
    if name == "['scale']":
      return 1.0 + 0.1 * noise
    if name == "['bias']":
      return 0.1 * noise
    if name == "['embedding']":
      return noise
    return noise / np.float32(np.sqrt(np.prod(shape.shape[:-1])))

  return jax.tree_util.tree_map_with_path(draw, models.param_shapes(model))


def save_random_checkpoint(workdir, config, step):
  """A workdir holding an inference checkpoint of `config`'s model at `step`: raw params random_params(seed 0),
  EMA params random_params(seed 1) (different, so a test sees which ones were used)."""
  model = models.create_model(config)
  checkpointing.save_inference_checkpoint(str(workdir), step, random_params(model, 0), random_params(model, 1))
  return str(workdir)


def random_diffusers_unet(config, seed=0):
  """A diffusers UNet2DModel of `config` (its keyword arguments; '_'-keys ignored) with non-zero random weights in
  every tensor: zero-initialised output convolutions would make any two implementations agree trivially."""
  import torch  # pylint: disable=g-import-not-at-top  (only the oracle tests need torch)
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  net = UNet2DModel(**{k: v for k, v in config.items() if not k.startswith('_')}).eval()
  with torch.no_grad():
    for name, p in net.named_parameters():
      noise = torch.randn_like(p)
      if p.ndim > 1:
        p.copy_(noise / np.sqrt(p[0].numel()))
      elif 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return net
