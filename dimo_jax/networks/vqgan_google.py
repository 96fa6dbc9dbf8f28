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
from dimo_jax.networks.vq_blocks import (
  Codebook,
  Coder,
  ResnetBlock,
  check_codes,
  check_images,
  check_level_channels,
  conv,
  norm_act_conv,
  tokens_to_grid,
  upsample_nearest,
)
from dimo_jax.networks.vqgan import abstract_params, format_problems

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
    check_level_channels("GoogleVQGANConfig.channel_multipliers",
                         [self.filters * m for m in self.channel_multipliers], "num_groups", self.num_groups)

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


class GoogleResBlock(ResnetBlock):
  """Google MaskGIT residual block: ``vq_blocks.ResnetBlock`` with bias-free convolutions.

  ``h = conv3(swish(gn(conv3(swish(gn(x))))))``; the output is ``x + h`` when the channel count is
  unchanged and ``h + conv1x1(h)`` (kernel ``Conv_2``, ``[1, 1, filters, filters]``) when it
  changes: the shortcut reads the main-path output, not the input. The released weights were
  trained with this layout. The first field is the number of output channels (``filters``).
  """
  shortcut: str = "Conv_2"
  names: Tuple[str, str, str, str] = ("GroupNorm_0", "Conv_0", "GroupNorm_1", "Conv_1")
  use_bias: bool = False
  shortcut_on_output: bool = True


def _avg_pool_2x2_same(x):
  """2x2 stride-2 average pool, 'SAME' padding, padded cells excluded from the mean."""
  window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
  total = jax.lax.reduce_window(x, jnp.array(0, x.dtype), jax.lax.add, window, strides, "SAME")
  count = jax.lax.reduce_window(jnp.ones_like(x), jnp.array(0, x.dtype), jax.lax.add, window,
                                strides, "SAME")
  return total / count


def _res_blocks(x, c: GoogleVQGANConfig, filters: int, first: int, kw):
  """``num_res_blocks`` blocks named from ``ResBlock_{first}`` on (the numbering runs through a
  whole encoder or decoder, as Linen's auto-names did); returns ``(x, next index)``."""
  for k in range(first, first + c.num_res_blocks):
    x = GoogleResBlock(filters, c.num_groups, name=f"ResBlock_{k}", **kw)(x)
  return x, first + c.num_res_blocks


class GoogleEncoder(Coder):
  """Images in ``[0, 1]`` -> features ``[B, H/f, W/f, embedding_dim]``; Linen auto-names."""

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = self.kw
    x = conv(c.filters, 3, "Conv_0", use_bias=False, **kw)(x)
    block = 0
    levels = len(c.channel_multipliers)
    for i, mult in enumerate(c.channel_multipliers):
      x, block = _res_blocks(x, c, c.filters * mult, block, kw)
      if i < levels - 1:
        x = _avg_pool_2x2_same(x)
    x, block = _res_blocks(x, c, c.filters * c.channel_multipliers[-1], block, kw)
    return norm_act_conv(x, c.num_groups, c.embedding_dim, 1, "GroupNorm_0", "Conv_1", **kw)


class GoogleDecoder(Coder):
  """Features ``[B, h, w, embedding_dim]`` -> images ``[B, h*f, w*f, 3]`` (unclipped)."""

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = self.kw
    filters = c.filters * c.channel_multipliers[-1]
    x = conv(filters, 3, "Conv_0", **kw)(x)
    x, block = _res_blocks(x, c, filters, 0, kw)
    conv_index = 1
    for i in reversed(range(len(c.channel_multipliers))):
      filters = c.filters * c.channel_multipliers[i]
      x, block = _res_blocks(x, c, filters, block, kw)
      if i > 0:
        x = conv(filters, 3, f"Conv_{conv_index}", **kw)(upsample_nearest(x))
        conv_index += 1
    return norm_act_conv(x, c.num_groups, c.output_dim, 3, "GroupNorm_0", f"Conv_{conv_index}", **kw)


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
    self.quantizer = Codebook(c.codebook_size, c.embedding_dim, "codebook",
                              nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
                              param_dtype=self.param_dtype)

  def __call__(self, images):
    """Reconstruction through the codebook: ``(images_rec, codes)``."""
    codes = self.encode(images)
    return self.decode_codes(codes), codes

  def encode_features(self, images):
    """Pre-quantisation features ``[B, h, w, embedding_dim]``."""
    check_images(images, 3)
    return self.encoder(images.astype(self.dtype))

  def encode(self, images):
    """Images in ``[0, 1]`` ``[B, H, W, 3]`` -> int32 codes ``[B, H/f, W/f]``."""
    return self.quantizer.nearest(self.encode_features(images))

  def decode_codes(self, codes):
    """Codes ``[B, h, w]`` -> images ``[B, h*f, w*f, 3]``, nominally in ``[0, 1]`` (unclipped)."""
    check_codes(codes)
    return self.decoder(self.quantizer.lookup(codes).astype(self.dtype))

  def decode_tokens(self, tokens):
    """Tokens ``[B, h*w]`` (clamped to valid codes) -> float32 images clipped to ``[0, 1]``."""
    x = self.decode_codes(tokens_to_grid(tokens, self.config.codebook_size))
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
