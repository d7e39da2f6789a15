"""A tiny CPU config for tests: trains a few steps in seconds (mock cifar10-shaped data)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'cifar10'
  config.data.image_size = 32
  config.data.random_flip = True
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0
  config.diffusion.num_timesteps = 20
  config.training.batch_size = 8
  config.training.num_steps = 6
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.training.sample_every = 0
  config.training.ema_decay = 0.9
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 2
  config.sample.num_samples = 8
  config.sample.batch_size = 8
  config.eval.bpd_batch_size = 8
  config.eval.num_samples = 16
  config.eval.inception_batch_size = 8
  return config
