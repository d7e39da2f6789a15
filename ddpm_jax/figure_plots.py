"""Drawing the figures of `python -m ddpm_jax.figures` from the numbers of `ddpm_jax.figure_data`.

Plots use matplotlib's object API on the Agg canvas (`Figure` + `FigureCanvasAgg`): nothing touches pyplot's global
state or the interactive backend of a session that imports this module. Image strips are tiled by
`ddpm_jax.images.make_grid`, then shown with row and column labels.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any, Dict, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from ddpm_jax import images as images_lib

PAD = 2  # make_grid's padding between tiles, in pixels
DPI = 120
# Schedules whose curves are drawn dashed: they share ranges with others and would hide them.
_DASHED = ('warmup10', 'warmup50', 'const')


def _save(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=DPI)
  return path


def grid_of(images: np.ndarray, ncol: int) -> np.ndarray:
  """uint8 grid (make_grid, row-major) of images in [-1, 1] of shape (N, H, W, C)."""
  return images_lib.make_grid(images_lib.to_uint8(images), ncol=ncol, pad=PAD)


def _show_grid(ax, grid: np.ndarray, tile: Sequence[int], row_labels: Sequence[str],
               col_labels: Sequence[str]) -> None:
  """Draws a make_grid image on `ax` with a label under every column and left of every row."""
  h, w = tile
  ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap='gray', vmin=0, vmax=255, interpolation='nearest')
  ax.set_xticks([PAD + c * (w + PAD) + w / 2 for c in range(len(col_labels))])
  ax.set_xticklabels(col_labels, fontsize=8)
  ax.set_yticks([PAD + r * (h + PAD) + h / 2 for r in range(len(row_labels))])
  ax.set_yticklabels(row_labels, fontsize=8)
  ax.tick_params(length=0)
  for spine in ax.spines.values():
    spine.set_visible(False)


def image_table(images: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
                path: str, xlabel: str = '') -> str:
  """Saves images (rows, cols, H, W, C) in [-1, 1] as one labelled grid PNG; returns the path."""
  rows, cols, h, w = images.shape[:4]
  grid = grid_of(images.reshape((-1,) + images.shape[2:]), cols)
  scale = max(1.0, 64.0 / max(h, w))  # small images (MNIST, CIFAR) are enlarged so a tile is ~0.5 inch
  width = max(grid.shape[1] * scale / DPI, 4.5) + 1.2
  # A title wider than a narrow table wraps (about 14 characters per inch at 9 pt) instead of being cut off.
  title = textwrap.fill(title, width=max(30, int((width - 0.4) * 14)))
  title_height = 0.2 * (title.count('\n') + 1)
  height = grid.shape[0] * scale / DPI + 0.8 + title_height
  fig = Figure(figsize=(width, height))
  ax = fig.add_axes((0.9 / width, 0.55 / height, 1 - 1.1 / width, 1 - (0.75 + title_height) / height))
  _show_grid(ax, grid, (h, w), row_labels, col_labels)
  ax.set_title(title, fontsize=9)
  if xlabel:
    ax.set_xlabel(xlabel, fontsize=8)
  return _save(fig, path)


def schedules_figure(curves: Dict[str, Dict[str, np.ndarray]], strips: np.ndarray, strip_names: Sequence[str],
                     strip_ts: Sequence[int], path: str) -> str:
  """beta_t, alpha_bar_t and log-SNR against t for every schedule (top), and x_t ~ q(x_t | x_0) of one real image
  under each of `strip_names` at `strip_ts` (bottom: strips (len(strip_names), len(strip_ts), H, W, C))."""
  fig = Figure(figsize=(13, 6.4))
  gs = fig.add_gridspec(2, 3, height_ratios=(1.25, 1.0), hspace=0.35, wspace=0.28,
                        left=0.06, right=0.98, top=0.94, bottom=0.04)
  panels = (('betas', r'$\beta_t$', 'log'), ('alphas_cumprod', r'$\bar\alpha_t$', 'linear'),
            ('log_snr', r'log-SNR $= \log \bar\alpha_t / (1 - \bar\alpha_t)$', 'linear'))
  for i, (key, label, yscale) in enumerate(panels):
    ax = fig.add_subplot(gs[0, i])
    for name, curve in curves.items():
      t = np.arange(1, len(curve[key]) + 1)
      ax.plot(t, curve[key], label=name, linewidth=1.4, linestyle='--' if name in _DASHED else '-')
    ax.set_yscale(yscale)
    ax.set_xlabel('t')
    ax.set_title(label, fontsize=10)
    ax.grid(alpha=0.3)
    if i == 0:
      ax.legend(fontsize=8, ncol=2)
  ax = fig.add_subplot(gs[1, :])
  h, w = strips.shape[2:4]
  grid = grid_of(strips.reshape((-1,) + strips.shape[2:]), strips.shape[1])
  _show_grid(ax, grid, (h, w), list(strip_names), [f't={t + 1}' for t in strip_ts])
  ax.set_title(r'$x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$ (eq. 4), the same $\epsilon$ '
               'in every tile', fontsize=10)
  return _save(fig, path)


def rate_distortion_figure(table: Dict[str, Any], path: str) -> str:
  """Ho et al. 2020 Fig. 5: distortion (RMSE on [0, 255]) and rate (bits/dim) against reverse-process steps
  T - t, and distortion against rate."""
  num_t = table['num_timesteps'] or max(table['t'])
  steps = num_t - np.asarray(table['t'])
  fig = Figure(figsize=(12, 3.6))
  axes = fig.subplots(1, 3)
  fig.subplots_adjust(left=0.06, right=0.98, bottom=0.16, top=0.86, wspace=0.3)
  axes[0].plot(steps, table['rmse'], 'o-')
  axes[0].set(xlabel='Reverse process steps (T - t)', ylabel='Distortion (RMSE [0, 255])')
  axes[1].plot(steps, table['rate_bpd'], 'o-')
  axes[1].set(xlabel='Reverse process steps (T - t)', ylabel='Rate (bits/dim)')
  axes[2].plot(table['rate_bpd'], table['rmse'], 'o-')
  axes[2].set(xlabel='Rate (bits/dim)', ylabel='Distortion (RMSE [0, 255])')
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.suptitle(f'Rate-distortion of the progressive code, checkpoint step {table["step"]} (Ho et al. Fig. 5)',
               fontsize=10)
  return _save(fig, path)


def loss_by_t_figure(data: Dict[str, Any], num_timesteps: Optional[int], path: str) -> str:
  """The training loss of each quarter of the timesteps against the training step (log scale)."""
  fig = Figure(figsize=(7, 4.2))
  ax = fig.add_subplot(1, 1, 1)
  fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.9)
  for q in range(4):
    if num_timesteps:
      low, high = q * num_timesteps // 4 + 1, (q + 1) * num_timesteps // 4
      label = f't in {low}..{high}'
    else:
      label = f'quartile {q + 1} of t'
    ax.plot(data['steps'], data[f'loss_q{q}'], label=label, linewidth=1.4)
  ax.set_yscale('log')
  ax.set(xlabel='training step', ylabel='loss (mean over each logging window)')
  ax.set_title('Training loss by timestep quartile', fontsize=10)
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  return _save(fig, path)
