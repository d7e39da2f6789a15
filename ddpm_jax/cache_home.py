"""The per-user cache directory: what is the same for every run on a machine and costs minutes to make.

`$XDG_CACHE_HOME/ddpm_jax`, default `~/.cache/ddpm_jax` (XDG base directories). It holds the FID Inception weights
and reference statistics (`evaluation/cache.py`), JAX's persistent compilation cache (`compilation_cache.py`) and
the compiled oneDNN convolution kernels (`models/onednn.py`).
"""

import os


def cache_home() -> str:
  """`$XDG_CACHE_HOME/ddpm_jax`, or `~/.cache/ddpm_jax` when XDG_CACHE_HOME is unset or empty."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'ddpm_jax')
