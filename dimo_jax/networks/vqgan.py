"""The Taming-transformers VQGAN (valeoai MaskGIT's tokenizer) in Linen, and the building blocks
Google's VQGAN (``vqgan_google``) shares with it.

f16 with a 1024 x 256 codebook at its default configuration: encoder / decoder with GroupNorm +
swish residual blocks, single-head attention blocks at the listed resolutions and in the middle,
``quant_conv`` / ``post_quant_conv``. Pixels in ``[-1, 1]``. ``decode_tokens`` maps codes to
images in ``[0, 1]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax.core.trees import flatten_paths

Dtype = Any
Params = Dict[str, Any]

_GN_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def _swish(x):
  return x * jax.nn.sigmoid(x)


def _group_norm(num_groups: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=num_groups, epsilon=_GN_EPS, use_fast_variance=False,
                      dtype=dtype, param_dtype=param_dtype, name=name)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype,
          use_bias: bool = True, strides: int = 1, padding: Any = None) -> nn.Conv:
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def _upsample_nearest(x):
  """Nearest-neighbour x2 upsampling of an NHWC array (each pixel repeated 2 x 2)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _nearest_code(z, codebook):
  """Index of the nearest codebook row (squared Euclidean distance) for every vector in ``z``.

  ``z`` is ``[..., D]``, ``codebook`` ``[K, D]``; computed in float32 as
  ``|z|^2 - 2 z.e + |e|^2`` with a full-precision matmul.
  """
  z = z.astype(jnp.float32)
  e = codebook.astype(jnp.float32)
  flat = z.reshape(-1, z.shape[-1])
  dist = (jnp.sum(flat**2, axis=1, keepdims=True)
          - 2.0 * jnp.matmul(flat, e.T, precision=jax.lax.Precision.HIGHEST)
          + jnp.sum(e**2, axis=1)[None, :])
  return jnp.argmin(dist, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])


def _tokens_to_grid(tokens, num_codes: int):
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


def _check_codes(codes):
  if codes.ndim != 3:
    raise ValueError(f"codes must have shape [B, h, w]; got shape {codes.shape}.")


def _check_images(images, channels: int):
  if images.ndim != 4 or images.shape[-1] != channels:
    raise ValueError(f"images must have shape [B, H, W, {channels}] (NHWC); got {images.shape}.")


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
    if not self.ch_mult:
      raise ValueError("TamingConfig.ch_mult must list at least one level.")
    for m in self.ch_mult:
      if (self.ch * m) % self.num_groups:
        raise ValueError(f"TamingConfig: channels ch*mult = {self.ch * m} are not divisible by "
                         f"num_groups = {self.num_groups}; choose ch a multiple of num_groups.")
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


class TamingResnetBlock(nn.Module):
  """GN-swish-conv3x3 twice; a 1x1 ``nin_shortcut`` on the input when channels change."""
  out_channels: int
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _swish(_group_norm(self.num_groups, name="norm1", **kw)(x))
    h = _conv(self.out_channels, 3, "conv1", **kw)(h)
    h = _swish(_group_norm(self.num_groups, name="norm2", **kw)(h))
    h = _conv(self.out_channels, 3, "conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "nin_shortcut", **kw)(x)
    return x + h


class TamingAttnBlock(nn.Module):
  """Single-head spatial self-attention with 1x1 q/k/v/proj_out convolutions and a residual."""
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hh, ww, c = x.shape
    h = _group_norm(self.num_groups, name="norm", **kw)(x)
    q = _conv(c, 1, "q", **kw)(h).reshape(b, hh * ww, c)
    k = _conv(c, 1, "k", **kw)(h).reshape(b, hh * ww, c)
    v = _conv(c, 1, "v", **kw)(h).reshape(b, hh * ww, c)
    logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (c ** -0.5)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, hh, ww, c)
    return x + _conv(c, 1, "proj_out", **kw)(out)


