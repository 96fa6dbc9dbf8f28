"""FID Inception-v3 (the 2015-12-05 TF graph behind standard FID statistics) in Flax Linen.

Matches pytorch-fid's `fid_inception_v3` (weights `pt_inception-2015-12-05`): torchvision
Inception-v3 layout without the aux head, 1008 logits, and the FID-specific blocks
(`FIDInceptionA/C/E_1` average-pool without counting padding, `FIDInceptionE_2` max-pools
in its pool branch). Inference only: BatchNorm uses running statistics, eps 1e-3.

Images are NHWC in [0, 1]; they are resized to 299x299 (bilinear, half-pixel centres, no
antialiasing, as `F.interpolate(..., align_corners=False)`) and scaled to [-1, 1].
"""

from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Padding = Tuple[Tuple[int, int], Tuple[int, int]]

FID_INPUT_SIZE = 299
FID_NUM_CLASSES = 1008
POOL_FEATURES = 2048


def _pad(ph: int, pw: int) -> Padding:
  return ((ph, ph), (pw, pw))


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (running stats, eps 1e-3) -> ReLU."""
  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  padding: Padding = ((0, 0), (0, 0))
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = 'highest'

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding=self.padding,
                use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                precision=self.precision, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='bn')(x)
    return nn.relu(x)


class _Block(nn.Module):
  """Shared conv factory for the Inception blocks."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = 'highest'

  def conv(self, name: str, features: int, kernel_size, strides=(1, 1), padding=(0, 0)):
    if isinstance(kernel_size, int):
      kernel_size = (kernel_size, kernel_size)
    if isinstance(padding, int):
      padding = (padding, padding)
    return BasicConv2d(features, tuple(kernel_size), tuple(strides), _pad(*padding),
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       precision=self.precision, name=name)


def _avg_pool_3x3_same(x):
  # TF average pooling: padded zeros are not counted.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1), count_include_pad=False)


