"""How good are a quickstart run's samples? FID@N against the mnist5k train statistics, and what a digit classifier
makes of them (issue 18's yardstick, measured the same way for every experiment).

  python bench/quickstart_quality.py --workdir=runs/quickstart                       # FID@1000, EMA params
  python bench/quickstart_quality.py --workdir=runs/quickstart --config=configs/quickstart.py \\
      --config.sample.method=ddim --config.sample.respacing=ddim100                  # another sampler, same model

The samples are drawn exactly as `--mode=sample` / `--mode=eval` draw them (the workdir's latest checkpoint, EMA
params, the config's sampler, batch i with key fold_in(sample stream, i)), quantised to uint8, written to
`<workdir>/quality/<tag>/samples.npz`, then
  * FID@N: Inception-v3 pool3 features under the frozen protocol of `--mode=eval`, against the statistics of all
    4,500 train digits read from the reference cache (`--mode=eval` writes it; computed here if missing);
  * the digit classifier of bench/digit_classifier.py (PCA+MLP, 94-95% on the 500 test digits): the fraction of
    samples it classifies with probability >= `--confidence` (a clean digit; blobs and broken strokes are not),
    and the class histogram of the samples (a model that draws mostly 1s scores well on confidence, not here).
The human-readable lines go first; the LAST line of stdout is one JSON object (also in `<tag>/quality.json`).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digit_classifier  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import checkpointing  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import diffusion as diffusion_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import evaluate  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import random_streams  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import sample  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import workdir_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS

def sampler_tag(config) -> str:
  s = config.sample
  return f'{s.method}_{s.respacing or config.diffusion.num_timesteps}_{config.diffusion.var_type}_eta{s.eta:g}'


def draw(config, workdir: str, num: int) -> tuple[int, np.ndarray, float]:
  """(checkpoint step, `num` uint8 samples, seconds) drawn as `--mode=eval` draws its FID samples."""
  mesh = sharding.create_mesh()
  step, _, ema_params = checkpointing.restore_inference_params(workdir, config.sample.step)
  ema_params = jax.device_put(ema_params, sharding.replicated(mesh))
  model, diffusion = models.create_model(config), diffusion_lib.from_config(config.diffusion)
  batch = config.sample.batch_size
  sample_fn = sample.make_sample_fn(config, model, diffusion, mesh, batch)
  base_rng = random_streams.stream(config.seed, 'sample')
  start, images = time.perf_counter(), []
  for i in range(-(-num // batch)):
    images.append(sample.generate(sample_fn, ema_params, jax.random.fold_in(base_rng, i), None, mesh, batch))
    logging.info('samples: batch %d/%d (%.0f s)', i + 1, -(-num // batch), time.perf_counter() - start)
  return step, np.concatenate(images)[:num], time.perf_counter() - start


def fid_to_train(config, images: np.ndarray) -> tuple[float, float]:
  """(FID of `images` against the train split's cached statistics, seconds)."""
  start = time.perf_counter()
  net = evaluate.load_fid_network(config)
  mesh = sharding.create_mesh()
  source = next(s for s in evaluate.reference_sources(config, net, '') if s.key == 'fid_train')
  ref_mu, ref_sigma, _, _ = evaluate.reference_statistics(source, net, '/tmp', mesh)
  acc = metrics.FeatureStatsAccumulator(2048)
  chunk = config.eval.inception_batch_size
  for i in range(0, len(images), chunk):
    acc.update(np.asarray(net.features(images[i:i + chunk]), np.float64))
  mu, sigma = acc.finalize()
  return metrics.frechet_distance(mu, sigma, ref_mu, ref_sigma), time.perf_counter() - start


def classify(images: np.ndarray, confidence: float) -> dict:
  """Confident fraction and class histogram of uint8 (N, 28, 28, 1) digits under the PCA+MLP classifier."""
  train_x, train_y = digit_classifier.load_digits('train')
  probabilities = digit_classifier.train_mlp_probabilities(train_x, train_y)
  probs = probabilities(digit_classifier.uint8_to_model_space(images))
  top = probs.max(axis=1)
  histogram = np.bincount(probs.argmax(axis=1), minlength=digit_classifier.NUM_CLASSES)
  return {'confident_fraction': float(np.mean(top >= confidence)), 'confidence': confidence,
          'class_histogram': histogram.tolist(),
          'class_histogram_confident': np.bincount(probs.argmax(axis=1)[top >= confidence],
                                                   minlength=digit_classifier.NUM_CLASSES).tolist()}


def main(argv):
  del argv
  config = workdir_config.for_inference(FLAGS.workdir, FLAGS.config)
  tag = FLAGS.tag or sampler_tag(config)
  out = os.path.join(FLAGS.workdir, 'quality', tag)
  os.makedirs(out, exist_ok=True)
  step, images, sample_s = draw(config, FLAGS.workdir, FLAGS.num_samples)
  np.savez(os.path.join(out, 'samples.npz'), images=images)
  fid, fid_s = fid_to_train(config, images)
  result = {'workdir': FLAGS.workdir, 'step': step, 'sampler': tag, 'num_samples': len(images),
            f'fid_train@{len(images)}': fid, **classify(images, FLAGS.confidence),
            'sample_s': sample_s, 'fid_s': fid_s, 'load_average_1min': os.getloadavg()[0]}
  print(f'{FLAGS.workdir} step {step}, {tag}: FID@{len(images)} {fid:.1f}, '
        f'{result["confident_fraction"]:.1%} confident digits, classes {result["class_histogram"]}')
  with open(os.path.join(out, 'quality.json'), 'w') as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result))


def define_flags() -> None:
  """Command-line flags (defined only when run as a script: tests import the helpers)."""
  config_flags.DEFINE_config_file('config', None, 'Optional: the run\'s config file with sampler overrides (default: '
                                  'the config the workdir records).')
  flags.DEFINE_string('workdir', None, 'A quickstart run directory.', required=True)
  flags.DEFINE_integer('num_samples', 1000, 'N of FID@N.')
  flags.DEFINE_string('tag', None, 'Subdirectory of <workdir>/quality for the samples and the JSON (default: derived '
                      'from the sampler).')
  flags.DEFINE_float('confidence', 0.9, 'Classifier probability that counts a sample as a clean digit.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
