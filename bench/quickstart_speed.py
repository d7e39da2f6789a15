"""The quickstart's training speed, side by side in one run: our loop, our compiled step, and the PyTorch peer's loop.

  python bench/quickstart_speed.py                     # --steps=300 --rounds=2, configs/quickstart.py
  python bench/quickstart_speed.py --steps=100 --rounds=1 --config.training.batch_size=32

Each round runs, one after another on the same machine:
  * loop:  `python main.py --config=<config> --workdir=<tmp>` for `--steps` steps (no grid, one checkpoint at the
    end), as a user runs it. Reported: the steady img/s of the console's log windows after the first (compilation
    and the first window excluded), and the process's wall time from start to exit (start-up, compile, shutdown;
    the compilation cache off, so every round compiles as a first run does).
  * step:  `bench/throughput.py`: the same compiled step called back to back on one synthetic batch.
  * peer:  the same training written in PyTorch (bench/peer_torch.py's step: diffusers `UNet2DModel` of the same
    architecture and parameter count, q_sample, MSE, clipping, Adam, EMA lerp; eager, one thread per core) in its
    own loop over the same 4,500 digits: a shuffled permutation per epoch, batches gathered from a NumPy array and
    converted to NCHW tensors every step, the loss read back every `log_every` steps. Timed over `--steps` steps
    after 20 warm-up steps.
Rounds alternate, so drift of the machine's speed shows up as spread, not as a bias. The human-readable table goes
first; the LAST line of stdout is one JSON object.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# torchvision's C ops cannot load on this CPU build of torch; diffusers only needs the module to exist.
sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))

import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WINDOW = re.compile(r'Step (\d+)/\d+ .*?([\d.]+) steps/s')


def our_loop(config_path: str, overrides: list[str], steps: int, log_every: int) -> dict:
  """Wall time of main.py training `steps` steps, and the img/s of its log windows after the first."""
  workdir = tempfile.mkdtemp(prefix='ddpm_qs_speed_')
  cmd = [sys.executable, os.path.join(REPO, 'main.py'), f'--config={config_path}', f'--workdir={workdir}',
         f'--config.training.num_steps={steps}', f'--config.training.log_every={log_every}',
         '--config.training.sample_every=0', f'--config.training.checkpoint_every={steps}',
         '--compilation_cache_dir='] + overrides
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed: {proc.stderr[-2000:]}')
  windows = [(int(s), float(r)) for s, r in _WINDOW.findall(proc.stdout + proc.stderr)]
  steady = [rate for step, rate in windows if step > log_every]
  return {'wall_s': wall, 'steady_steps_per_s': statistics.median(steady) if steady else None,
          'windows': windows}


def our_step(config_path: str, overrides: list[str]) -> dict:
  cmd = [sys.executable, os.path.join(REPO, 'bench', 'throughput.py'), f'--config={config_path}', '--steps=30',
         '--forward=false'] + overrides
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def peer_loop(config, steps: int, warmup: int = 20) -> dict:
  """The PyTorch peer's training loop over the mnist5k train digits; img/s over `steps` steps after `warmup`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
  import digit_classifier  # pylint: disable=g-import-not-at-top
  import peer_torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(peer_torch.physical_cores())
  torch.manual_seed(config.seed)
  digits, _ = digit_classifier.load_digits('train', config)  # (N, H, W, 1) float32 in [-1, 1], as we train on them
  model = UNet2DModel(**peer_torch.diffusers_config(config))
  step = peer_torch.make_train_step(config, model, model)
  batch, log_every = config.training.batch_size, config.training.log_every
  rng = np.random.default_rng(config.seed)
  order, cursor = rng.permutation(len(digits)), 0
  start = None
  for i in range(warmup + steps):
    if i == warmup:
      start = time.perf_counter()
    if cursor + batch > len(order):
      order, cursor = rng.permutation(len(digits)), 0
    x0 = torch.from_numpy(np.ascontiguousarray(digits[order[cursor:cursor + batch]].transpose(0, 3, 1, 2)))
    cursor += batch
    loss = step(x0)
    if (i + 1) % log_every == 0:
      loss.item()
  loss.item()
  seconds = time.perf_counter() - start
  return {'steps_per_s': steps / seconds, 'img_per_s': steps * batch / seconds,
          'torch_threads': torch.get_num_threads()}


def main(argv):
  del argv
  config = FLAGS.config
  config_path = config_flags.get_config_filename(FLAGS['config'])
  overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  batch = config.training.batch_size
  rounds = []
  for r in range(FLAGS.rounds):
    loop = our_loop(config_path, overrides, FLAGS.steps, FLAGS.log_every)
    step = our_step(config_path, overrides)
    peer = peer_loop(config, FLAGS.steps)
    rounds.append({'loop_img_per_s': loop['steady_steps_per_s'] * batch if loop['steady_steps_per_s'] else None,
                   'loop_wall_s': loop['wall_s'], 'step_img_per_s': step['train_img_per_s'],
                   'peer_loop_img_per_s': peer['img_per_s'], 'load_average_1min': round(os.getloadavg()[0], 2)})
    print(f'round {r + 1}: loop {rounds[-1]["loop_img_per_s"]:.1f} img/s (wall {loop["wall_s"]:.0f} s for '
          f'{FLAGS.steps} steps), step {step["train_img_per_s"]:.1f} img/s, peer loop {peer["img_per_s"]:.1f} img/s',
          flush=True)
  summary = {k: [rd[k] for rd in rounds] for k in rounds[0]}
  res = {**throughput.machine_info(), 'config': config_path, 'overrides': overrides, 'batch_size': batch,
         'steps': FLAGS.steps, 'rounds': summary,
         'loop_over_peer': [a / b for a, b in zip(summary['loop_img_per_s'], summary['peer_loop_img_per_s'])]}
  throughput.print_table(f'Quickstart speed ({config_path}, batch {batch})', [
      ('loop img/s', ' / '.join(f'{v:.1f}' for v in summary['loop_img_per_s'])),
      ('step img/s', ' / '.join(f'{v:.1f}' for v in summary['step_img_per_s'])),
      ('peer loop img/s', ' / '.join(f'{v:.1f}' for v in summary['peer_loop_img_per_s'])),
      ('loop / peer', ' / '.join(f'{v:.2f}' for v in res['loop_over_peer'])),
      (f'loop wall s ({FLAGS.steps} steps)', ' / '.join(f'{v:.0f}' for v in summary['loop_wall_s']))])
  print(json.dumps(res))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', os.path.join(REPO, 'configs', 'quickstart.py'), 'The quickstart config.')
  flags.DEFINE_integer('steps', 300, 'Timed training steps of each loop.')
  flags.DEFINE_integer('rounds', 2, 'Rounds of (loop, step, peer).')
  flags.DEFINE_integer('log_every', 50, 'Our loop\'s log window (its img/s is read from the console).')
  app.run(main)
