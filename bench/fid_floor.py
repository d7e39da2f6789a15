"""FID floors of a dataset under the frozen protocol: its train split against itself in two halves (Issue 8).

  python bench/fid_floor.py --config=configs/quickstart.py --workdir=runs/quickstart

Every train example goes through the FID network once (`evaluate.load_fid_network`, the same code and weights as
`--mode=eval`). The features are split into two random halves (a fixed permutation, --seed; NOT even/odd indices:
mnist5k's order cycles through the classes, so its even and odd examples hold different digits) and the script
prints

  * `fid_train_halves`: FID between the two halves (N = half the split each): what two independent draws from the
    data distribution score, the floor a perfect model's samples approach at that N;
  * `fid_test_vs_train`: the `eval_split`'s features against the full train statistics (N = the eval split size):
    real held-out images scored exactly as `--mode=eval` scores N samples (`fid_train@N`).

It also writes the full train and eval-split statistics to the cache `--mode=eval` reads
(`<eval.cache_dir or ~/.cache/ddpm_jax>/fid_stats/`), so a following `--mode=eval` does not recompute them, and keeps
the features in `<workdir>/eval/features_<split>.npy` (reused by a second run).
The human-readable lines go first; the LAST line of stdout is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS


def split_features(config, split: str, net, mesh):
  """(N, 2048) float64 Inception pool3 features of every example of `split`, in the split's order."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ddpm_jax import images as images_lib  # pylint: disable=g-import-not-at-top
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  it = input_pipeline.create_eval_iterator(config, split, config.eval.inception_batch_size)
  feats = []
  for b, batch in enumerate(it):
    f, _ = evaluate._feature_batch(net, images_lib.to_uint8(batch['image']), batch['mask'], mesh, False)  # pylint: disable=protected-access
    feats.append(f)
    print(f'  {split}: batch {b + 1}/{len(it)}', flush=True)
  return np.concatenate(feats)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sharding  # pylint: disable=g-import-not-at-top
  from ddpm_jax.evaluation import cache as fid_cache  # pylint: disable=g-import-not-at-top
  from ddpm_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  eval_dir = os.path.join(FLAGS.workdir, 'eval')
  os.makedirs(eval_dir, exist_ok=True)
  t0 = time.perf_counter()
  net = evaluate.load_fid_network(config)
  mesh = sharding.create_mesh()
  stats, res = {}, {'config': config_flags.get_config_filename(FLAGS['config']), 'dataset': config.data.dataset,
                    'protocol': net.protocol, 'device': f'{jax.devices()[0].platform}:{jax.devices()[0].device_kind}'}
  for split in (config.data.train_split, config.data.eval_split):
    start = time.perf_counter()
    cache = os.path.join(eval_dir, f'features_{split}.npy')
    if os.path.isfile(cache):
      feats = np.load(cache)
    else:
      feats = split_features(config, split, net, mesh)
      np.save(cache, feats)
      res[f'{split}_inception_s'] = time.perf_counter() - start
    res[f'{split}_images'] = len(feats)
    stats[split] = metrics.feature_statistics(feats)
    path = evaluate.ref_stats_path(config, split, len(feats), net.protocol)
    fid_cache.save_statistics(path, fid_cache.statistics_key(config.data, split, len(feats), net.protocol),
                              *stats[split], len(feats))
    if split == config.data.train_split:
      order = np.random.default_rng(FLAGS.seed).permutation(len(feats))
      halves = order[:len(feats) // 2], order[len(feats) // 2:]
      res['halves_images'] = [len(h) for h in halves]
      res['fid_train_halves'] = metrics.frechet_distance(*metrics.feature_statistics(feats[halves[0]]),
                                                         *metrics.feature_statistics(feats[halves[1]]))
  res['fid_test_vs_train'] = metrics.frechet_distance(*stats[config.data.eval_split], *stats[config.data.train_split])
  res['total_s'] = time.perf_counter() - t0
  print(f'FID floors of {config.data.dataset} (Inception weights sha256 {net.protocol.get("weights_sha256")})')
  print(f'  train halves ({res["halves_images"][0]} vs {res["halves_images"][1]} images): '
        f'{res["fid_train_halves"]:.3f}')
  print(f'  {config.data.eval_split} ({res[config.data.eval_split + "_images"]} images) vs train statistics: '
        f'{res["fid_test_vs_train"]:.3f}')
  print(json.dumps(res, default=str))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', 'configs/quickstart.py', 'Path to an ml_collections config file.')
  flags.DEFINE_string('workdir', None, 'Run directory; statistics are cached in <workdir>/eval.', required=True)
  flags.DEFINE_integer('seed', 0, 'Seed of the permutation that splits the train split into halves.')
  app.run(main)
