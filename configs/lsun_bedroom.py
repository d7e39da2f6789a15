"""LSUN Bedroom 256x256 (Ho et al. 2020, App. B: 2.4M steps, no random flips; FID 6.36)."""

from configs import _lsun_256


def get_config():
  config = _lsun_256.get_config_256('lsun/bedroom', num_steps=2_400_000, random_flip=False)
  config.data.eval_split = 'validation'
  return config
