"""LSUN Church 256x256 (Ho et al. 2020, App. B: 1.2M steps; FID 7.89)."""

from configs import _lsun_256


def get_config():
  config = _lsun_256.get_config_256('lsun/church_outdoor', num_steps=1_200_000)
  config.data.eval_split = 'validation'
  return config
