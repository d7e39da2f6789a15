"""Bits/dim of a dataset split under the discrete variational bound (Ho et al. 2020, eq. 5), for `--mode=eval`.

L = L_T + sum_{t>1} L_{t-1} + L_0 per example, every term kept: the prior L_T, the decoder L_0 and each L_t, so
that the rate-distortion pairs of the progressive code (Sec. 4.3, Table 4, Fig. 5) come from the same pass. One
batch of the bound is T network calls, compiled in chunks of `BPD_CHUNK_TIMESTEPS` timesteps between which
progress is logged and saved (`evaluation.progress`); every batch has its own key (`fold_in(bpd stream, batch)`)
and host sums are float64 in a fixed order, so a resumed pass gives bit-identical numbers.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import console
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import input_pipeline
from ddpm_jax import likelihood
from ddpm_jax import random_streams
from ddpm_jax import sharding
from ddpm_jax.evaluation import progress as progress_lib

# Largest number of timesteps of the bound per compiled call, between which progress is logged. About 20 s per
# chunk for the quickstart's 100 examples on a 2-core CPU; on CPU 40 chunks of 25 run as fast as one scan of 1000.
BPD_CHUNK_TIMESTEPS = 25
# Reverse-process times t (paper indexing, 1..T, for T = 1000) of the rate-distortion table; scaled to other T.
RATE_DISTORTION_T = (1, 10, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000)
BPD_DEFINITION = 'discrete variational bound (Ho et al. 2020, eq. 5), not ODE likelihood'


def bpd_chunks(num_timesteps: int, max_chunk: Optional[int] = None) -> Tuple[int, int]:
  """(timesteps per chunk K, number of chunks C) of the bound's T timesteps: C = ceil(T / max_chunk) calls of the
  same K = ceil(T / C) timesteps, so one program is compiled and the last chunk pads at most C - 1 timesteps.
  `max_chunk` defaults to `BPD_CHUNK_TIMESTEPS`."""
  max_chunk = BPD_CHUNK_TIMESTEPS if max_chunk is None else max_chunk
  num_chunks = -(-num_timesteps // max(1, min(max_chunk, num_timesteps)))
  return -(-num_timesteps // num_chunks), num_chunks


def make_bpd_chunk_fn(model, diffusion: diffusion_lib.Diffusion, mesh: jax.sharding.Mesh, chunk_size: int):
  """Jitted `(params, images, labels, mask, rng, first_t, vb_sum) -> sums` of K = `chunk_size` timesteps of the bound.

  The chunk is t = first_t, first_t - 1, ..., first_t - K + 1 (walking down like the reverse process;
  `likelihood.bpd_terms`, key fold_in(rng, t) per t as in `likelihood.calc_bpd_loop`); timesteps below 0 pad the
  last chunk and are masked out. `vb_sum` (B,) carries each example's sum of the bound terms L_t of eq. 5 over the
  chunks done so far; the returned 'vb_sum' adds this chunk's. The other sums are replicated, float32, and count
  only mask=True examples, so the padding of the last eval batch never enters the bound: per-timestep (K,) sums
  'vb', 'xstart_mse', 'eps_mse' of this chunk, and 'count', 'prior_bpd' (L_T), 'total_bpd' and 'total_bpd_sq'
  (of L_T + vb_sum), which after the last chunk are the batch's.
  """

  def chunk(params, images, labels, mask, rng, first_t, vb_sum):
    def model_fn(x_t, t):
      return model.apply({'params': params}, x_t, t, y=labels, train=False)
    timesteps = first_t - jnp.arange(chunk_size, dtype=jnp.int32)
    real_t = (timesteps >= 0).astype(jnp.float32)
    terms = likelihood.bpd_terms(diffusion, model_fn, images, rng, jnp.maximum(timesteps, 0))
    vb = terms['vb'] * real_t
    vb_sum = vb_sum + jnp.sum(vb, axis=1)
    prior = likelihood.prior_bpd(diffusion, images.astype(diffusion.dtype))
    total = vb_sum + prior
    w = mask.astype(jnp.float32)

    def wsum(x):  # elementwise product + sum, not a matmul (no reduced-precision passes on accelerators)
      return jnp.sum(w.reshape((-1,) + (1,) * (x.ndim - 1)) * x, axis=0)
    return {'vb_sum': vb_sum, 'vb': wsum(vb), 'xstart_mse': wsum(terms['xstart_mse'] * real_t),
            'eps_mse': wsum(terms['mse'] * real_t), 'count': jnp.sum(w), 'prior_bpd': wsum(prior),
            'total_bpd': wsum(total), 'total_bpd_sq': wsum(jnp.square(total))}

  replicated, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  out_shardings = {k: replicated for k in ('vb', 'xstart_mse', 'eps_mse', 'count', 'prior_bpd', 'total_bpd',
                                           'total_bpd_sq')}
  out_shardings['vb_sum'] = batch
  return jax.jit(chunk, in_shardings=(replicated, batch, batch, batch, replicated, replicated, batch),
                 out_shardings=out_shardings)


def _bpd_batch(chunk_fn, chunk_size: int, num_timesteps: int, params, batch: Dict[str, np.ndarray], rng: jax.Array,
               mesh: jax.sharding.Mesh, conditional: bool,
               on_chunk: Callable[[int], None] = lambda timesteps_done: None) -> Dict[str, np.ndarray]:
  """The bound of one eval batch (this process's slice): `chunk_fn` over t = T-1 .. 0 in chunks, the host carrying
  each example's partial sum between them; `on_chunk(timesteps done)` after each chunk. Returns the masked sums
  of the batch as float64 host arrays (per-timestep ones (T,), indexed by t), the numbers of
  `likelihood.calc_bpd_loop` on the batch up to float32 rounding."""
  local = sharding.pad_local({'image': batch['image'], 'label': batch['label'] if conditional else None,
                      'mask': np.asarray(batch['mask'], bool)}, jax.local_device_count())
  local['vb_sum'] = np.zeros(local['mask'].shape, np.float32)
  arrays = sharding.global_batch_array(local, sharding.batch_sharded(mesh))
  vb_sum = arrays['vb_sum']
  per_t = {k: np.zeros((num_timesteps,)) for k in ('vb', 'xstart_mse', 'eps_mse')}
  for first_t in range(num_timesteps - 1, -1, -chunk_size):
    out = chunk_fn(params, arrays['image'], arrays['label'], arrays['mask'], rng, first_t, vb_sum)
    vb_sum = out.pop('vb_sum')
    sums = {k: np.asarray(v, np.float64) for k, v in jax.device_get(out).items()}
    timesteps = first_t - np.arange(chunk_size)
    real = timesteps >= 0
    for k in per_t:
      per_t[k][timesteps[real]] = sums[k][real]
    on_chunk(num_timesteps - int(timesteps[real][-1]))  # t = T-1 .. timesteps[-1] are done
  return {**{k: sums[k] for k in ('count', 'prior_bpd', 'total_bpd', 'total_bpd_sq')}, **per_t}


def bpd_key(seed: int) -> jax.Array:
  """Root key of the bits/dim noise; batch b uses fold_in(bpd_key(seed), b)."""
  return random_streams.stream(seed, 'bpd')


def bpd_iterator(config: ml_collections.ConfigDict) -> input_pipeline.EvalIterator:
  """The batches of `data.eval_split` (`eval.bpd_num_examples` of it, 0 = all) whose bits/dim is reported."""
  return input_pipeline.create_eval_iterator(config, config.data.eval_split, config.eval.bpd_batch_size,
                                             num_examples=config.eval.bpd_num_examples)


def compute_bpd(config: ml_collections.ConfigDict, model, diffusion: diffusion_lib.Diffusion,
                mesh: jax.sharding.Mesh, params: Any, progress: progress_lib.Progress,
                it: Optional[input_pipeline.EvalIterator] = None) -> Dict[str, Any]:
  """Bits/dim (eq. 5) of the batches of `bpd_iterator(config)`, resuming saved partial sums (whole batches).

  Logs the timesteps done of the batch and an ETA of the whole phase between chunks of timesteps (at most every
  `console.PROGRESS_LOG_SECONDS`, and after every batch): one batch can take many minutes on a CPU.
  """
  split = config.data.eval_split
  it = it if it is not None else bpd_iterator(config)
  num_t = diffusion.num_timesteps
  state = progress.load('bpd')
  if state is None:
    state = {'batches_done': np.asarray(0, np.int64), 'count': np.float64(0), 'total_bpd': np.float64(0),
             'total_bpd_sq': np.float64(0), 'prior_bpd': np.float64(0), 'vb': np.zeros((num_t,)),
             'xstart_mse': np.zeros((num_t,)), 'eps_mse': np.zeros((num_t,))}
  done = int(state['batches_done'])
  if done:
    logging.info('bits/dim: resuming after %d of %d batches.', done, len(it))
  if done < len(it):
    chunk_size, num_chunks = bpd_chunks(num_t)
    chunk_fn = make_bpd_chunk_fn(model, diffusion, mesh, chunk_size)
    key = bpd_key(config.seed)
    conditional = bool(config.model.num_classes)
    log = console.ProgressLog((len(it) - done) * num_chunks)
    for b, batch in enumerate(it):
      if b < done:
        continue  # reading a done batch costs only its decoding

      def on_chunk(timesteps_done, b=b):
        chunks_done = (b - done) * num_chunks + -(-timesteps_done // chunk_size)
        if log.due(chunks_done) and timesteps_done < num_t:
          logging.info('bits/dim: batch %d/%d, timesteps %d/%d, %s, ETA %s', b + 1, len(it), timesteps_done, num_t,
                       log.rate(chunk_size, 'timestep', 'timesteps'), log.eta())
      sums = _bpd_batch(chunk_fn, chunk_size, num_t, params, batch, jax.random.fold_in(key, b), mesh, conditional,
                        on_chunk)
      for k, v in sums.items():
        state[k] = state[k] + v
      state['batches_done'] = np.asarray(b + 1, np.int64)
      progress.save('bpd', state, force=b + 1 == len(it))
      logging.info('bits/dim: batch %d/%d done, running bpd %.4f, %s, ETA %s', b + 1, len(it),
                   state['total_bpd'] / max(state['count'], 1), log.rate(chunk_size, 'timestep', 'timesteps'),
                   log.eta())
  return bpd_results(state, split)


def rate_distortion(prior: float, vb: np.ndarray, xstart_mse: np.ndarray,
                    timesteps: Sequence[int] = RATE_DISTORTION_T) -> list:
  """Rate-distortion of the progressive code (Ho et al. 2020, Sec. 4.3, Algorithms 3-4, Table 4, Fig. 5).

  With vb[k] = L_k (L_0 the decoder, L_k = KL(q(x_k | x_{k+1}, x_0) || p(x_k | x_{k+1})) for k >= 1) and
  prior = L_T, a receiver holding x_t (paper time t in 1..T) has been sent
    rate(t)       = L_T + sum_{k=t}^{T-1} L_k                bits/dim (t = 1: L_1 + ... + L_T, Table 4's rate),
  and needs
    distortion(t) = sum_{k=0}^{t-1} L_k                      bits/dim (t = 1: L_0, Table 4's distortion)
  more to decode x_0 losslessly, so rate + distortion = bpd at every t. `rmse` is the paper's distortion measure:
  sqrt(mean ||x_0 - x0_hat(x_t)||^2 / D) on the [0, 255] scale, the mean over examples and dimensions (x0_hat
  from eq. 4, clipped to [-1, 1], at code timestep index t - 1). `timesteps` are paper times for T = 1000,
  scaled to T = len(vb).
  """
  num_t = len(vb)
  ts = sorted({min(num_t, max(1, int(round(t * num_t / 1000)))) for t in timesteps})
  cum = np.cumsum(np.asarray(vb, np.float64))
  return [{'t': t, 'rate_bpd': float(prior + cum[-1] - cum[t - 1]), 'distortion_bpd': float(cum[t - 1]),
           'rmse': float(127.5 * np.sqrt(xstart_mse[t - 1]))} for t in ts]


def bpd_results(state: Dict[str, np.ndarray], split: str) -> Dict[str, Any]:
  """The json entries of bits/dim from the accumulated sums."""
  n = float(state['count'])
  bpd = float(state['total_bpd'] / n)
  var = max(float(state['total_bpd_sq'] / n) - bpd * bpd, 0.0)
  vb, prior = state['vb'] / n, float(state['prior_bpd'] / n)
  xstart_mse = state['xstart_mse'] / n
  return {
      'bpd': bpd,
      'bpd_terms': {
          'split': split, 'num_examples': int(n), 'stderr': float(np.sqrt(var / (n - 1))) if n > 1 else None,
          'prior': prior, 'decoder': float(vb[0]), 'vb': [float(v) for v in vb],
          'xstart_mse': [float(v) for v in xstart_mse], 'eps_mse': [float(v) for v in state['eps_mse'] / n],
      },
      'rate_distortion': rate_distortion(prior, vb, xstart_mse),
  }