def _max_pool_3x3_stride2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(_Block):
  """Mixed_5b/c/d (FIDInceptionA)."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv('branch1x1', 64, 1)(x)
    b5 = self.conv('branch5x5_1', 48, 1)(x)
    b5 = self.conv('branch5x5_2', 64, 5, padding=2)(b5)
    b3 = self.conv('branch3x3dbl_1', 64, 1)(x)
    b3 = self.conv('branch3x3dbl_2', 96, 3, padding=1)(b3)
    b3 = self.conv('branch3x3dbl_3', 96, 3, padding=1)(b3)
    bp = self.conv('branch_pool', self.pool_features, 1)(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a (grid reduction 35 -> 17)."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv('branch3x3', 384, 3, strides=(2, 2))(x)
    bd = self.conv('branch3x3dbl_1', 64, 1)(x)
    bd = self.conv('branch3x3dbl_2', 96, 3, padding=1)(bd)
    bd = self.conv('branch3x3dbl_3', 96, 3, strides=(2, 2))(bd)
    bp = _max_pool_3x3_stride2(x)
    return jnp.concatenate([b3, bd, bp.astype(b3.dtype)], axis=-1)


class InceptionC(_Block):
  """Mixed_6b/c/d/e (FIDInceptionC)."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv('branch1x1', 192, 1)(x)
    b7 = self.conv('branch7x7_1', c7, 1)(x)
    b7 = self.conv('branch7x7_2', c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv('branch7x7_3', 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv('branch7x7dbl_1', c7, 1)(x)
    bd = self.conv('branch7x7dbl_2', c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv('branch7x7dbl_3', c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv('branch7x7dbl_4', c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv('branch7x7dbl_5', 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv('branch_pool', 192, 1)(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a (grid reduction 17 -> 8)."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv('branch3x3_1', 192, 1)(x)
    b3 = self.conv('branch3x3_2', 320, 3, strides=(2, 2))(b3)
    b7 = self.conv('branch7x7x3_1', 192, 1)(x)
    b7 = self.conv('branch7x7x3_2', 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv('branch7x7x3_3', 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv('branch7x7x3_4', 192, 3, strides=(2, 2))(b7)
    bp = _max_pool_3x3_stride2(x)
    return jnp.concatenate([b3, b7, bp.astype(b3.dtype)], axis=-1)


class InceptionE(_Block):
  """Mixed_7b (pool='avg', FIDInceptionE_1) and Mixed_7c (pool='max', FIDInceptionE_2)."""
  pool: str = 'avg'

  @nn.compact
  def __call__(self, x):
    b1 = self.conv('branch1x1', 320, 1)(x)
    b3 = self.conv('branch3x3_1', 384, 1)(x)
    b3 = jnp.concatenate([
        self.conv('branch3x3_2a', 384, (1, 3), padding=(0, 1))(b3),
        self.conv('branch3x3_2b', 384, (3, 1), padding=(1, 0))(b3),
    ], axis=-1)
    bd = self.conv('branch3x3dbl_1', 448, 1)(x)
    bd = self.conv('branch3x3dbl_2', 384, 3, padding=1)(bd)
    bd = jnp.concatenate([
        self.conv('branch3x3dbl_3a', 384, (1, 3), padding=(0, 1))(bd),
        self.conv('branch3x3dbl_3b', 384, (3, 1), padding=(1, 0))(bd),
    ], axis=-1)
    if self.pool == 'avg':
      bp = _avg_pool_3x3_same(x)
    elif self.pool == 'max':
      bp = nn.max_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1))
    else:
      raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}.")
    bp = self.conv('branch_pool', 192, 1)(bp)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images, size: int = FID_INPUT_SIZE):
  """Bilinear resize of NHWC images to size x size, like torch `align_corners=False`."""
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (n, size, size, c), method='bilinear', antialias=False)


class InceptionV3(nn.Module):
  """FID Inception-v3. Returns (pool features [N, 2048], logits [N, num_classes]), float32.

  Attributes:
    num_classes: logits of the final layer (1008 in the FID weights).
    resize_input: resize inputs to 299x299 first. With False the network takes any
      size >= 75x75 (fully convolutional up to the global average pool).
    normalize_input: map inputs from [0, 1] to [-1, 1].
    dtype: compute dtype; param_dtype: parameter dtype; precision: conv/dense precision.
  """
  num_classes: int = FID_NUM_CLASSES
  resize_input: bool = True
  normalize_input: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = 'highest'

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be NHWC with 3 channels, got shape {images.shape}.')
    x = jnp.asarray(images, jnp.float32)
    if self.resize_input:
      x = resize_bilinear(x, FID_INPUT_SIZE)
    if self.normalize_input:
      x = 2.0 * x - 1.0
    x = x.astype(self.dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

    def conv(name, features, kernel, strides=(1, 1), padding=(0, 0)):
      return BasicConv2d(features, kernel, strides, _pad(*padding), name=name, **kw)

    x = conv('Conv2d_1a_3x3', 32, (3, 3), strides=(2, 2))(x)
    x = conv('Conv2d_2a_3x3', 32, (3, 3))(x)
    x = conv('Conv2d_2b_3x3', 64, (3, 3), padding=(1, 1))(x)
    x = _max_pool_3x3_stride2(x)
    x = conv('Conv2d_3b_1x1', 80, (1, 1))(x)
    x = conv('Conv2d_4a_3x3', 192, (3, 3))(x)
    x = _max_pool_3x3_stride2(x)
    x = InceptionA(pool_features=32, name='Mixed_5b', **kw)(x)
    x = InceptionA(pool_features=64, name='Mixed_5c', **kw)(x)
    x = InceptionA(pool_features=64, name='Mixed_5d', **kw)(x)
    x = InceptionB(name='Mixed_6a', **kw)(x)
    x = InceptionC(channels_7x7=128, name='Mixed_6b', **kw)(x)
    x = InceptionC(channels_7x7=160, name='Mixed_6c', **kw)(x)
    x = InceptionC(channels_7x7=160, name='Mixed_6d', **kw)(x)
    x = InceptionC(channels_7x7=192, name='Mixed_6e', **kw)(x)
    x = InceptionD(name='Mixed_7a', **kw)(x)
    x = InceptionE(pool='avg', name='Mixed_7b', **kw)(x)
    x = InceptionE(pool='max', name='Mixed_7c', **kw)(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      precision=self.precision, name='fc')(pool)
    return pool, logits.astype(jnp.float32)
