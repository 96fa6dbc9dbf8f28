"""The building blocks the three VQ image tokenizers share: the Taming VQGAN (``vqgan``), Google
MaskGIT's VQGAN (``vqgan_google``) and Meissonic's VQ model (``meissonic_vq``).

Each block takes the names of its parameters as fields, so that every tokenizer keeps the layout
of its released checkpoints (what the converters in ``dimo_jax.converters`` write):

- ``ResnetBlock``: GroupNorm -> swish -> conv 3x3, twice, plus a skip; the 1x1 shortcut (where the
  channel count changes) reads the input (Taming ``nin_shortcut``, diffusers ``conv_shortcut``)
  or, in Google's layout, the main path's output.
- ``Downsample`` (zero row and column at the bottom and right, then a 3x3 stride-2 convolution)
  and ``Upsample`` (nearest x2, then a 3x3 convolution), each a single ``conv``.
- ``Codebook``: the ``[num_codes, dim]`` table, its nearest-row search and its lookup.
- ``norm_act_conv``: the GroupNorm -> swish -> convolution that ends every encoder and decoder.

Every GroupNorm computes its variance in two passes (``use_fast_variance=False``), as PyTorch does.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

GN_EPS = 1e-6


def check_level_channels(levels: str, channels: Sequence[int], groups_field: str, groups: int):
  """Raise ``ValueError`` unless ``channels`` (one entry per level of the config field ``levels``)
  is not empty and every entry divides into ``groups`` GroupNorm groups."""
  if not channels:
    raise ValueError(f"{levels} must list at least one level.")
  for ch in channels:
    if ch % groups:
      raise ValueError(f"{levels}: a level's channels {ch} are not divisible by {groups_field} = "
                       f"{groups}; choose widths that are multiples of {groups_field}.")


class Coder(nn.Module):
  """The fields of every encoder and decoder: the architecture ``config``, the compute ``dtype`` and
  the parameter ``param_dtype``; ``kw`` passes the two dtypes on to a block."""
  config: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def kw(self):
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)


def swish(x):
  """``x * sigmoid(x)`` (SiLU)."""
  return x * jax.nn.sigmoid(x)


def group_norm(num_groups: int, name: str, dtype: Dtype, param_dtype: Dtype,
               eps: float = GN_EPS) -> nn.GroupNorm:
  """A GroupNorm with affine parameters ``scale`` / ``bias`` named ``name``."""
  return nn.GroupNorm(num_groups=num_groups, epsilon=eps, use_fast_variance=False,
                      dtype=dtype, param_dtype=param_dtype, name=name)


def conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype,
         use_bias: bool = True, strides: int = 1, padding: Any = None) -> nn.Conv:
  """A square ``kernel`` x ``kernel`` convolution, 'same' zero padding unless ``padding`` is given."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def norm_act_conv(x, num_groups: int, features: int, kernel: int, norm_name: str, conv_name: str,
                  dtype: Dtype, param_dtype: Dtype, eps: float = GN_EPS):
  """GroupNorm ``norm_name`` -> swish -> convolution ``conv_name`` (the head of every coder)."""
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  x = swish(group_norm(num_groups, norm_name, eps=eps, **kw)(x))
  return conv(features, kernel, conv_name, **kw)(x)


