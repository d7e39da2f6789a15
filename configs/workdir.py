"""The config a workdir recorded (`<workdir>/config.json`), so that overrides apply to the run's own config.

  python main.py --mode=sample --workdir=runs/quickstart --config=configs/workdir.py:runs/quickstart \
      --config.sample.num_samples=500

`--mode=sample|eval` without `--config` uses the recording as it is; this file is for changing sampling or
evaluation fields of it from the command line (architecture, diffusion and image-shape fields stay the run's).
"""

from ddpm_jax import workdir_config


def get_config(workdir):
  return workdir_config.read(workdir)
