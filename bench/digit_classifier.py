"""Do class-conditional digit samples show the digit they were generated for? (Issue 7, the quickstart_cond check)

  python bench/digit_classifier.py                      # train the classifier, report its mnist5k test accuracy
  python bench/digit_classifier.py --samples=runs/quickstart_cond/samples/step_2800/samples.npz
  python bench/digit_classifier.py --samples=... --classifier=nearest_mean --min_agreement=0.8

A small classifier is trained on the mnist5k 'train' digits (4,500), read through `ddpm_jax.input_pipeline` exactly
as `configs/quickstart_cond.py` feeds them to the model (28x28, or padded to `data.pad_to`), scaled to [-1, 1].
Its accuracy on mnist5k 'test' (500 held-out digits) is reported first: it bounds how far the agreement figure can
be trusted. With --samples, the `images` of a `--mode=sample` output (uint8 NHWC, mapped back to [-1, 1] as the
pipeline does) are classified and compared with the `labels` they were generated for (written by conditional
models only): the agreement per class and overall is the figure of the check ("a small classifier trained on the
same digits agrees for most samples").

Classifiers (`--classifier`), all deterministic and a few seconds on one CPU core:
  mlp           PCA to 50 dimensions, then an MLP with one hidden layer of 128 units (scikit-learn, bench-only
                dependency); ~95% on mnist5k test.
  knn           PCA to 50 dimensions, then the majority of the 5 nearest training digits; ~94%.
  nearest_mean  nearest class mean in pixel space (no dependency beyond NumPy); ~84%.

The human-readable lines go first; the LAST line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from typing import Callable, Optional

# Tiny matrices: one BLAS thread avoids oversubscription on shared CPUs (set before NumPy loads its BLAS).
for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
  os.environ.setdefault(_var, '1')

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_CLASSES = 10
CLASSIFIERS = ('mlp', 'knn', 'nearest_mean')
_PCA_DIMS = 50
_KNN_K = 5

Predictor = Callable[[np.ndarray], np.ndarray]


def quickstart_config():
  """The conditional quickstart's config (dataset, padding, classes): the digits as its model saw them."""
  from configs import quickstart_cond  # pylint: disable=g-import-not-at-top
  return quickstart_cond.get_config()


def load_digits(split: str, config=None) -> tuple[np.ndarray, np.ndarray]:
  """mnist5k `split` through the input pipeline: float32 (N, H, W, 1) in [-1, 1] and int32 (N,) labels.

  With the default (quickstart) config the arrays are cached per split and read-only.
  """
  if config is None:
    return _load_quickstart_digits(split)
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  images, labels = [], []
  it = input_pipeline.create_eval_iterator(config, split, 500, process_index=0, process_count=1)
  for batch in it:
    mask = np.asarray(batch['mask'], bool)
    images.append(np.asarray(batch['image'])[mask])
    labels.append(np.asarray(batch['label'])[mask])
  return np.concatenate(images), np.concatenate(labels).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _load_quickstart_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels = load_digits(split, quickstart_config())
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def uint8_to_model_space(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], the input pipeline's x / 127.5 - 1 (inverse of images.to_uint8)."""
  return np.asarray(images, np.float32) * np.float32(1 / 127.5) - np.float32(1)


def _flat(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float32).reshape(len(x), -1)


def _pca(x: np.ndarray, dims: int) -> Callable[[np.ndarray], np.ndarray]:
  mean = x.mean(axis=0)
  _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
  basis = vt[:dims].T
  return lambda z: (z - mean) @ basis


def _one_blas_thread():
  """One BLAS thread also when NumPy was loaded before this module (e.g. under pytest): on a shared CPU the
  multi-threaded SVD/matmuls of these tiny problems run several times slower than single-threaded."""
  try:
    from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top
  except ImportError:
    return contextlib.nullcontext()
  return threadpool_limits(limits=1, user_api='blas')


def _single_threaded(fn):
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with _one_blas_thread():
      return fn(*args, **kwargs)
  return wrapped


def train_classifier(images: np.ndarray, labels: np.ndarray, method: str = 'mlp', seed: int = 0) -> Predictor:
  """Fits `method` on (N, H, W, C) images in [-1, 1]; returns predict(images) -> (M,) int labels."""
  with _one_blas_thread():
    return _single_threaded(_train_classifier(images, labels, method, seed))


def _train_classifier(images: np.ndarray, labels: np.ndarray, method: str, seed: int) -> Predictor:
  if method not in CLASSIFIERS:
    raise ValueError(f'--classifier={method!r} is not one of {list(CLASSIFIERS)}')
  x, y = _flat(images), np.asarray(labels, np.int64)
  if method == 'nearest_mean':
    means = np.stack([x[y == k].mean(axis=0) for k in range(NUM_CLASSES)])
    # argmin |z - m|^2 = argmin (|m|^2 - 2 z.m): no (M, K, D) intermediate.
    sq = np.sum(means ** 2, axis=1)
    return lambda z: np.argmin(sq[None, :] - 2.0 * _flat(z) @ means.T, axis=1).astype(np.int32)
  project = _pca(x, _PCA_DIMS)
  features = project(x)
  if method == 'knn':
    train_sq = np.sum(features ** 2, axis=1)

    def predict_knn(z):
      f = project(_flat(z))
      dist = train_sq[None, :] - 2.0 * f @ features.T
      nearest = y[np.argsort(dist, axis=1, kind='stable')[:, :_KNN_K]]
      return np.asarray([np.bincount(row, minlength=NUM_CLASSES).argmax() for row in nearest], np.int32)

    return predict_knn
  probabilities = _fit_mlp(project, features, y, seed)
  return lambda z: np.argmax(probabilities(z), axis=1).astype(np.int32)


