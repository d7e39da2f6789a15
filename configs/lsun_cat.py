"""LSUN Cat 256x256 (Ho et al. 2020, App. B: 1.8M steps; FID 19.75)."""

from configs import _lsun_256


def get_config():
  config = _lsun_256.get_config_256('lsun/cat', num_steps=1_800_000)
  config.data.eval_split = 'train'  # TFDS lsun/cat has only a train split.
  return config
