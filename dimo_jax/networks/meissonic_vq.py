"""Meissonic's VQ image tokenizer (the diffusers ``VQModel`` of the released ``vqvae/`` folder).

Layout (``reference/meissonic_reference.md`` sections 2 and 10.2), f = 16, 8192 codes of width 64:

- encoder: ``conv_in`` 3x3 -> one down block per entry of ``block_out_channels`` with
  ``layers_per_block`` resnets each and, except after the last, a stride-2 3x3 convolution after
  zero-padding one row and column at the bottom and right -> a mid block of two resnets (no
  attention) -> GroupNorm -> SiLU -> ``conv_out`` 3x3 to ``latent_channels``; then ``quant_conv``
  1x1 and the nearest codebook row (squared Euclidean distance, float32).
- decoder (what integer ids take, as Meissonic and Di[M]O decode them with
  ``force_not_quantize=True`` and ``lookup_from_codebook``): codebook row of each id ->
  ``post_quant_conv`` 1x1 -> ``conv_in`` 3x3 -> mid block of two resnets -> up blocks over the
  reversed channel list with ``layers_per_block + 1`` resnets each and, except after the last, a
  nearest x2 upsampling followed by a 3x3 convolution -> GroupNorm -> SiLU -> ``conv_out`` 3x3.
  No latent scaling is applied on this path (``scaling_factor`` is unused).
- resnet: GroupNorm -> SiLU -> conv 3x3 -> GroupNorm -> SiLU -> conv 3x3, added to the input,
  which passes a 1x1 ``conv_shortcut`` when the channel count changes; output scale 1.
- every GroupNorm has ``norm_num_groups`` groups, eps 1e-6 and affine parameters.

Pixels are NHWC in ``[0, 1]`` on both sides (no ``[-1, 1]`` mapping): ``encode_ids(images)`` and
``decode_ids(ids)``, the latter clipped to ``[0, 1]``. ``dtype`` is the computation dtype and
``param_dtype`` the storage dtype; codebook search and the returned images are float32. Both
upstream repositories run this model in float32 ("to avoid NaN"), which is the default here.

Parameter names mirror the released keys with ``.<i>`` folded into ``_<i>``
(``decoder.up_blocks.1.resnets.0.conv_shortcut`` is
``decoder/up_blocks_1/resnets_0/conv_shortcut``),
which is what ``dimo_jax.converters.meissonic_vq`` relies on.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax.networks.vq_blocks import (
  Codebook,
  Coder,
  Downsample,
  ResnetBlock,
  Upsample,
  check_level_channels,
  conv,
  norm_act_conv,
)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class MeissonicVQConfig:
  """Architecture of the VQ model; the defaults are Meissonic's released ``vqvae/config.json``."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Tuple[int, ...] = (128, 256, 256, 512, 768)
  layers_per_block: int = 2
  latent_channels: int = 64
  num_vq_embeddings: int = 8192
  vq_embed_dim: Optional[int] = None  # None: the codebook width is latent_channels
  norm_num_groups: int = 32
  norm_eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    check_level_channels("MeissonicVQConfig.block_out_channels", self.block_out_channels,
                         "norm_num_groups", self.norm_num_groups)
    if self.layers_per_block < 1:
      raise ValueError("MeissonicVQConfig.layers_per_block must be at least 1.")

  @property
  def embed_dim(self) -> int:
    """Width of a codebook row."""
    return self.latent_channels if self.vq_embed_dim is None else int(self.vq_embed_dim)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d["block_out_channels"] = list(self.block_out_channels)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "MeissonicVQConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"MeissonicVQConfig: unknown fields {unknown}; known: {sorted(names)}.")
    return cls(**dict(d))

  @classmethod
  def tiny(cls) -> "MeissonicVQConfig":
    """A three-level test configuration (f = 4) with channel changes in both directions."""
    return cls(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=8,
               num_vq_embeddings=32, norm_num_groups=4)


class _ResnetStack(nn.Module):
  """``resnets_0 .. resnets_{n-1}``, then an optional ``downsamplers_0`` / ``upsamplers_0``."""
  out_channels: int
  num_resnets: int
  groups: int
  eps: float
  resample: Optional[str] = None  # None, "down" or "up"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_resnets):
      x = ResnetBlock(self.out_channels, self.groups, self.eps, "conv_shortcut", name=f"resnets_{j}",
                      **kw)(x)
    if self.resample == "down":
      x = Downsample(name="downsamplers_0", **kw)(x)
    elif self.resample == "up":
      x = Upsample(name="upsamplers_0", **kw)(x)
    return x


