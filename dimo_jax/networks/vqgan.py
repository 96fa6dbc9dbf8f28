"""The Taming-transformers VQGAN (valeoai MaskGIT's tokenizer) in Linen (blocks from ``vq_blocks``),
and the parameter-shape helpers the tokenizer converters share.

f16 with a 1024 x 256 codebook at its default configuration: encoder / decoder with GroupNorm +
swish residual blocks, single-head attention blocks at the listed resolutions and in the middle,
``quant_conv`` / ``post_quant_conv``. Pixels in ``[-1, 1]``. ``decode_tokens`` maps codes to
images in ``[0, 1]``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax.core.trees import flatten_paths
from dimo_jax.networks.vq_blocks import (
  Codebook,
  Coder,
  Downsample,
  ResnetBlock,
  Upsample,
  check_codes,
  check_images,
  check_level_channels,
  conv,
  group_norm,
  norm_act_conv,
  tokens_to_grid,
)

Dtype = Any
Params = Dict[str, Any]

# ---------------------------------------------------------------------------------------------
# Taming-transformers VQGAN (valeoai MaskGIT tokenizer)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TamingConfig:
  """Architecture of a Taming-transformers ``VQModel``; defaults: the f16 ImageNet model."""
  ch: int = 128
  ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Tuple[int, ...] = (16,)
  resolution: int = 256
  in_channels: int = 3
  out_ch: int = 3
  z_channels: int = 256
  embed_dim: int = 256
  n_embed: int = 1024
  num_groups: int = 32

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
    check_level_channels("TamingConfig.ch_mult", [self.ch * m for m in self.ch_mult], "num_groups",
                         self.num_groups)
    if self.resolution % self.downsample_factor:
      raise ValueError(f"TamingConfig.resolution = {self.resolution} is not divisible by the "
                       f"downsampling factor {self.downsample_factor}.")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def latent_size(self) -> int:
    return self.resolution // self.downsample_factor

  @classmethod
  def small(cls) -> "TamingConfig":
    """A two-level test configuration: 32 px -> 16 x 16 codes, attention at 16."""
    return cls(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32,
               z_channels=32, embed_dim=16, n_embed=64)


class TamingAttnBlock(nn.Module):
  """Single-head spatial self-attention with 1x1 q/k/v/proj_out convolutions and a residual."""
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hh, ww, c = x.shape
    h = group_norm(self.num_groups, "norm", **kw)(x)
    q = conv(c, 1, "q", **kw)(h).reshape(b, hh * ww, c)
    k = conv(c, 1, "k", **kw)(h).reshape(b, hh * ww, c)
    v = conv(c, 1, "v", **kw)(h).reshape(b, hh * ww, c)
    logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (c ** -0.5)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, hh, ww, c)
    return x + conv(c, 1, "proj_out", **kw)(out)


def _taming_mid(h, num_groups: int, kw):
  """The middle of both coders: ``mid_block_1``, ``mid_attn_1``, ``mid_block_2`` at constant width."""
  width = h.shape[-1]
  h = ResnetBlock(width, num_groups, name="mid_block_1", **kw)(h)
  h = TamingAttnBlock(num_groups, name="mid_attn_1", **kw)(h)
  return ResnetBlock(width, num_groups, name="mid_block_2", **kw)(h)


def _taming_level(h, c: "TamingConfig", level: int, blocks: int, res: int, side: str, kw):
  """``{side}_{level}_block_{j}`` resnets (and ``{side}_{level}_attn_{j}`` at attention resolutions)."""
  for j in range(blocks):
    h = ResnetBlock(c.ch * c.ch_mult[level], c.num_groups, name=f"{side}_{level}_block_{j}", **kw)(h)
    if res in c.attn_resolutions:
      h = TamingAttnBlock(c.num_groups, name=f"{side}_{level}_attn_{j}", **kw)(h)
  return h


class TamingEncoder(Coder):
  """Images ``[B, H, W, in_channels]`` -> features ``[B, H/f, W/f, z_channels]``.

  Submodule names follow the torch keys: ``down_{i}_block_{j}`` is ``down.i.block.j``.
  """

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = self.kw
    h = conv(c.ch, 3, "conv_in", **kw)(x)
    res = c.resolution
    for i in range(len(c.ch_mult)):
      h = _taming_level(h, c, i, c.num_res_blocks, res, "down", kw)
      if i != len(c.ch_mult) - 1:
        h = Downsample(name=f"down_{i}_downsample", **kw)(h)
        res //= 2
    h = _taming_mid(h, c.num_groups, kw)
    return norm_act_conv(h, c.num_groups, c.z_channels, 3, "norm_out", "conv_out", **kw)


class TamingDecoder(Coder):
  """Features ``[B, h, w, z_channels]`` -> images ``[B, h*f, w*f, out_ch]`` (unclipped)."""

  @nn.compact
  def __call__(self, z):
    c = self.config
    kw = self.kw
    res = c.latent_size
    h = conv(c.ch * c.ch_mult[-1], 3, "conv_in", **kw)(z)
    h = _taming_mid(h, c.num_groups, kw)
    for i in reversed(range(len(c.ch_mult))):
      h = _taming_level(h, c, i, c.num_res_blocks + 1, res, "up", kw)
      if i != 0:
        h = Upsample(name=f"up_{i}_upsample", **kw)(h)
        res *= 2
    return norm_act_conv(h, c.num_groups, c.out_ch, 3, "norm_out", "conv_out", **kw)


class TamingVQGAN(nn.Module):
  """Taming-transformers ``VQModel`` (encoder, quant_conv, codebook, post_quant_conv, decoder).

  ``init`` with images ``[B, H, W, 3]``; ``apply(..., method='encode' | 'decode_codes' |
  'decode_tokens')`` afterwards. Pixels in ``[-1, 1]``.
  """
  config: TamingConfig = TamingConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = TamingEncoder(c, **kw)
    self.decoder = TamingDecoder(c, **kw)
    self.quant_conv = nn.Conv(c.embed_dim, (1, 1), **kw)
    self.post_quant_conv = nn.Conv(c.z_channels, (1, 1), **kw)
    self.quantize = Codebook(c.n_embed, c.embed_dim, param_dtype=self.param_dtype)

  def __call__(self, images):
    """Reconstruction through the codebook: ``(images_rec, codes)``."""
    codes = self.encode(images)
    return self.decode_codes(codes), codes

  def encode_features(self, images):
    """Pre-quantisation features ``[B, h, w, embed_dim]`` (after ``quant_conv``)."""
    check_images(images, self.config.in_channels)
    return self.quant_conv(self.encoder(images.astype(self.dtype)))

  def encode(self, images):
    """Images in ``[-1, 1]`` ``[B, H, W, 3]`` -> int32 codes ``[B, H/f, W/f]``."""
    return self.quantize.nearest(self.encode_features(images))

  def decode_codes(self, codes):
    """Codes ``[B, h, w]`` -> images ``[B, h*f, w*f, 3]``, nominally in ``[-1, 1]`` (unclipped)."""
    check_codes(codes)
    z = self.quantize.lookup(codes).astype(self.dtype)
    return self.decoder(self.post_quant_conv(z))

  def decode_tokens(self, tokens):
    """Tokens ``[B, h*w]`` (clamped to valid codes) -> float32 images in ``[0, 1]``."""
    x = self.decode_codes(tokens_to_grid(tokens, self.config.n_embed)).astype(jnp.float32)
    return jnp.clip((x + 1.0) * 0.5, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def decode_tokens(variables, tokens, config: TamingConfig = TamingConfig(),
                  dtype: Dtype = jnp.float32):
  """Taming VQGAN: tokens ``[B, h*w]`` -> float32 images ``[B, H, W, 3]`` in ``[0, 1]``.

  Tokens outside ``0..n_embed-1`` (e.g. a mask id) are clamped, as the valeoai sampler does.
  ``dtype`` is the computation dtype.
  """
  return TamingVQGAN(config, dtype=dtype).apply(variables, tokens, method="decode_tokens")


def abstract_params(module: nn.Module, image_size: int, channels: int) -> Dict[Tuple[str, ...], Any]:
  images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
  return flatten_paths(flax.core.unfreeze(shapes)["params"])


def format_problems(source: str, missing, unexpected, mismatched, fix: str) -> str:
  lines = [f"{source} does not match the expected tokenizer parameters:"]
  if missing:
    lines.append(f"  missing ({len(missing)}): " + ", ".join(sorted(missing)))
  if unexpected:
    lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
  for name, got, want in sorted(mismatched):
    lines.append(f"  shape mismatch: {name}: got {tuple(got)}, expected {tuple(want)}")
  lines.append(fix)
  return "\n".join(lines)
