"""Dispatch of `main.py --mode=train|sample|eval` to the library, after every check that needs no compiling."""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import ml_collections

from ddpm_jax import compilation_cache
from ddpm_jax import config_validation
from ddpm_jax import errors
from ddpm_jax import workdir_config
from ddpm_jax.errors import ConfigError, WorkdirError

MODES = ('train', 'sample', 'eval')


def check_workdir(workdir: str, mode: str) -> None:
  """The workdir exists (or can be created, for training) and takes files; raises `WorkdirError` otherwise."""
  if '://' in workdir:
    return  # object stores: orbax / the writers report their own errors
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir} is a file, not a directory')
  if mode != 'train' and not os.path.isdir(workdir):
    raise errors.workdir_missing(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_check_'):
      pass
  except OSError as e:
    raise WorkdirError(f'--workdir={workdir} is not writable ({e.strerror or e}); choose a writable directory'
                       ) from None


def run(mode: str, config: Optional[ml_collections.ConfigDict], workdir: str,
        compilation_cache_dir: Optional[str] = None) -> None:
  """Validates `config`, the data and `workdir` (before anything compiles), then trains, samples or evaluates.

  `config=None` (no --config) samples or evaluates with the config the workdir records (`workdir_config`); a
  config given for those modes is checked against it. `compilation_cache_dir` as in `compilation_cache.enable`
  (`main.py` passes its flag, default 'auto'; None leaves JAX's setting alone).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if mode not in MODES:
    raise ConfigError(f'--mode={mode!r} is invalid: must be one of {list(MODES)}')
  if mode == 'train' and config is None:
    raise ConfigError('--config is required for --mode=train (e.g. --config=configs/quickstart.py)')
  if mode != 'train':
    check_workdir(workdir, mode)  # it must exist before its recorded config is read
    config = workdir_config.for_inference(workdir, config)
  config_validation.validate_config(config, jax.device_count())
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  if mode in ('train', 'eval'):
    input_pipeline.check_data(config, _splits(config, mode))
  check_workdir(workdir, mode)  # after the data checks: a mistyped field leaves no new empty workdir behind
  if mode != 'train':
    from ddpm_jax import checkpointing  # pylint: disable=g-import-not-at-top
    step = config.sample.step if mode == 'sample' else config.eval.step
    checkpointing.require_checkpoint(workdir, step)  # before the Inception weights or anything else is loaded
  compilation_cache.enable(compilation_cache_dir)  # after every check, before the first compile
  if mode == 'train':
    from ddpm_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, workdir)
  elif mode == 'sample':
    from ddpm_jax import sample  # pylint: disable=g-import-not-at-top
    sample.sample_and_export(config, workdir)
  else:
    from ddpm_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(config, workdir)


def _splits(config: ml_collections.ConfigDict, mode: str) -> dict[str, str]:
  """The splits a mode reads, by the field that names them (training also checks the eval split it will need)."""
  splits = {'data.train_split': config.data.train_split, 'data.eval_split': config.data.eval_split}
  if mode == 'eval' and not (config.eval.fid or config.eval.bpd):
    return {}
  return splits
