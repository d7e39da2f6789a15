"""Resumable evaluation passes: partial results saved atomically as `.npz` files tagged with a fingerprint.

A long pass (bits/dim over a split, FID samples, reference statistics) saves its accumulators at most every
`PROGRESS_SAVE_SECONDS` (and after its last batch); a restarted evaluation with the same fingerprint (everything the
numbers depend on) resumes from them, one with another fingerprint ignores them.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Dict, Optional

from absl import logging
import jax
import numpy as np

from ddpm_jax import atomic_write

# Progress is written at most this often (and always after the last batch of a phase).
PROGRESS_SAVE_SECONDS = 60.0


class Progress:
  """Partial results saved as `.npz` files tagged with a fingerprint; files with another fingerprint are ignored."""

  def __init__(self, directory: str, fingerprint: str):
    self.directory, self.fingerprint = directory, fingerprint
    self._last_save: Dict[str, float] = {}

  def path(self, name: str) -> str:
    return os.path.join(self.directory, f'{name}.npz')

  def load(self, name: str) -> Optional[Dict[str, np.ndarray]]:
    path = self.path(name)
    if not os.path.isfile(path):
      return None
    with np.load(path) as z:
      state = {k: np.array(z[k]) for k in z.files}
    if str(state.pop('fingerprint', '')) != self.fingerprint:
      logging.warning('Ignoring %s: written by an evaluation with another config.', path)
      return None
    return state

  def save(self, name: str, arrays: Dict[str, Any], force: bool = False) -> None:
    now = time.monotonic()
    if not force and now - self._last_save.get(name, -np.inf) < PROGRESS_SAVE_SECONDS:
      return
    self._last_save[name] = now
    if jax.process_index() == 0:
      tagged = {**arrays, 'fingerprint': np.asarray(self.fingerprint)}
      atomic_write.atomic_write(self.path(name), lambda tmp: np.savez(tmp, **tagged))

  def clear(self) -> None:
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      shutil.rmtree(self.directory)
