"""Dispatch of `main.py --mode=train|sample|eval` to the library."""

from __future__ import annotations

import ml_collections

from ddpm_jax import config_validation


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Validates `config` (before anything compiles), then trains, samples or evaluates in `workdir`."""
  import jax  # pylint: disable=g-import-not-at-top
  config_validation.validate_config(config, jax.device_count())
  if mode == 'train':
    from ddpm_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, workdir)
  elif mode == 'sample':
    from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
    sampling.sample_and_export(config, workdir)
  elif mode == 'eval':
    from ddpm_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(config, workdir)
  else:
    raise config_validation.ConfigError(f'--mode={mode!r} is invalid: must be one of train, sample, eval')