def upsample_nearest(x):
  """Nearest-neighbour x2 upsampling of an NHWC array (each pixel repeated 2 x 2)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def nearest_code(z, codebook):
  """Index of the nearest codebook row (squared Euclidean distance) for every vector in ``z``.

  ``z`` is ``[..., D]``, ``codebook`` ``[K, D]``; computed in float32 as
  ``|z|^2 - 2 z.e + |e|^2`` with a full-precision matmul; the first row wins a tie.
  """
  z = z.astype(jnp.float32)
  e = codebook.astype(jnp.float32)
  flat = z.reshape(-1, z.shape[-1])
  dist = (jnp.sum(flat**2, axis=1, keepdims=True)
          - 2.0 * jnp.matmul(flat, e.T, precision=jax.lax.Precision.HIGHEST)
          + jnp.sum(e**2, axis=1)[None, :])
  return jnp.argmin(dist, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])


def tokens_to_grid(tokens, num_codes: int):
  """``[B, h*w]`` int tokens -> ``[B, h, w]`` codes clamped to ``0..num_codes-1`` (square grid)."""
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must have shape [B, h*w]; got shape {tokens.shape}.")
  n = tokens.shape[1]
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f"tokens: sequence length {n} is not a square number; pass a [B, h*w] array "
                     "of a square h x w token grid.")
  tokens = jnp.clip(tokens.astype(jnp.int32), 0, num_codes - 1)
  return tokens.reshape(tokens.shape[0], side, side)


def check_codes(codes):
  """Raise ``ValueError`` unless ``codes`` is ``[B, h, w]``."""
  if codes.ndim != 3:
    raise ValueError(f"codes must have shape [B, h, w]; got shape {codes.shape}.")


def check_images(images, channels: int):
  """Raise ``ValueError`` unless ``images`` is NHWC with ``channels`` channels."""
  if images.ndim != 4 or images.shape[-1] != channels:
    raise ValueError(f"images must have shape [B, H, W, {channels}] (NHWC); got {images.shape}.")


class ResnetBlock(nn.Module):
  """``h = conv2(swish(norm2(conv1(swish(norm1(x))))))``, returned as ``skip + h``.

  ``skip`` is ``x`` when the channel count is unchanged; otherwise the 1x1 convolution named
  ``shortcut`` of ``x``, or of ``h`` with ``shortcut_on_output`` (Google's released layout).
  ``names`` are the parameter names of norm1, conv1, norm2, conv2.
  """
  out_channels: int
  num_groups: int = 32
  eps: float = GN_EPS
  shortcut: str = "nin_shortcut"
  names: Tuple[str, str, str, str] = ("norm1", "conv1", "norm2", "conv2")
  use_bias: bool = True
  shortcut_on_output: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm1, conv1, norm2, conv2 = self.names
    h = swish(group_norm(self.num_groups, norm1, eps=self.eps, **kw)(x))
    h = conv(self.out_channels, 3, conv1, use_bias=self.use_bias, **kw)(h)
    h = swish(group_norm(self.num_groups, norm2, eps=self.eps, **kw)(h))
    h = conv(self.out_channels, 3, conv2, use_bias=self.use_bias, **kw)(h)
    if x.shape[-1] == self.out_channels:
      return x + h
    shortcut = conv(self.out_channels, 1, self.shortcut, use_bias=self.use_bias, **kw)
    if self.shortcut_on_output:
      return h + shortcut(h)
    return shortcut(x) + h


class Downsample(nn.Module):
  """Zero pad (top 0, bottom 1, left 0, right 1), then a 3x3 stride-2 convolution ``conv``."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return conv(x.shape[-1], 3, "conv", self.dtype, self.param_dtype, strides=2,
                padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 convolution ``conv``."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return conv(x.shape[-1], 3, "conv", self.dtype, self.param_dtype)(upsample_nearest(x))


def _uniform_init(num_codes: int):
  limit = 1.0 / num_codes
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -limit, limit)


class Codebook(nn.Module):
  """Codebook parameter ``param_name`` ``[num_codes, dim]``; ``initializer`` None: uniform in
  ``±1/num_codes`` (the initialisation of the Taming and diffusers quantizers)."""
  num_codes: int
  dim: int
  param_name: str = "embedding"
  initializer: Optional[Callable] = None
  param_dtype: Dtype = jnp.float32

  def setup(self):
    init = self.initializer if self.initializer is not None else _uniform_init(self.num_codes)
    self.table = self.param(self.param_name, init, (self.num_codes, self.dim), self.param_dtype)

  def nearest(self, z):
    return nearest_code(z, self.table)

  def lookup(self, codes):
    return jnp.take(self.table, codes, axis=0)
