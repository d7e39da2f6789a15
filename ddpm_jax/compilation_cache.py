"""JAX's persistent compilation cache, on by default for `main.py` and `ddpm_jax.figures`: a resumed, sampling or
evaluating run reads back the programs an earlier one compiled (a 2-step quickstart run 67 s -> 19 s on a 2-core
CPU, BENCHMARKS.md).

JAX keeps every program that took over `jax_persistent_cache_min_compile_time_secs` (1 s) to compile, keyed by the
program, jax/jaxlib version, devices and compile options, so a hit gives the same executable and the same numbers.
Two things are added here:

* one folder per kind of CPU (`<dir>/<arch>-<hash of the CPU model and flags>`): XLA:CPU compiles for the host's
  instruction set, and a cache on a network home serves machines that differ;
* damaged entries set aside: JAX writes an entry in place, so a process killed during the write leaves a truncated
  file that every later run fails to read (a warning) and recompiles, without replacing it. Entries written since
  the last start-up (but in the last minute, which may still be being written) are checked once (their compressed
  stream must be complete) and a damaged one is moved to `<folder>/damaged/`, never deleted.
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import time
import zlib
from typing import Optional

from absl import flags
from absl import logging

from ddpm_jax import cache_home
from ddpm_jax.errors import UserError

flags.disclaim_key_flags()  # `define_flag` defines the flag for the command that calls it: its --help lists it

_CHECKED_STAMP = '.entries_checked'  # its mtime: entries modified before it passed the check
_DAMAGED = 'damaged'
_WRITE_GRACE_S = 60.0  # an entry this recent may still be being written
_ZSTD_MAGIC = b'\x28\xb5\x2f\xfd'


def machine_tag() -> str:
  """`<arch>-<12 hex>`: the machine architecture and a hash of the CPU's model name and feature flags."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
      ident = ''.join(sorted({line for line in f if line.startswith(('model name', 'flags', 'Features', 'CPU part'))}))
  except OSError:
    ident = platform.processor()
  return f'{platform.machine() or "cpu"}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}'


def _zstd_decompressor():
  try:
    from compression import zstd  # pylint: disable=g-import-not-at-top  # Python >= 3.14
    return zstd.ZstdDecompressor()
  except ImportError:
    pass
  try:
    import zstandard  # pylint: disable=g-import-not-at-top
    return zstandard.ZstdDecompressor().decompressobj()
  except ImportError:
    return None


def _is_complete(data: bytes) -> Optional[bool]:
  """Whether `data` is one complete compressed stream (JAX writes zstd, or zlib without a zstd module); None when
  the format or its decompressor is unknown here (the entry is left alone)."""
  if data.startswith(_ZSTD_MAGIC):
    stream = _zstd_decompressor()
  elif data[:1] == b'\x78':
    stream = zlib.decompressobj()
  else:
    return None
  if stream is None:
    return None
  try:
    stream.decompress(data)
  except Exception:  # pylint: disable=broad-except  # zlib.error, zstd's ZstdError: a corrupt stream
    return False
  return bool(stream.eof)


def set_aside_damaged_entries(path: str, now: Optional[float] = None) -> list[str]:
  """Moves the entries of `path` written since the last check whose stream is incomplete to `path/damaged/`;
  returns their names. Entries of the last minute are left for the next check: another process may be writing
  them (several runs can share the folder)."""
  stamp = os.path.join(path, _CHECKED_STAMP)
  since = os.stat(stamp).st_mtime if os.path.exists(stamp) else 0.0
  until = (time.time() if now is None else now) - _WRITE_GRACE_S
  moved = []
  for entry in os.scandir(path):
    try:
      if not entry.is_file() or entry.name.startswith('.') or not since <= entry.stat().st_mtime < until:
        continue
      with open(entry.path, 'rb') as f:
        complete = _is_complete(f.read())
      if complete is False:
        os.makedirs(os.path.join(path, _DAMAGED), exist_ok=True)
        os.replace(entry.path, os.path.join(path, _DAMAGED, entry.name))
        moved.append(entry.name)
    except FileNotFoundError:
      continue  # moved or evicted by another process meanwhile
  with open(stamp, 'w', encoding='utf-8'):
    pass
  os.utime(stamp, (until, until))  # what is newer than this is checked at the next start-up
  return moved


def define_flag() -> None:
  """`--compilation_cache_dir` (default 'auto'), for the commands that compile: main.py and ddpm_jax.figures."""
  flags.DEFINE_string('compilation_cache_dir', 'auto', 'Where compiled programs are kept between runs, so a resumed '
                      'or sampling run does not compile them again: \'auto\' = $JAX_COMPILATION_CACHE_DIR if set, '
                      'else $XDG_CACHE_HOME/ddpm_jax/jax_compilation (~/.cache/...); a folder; or empty to turn it '
                      'off.')


def enable(directory: Optional[str]) -> Optional[str]:
  """Points JAX's persistent compilation cache at a folder; returns the folder used, or None when it is off.

  `directory`: None leaves JAX's own setting alone (`$JAX_COMPILATION_CACHE_DIR`, or off); '' turns the cache off;
  'auto' is `$JAX_COMPILATION_CACHE_DIR` when set, else `<cache home>/jax_compilation/<machine>` (the cache home of
  the FID statistics; skipped with a warning if it cannot be written); any other value is a folder whose
  `<machine>` subfolder is used, and one that cannot be written is a `UserError`. Call it before anything compiles:
  JAX decides whether to use the cache at the first compile of the process.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if directory is None or (directory == 'auto' and jax.config.jax_compilation_cache_dir):
    return jax.config.jax_compilation_cache_dir
  if not directory:
    jax.config.update('jax_compilation_cache_dir', None)
    return None
  base = (os.path.join(cache_home.cache_home(), 'jax_compilation') if directory == 'auto'
          else os.path.expanduser(directory))
  path = os.path.join(base, machine_tag())
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write_check_'):
      pass
    moved = set_aside_damaged_entries(path)
  except OSError as e:
    problem = f'{path} is not writable ({e.strerror or e})'
    if directory != 'auto':
      raise UserError(f'--compilation_cache_dir={directory}: {problem}; choose a writable folder, or pass '
                      '--compilation_cache_dir= to compile every time') from None
    logging.warning('Compilation cache off: %s (--compilation_cache_dir= chooses another folder).', problem)
    return None
  if moved:
    logging.warning('Compilation cache: %d damaged entr%s moved to %s (they are compiled again).', len(moved),
                    'y' if len(moved) == 1 else 'ies', os.path.join(path, _DAMAGED))
  jax.config.update('jax_compilation_cache_dir', path)
  return path
