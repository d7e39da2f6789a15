"""Every random stream of a run, derived from `config.seed` alone.

One seed, named streams: each stream is `fold_in(key(seed), id)` with a fixed id, and each use of a stream folds in
what indexes it (the train step, the sample batch, the bits/dim batch), so a result depends on the seed and its
own position and never on what else ran before it (a resumed run, a second eval, a figure drawn later). The ids of
`params`, `train` and `sample` are those of the first release, so runs keep their numbers.

  params   initial U-Net parameters;
  train    the train step: `fold_in(train, step)` gives the timesteps, noise, dropout and label dropout of the step
           (under pmap also folded with the device index);
  sample   samples: batch i of `--mode=sample`, of the eval FID samples and of the grid drawn at training step s use
           `fold_in(sample, i)` / `fold_in(sample, s)`;
  bpd      the noise of the bits/dim bound: `fold_in(fold_in(bpd, batch), t)`;
  figures  the noise of the figures (`python -m ddpm_jax.figures`);
  data     shuffling and flips of the input pipeline (a 32-bit integer seed for grain / NumPy: `data_seed`).
"""

from __future__ import annotations

import jax
import numpy as np

STREAM_IDS = {'params': 0, 'train': 1, 'sample': 2, 'bpd': 0xB9D, 'figures': 0xF16}


def stream(seed: int, name: str) -> jax.Array:
  """The root key of stream `name` (one of `STREAM_IDS`) for `seed`."""
  return jax.random.fold_in(jax.random.key(seed), STREAM_IDS[name])


def step_key(train_stream: jax.Array, step: jax.Array) -> jax.Array:
  """The key of one train step: `fold_in(train_stream, step)` (traceable: `step` is the state's step counter)."""
  return jax.random.fold_in(train_stream, step)


def data_seed(seed: int) -> int:
  """The 32-bit seed of the data stream, from `seed` only (so data order does not depend on, e.g., the model)."""
  return int(np.random.SeedSequence([int(seed) % 2**32, 0xDA7A]).generate_state(1)[0] >> 1)
