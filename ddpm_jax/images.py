"""Image conversions and grids shared by training, sampling and figures."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Model-space images in [-1, 1] → uint8 [0, 255] by the decoder's bin centres: round((x + 1) · 127.5)."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles (N, H, W, C) uint8 images row-major into one (rows·(H+pad)+pad, cols·(W+pad)+pad, C) image."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'make_grid expects (N, H, W, C) images, got shape {images.shape}')
  n, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, images.dtype)
  for i in range(n):
    r, col = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  return grid


def save_png(image: np.ndarray, path: str) -> str:
  """Writes an (H, W, C) uint8 image (C = 1 or 3) as PNG, creating the directory; returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image = np.asarray(image)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
  return path
