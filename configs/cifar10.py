"""CIFAR-10, the DDPM paper's recipe (Ho et al. 2020, App. B; released scripts/run_cifar.py).

T=1000, linear betas 1e-4..0.02, eps prediction, fixedlarge variance, L_simple; Adam lr 2e-4, warmup 5000, grad
clip 1.0, batch 128, EMA 0.9999, dropout 0.1, random flips, 800k steps. 35,746,307 parameters.
Everything here already equals configs/default.py; the file exists to name the recipe.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'cifar10'
  config.data.image_size = 32
  config.training.num_steps = 800_000
  return config
