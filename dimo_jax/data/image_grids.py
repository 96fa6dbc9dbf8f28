"""Grey-level tokens to images, and PNG grids of images."""

from __future__ import annotations

import math
import os
import tempfile
from typing import Optional, Sequence

import numpy as np

from dimo_jax.data.datasets import _check_levels, _normalize_image_shape

# ----------------------------------------------------------------------------
# Images.


def tokens_to_images(tokens: np.ndarray, levels: int,
                     image_shape: Sequence[int]) -> np.ndarray:
  """Grey-level tokens [..., L] -> float32 images [..., H, W] in [0, 1].

  Token t maps to t / (levels - 1); out-of-range ids (e.g. the mask id) are
  clipped.
  """
  _check_levels(levels)
  h, w = _normalize_image_shape(image_shape)
  tokens = np.asarray(tokens)
  if tokens.shape[-1] != h * w:
    raise ValueError(f'tokens have length {tokens.shape[-1]} but image_shape '
                     f'({h}, {w}) needs {h * w}.')
  t = np.clip(tokens.astype(np.float32), 0, levels - 1) / (levels - 1)
  return t.reshape(tokens.shape[:-1] + (h, w))


def save_image_grid(images: np.ndarray, path: str,
                    ncols: Optional[int] = None, scale: int = 4) -> None:
  """Writes images [N, H, W] or [N, H, W, 3] in [0, 1] as one PNG grid.

  Images are tiled row-major without padding, `ncols` per row (default
  ceil(sqrt(N))), each pixel upscaled `scale` times (nearest). The file is
  written to a temporary name in the same folder and then renamed.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  images = np.asarray(images, dtype=np.float32)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
    raise ValueError(f'images must be [N, H, W] or [N, H, W, 3], got shape '
                     f'{images.shape}.')
  n = images.shape[0]
  if n == 0:
    raise ValueError('images is empty; nothing to save.')
  scale = int(scale)
  if scale < 1:
    raise ValueError(f'scale must be >= 1, got {scale}.')
  ncols = int(ncols) if ncols else int(math.ceil(math.sqrt(n)))
  if ncols < 1:
    raise ValueError(f'ncols must be >= 1, got {ncols}.')
  ncols = min(ncols, n)
  nrows = int(math.ceil(n / ncols))
  h, w = images.shape[1:3]
  pixels = np.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0)
  pixels = np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
  extra = pixels.shape[3:]
  grid = np.zeros((nrows * ncols, h, w) + extra, np.uint8)
  grid[:n] = pixels
  grid = grid.reshape((nrows, ncols, h, w) + extra)
  grid = np.swapaxes(grid, 1, 2).reshape((nrows * h, ncols * w) + extra)
  if scale > 1:
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)

  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp_', suffix='.png')
  try:
    with os.fdopen(fd, 'wb') as f:
      Image.fromarray(grid).save(f, format='PNG')
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
