"""The device mesh and the two layouts everything uses: batch sharded on `data`, everything else replicated.

One mesh axis `data` spans every device of every process. Each process feeds its local slice of a global batch
(`global_batch_array`) and reads results back with `to_host`, which gathers across processes; `pad_local` pads a
host batch with masked rows so it splits over the local devices.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def create_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes.

  Axis type Auto: with jax >= 0.11 `make_mesh` defaults to Explicit axes, under which the auto-sharded train step
  (global batch in, replicated state) no longer type-checks.
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Same value on every device (params, optimizer state, rng)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
  """Examples split across devices along the batch axis, after `leading_dims` unsharded axes (e.g. scan steps)."""
  return NamedSharding(mesh, P(*([None] * leading_dims), DATA_AXIS))


def global_batch_array(local: Any, sharding: NamedSharding) -> Any:
  """This process's NumPy slice(s) of a global batch → global `jax.Array`s (no data crosses processes)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def to_host(tree: Any) -> Any:
  """Fetches (possibly multi-process) global arrays as full NumPy arrays on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def pad_local(arrays: Dict[str, Optional[np.ndarray]], multiple: int) -> Dict[str, Optional[np.ndarray]]:
  """Pads every array along axis 0 to a multiple of `multiple` by repeating row 0 (mask padded with False)."""
  n = len(arrays['mask'])
  pad = (-n) % multiple
  if not pad:
    return arrays
  out = {}
  for k, v in arrays.items():
    if v is None:
      out[k] = None
    elif k == 'mask':
      out[k] = np.concatenate([v, np.zeros((pad,), bool)])
    else:
      out[k] = np.concatenate([v, np.repeat(v[:1], pad, axis=0)])
  return out
