"""Google's JAX MaskGIT VQGAN tokenizer (no attention; GroupNorm + swish residual blocks whose 1x1
shortcut, where the channel count changes, is applied to the main path's output), and the
parameter layout check of its released checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.core.trees import flatten_paths
from dimo_jax.networks.vqgan import (
  _check_codes,
  _check_images,
  _conv,
  _group_norm,
  _nearest_code,
  _swish,
  _tokens_to_grid,
  _upsample_nearest,
  abstract_params,
  format_problems,
)

Dtype = Any

# ---------------------------------------------------------------------------------------------
# Google MaskGIT VQGAN tokenizer
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GoogleVQGANConfig:
  """Architecture of Google MaskGIT's VQGAN tokenizer; defaults: the ImageNet 256 tokenizer."""
  filters: int = 128
  channel_multipliers: Tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  embedding_dim: int = 256
  codebook_size: int = 1024
  image_size: int = 256
  num_groups: int = 32
  output_dim: int = 3

  def __post_init__(self):
    object.__setattr__(self, "channel_multipliers",
                       tuple(int(m) for m in self.channel_multipliers))
    if not self.channel_multipliers:
      raise ValueError("GoogleVQGANConfig.channel_multipliers must list at least one level.")
    for m in self.channel_multipliers:
      if (self.filters * m) % self.num_groups:
        raise ValueError(f"GoogleVQGANConfig: channels filters*mult = {self.filters * m} are not "
                         f"divisible by num_groups = {self.num_groups}.")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.channel_multipliers) - 1)

  @property
  def latent_size(self) -> int:
    return self.image_size // self.downsample_factor

  @classmethod
  def small(cls) -> "GoogleVQGANConfig":
    """A two-level test configuration: 16 px -> 8 x 8 codes."""
    return cls(filters=32, channel_multipliers=(1, 2), num_res_blocks=1, embedding_dim=16,
               codebook_size=64, image_size=16)


class GoogleResBlock(nn.Module):
  """Google MaskGIT residual block (bias-free convolutions).

  ``h = conv3(swish(gn(conv3(swish(gn(x))))))``; the output is ``x + h`` when the channel count is
  unchanged and ``h + conv1x1(h)`` (kernel ``Conv_2``, ``[1, 1, filters, filters]``) when it
  changes: the shortcut reads the main-path output, not the input. The released weights were
  trained with this layout.
  """
  filters: int
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    residual = x
    h = _swish(_group_norm(self.num_groups, name="GroupNorm_0", **kw)(x))
    h = _conv(self.filters, 3, "Conv_0", use_bias=False, **kw)(h)
    h = _swish(_group_norm(self.num_groups, name="GroupNorm_1", **kw)(h))
    h = _conv(self.filters, 3, "Conv_1", use_bias=False, **kw)(h)
    if x.shape[-1] != self.filters:
      residual = _conv(self.filters, 1, "Conv_2", use_bias=False, **kw)(h)
    return h + residual


def _avg_pool_2x2_same(x):
  """2x2 stride-2 average pool, 'SAME' padding, padded cells excluded from the mean."""
  window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
  total = jax.lax.reduce_window(x, jnp.array(0, x.dtype), jax.lax.add, window, strides, "SAME")
  count = jax.lax.reduce_window(jnp.ones_like(x), jnp.array(0, x.dtype), jax.lax.add, window,
                                strides, "SAME")
  return total / count


class GoogleEncoder(nn.Module):
  """Images in ``[0, 1]`` -> features ``[B, H/f, W/f, embedding_dim]``; Linen auto-names."""
  config: GoogleVQGANConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _conv(c.filters, 3, "Conv_0", use_bias=False, **kw)(x)
    block = 0
    levels = len(c.channel_multipliers)
    filters = c.filters
    for i, mult in enumerate(c.channel_multipliers):
      filters = c.filters * mult
      for _ in range(c.num_res_blocks):
        x = GoogleResBlock(filters, c.num_groups, name=f"ResBlock_{block}", **kw)(x)
        block += 1
      if i < levels - 1:
        x = _avg_pool_2x2_same(x)
    for _ in range(c.num_res_blocks):
      x = GoogleResBlock(filters, c.num_groups, name=f"ResBlock_{block}", **kw)(x)
      block += 1
    x = _swish(_group_norm(c.num_groups, name="GroupNorm_0", **kw)(x))
    return _conv(c.embedding_dim, 1, "Conv_1", **kw)(x)


