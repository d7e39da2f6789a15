"""Shared settings of the paper's 256x256 models (CelebA-HQ, LSUN): App. B of Ho et al. 2020."""

from configs import default


def get_config_256(dataset: str, num_steps: int, random_flip: bool = True):
  """ch 128, ch_mult (1,1,2,2,4,4), attention at 16 (114M params); lr 2e-5, batch 64, no dropout."""
  config = default.get_config()
  config.data.dataset = dataset
  config.data.image_size = 256
  config.data.random_flip = random_flip
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0
  config.optim.lr = 2e-5
  config.training.batch_size = 64
  config.training.num_steps = num_steps
  config.sample.batch_size = 16
  config.sample.num_samples = 16
  config.eval.bpd_batch_size = 16
  config.eval.inception_batch_size = 50
  return config
