"""Default configuration for ddpm_jax: every field at its default value.

The fields, and what each does, are written down once, in `ddpm_jax/default_config.py` (in the package, so that the
library needs no repository checkout); this file is that config for `--config=configs/default.py`. Dataset configs
(`cifar10.py`, `lsun_church.py`, ...) start from `get_config()` here and override only what differs. Any field can
be changed from the command line, e.g. `--config.diffusion.loss_type=kl`.
"""

from ddpm_jax.default_config import get_config

__all__ = ['get_config']