class GoogleDecoder(nn.Module):
  """Features ``[B, h, w, embedding_dim]`` -> images ``[B, h*f, w*f, 3]`` (unclipped)."""
  config: GoogleVQGANConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    filters = c.filters * c.channel_multipliers[-1]
    x = _conv(filters, 3, "Conv_0", **kw)(x)
    block, conv = 0, 1
    for _ in range(c.num_res_blocks):
      x = GoogleResBlock(filters, c.num_groups, name=f"ResBlock_{block}", **kw)(x)
      block += 1
    for i in reversed(range(len(c.channel_multipliers))):
      filters = c.filters * c.channel_multipliers[i]
      for _ in range(c.num_res_blocks):
        x = GoogleResBlock(filters, c.num_groups, name=f"ResBlock_{block}", **kw)(x)
        block += 1
      if i > 0:
        x = _conv(filters, 3, f"Conv_{conv}", **kw)(_upsample_nearest(x))
        conv += 1
    x = _swish(_group_norm(c.num_groups, name="GroupNorm_0", **kw)(x))
    return _conv(c.output_dim, 3, f"Conv_{conv}", **kw)(x)


class _GoogleQuantizer(nn.Module):
  """Codebook parameter ``codebook`` ``[codebook_size, embedding_dim]``."""
  num_codes: int
  dim: int
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.codebook = self.param(
        "codebook", nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
        (self.num_codes, self.dim), self.param_dtype)

  def nearest(self, z):
    return _nearest_code(z, self.codebook)

  def lookup(self, codes):
    return jnp.take(self.codebook, codes, axis=0)


class GoogleVQGAN(nn.Module):
  """Google MaskGIT VQGAN tokenizer: ``encoder``, ``quantizer`` (``codebook``), ``decoder``.

  Pixels in ``[0, 1]``. Parameter tree = the released msgpack's ``params`` tree.
  """
  config: GoogleVQGANConfig = GoogleVQGANConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = GoogleEncoder(c, **kw)
    self.decoder = GoogleDecoder(c, **kw)
    self.quantizer = _GoogleQuantizer(c.codebook_size, c.embedding_dim, param_dtype=self.param_dtype)

  def __call__(self, images):
    """Reconstruction through the codebook: ``(images_rec, codes)``."""
    codes = self.encode(images)
    return self.decode_codes(codes), codes

  def encode_features(self, images):
    """Pre-quantisation features ``[B, h, w, embedding_dim]``."""
    _check_images(images, 3)
    return self.encoder(images.astype(self.dtype))

  def encode(self, images):
    """Images in ``[0, 1]`` ``[B, H, W, 3]`` -> int32 codes ``[B, H/f, W/f]``."""
    return self.quantizer.nearest(self.encode_features(images))

  def decode_codes(self, codes):
    """Codes ``[B, h, w]`` -> images ``[B, h*f, w*f, 3]``, nominally in ``[0, 1]`` (unclipped)."""
    _check_codes(codes)
    return self.decoder(self.quantizer.lookup(codes).astype(self.dtype))

  def decode_tokens(self, tokens):
    """Tokens ``[B, h*w]`` (clamped to valid codes) -> float32 images clipped to ``[0, 1]``."""
    x = self.decode_codes(_tokens_to_grid(tokens, self.config.codebook_size))
    return jnp.clip(x.astype(jnp.float32), 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def google_decode_tokens(variables, tokens, config: GoogleVQGANConfig = GoogleVQGANConfig(),
                         dtype: Dtype = jnp.float32):
  """Google VQGAN: tokens ``[B, h*w]`` -> float32 images ``[B, H, W, 3]`` in ``[0, 1]``.

  Tokens outside ``0..codebook_size-1`` are clamped. ``dtype`` is the computation dtype.
  """
  return GoogleVQGAN(config, dtype=dtype).apply(variables, tokens, method="decode_tokens")


@functools.lru_cache(maxsize=16)
def _google_shapes_cached(config: GoogleVQGANConfig):
  flat = abstract_params(GoogleVQGAN(config), config.image_size, 3)
  return tuple(("/".join(p), tuple(s.shape)) for p, s in flat.items())


def google_param_shapes(config: GoogleVQGANConfig = GoogleVQGANConfig()) -> Dict[str, Tuple[int, ...]]:
  """Expected ``'/'``-joined parameter paths (inside ``params``) -> shapes for ``config``."""
  return dict(_google_shapes_cached(config))


def check_google_params(params: Mapping[str, Any], config: GoogleVQGANConfig = GoogleVQGANConfig(),
                        source: str = "params") -> None:
  """Raise ``ValueError`` naming every missing, extra or mis-shaped parameter."""
  expected = google_param_shapes(config)
  given = {"/".join(p): np.shape(v) for p, v in flatten_paths(params).items()}
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  mismatched = [(k, given[k], expected[k]) for k in expected
                if k in given and tuple(given[k]) != tuple(expected[k])]
  if missing or unexpected or mismatched:
    raise ValueError(format_problems(
        source, missing, unexpected, mismatched,
        f"Pass a Google MaskGIT tokenizer checkpoint whose architecture matches {config} "
        "(or adjust the GoogleVQGANConfig)."))