class TamingDownsample(nn.Module):
  """Zero-pad one row/column at the bottom/right, then a 3x3 stride-2 convolution."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, "conv", self.dtype, self.param_dtype, strides=2,
                 padding="VALID")(x)


class TamingUpsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 convolution."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _conv(x.shape[-1], 3, "conv", self.dtype, self.param_dtype)(_upsample_nearest(x))


class TamingEncoder(nn.Module):
  """Images ``[B, H, W, in_channels]`` -> features ``[B, H/f, W/f, z_channels]``.

  Submodule names follow the torch keys: ``down_{i}_block_{j}`` is ``down.i.block.j``.
  """
  config: TamingConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _conv(c.ch, 3, "conv_in", **kw)(x)
    res = c.resolution
    for i, mult in enumerate(c.ch_mult):
      for j in range(c.num_res_blocks):
        h = TamingResnetBlock(c.ch * mult, c.num_groups, name=f"down_{i}_block_{j}", **kw)(h)
        if res in c.attn_resolutions:
          h = TamingAttnBlock(c.num_groups, name=f"down_{i}_attn_{j}", **kw)(h)
      if i != len(c.ch_mult) - 1:
        h = TamingDownsample(name=f"down_{i}_downsample", **kw)(h)
        res //= 2
    width = h.shape[-1]
    h = TamingResnetBlock(width, c.num_groups, name="mid_block_1", **kw)(h)
    h = TamingAttnBlock(c.num_groups, name="mid_attn_1", **kw)(h)
    h = TamingResnetBlock(width, c.num_groups, name="mid_block_2", **kw)(h)
    h = _swish(_group_norm(c.num_groups, name="norm_out", **kw)(h))
    return _conv(c.z_channels, 3, "conv_out", **kw)(h)


class TamingDecoder(nn.Module):
  """Features ``[B, h, w, z_channels]`` -> images ``[B, h*f, w*f, out_ch]`` (unclipped)."""
  config: TamingConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = c.ch * c.ch_mult[-1]
    res = c.latent_size
    h = _conv(width, 3, "conv_in", **kw)(z)
    h = TamingResnetBlock(width, c.num_groups, name="mid_block_1", **kw)(h)
    h = TamingAttnBlock(c.num_groups, name="mid_attn_1", **kw)(h)
    h = TamingResnetBlock(width, c.num_groups, name="mid_block_2", **kw)(h)
    for i in reversed(range(len(c.ch_mult))):
      for j in range(c.num_res_blocks + 1):
        h = TamingResnetBlock(c.ch * c.ch_mult[i], c.num_groups, name=f"up_{i}_block_{j}", **kw)(h)
        if res in c.attn_resolutions:
          h = TamingAttnBlock(c.num_groups, name=f"up_{i}_attn_{j}", **kw)(h)
      if i != 0:
        h = TamingUpsample(name=f"up_{i}_upsample", **kw)(h)
        res *= 2
    h = _swish(_group_norm(c.num_groups, name="norm_out", **kw)(h))
    return _conv(c.out_ch, 3, "conv_out", **kw)(h)


class _TamingCodebook(nn.Module):
  """Codebook parameter ``embedding`` ``[n_embed, embed_dim]`` (torch ``quantize.embedding.weight``)."""
  num_codes: int
  dim: int
  param_dtype: Dtype = jnp.float32

  def setup(self):
    limit = 1.0 / self.num_codes
    self.embedding = self.param(
        "embedding", lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -limit, limit),
        (self.num_codes, self.dim), self.param_dtype)

  def nearest(self, z):
    return _nearest_code(z, self.embedding)

  def lookup(self, codes):
    return jnp.take(self.embedding, codes, axis=0)


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
    self.quantize = _TamingCodebook(c.n_embed, c.embed_dim, param_dtype=self.param_dtype)

  def __call__(self, images):
    """Reconstruction through the codebook: ``(images_rec, codes)``."""
    codes = self.encode(images)
    return self.decode_codes(codes), codes

  def encode_features(self, images):
    """Pre-quantisation features ``[B, h, w, embed_dim]`` (after ``quant_conv``)."""
    _check_images(images, self.config.in_channels)
    return self.quant_conv(self.encoder(images.astype(self.dtype)))

  def encode(self, images):
    """Images in ``[-1, 1]`` ``[B, H, W, 3]`` -> int32 codes ``[B, H/f, W/f]``."""
    return self.quantize.nearest(self.encode_features(images))

  def decode_codes(self, codes):
    """Codes ``[B, h, w]`` -> images ``[B, h*f, w*f, 3]``, nominally in ``[-1, 1]`` (unclipped)."""
    _check_codes(codes)
    z = self.quantize.lookup(codes).astype(self.dtype)
    return self.decoder(self.post_quant_conv(z))

  def decode_tokens(self, tokens):
    """Tokens ``[B, h*w]`` (clamped to valid codes) -> float32 images in ``[0, 1]``."""
    x = self.decode_codes(_tokens_to_grid(tokens, self.config.n_embed)).astype(jnp.float32)
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