def _fit_mlp(project, features: np.ndarray, y: np.ndarray, seed: int) -> Callable[[np.ndarray], np.ndarray]:
  import warnings  # pylint: disable=g-import-not-at-top
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
  from sklearn.neural_network import MLPClassifier  # pylint: disable=g-import-not-at-top
  mlp = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-2, max_iter=200, random_state=seed)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', ConvergenceWarning)
    mlp.fit(features, y)
  return lambda z: mlp.predict_proba(project(_flat(z)))


def train_mlp_probabilities(images: np.ndarray, labels: np.ndarray, seed: int = 0
                            ) -> Callable[[np.ndarray], np.ndarray]:
  """The PCA+MLP classifier as predict_proba(images) -> (M, 10) class probabilities (unconditional samples:
  how many are confidently a digit, and which)."""
  with _one_blas_thread():
    x = _flat(images)
    project = _pca(x, _PCA_DIMS)
    return _single_threaded(_fit_mlp(project, project(x), np.asarray(labels, np.int64), seed))


def agreement(predicted: np.ndarray, labels: np.ndarray, num_classes: int = NUM_CLASSES) -> dict:
  """Overall and per-class fraction of `predicted == labels` (per class: over the samples OF that label)."""
  predicted, labels = np.asarray(predicted), np.asarray(labels)
  if predicted.shape != labels.shape:
    raise ValueError(f'{predicted.shape} predictions for {labels.shape} labels')
  per_class, counts = {}, {}
  for k in range(num_classes):
    mask = labels == k
    counts[str(k)] = int(mask.sum())
    per_class[str(k)] = float(np.mean(predicted[mask] == k)) if mask.any() else None
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, predicted), 1)
  return {'agreement': float(np.mean(predicted == labels)) if len(labels) else None, 'per_class': per_class,
          'counts': counts, 'confusion': confusion.tolist()}


def model_image_shape(config=None) -> tuple[int, int, int]:
  """(H, W, C) of the images the quickstart model sees (and samples)."""
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  config = config or quickstart_config()
  return models.image_shape(config)


def load_samples(path: str, image_shape: Optional[tuple[int, int, int]] = None) -> tuple[np.ndarray, np.ndarray]:
  """(images in [-1, 1], labels) of a `--mode=sample` samples.npz; clear errors for unconditional/foreign files."""
  image_shape = image_shape or model_image_shape()
  with np.load(path) as data:
    if 'images' not in data:
      raise ValueError(f'{path} has no `images` array (not a --mode=sample output); keys: {sorted(data.keys())}')
    if 'labels' not in data:
      raise ValueError(f'{path} has no `labels`: it was sampled from an unconditional model (model.num_classes=0); '
                       'sample the conditional quickstart (configs/quickstart_cond.py)')
    images, labels = data['images'], np.asarray(data['labels'], np.int64)
  if images.dtype != np.uint8 or images.shape[1:] != image_shape:
    raise ValueError(f'{path}: expected uint8 images of shape (N, {", ".join(map(str, image_shape))}) (the '
                     f'quickstart digits), got {images.dtype} {images.shape}')
  if labels.shape != (len(images),) or labels.min(initial=0) < 0 or labels.max(initial=0) >= NUM_CLASSES:
    raise ValueError(f'{path}: labels must be ({len(images)},) in [0, {NUM_CLASSES}), got shape {labels.shape}, '
                     f'range [{labels.min(initial=0)}, {labels.max(initial=0)}]')
  return uint8_to_model_space(images), labels


def run(samples: Optional[str] = None, method: str = 'mlp', seed: int = 0, log=print) -> dict:
  """Trains on mnist5k train, evaluates on test and (optionally) on `samples`; returns the JSON report."""
  start = time.perf_counter()
  config = quickstart_config()
  train_x, train_y = load_digits('train')
  test_x, test_y = load_digits('test')
  predict = train_classifier(train_x, train_y, method, seed)
  test = agreement(predict(test_x), test_y)
  log(f'classifier {method}: trained on {len(train_x)} mnist5k train digits, accuracy on the {len(test_x)} test '
      f'digits {test["agreement"]:.3f}')
  result = {'classifier': method, 'num_train': len(train_x), 'num_test': len(test_x),
            'test_accuracy': test['agreement'], 'test_per_class': test['per_class']}
  if samples:
    images, labels = load_samples(samples, model_image_shape(config))
    got = agreement(predict(images), labels)
    log(f'samples {samples}: {len(images)} images, classifier agrees with the generating label for '
        f'{got["agreement"]:.3f}')
    for k in range(NUM_CLASSES):
      frac = got['per_class'][str(k)]
      log(f'  class {k}: {got["counts"][str(k)]:4d} samples, agreement '
          f'{"-" if frac is None else f"{frac:.3f}"}')
    result.update(samples=samples, num_samples=len(images), agreement=got['agreement'],
                  per_class=got['per_class'], counts=got['counts'], confusion=got['confusion'])
  result['seconds'] = round(time.perf_counter() - start, 2)
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--samples', default=None, help='samples.npz written by --mode=sample (with `labels`).')
  parser.add_argument('--classifier', default='mlp', choices=CLASSIFIERS)
  parser.add_argument('--seed', type=int, default=0, help='MLP initialisation seed.')
  parser.add_argument('--min_agreement', type=float, default=0.0,
                      help='exit with status 1 when the sample agreement is below this (0 = report only).')
  args = parser.parse_args(argv)
  result = run(args.samples, args.classifier, args.seed)
  print(json.dumps(result))
  if args.samples and args.min_agreement > 0 and result['agreement'] < args.min_agreement:
    print(f'agreement {result["agreement"]:.3f} < --min_agreement={args.min_agreement}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
