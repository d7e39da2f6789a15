"""`--mode=eval`: bits/dim, FID and Inception Score of a checkpoint's EMA parameters under one frozen protocol.

Writes `<workdir>/eval/step_<N>.json` and TensorBoard scalars (`eval/...`) with
* `bpd`: the discrete variational bound L = L_T + sum_{t>1} L_{t-1} + L_0 of Ho et al. 2020 (eq. 5), in bits/dim,
  averaged over every example of `data.eval_split` once (padding masked out), with its terms (prior L_T, decoder
  L_0, every L_t) and the rate-distortion pairs of the progressive code (Sec. 4.3, Table 4, Fig. 5);
* `fid_train` / `fid_test` (Heusel et al. 2017) of `eval.num_samples` samples from `config.sample`'s sampler against
  the statistics of the full train / eval splits (cached per dataset, split and Inception protocol), `fid` (or
  `fid@N` when N != 50,000) = `fid_train`, the paper's Table 1 convention, and the Inception Score (Salimans et al.
  2016) when the Inception weights carry the classifier;
* a `protocol` block saying how every number was obtained.

Resumable: partial sums, the sample feature accumulator and the reference-statistics accumulators are saved
atomically (tmp file + os.replace) under `<workdir>/eval/` at most every `PROGRESS_SAVE_SECONDS`, and a restarted
evaluation skips what was done. Deterministic: every batch has its own key (`fold_in(stream, batch_index)`) and
host sums are float64 in a fixed order, so a resumed run gives bit-identical numbers.

Tells how long it takes: the first line is the plan (checkpoint step; bits/dim examples, batches and timesteps;
FID samples, batches and sampler; each reference split computed or read from its cache), then progress lines with a
rate and an ETA per phase (bits/dim between chunks of `BPD_CHUNK_TIMESTEPS` timesteps, since one batch of the
bound is T network calls), and the last line says where the results were written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import atomic_write
from ddpm_jax import checkpointing
from ddpm_jax import console
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import images as images_lib
from ddpm_jax import input_pipeline
from ddpm_jax import likelihood
from ddpm_jax import models
from ddpm_jax import random_streams
from ddpm_jax import sample
from ddpm_jax import samplers
from ddpm_jax import sharding
from ddpm_jax import tensorboard_writer
from ddpm_jax.errors import ConfigError, UserError
from ddpm_jax.evaluation import cache as fid_cache
from ddpm_jax.evaluation import metrics

# Progress is written at most this often (and always after the last batch of a phase).
PROGRESS_SAVE_SECONDS = 60.0
# Largest number of timesteps of the bound per compiled call, between which progress is logged. About 20 s per
# chunk for the quickstart's 100 examples on a 2-core CPU; on CPU 40 chunks of 25 run as fast as one scan of 1000.
BPD_CHUNK_TIMESTEPS = 25
# Reverse-process times t (paper indexing, 1..T, for T = 1000) of the rate-distortion table; scaled to other T.
RATE_DISTORTION_T = (1, 10, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000)
BPD_DEFINITION = 'discrete variational bound (Ho et al. 2020, eq. 5), not ODE likelihood'


class FIDNetworkUnavailableError(UserError):
  """The FID Inception weights are missing or unreadable (raised before anything is sampled)."""


def load_fid_network(config: ml_collections.ConfigDict):
  """`evaluation.load_inception(config.eval.inception_weights)`, failing with one line when the weights are missing."""
  from ddpm_jax import evaluation  # pylint: disable=g-import-not-at-top
  try:
    return evaluation.load_inception(config.eval.inception_weights)
  except evaluation.InceptionWeightsError as e:
    message = ' '.join(str(e).split())
    raise FIDNetworkUnavailableError(f'{message} (or pass --config.eval.fid=False to skip FID/IS)') from None


# ------------------------------------------------------------------------------------------------ progress


def _savez(path: str, arrays: Dict[str, Any]) -> None:
  atomic_write.atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


class _Progress:
  """Partial results saved as `.npz` files tagged with a fingerprint; files with another fingerprint are ignored."""

  def __init__(self, directory: str, fingerprint: str):
    self.directory, self.fingerprint = directory, fingerprint
    self._last_save: Dict[str, float] = {}

  def path(self, name: str) -> str:
    return os.path.join(self.directory, f'{name}.npz')

  def load(self, name: str) -> Optional[Dict[str, np.ndarray]]:
    path = self.path(name)
    if not os.path.isfile(path):
      return None
    with np.load(path) as z:
      state = {k: np.array(z[k]) for k in z.files}
    if str(state.pop('fingerprint', '')) != self.fingerprint:
      logging.warning('Ignoring %s: written by an evaluation with another config.', path)
      return None
    return state

  def save(self, name: str, arrays: Dict[str, Any], force: bool = False) -> None:
    now = time.monotonic()
    if not force and now - self._last_save.get(name, -np.inf) < PROGRESS_SAVE_SECONDS:
      return
    self._last_save[name] = now
    if jax.process_index() == 0:
      _savez(self.path(name), {**arrays, 'fingerprint': np.asarray(self.fingerprint)})

  def clear(self) -> None:
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      shutil.rmtree(self.directory)


def _hash(obj: Any, length: int = 16) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _fingerprint(config: ml_collections.ConfigDict, step: int) -> str:
  """Everything the numbers depend on: a progress file from another config is never resumed."""
  data = {k: v for k, v in config.data.to_dict().items() if k not in ('num_workers', 'prefetch')}
  parts = {name: config[name].to_dict() for name in ('model', 'diffusion', 'sample', 'eval')}
  parts['eval'].pop('cache_dir', None)  # where the reference statistics are cached does not change any number
  return _hash({'seed': config.seed, 'step': step, 'data': data, **parts})


# ------------------------------------------------------------------------------------------------ bits/dim


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


def _pad_local(arrays: Dict[str, Optional[np.ndarray]], multiple: int) -> Dict[str, Optional[np.ndarray]]:
  """Pads every array along axis 0 to a multiple of `multiple` by repeating row 0 (mask padded with False)."""
  n = len(arrays['mask'])
  pad = (-n) % multiple
  if not pad:
    return arrays
  out = {}
  for k, v in arrays.items():
    if v is None:
      out[k] = None
    elif k == 'mask':
      out[k] = np.concatenate([v, np.zeros((pad,), bool)])
    else:
      out[k] = np.concatenate([v, np.repeat(v[:1], pad, axis=0)])
  return out


def _bpd_batch(chunk_fn, chunk_size: int, num_timesteps: int, params, batch: Dict[str, np.ndarray], rng: jax.Array,
               mesh: jax.sharding.Mesh, conditional: bool,
               on_chunk: Callable[[int], None] = lambda timesteps_done: None) -> Dict[str, np.ndarray]:
  """The bound of one eval batch (this process's slice): `chunk_fn` over t = T-1 .. 0 in chunks, the host carrying
  each example's partial sum between them; `on_chunk(timesteps done)` after each chunk. Returns the masked sums
  of the batch as float64 host arrays (per-timestep ones (T,), indexed by t), the numbers of
  `likelihood.calc_bpd_loop` on the batch up to float32 rounding."""
  local = _pad_local({'image': batch['image'], 'label': batch['label'] if conditional else None,
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
                mesh: jax.sharding.Mesh, params: Any, progress: _Progress,
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


# ----------------------------------------------------------------------------------------------- FID / IS


def _feature_batch(net, local_images: np.ndarray, local_mask: np.ndarray, mesh: jax.sharding.Mesh,
                   with_logits: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """Inception features (and logits) of a global batch given as this process's uint8 slice, sharded over the
  mesh; returns host arrays of the mask=True rows of the whole global batch, in global order."""
  local = _pad_local({'image': local_images, 'mask': np.asarray(local_mask, bool)}, jax.local_device_count())
  arrays = sharding.global_batch_array(local, sharding.batch_sharded(mesh))
  if with_logits and hasattr(net, 'features_and_logits'):
    features, logits = net.features_and_logits(arrays['image'])
  else:
    features = net.features(arrays['image'])
    logits = net.logits(arrays['image']) if with_logits else None
  host = sharding.to_host({'features': features, 'logits': logits, 'mask': arrays['mask']})
  mask = np.asarray(host['mask'], bool)
  logits = None if host['logits'] is None else np.asarray(host['logits'], np.float32)[mask]
  return np.asarray(host['features'], np.float64)[mask], logits


def _features_of(net, images: np.ndarray, mesh: jax.sharding.Mesh, chunk: int,
                 with_logits: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """Features of uint8 images held in full by every process, in chunks of `chunk` (padded: one compiled shape)."""
  processes, index = jax.process_count(), jax.process_index()
  chunk = -(-chunk // processes) * processes
  feats, logits = [], []
  for start in range(0, len(images), chunk):
    part = images[start:start + chunk]
    mask = np.arange(chunk) < len(part)
    part = np.concatenate([part, np.repeat(part[:1], chunk - len(part), axis=0)])
    local = slice(index * chunk // processes, (index + 1) * chunk // processes)
    f, lg = _feature_batch(net, part[local], mask[local], mesh, with_logits)
    feats.append(f)
    logits.append(lg)
  return np.concatenate(feats), (np.concatenate(logits) if with_logits else None)


def ref_stats_path(config: ml_collections.ConfigDict, split: str, num_examples: int, protocol: Dict[str, Any]) -> str:
  """The cache file of the reference statistics of all `num_examples` examples of `split`, outside the workdir:
  `<eval.cache_dir or ~/.cache/ddpm_jax>/fid_stats/<dataset>_<split>_<N>_<key>.npz`, the key covering the data and
  the Inception protocol (`evaluation.cache`), so every run on the machine shares it."""
  key = fid_cache.statistics_key(config.data, split, num_examples, protocol)
  return fid_cache.statistics_path(fid_cache.statistics_dir(config.eval.get('cache_dir')), key)


class ReferenceSource(NamedTuple):
  """Where the FID reference statistics of one split come from: the cache file when it is valid, else a pass over
  every example of the split."""
  key: str  # the result it serves: 'fid_train' or 'fid_test'
  split: str
  path: str  # the cache file (`ref_stats_path`)
  iterator: input_pipeline.EvalIterator  # every example of the split, no dropped batch
  cached: Optional[Tuple[np.ndarray, np.ndarray, int]]  # (mu, sigma, count) from the cache, None = to compute
  cache_key: Dict[str, Any]  # what the statistics depend on, stored in the file (`fid_cache.statistics_key`)


def reference_sources(config: ml_collections.ConfigDict, net, eval_dir: str) -> List[ReferenceSource]:
  """The references of `fid_train` (data.train_split) and `fid_test` (data.eval_split), each from its cache file
  (`ref_stats_path`) when that holds the statistics of every example of the split under the same Inception protocol;
  an unusable cache file is moved aside (`fid_cache.load_statistics`) and the statistics computed again."""
  del eval_dir  # the statistics live in the cache, outside the workdir
  sources = []
  for key, split in (('fid_train', config.data.train_split), ('fid_test', config.data.eval_split)):
    it = input_pipeline.create_eval_iterator(config, split, config.eval.inception_batch_size)
    cache_key = fid_cache.statistics_key(config.data, split, it.num_examples, net.protocol)
    path = ref_stats_path(config, split, it.num_examples, net.protocol)
    cached = fid_cache.load_statistics(path, cache_key)
    if jax.process_count() > 1:  # each host may have its own cache: compute unless every process has the file
      everywhere = sharding.to_host(np.asarray([cached is not None]))
      cached = cached if bool(np.all(everywhere)) else None
    sources.append(ReferenceSource(key, split, path, it, cached, cache_key))
  return sources


def reference_statistics(source: ReferenceSource, net, eval_dir: str,
                         mesh: jax.sharding.Mesh) -> Tuple[np.ndarray, np.ndarray, int, str]:
  """(mu, sigma, count, cache file) of the Inception features of EVERY example of `source.split`.

  From the cache when valid, else computed once and cached in `source.path` for every later evaluation on this
  machine; the pass over the split is itself resumable (`<workdir>/eval/<cache name>.partial.npz`) and logs its rate
  and ETA (a cold cache is the long part of a small evaluation: minutes per thousand images on a CPU).
  """
  split, path, it = source.split, source.path, source.iterator
  if source.cached is not None:
    return source.cached + (path,)
  logging.info('FID reference statistics of %s are not cached yet: computing them once (%d examples, %d batches '
               'through Inception; an ETA follows the first batches), then kept in %s.', split, it.num_examples,
               len(it), path)
  progress = _Progress(eval_dir, os.path.basename(path))
  name = os.path.basename(path)[:-len('.npz')] + '.partial'
  state = progress.load(name)
  acc, done = None, 0
  if state is not None:
    done = int(state.pop('batches_done'))
    acc = metrics.FeatureStatsAccumulator.from_state_dict(state)
    logging.info('FID reference statistics of %s: resuming after %d of %d batches.', split, done, len(it))
  log = console.ProgressLog(len(it) - done)
  for b, batch in enumerate(it):
    if b < done:
      continue
    features, _ = _feature_batch(net, images_lib.to_uint8(batch['image']), batch['mask'], mesh, False)
    acc = acc or metrics.FeatureStatsAccumulator(features.shape[1])
    acc.update(features)
    progress.save(name, {**acc.state_dict(), 'batches_done': np.asarray(b + 1, np.int64)}, force=b + 1 == len(it))
    if log.due(b + 1 - done):
      logging.info('FID reference statistics of %s: batch %d/%d, %s, ETA %s', split, b + 1, len(it), log.rate(),
                   log.eta())
  mu, sigma = acc.finalize()
  # Every process holds the same statistics and writes them: each host's cache gets them, and on a shared file
  # system the writes are safe together (`fid_cache.save_statistics`).
  fid_cache.save_statistics(path, source.cache_key, mu, sigma, acc.count)
  if jax.process_index() == 0:
    os.remove(progress.path(name))
  return mu, sigma, acc.count, path


def sample_features(config: ml_collections.ConfigDict, model, diffusion: diffusion_lib.Diffusion,
                    mesh: jax.sharding.Mesh, params: Any, net,
                    progress: _Progress) -> Tuple[metrics.FeatureStatsAccumulator, Optional[np.ndarray]]:
  """Draws `eval.num_samples` samples (config.sample's sampler, batches of sample.batch_size, batch i with key
  fold_in(sample stream, i) as `--mode=sample`), quantised to uint8 like saved samples, and accumulates their
  Inception features (plus logits for IS). Resumes from the saved accumulator; logits are kept per batch. Logs the
  rate and ETA of the sample batches."""
  num, batch = config.eval.num_samples, config.sample.batch_size
  num_batches = -(-num // batch)
  with_logits = getattr(net, 'logits', None) is not None
  state = progress.load('samples')
  acc, done = None, 0
  if state is not None:
    done = int(state.pop('batches_done'))
    acc = metrics.FeatureStatsAccumulator.from_state_dict(state)
    logging.info('FID samples: resuming after %d of %d batches.', done, num_batches)
  if done < num_batches:
    sample_fn = sample.make_sample_fn(config, model, diffusion, mesh, batch)
    labels_all = sample.sample_labels(config, num)
    base_rng = random_streams.stream(config.seed, 'sample')
    # Inception chunks no larger than a sample batch: a small sample batch is not padded to a large chunk.
    chunk = min(config.eval.inception_batch_size, batch)
    log = console.ProgressLog(num_batches - done)
    for i in range(done, num_batches):
      labels = None if labels_all is None else np.resize(labels_all[i * batch:(i + 1) * batch], batch)
      images = sample.generate(sample_fn, params, jax.random.fold_in(base_rng, i), labels, mesh, batch)
      images = images[:min(batch, num - i * batch)]
      features, logits = _features_of(net, images, mesh, chunk, with_logits)
      acc = acc or metrics.FeatureStatsAccumulator(features.shape[1])
      acc.update(features)
      if with_logits and jax.process_index() == 0:
        path = os.path.join(progress.directory, f'logits_{i}.npy')
        atomic_write.atomic_write(path, lambda tmp, lg=logits: np.save(tmp, lg))
      progress.save('samples', {**acc.state_dict(), 'batches_done': np.asarray(i + 1, np.int64)},
                    force=i + 1 == num_batches)
      if log.due(i + 1 - done):
        logging.info('FID samples: batch %d/%d, %s, ETA %s', i + 1, num_batches, log.rate(), log.eta())
  logits = None
  if with_logits:
    logits = np.concatenate([np.load(os.path.join(progress.directory, f'logits_{i}.npy'))
                             for i in range(num_batches)])
  return acc, logits


def compute_fid(config: ml_collections.ConfigDict, model, diffusion: diffusion_lib.Diffusion,
                mesh: jax.sharding.Mesh, params: Any, net, eval_dir: str, progress: _Progress,
                references: Optional[List[ReferenceSource]] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """FID against the train and eval splits (`references`, default `reference_sources`) and the Inception Score;
  returns (results, protocol entries)."""
  refs = {}
  for source in references if references is not None else reference_sources(config, net, eval_dir):
    refs[source.key] = reference_statistics(source, net, eval_dir, mesh) + (source.split,)
  acc, logits = sample_features(config, model, diffusion, mesh, params, net, progress)
  mu, sigma = acc.finalize()
  num = acc.count
  results: Dict[str, Any] = {'num_samples': num}
  # A matrix square root of the feature dimension per reference: about a minute each for 2048-d on a 2-core CPU.
  logging.info('FID: Frechet distances of %d samples to %d reference statistics (%d-d features).', num, len(refs),
               len(mu))
  for key, (ref_mu, ref_sigma, _, _, _) in refs.items():
    results[key] = metrics.frechet_distance(mu, sigma, ref_mu, ref_sigma)
  results[metrics.metric_name('fid', num)] = results['fid_train']
  if num != metrics.PROTOCOL_NUM_SAMPLES:
    results[metrics.metric_name('fid_test', num)] = results['fid_test']
  if logits is not None and len(logits) >= 10:
    results['inception_score'], results['inception_score_std'] = metrics.inception_score(logits, splits=10)
  else:
    results['inception_score'] = None
    results['inception_score_unavailable'] = (getattr(net, 'is_unavailable_reason', None)
                                              or 'the Inception network has no classifier' if logits is None
                                              else f'{len(logits)} samples: need >= 10 (10 splits)')
  protocol = {
      'num_samples': num,
      'inception_weights_sha256': net.protocol.get('weights_sha256'),
      'resize': net.protocol.get('resize'),
      'reference': {key: {'split': split, 'num_examples': count, 'statistics_file': os.path.basename(path)}
                    for key, (_, _, count, path, split) in refs.items()},
      'fid_key': ('fid / fid@N = fid_train: FID against the train split (Ho et al. 2020, Table 1); fid@N marks '
                  f'N != {metrics.PROTOCOL_NUM_SAMPLES} samples'),
      'samples': ('uint8 NHWC round((x + 1) * 127.5) of the final sample (no noise added at t = 0), as saved by '
                  '--mode=sample; the same seeds as --mode=sample'),
      'statistics': ('float64 mean and unbiased covariance of pool3; Frechet distance, Tr((S1 S2)^1/2) from '
                     'symmetric eigendecompositions (TTUR sqrtm value to ~1e-9)'),
      'inception_score_splits': 10,
      'inception': {k: v for k, v in net.protocol.items() if k != 'weights_path'},
  }
  return results, protocol


# ------------------------------------------------------------------------------------------------- driver


def _count(n: int, singular: str, plural: str) -> str:
  return f'{n} {singular if n == 1 else plural}'


def sampler_description(config: ml_collections.ConfigDict, diffusion: diffusion_lib.Diffusion) -> str:
  """`ancestral, 100 of 1000 steps`, `ddim eta=0, 50 of 1000 steps, guidance 3`: what one FID sample costs."""
  s, num_t = config.sample, diffusion.num_timesteps
  steps = samplers.num_sampling_steps(num_t, s)
  text = s.method + (f' eta={s.eta:g}' if s.method == 'ddim' else '') + f', {steps} of {num_t} steps'
  return text + (f', guidance {s.guidance_scale:g}' if s.guidance_scale > 0 else '')


def describe_plan(config: ml_collections.ConfigDict, step: int, diffusion: diffusion_lib.Diffusion,
                  bpd_it: Optional[input_pipeline.EvalIterator],
                  references: Optional[List[ReferenceSource]]) -> str:
  """The first line of an evaluation: what will be computed, in how many batches, so its length can be judged
  before the first progress line (a bits/dim batch can take many minutes on a CPU)."""
  parts = [f'Evaluating step {step} (EMA parameters)']
  if bpd_it is None:
    parts.append('bits/dim off')
  else:
    chunk_size, num_chunks = bpd_chunks(diffusion.num_timesteps)
    subset = f'the first {bpd_it.num_examples}' if config.eval.bpd_num_examples else f'all {bpd_it.num_examples}'
    parts.append(f'bits/dim of {subset} {config.data.eval_split!r} examples in '
                 f'{_count(len(bpd_it), "batch", "batches")} of {config.eval.bpd_batch_size} x '
                 f'{diffusion.num_timesteps} timesteps ({_count(num_chunks, "chunk", "chunks")} of {chunk_size})')
  if references is None:
    parts.append('FID/IS off')
  else:
    num, batch = config.eval.num_samples, config.sample.batch_size
    parts.append(f'FID/IS of {num} samples in {_count(-(-num // batch), "batch", "batches")} of {batch} '
                 f'({sampler_description(config, diffusion)})')
    for source in references:
      if source.cached is not None:
        parts.append(f'{source.key} reference {source.split!r} from {source.path}')
      else:
        parts.append(f'{source.key} reference {source.split!r} to compute ({source.iterator.num_examples} examples, '
                     f'{_count(len(source.iterator), "batch", "batches")})')
  return '; '.join(parts)


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, inception: Any = None) -> Dict[str, Any]:
  """`--mode=eval`: evaluates the EMA parameters of checkpoint `config.eval.step` (None = latest).

  Args:
    config: the experiment config (`eval`, `sample`, `data`, `model`, `diffusion` sections).
    workdir: the run directory; results go to `<workdir>/eval/step_<N>.json` and TensorBoard.
    inception: the FID network (`.features`, `.logits`, `.protocol`); None = `load_fid_network(config)`.

  Returns:
    The dict written to the json file.

  Raises:
    FIDNetworkUnavailableError: FID is on and the Inception weights are missing (before anything is computed).
  """
  cfg = config.eval
  net = None
  if cfg.fid:
    if cfg.num_samples < 2:
      raise ConfigError(f'config.eval.num_samples={cfg.num_samples} is invalid: FID needs >= 2')
    net = inception if inception is not None else load_fid_network(config)  # fail fast, before any sampling
  step, _, ema_params = checkpointing.restore_inference_params(workdir, cfg.step)
  eval_dir = os.path.join(workdir, 'eval')
  progress = _Progress(os.path.join(eval_dir, f'step_{step}.progress'), _fingerprint(config, step))
  mesh = sharding.create_mesh()
  params = jax.device_put(ema_params, sharding.replicated(mesh))
  model = models.create_model(config)
  diffusion = diffusion_lib.from_config(config.diffusion)

  results: Dict[str, Any] = {'step': step}
  protocol: Dict[str, Any] = {'params': 'EMA', 'ema_decay': config.training.ema_decay, 'checkpoint_step': step,
                              'seed': config.seed}
  bpd_it = bpd_iterator(config) if cfg.bpd else None
  references = reference_sources(config, net, eval_dir) if net is not None else None
  logging.info('%s', describe_plan(config, step, diffusion, bpd_it, references))
  if cfg.bpd:
    results.update(compute_bpd(config, model, diffusion, mesh, params, progress, bpd_it))
    protocol['bpd'] = BPD_DEFINITION
    protocol['bpd_details'] = {
        'split': config.data.eval_split, 'num_examples': results['bpd_terms']['num_examples'],
        'batch_size': cfg.bpd_batch_size, 'clip_denoised': True, 'num_timesteps': diffusion.num_timesteps,
        'noise': ('fresh per timestep and batch: fold_in(fold_in(fold_in(key(seed), '
                  f'{random_streams.STREAM_IDS["bpd"]}), batch), t)'),
        'labels': 'true labels (conditional bound)' if config.model.num_classes else None,
        'rate_distortion': 'Ho et al. 2020 Sec. 4.3: rate = L_T + sum_{k>=t} L_k, distortion = sum_{k<t} L_k; '
                           'rmse of x0_hat(x_t) on [0, 255]'}
  if net is not None:
    fid_results, fid_protocol = compute_fid(config, model, diffusion, mesh, params, net, eval_dir, progress,
                                            references)
    results.update(fid_results)
    protocol.update(fid_protocol)
    s = config.sample
    protocol['sampler'] = {**samplers.sampler_settings(s), 'batch_size': s.batch_size,
                           'num_timesteps': diffusion.num_timesteps}
  results['protocol'] = protocol

  path = os.path.join(eval_dir, f'step_{step}.json')
  if jax.process_index() == 0:
    def write(tmp):
      with open(tmp, 'w') as f:
        json.dump(results, f, indent=2)
    atomic_write.atomic_write(path, write)
  scalars = {f'eval/{k}': v for k, v in results.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k != 'step'}
  if cfg.bpd:
    scalars['eval/bpd_prior'] = results['bpd_terms']['prior']
    scalars['eval/bpd_decoder'] = results['bpd_terms']['decoder']
  with tensorboard_writer.create_writer(workdir, enabled=jax.process_index() == 0) as writer:
    writer.write_scalars(step, scalars)
  progress.clear()
  logging.info('Evaluation of step %d written to %s: %s', step, path, scalars)
  return results
