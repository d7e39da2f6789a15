"""The config a workdir records (`<workdir>/config.json`), so that a run directory describes itself.

Training and `python -m ddpm_jax.convert` write the resolved config there. `--mode=sample|eval` and
`python -m ddpm_jax.figures` read it back when no `--config` is given. A `--config` given alongside may change how
samples are drawn and evaluated (`sample.*`, `eval.*`, `seed`, the data to compare with, `model.dtype`, ...), but not
the fields that fix what was trained: the architecture (`model.*`), the diffusion (`diffusion.*`) and the image
shape (`data.image_size`, `data.num_channels`, `data.pad_to`). Changing one of those is an error naming the field
and both values: the checkpoint would be read with another meaning. One exception: a run with a fixed reverse
variance may be sampled with the other one (`diffusion.var_type` fixedlarge <-> fixedsmall): the network predicts
only the mean, and sigma_t^2 = beta_t or beta~_t is the sampler's choice (Ho et al. 2020, §3.2).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Optional

from flax import traverse_util
import ml_collections

from ddpm_jax import atomic_write
from ddpm_jax import default_config
from ddpm_jax import diffusion
from ddpm_jax import errors
from ddpm_jax.errors import ConfigError, UserError

FILENAME = 'config.json'
# Sections, or single fields, a trained model is bound to; the exceptions change the computation, not the model.
FIXED_BY_THE_RUN = ('model', 'diffusion', 'data.image_size', 'data.num_channels', 'data.pad_to')
FREE_MODEL_FIELDS = ('model.dtype', 'model.remat')


def path(workdir: str) -> str:
  return os.path.join(workdir, FILENAME)


def write(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the resolved `config` to `<workdir>/config.json` (atomically: a reader never sees half a file)."""
  os.makedirs(workdir, exist_ok=True)
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  atomic_write.atomic_write(path(workdir), lambda tmp: pathlib.Path(tmp).write_text(text))
  return path(workdir)


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the configs use (ch_mult, attn_resolutions)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def read(workdir: str) -> ml_collections.ConfigDict:
  """The config recorded in `workdir`; `UserError` (one line) when it is missing or unreadable."""
  p = path(workdir)
  if not os.path.isdir(workdir):
    raise errors.workdir_missing(workdir)
  if not os.path.isfile(p):
    raise UserError(f'{p} does not exist: this workdir records no config (trained before configs were recorded?); '
                    'pass the run\'s config with --config')
  # Fields added to the package since the run was recorded take their defaults (which keep the old behaviour).
  # Updating the default config, not building one from the dict, keeps each field's type (a placeholder(int) that
  # is None stays an int field), so `--config.sample.step=N` can override a recording (configs/workdir.py).
  config = default_config.get_config()
  try:
    with open(p) as f:
      recorded = _tuples(json.load(f))
    config.update(recorded)  # recurses into sections: a section keeps the fields the recording does not name
  except (OSError, ValueError, TypeError) as e:  # TypeError: a (hand-edited) value of another type than its field
    raise UserError(f'{p} is not a readable config ({type(e).__name__}: {e}); pass the run\'s config with '
                    '--config') from None
  return config


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'model.ch': 128, ...}, sequences as tuples (a recording and a config file spell them alike)."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: _tuples(list(v)) if isinstance(v, (list, tuple)) else v for k, v in flat.items()}


def _fixed(field: str) -> bool:
  if field in FREE_MODEL_FIELDS:
    return False
  return any(field == f or field.startswith(f + '.') for f in FIXED_BY_THE_RUN)


def fixed_field_changes(recorded: ml_collections.ConfigDict, given: ml_collections.ConfigDict
                        ) -> list[tuple[str, Any, Any]]:
  """(field, recorded value, given value) for every field fixed by the run whose value differs."""
  a, b = _flat(recorded), _flat(given)
  # A field only one side has (newer or older than the recording) says nothing about a change.
  changes = [(f, a[f], b[f]) for f in sorted(set(a) & set(b)) if _fixed(f) and a[f] != b[f]]
  return [c for c in changes if not _is_a_fixed_variance_swap(*c)]


def _is_a_fixed_variance_swap(field: str, recorded: Any, given: Any) -> bool:
  return (field == 'diffusion.var_type' and recorded in diffusion.VAR_TYPES and given in diffusion.VAR_TYPES
          and not diffusion.learns_variance(recorded) and not diffusion.learns_variance(given))


def for_inference(workdir: str, given: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """The config to sample or evaluate `workdir` with: `given` (checked against the recording), else the recording.

  A workdir without a recording (converted or trained before configs were recorded) needs `given` and takes it as
  it is.
  """
  if given is None:
    return read(workdir)
  if not os.path.isfile(path(workdir)):
    return given
  changes = fixed_field_changes(read(workdir), given)
  if changes:
    field, recorded, value = changes[0]
    more = f' (and {len(changes) - 1} more: {", ".join(c[0] for c in changes[1:])})' if len(changes) > 1 else ''
    raise ConfigError(f'config.{field}={value!r} differs from {recorded!r} in {path(workdir)}{more}: the model was '
                      'trained with the recorded value (architecture, diffusion and image shape are fixed by the '
                      'run). Drop it from --config/overrides, or leave out --config to use the recorded config')
  return given
