"""oneDNN's convolution kernels for the U-Net's 3x3 convolutions on the CPU, called through XLA's FFI.

At the quickstart's shapes (batch 16, 7x7 to 28x28, 32-128 channels) XLA:CPU's own kernels run a convolution's
forward, input-gradient and weight-gradient passes 2-4x slower than oneDNN's; with oneDNN the whole quickstart train
step is 1.4-1.5x faster (BENCHMARKS.md "oneDNN convolutions"). `conv3x3_onednn.cc` wraps the three oneDNN primitives
as XLA FFI handlers; `available()` compiles it once per machine with g++ (against jaxlib's FFI headers and the
`onednn-cpu-gomp` / `onednn-devel-cpu-gomp` wheels of requirements.txt) into `<cache home>/kernels/`, loads it and
registers the handlers (a cached library that no longer loads is moved aside, `<name>.unloadable-<time>`, and
built again). `models/ops.py` calls them only in programs lowered for the CPU.

Where anything is missing (not Linux x86-64, no g++, the oneDNN wheels not installed, a failed build)
`available()` is False, the log says why (once), and the CPU keeps XLA's kernels: the same results up to float32
summation order. `DDPM_JAX_ONEDNN=0` in the environment turns the kernels off. The choice is made when a function is
traced, and JAX keeps its traces: set the variable before the process traces anything (or `jax.clear_caches()`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import time
from typing import Optional

from absl import logging
import jax
import jaxlib

from ddpm_jax import atomic_write
from ddpm_jax import cache_home

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'conv3x3_onednn.cc')
_HANDLERS = ('forward', 'input_grad', 'weight_grad')
SWITCH_ENV = 'DDPM_JAX_ONEDNN'


def _library_path(lib_dir: str) -> str:
  """`<cache home>/kernels/conv3x3_onednn-<key>.so`, the key covering the source, jaxlib and the oneDNN library."""
  with open(_SOURCE, 'rb') as f:
    key = hashlib.sha256(f.read())
  key.update(jaxlib.__version__.encode())
  key.update(os.path.realpath(os.path.join(lib_dir, 'libdnnl.so')).encode())
  return os.path.join(cache_home.cache_home(), 'kernels', f'conv3x3_onednn-{key.hexdigest()[:16]}.so')


def _compile(lib_dir: str, include_dir: str, out: str) -> None:
  subprocess.run(['g++', '-O2', '-std=c++17', '-w', '-shared', '-fPIC', _SOURCE, '-o', out,
                  '-I', jax.ffi.include_dir(), '-I', include_dir, '-L', lib_dir, '-ldnnl', f'-Wl,-rpath,{lib_dir}'],
                 check=True, capture_output=True, text=True, timeout=600)


def _build_and_load(path: str, lib_dir: str, include_dir: str) -> ctypes.CDLL:
  if os.path.exists(path):
    try:
      return ctypes.cdll.LoadLibrary(path)
    except OSError as e:
      # Damaged after it was written (a full disk, a copied cache): set aside for a look, never deleted, and rebuilt.
      aside = f'{path}.unloadable-{time.strftime("%Y%m%d-%H%M%S")}'
      os.replace(path, aside)
      logging.warning('%s could not be loaded (%s): moved to %s and built again', path, e, aside)
  # Written under a temporary name and renamed: a killed build leaves no truncated library under the real name.
  atomic_write.atomic_write(path, lambda tmp: _compile(lib_dir, include_dir, tmp))
  return ctypes.cdll.LoadLibrary(path)


def _load() -> Optional[str]:
  """Builds (once per machine), loads and registers the handlers; returns why not, or None when they are ready."""
  if sys.platform != 'linux' or platform.machine() != 'x86_64':
    return f'requirements.txt installs oneDNN on Linux x86-64 only, this is {sys.platform} {platform.machine()}'
  # The wheels install their files as pip "data" under the environment's prefix.
  lib_dir, include_dir = os.path.join(sys.prefix, 'lib'), os.path.join(sys.prefix, 'include')
  if not (os.path.exists(os.path.join(lib_dir, 'libdnnl.so'))
          and os.path.exists(os.path.join(include_dir, 'oneapi', 'dnnl', 'dnnl.hpp'))):
    return f'the onednn-cpu-gomp and onednn-devel-cpu-gomp wheels are not installed in {sys.prefix}'
  path = _library_path(lib_dir)
  try:
    library = _build_and_load(path, lib_dir, include_dir)
  except FileNotFoundError:
    return 'no g++ to build the kernels with'
  except subprocess.CalledProcessError as e:
    return f'g++ failed on {_SOURCE}: {(e.stderr or "").strip()[-500:]}'
  except (OSError, subprocess.TimeoutExpired) as e:
    return f'building or loading {path} failed: {e}'
  for name in _HANDLERS:
    symbol = f'ddpm_conv3x3_{name}'
    jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
  return None


@functools.cache
def _loaded() -> bool:
  why_not = _load()
  if why_not:
    # A console line where the CPU is what runs the step; on accelerator hosts the CPU branch is traced but unused.
    log = logging.info if jax.default_backend() == 'cpu' else logging.debug
    log("CPU convolutions use XLA's kernels (oneDNN's are not used: %s)", why_not)
  return why_not is None


def available() -> bool:
  """Whether programs traced now for the CPU use oneDNN: not switched off, and the handlers built, loaded and
  registered with XLA (tried once per process)."""
  return os.environ.get(SWITCH_ENV, '1') != '0' and _loaded()


def _call(name: str, shape: tuple[int, ...], *args: jax.Array) -> jax.Array:
  # Under vmap each example of the mapped axis is one call (the handlers take exactly 4-D arrays).
  return jax.ffi.ffi_call(f'ddpm_conv3x3_{name}', jax.ShapeDtypeStruct(shape, args[0].dtype),
                          vmap_method='sequential')(*args)


def conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
  """y = conv(x, w): x (N, H, W, C_in) and w (3, 3, C_in, C_out) float32, stride 1, zero padding 1 on each side."""
  return _call('forward', x.shape[:3] + (w.shape[3],), x, w)


def conv3x3_input_grad(g: jax.Array, w: jax.Array) -> jax.Array:
  """dL/dx of `conv3x3(x, w)` given g = dL/dy."""
  return _call('input_grad', g.shape[:3] + (w.shape[2],), g, w)


def conv3x3_weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """dL/dw of `conv3x3(x, w)` given g = dL/dy."""
  return _call('weight_grad', (3, 3, x.shape[3], g.shape[3]), x, g)