class VQEncoder(Coder):
  """Images ``[B, H, W, in_channels]`` -> features ``[B, H/f, W/f, latent_channels]``."""

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = self.kw
    chans = c.block_out_channels
    x = conv(chans[0], 3, "conv_in", **kw)(x)
    for i, ch in enumerate(chans):
      x = _ResnetStack(ch, c.layers_per_block, c.norm_num_groups, c.norm_eps,
                       "down" if i < len(chans) - 1 else None, name=f"down_blocks_{i}", **kw)(x)
    x = _ResnetStack(chans[-1], 2, c.norm_num_groups, c.norm_eps, name="mid_block", **kw)(x)
    return norm_act_conv(x, c.norm_num_groups, c.latent_channels, 3, "conv_norm_out", "conv_out",
                         eps=c.norm_eps, **kw)


class VQDecoder(Coder):
  """Features ``[B, h, w, latent_channels]`` -> unclipped images ``[B, h*f, w*f, out_channels]``."""

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = self.kw
    chans = tuple(reversed(c.block_out_channels))
    x = conv(chans[0], 3, "conv_in", **kw)(x)
    x = _ResnetStack(chans[0], 2, c.norm_num_groups, c.norm_eps, name="mid_block", **kw)(x)
    for i, ch in enumerate(chans):
      x = _ResnetStack(ch, c.layers_per_block + 1, c.norm_num_groups, c.norm_eps,
                       "up" if i < len(chans) - 1 else None, name=f"up_blocks_{i}", **kw)(x)
    return norm_act_conv(x, c.norm_num_groups, c.out_channels, 3, "conv_norm_out", "conv_out",
                         eps=c.norm_eps, **kw)


class MeissonicVQModel(nn.Module):
  """Encoder, ``quant_conv``, codebook ``quantize``, ``post_quant_conv`` and decoder.

  ``init`` with images ``[B, H, W, 3]`` (``H`` and ``W`` multiples of the downsampling factor,
  16 at the released size); then ``apply(v, ids, method='decode_ids')`` or
  ``apply(v, images, method='encode_ids')``.
  """
  config: MeissonicVQConfig = MeissonicVQConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = VQEncoder(c, **kw)
    self.quant_conv = nn.Conv(c.embed_dim, (1, 1), **kw)
    self.quantize = Codebook(c.num_vq_embeddings, c.embed_dim, param_dtype=self.param_dtype)
    self.post_quant_conv = nn.Conv(c.latent_channels, (1, 1), **kw)
    self.decoder = VQDecoder(c, **kw)

  def __call__(self, images):
    """Round trip ``(reconstruction in [0, 1], ids)``; touches every parameter (for ``init``)."""
    ids = self.encode_ids(images)
    return self.decode_ids(ids), ids

  def encode_latents(self, images):
    """Images in ``[0, 1]`` -> pre-quantisation features ``[B, h, w, embed_dim]``."""
    c = self.config
    if images.ndim != 4 or images.shape[-1] != c.in_channels:
      raise ValueError(f"images must have shape [B, H, W, {c.in_channels}] (NHWC, values in "
                       f"[0, 1]); got {images.shape}.")
    f = c.downsample_factor
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"image height and width must be multiples of {f}; got "
                       f"{images.shape[1]} x {images.shape[2]}.")
    return self.quant_conv(self.encoder(images.astype(self.dtype)))

  def encode_ids(self, images):
    """Images in ``[0, 1]`` ``[B, H, W, 3]`` -> int32 ids ``[B, H/f, W/f]``."""
    return self.quantize.nearest(self.encode_latents(images))

  def decode_ids(self, ids, clip: bool = True):
    """Ids ``[B, h, w]`` -> float32 images ``[B, h*f, w*f, 3]`` in ``[0, 1]`` (clipped).

    Ids outside ``0..num_vq_embeddings-1`` (a mask id left by a sampler) are clamped into range.
    ``clip=False`` returns the decoder output as it is (used by the parity tests).
    """
    if ids.ndim != 3:
      raise ValueError(f"ids must have shape [B, h, w]; got shape {ids.shape}.")
    ids = jnp.clip(ids.astype(jnp.int32), 0, self.config.num_vq_embeddings - 1)
    z = self.quantize.lookup(ids).astype(self.dtype)
    x = self.decoder(self.post_quant_conv(z)).astype(jnp.float32)
    return jnp.clip(x, 0.0, 1.0) if clip else x


def abstract_params(config: MeissonicVQConfig, param_dtype: Dtype = jnp.float32):
  """Parameter shapes of the model by ``jax.eval_shape`` (nothing is allocated)."""
  f = config.downsample_factor
  images = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  model = MeissonicVQModel(config, param_dtype=param_dtype)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]


def param_count(config: MeissonicVQConfig) -> int:
  """Number of parameters (146,244,675 at the released configuration)."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(abstract_params(config))))
