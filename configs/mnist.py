"""MNIST (TFDS), padded to 32x32, with a small U-Net. Dataset preparation needs network once (see README)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'mnist'
  config.data.image_size = 32  # after padding the 28x28 digits
  config.data.pad_to = 32
  config.data.num_channels = 1
  config.data.random_flip = False  # digits are not mirror-symmetric
  config.model.ch = 64
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.1
  config.training.num_steps = 50_000
  config.training.ema_decay = 0.999
  config.training.sample_every = 5_000
  config.training.checkpoint_every = 5_000
  config.optim.warmup_steps = 1000
  config.sample.num_samples = 100
  config.sample.batch_size = 100
  config.eval.num_samples = 10_000
  return config
