"""CelebA-HQ 256x256 (Ho et al. 2020, App. B: 0.5M steps). TFDS needs the manual download (see README)."""

from configs import _lsun_256


def get_config():
  config = _lsun_256.get_config_256('celeb_a_hq', num_steps=500_000)
  config.data.train_split = 'train'
  config.data.eval_split = 'train'  # TFDS celeb_a_hq has only a train split.
  return config
