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
atomically (tmp file + os.replace) under `<workdir>/eval/` at most every `evaluation.progress.PROGRESS_SAVE_SECONDS`,
and a restarted evaluation skips what was done. Deterministic: every batch has its own key
(`fold_in(stream, batch_index)`) and host sums are float64 in a fixed order, so a resumed run gives bit-identical
numbers.

Tells how long it takes: the first line is the plan (checkpoint step; bits/dim examples, batches and timesteps;
FID samples, batches and sampler; each reference split computed or read from its cache), then progress lines with a
rate and an ETA per phase (bits/dim, computed by `bits_per_dim`, between chunks of `BPD_CHUNK_TIMESTEPS`
timesteps, since one batch of the bound is T network calls), and the last line says where the results were written.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np

from ddpm_jax import atomic_write
from ddpm_jax import bits_per_dim
from ddpm_jax import checkpointing
from ddpm_jax import console
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import images as images_lib
from ddpm_jax import input_pipeline
from ddpm_jax import models
from ddpm_jax import random_streams
from ddpm_jax import sample
from ddpm_jax import samplers
from ddpm_jax import sharding
from ddpm_jax import tensorboard_writer
from ddpm_jax.errors import ConfigError, UserError
from ddpm_jax.evaluation import cache as fid_cache
from ddpm_jax.evaluation import metrics
from ddpm_jax.evaluation import progress as progress_lib



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


def _hash(obj: Any, length: int = 16) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _fingerprint(config: ml_collections.ConfigDict, step: int) -> str:
  """Everything the numbers depend on: a progress file from another config is never resumed."""
  data = {k: v for k, v in config.data.to_dict().items() if k not in ('num_workers', 'prefetch')}
  parts = {name: config[name].to_dict() for name in ('model', 'diffusion', 'sample', 'eval')}
  parts['eval'].pop('cache_dir', None)  # where the reference statistics are cached does not change any number
  return _hash({'seed': config.seed, 'step': step, 'data': data, **parts})


# ----------------------------------------------------------------------------------------------- FID / IS


def _feature_batch(net, local_images: np.ndarray, local_mask: np.ndarray, mesh: jax.sharding.Mesh,
                   with_logits: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """Inception features (and logits) of a global batch given as this process's uint8 slice, sharded over the
  mesh; returns host arrays of the mask=True rows of the whole global batch, in global order."""
  local = sharding.pad_local({'image': local_images, 'mask': np.asarray(local_mask, bool)}, jax.local_device_count())
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
  progress = progress_lib.Progress(eval_dir, os.path.basename(path))
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
                    progress: progress_lib.Progress) -> Tuple[metrics.FeatureStatsAccumulator, Optional[np.ndarray]]:
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
                mesh: jax.sharding.Mesh, params: Any, net, eval_dir: str, progress: progress_lib.Progress,
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
    chunk_size, num_chunks = bits_per_dim.bpd_chunks(diffusion.num_timesteps)
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
  progress = progress_lib.Progress(os.path.join(eval_dir, f'step_{step}.progress'), _fingerprint(config, step))
  mesh = sharding.create_mesh()
  params = jax.device_put(ema_params, sharding.replicated(mesh))
  model = models.create_model(config)
  diffusion = diffusion_lib.from_config(config.diffusion)

  results: Dict[str, Any] = {'step': step}
  protocol: Dict[str, Any] = {'params': 'EMA', 'ema_decay': config.training.ema_decay, 'checkpoint_step': step,
                              'seed': config.seed}
  bpd_it = bits_per_dim.bpd_iterator(config) if cfg.bpd else None
  references = reference_sources(config, net, eval_dir) if net is not None else None
  logging.info('%s', describe_plan(config, step, diffusion, bpd_it, references))
  if cfg.bpd:
    results.update(bits_per_dim.compute_bpd(config, model, diffusion, mesh, params, progress, bpd_it))
    protocol['bpd'] = bits_per_dim.BPD_DEFINITION
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
