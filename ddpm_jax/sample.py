"""Drawing samples from a trained model: the compiled, sharded sampler and `--mode=sample`.

`--mode=sample` writes `<workdir>/samples/step_<N>/samples.npz` (key `images`, uint8 NHWC, plus `labels` for
conditional models) and `grid.png`, from the EMA parameters of the latest (or `config.sample.step`) checkpoint.
The result depends only on the config (seed included), not on the number of devices.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import checkpointing
from ddpm_jax import console
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import images as images_lib
from ddpm_jax import models
from ddpm_jax import random_streams
from ddpm_jax import samplers
from ddpm_jax import sharding


def sample_labels(config: ml_collections.ConfigDict, num: int) -> Optional[np.ndarray]:
  """Class labels for `num` samples: None (unconditional), one class, or contiguous blocks of every class in turn
  (so a grid with `num / num_classes` columns shows one class per row)."""
  num_classes = config.model.num_classes
  if not num_classes:
    return None
  if config.sample.class_label >= 0:
    return np.full((num,), config.sample.class_label, np.int32)
  return (np.arange(num) * num_classes // num).astype(np.int32)


def grid_layout(config: ml_collections.ConfigDict, samples: np.ndarray,
                labels: Optional[np.ndarray]) -> tuple[np.ndarray, Optional[int]]:
  """(images to show, columns): one class per row when every class was sampled in turn, else a square grid.

  Rows hold the same number of samples of each class (the smallest class count, at most 40), so a sample count
  that is not a multiple of `num_classes` still gives one class per row.
  """
  if labels is None or config.sample.class_label >= 0:
    return samples[:400], None
  labels = np.asarray(labels[:len(samples)])
  present = np.unique(labels)
  per_row = int(max(1, min(np.bincount(labels, minlength=config.model.num_classes)[present].min(), 40)))
  index = np.concatenate([np.flatnonzero(labels == c)[:per_row] for c in present])
  return samples[index], per_row


def sampling_model_fn(config: ml_collections.ConfigDict, model, params: Any,
                      labels: Optional[jax.Array]) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The `model_fn(x_t, t)` a sampler calls: unconditional, conditional on `labels`, or classifier-free guided
  ((1 + w) eps(x, y) - w eps(x, null) with both halves in one batched call) when `sample.guidance_scale` > 0."""
  def apply(x_t, t, y=None):
    return model.apply({'params': params}, x_t, t, y=y, train=False)
  if labels is None:
    return apply
  if config.sample.guidance_scale > 0:
    return samplers.classifier_free_guidance(apply, labels, config.model.num_classes, config.sample.guidance_scale)
  return functools.partial(apply, y=labels)


def make_sample_fn(config: ml_collections.ConfigDict, model, diffusion: diffusion_lib.Diffusion,
                   mesh: jax.sharding.Mesh, num: int) -> Callable[[Any, jax.Array, Optional[jax.Array]], jax.Array]:
  """A jitted `(params, rng, labels) -> images in [-1, 1]` drawing `num` samples sharded over the mesh.

  The whole reverse chain is one compiled loop (samplers.sample); classifier-free guidance evaluates the
  conditional and unconditional halves in one batched network call per step. `num` is rounded up to a multiple of
  the device count; `generate` trims the extra samples.
  """
  shape = (padded_count(num, mesh),) + models.image_shape(config)
  cfg = config.sample

  def sample(params, rng, labels):
    model_fn = sampling_model_fn(config, model, params, labels)
    return samplers.sample(diffusion, model_fn, shape, rng, method=cfg.method,
                           respacing=samplers.config_respacing(cfg), eta=cfg.eta, clip_denoised=cfg.clip_denoised,
                           use_clipped_model_output=cfg.get('use_clipped_model_output', True))

  return jax.jit(sample, in_shardings=(sharding.replicated(mesh), sharding.replicated(mesh),
                                       sharding.batch_sharded(mesh)),
                 out_shardings=sharding.batch_sharded(mesh))


def padded_count(num: int, mesh: jax.sharding.Mesh) -> int:
  """`num` rounded up to a multiple of the number of devices, so any sample count shards evenly."""
  return -(-num // mesh.size) * mesh.size


def generate(sample_fn, params, rng, labels: Optional[np.ndarray], mesh, num: int) -> np.ndarray:
  """Runs `sample_fn` and returns `num` uint8 images on the host (gathered from every process)."""
  if labels is not None:
    labels = jax.device_put(jnp.asarray(np.resize(labels, padded_count(num, mesh))), sharding.batch_sharded(mesh))
  samples = sample_fn(params, rng, labels)
  return images_lib.to_uint8(sharding.to_host(samples))[:num]


def sample_and_export(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`--mode=sample`: writes samples.npz and grid.png for the selected checkpoint; returns the output directory."""
  mesh = sharding.create_mesh()
  step, _, ema_params = checkpointing.restore_inference_params(workdir, config.sample.step)
  ema_params = jax.device_put(ema_params, sharding.replicated(mesh))
  model = models.create_model(config)
  diffusion = diffusion_lib.from_config(config.diffusion)
  batch = config.sample.batch_size
  sample_fn = make_sample_fn(config, model, diffusion, mesh, batch)
  labels_all = sample_labels(config, config.sample.num_samples)
  base_rng = random_streams.stream(config.seed, 'sample')

  out_dir = os.path.join(workdir, 'samples', f'step_{step}')
  chunks, num_batches = [], -(-config.sample.num_samples // batch)
  throughput = console.Throughput(num_batches)  # leaves out the first batch, which includes compilation
  start = time.monotonic()
  for i in range(num_batches):
    labels = None
    if labels_all is not None:
      labels = np.resize(labels_all[i * batch:(i + 1) * batch], batch)  # last batch padded, trimmed below
    chunks.append(generate(sample_fn, ema_params, jax.random.fold_in(base_rng, i), labels, mesh, batch))
    throughput.update(i + 1)
    rate = (f'{console.format_duration(1 / throughput.rate)}/batch' if throughput.rate else
            f'{console.format_duration(time.monotonic() - start)} with compilation')
    logging.info('sampled batch %d/%d, %s, ETA %s', i + 1, num_batches, rate,
                 console.format_duration(throughput.eta()))
  samples = np.concatenate(chunks)[:config.sample.num_samples]

  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    arrays = {'images': samples}
    if labels_all is not None:
      arrays['labels'] = labels_all
    np.savez(os.path.join(out_dir, 'samples.npz'), **arrays)
    shown, ncol = grid_layout(config, samples, labels_all)
    images_lib.save_png(images_lib.make_grid(shown, ncol=ncol), os.path.join(out_dir, 'grid.png'))
    logging.info('wrote %d samples from step %d to %s', len(samples), step, out_dir)
  return out_dir
