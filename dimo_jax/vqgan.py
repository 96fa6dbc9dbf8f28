"""VQGAN image tokenizers and checkpoint converters.

Two published tokenizers, both f16 with a 1024 x 256 codebook at their default configuration:

- ``TamingVQGAN``: the Taming-transformers ``VQModel`` used by valeoai MaskGIT (the Di[M]O teacher).
  Encoder / decoder with GroupNorm + swish residual blocks, single-head attention blocks at the
  listed resolutions and in the middle, ``quant_conv`` / ``post_quant_conv`` 1x1 convolutions.
  Pixels in ``[-1, 1]``. Weights come from the PyTorch state dict via
  ``convert_taming_state_dict`` / ``load_taming_checkpoint``.
- ``GoogleVQGAN``: Google's JAX MaskGIT tokenizer. No attention; GroupNorm + swish residual
  blocks whose 1x1 shortcut (where the channel count changes) is applied to the block's main-path
  output: ``y = h + conv1x1(h)``. Average-pool downsampling, nearest-neighbour upsampling. Pixels
  in ``[0, 1]``. Parameter names are the Linen auto-names of the public code, so the released
  msgpack tree loads directly (``load_google_tokenizer``).

Both modules expose ``encode(images) -> codes [B, h, w]`` (nearest codebook entry),
``decode_codes(codes) -> images [B, H, W, 3]`` and ``decode_tokens(tokens [B, h*w]) -> images in
[0, 1]``. Images are NHWC. ``dtype`` is the computation dtype and ``param_dtype`` the storage
dtype; the codebook search always runs in float32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def _flatten(tree: Mapping[str, Any], prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> Params:
  out: Params = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def _format_problems(source: str, missing, unexpected, mismatched, fix: str) -> str:
  lines = [f"{source} does not match the expected tokenizer parameters:"]
  if missing:
    lines.append(f"  missing ({len(missing)}): " + ", ".join(sorted(missing)))
  if unexpected:
    lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
  for name, got, want in sorted(mismatched):
    lines.append(f"  shape mismatch: {name}: got {tuple(got)}, expected {tuple(want)}")
  lines.append(fix)
  return "\n".join(lines)


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


_TAMING_MODULE_RULES = (
    (re.compile(r"^(down|up)_(\d+)_(block|attn)_(\d+)$"), r"\1.\2.\3.\4"),
    (re.compile(r"^(down|up)_(\d+)_(downsample|upsample)$"), r"\1.\2.\3"),
    (re.compile(r"^mid_(block_1|attn_1|block_2)$"), r"mid.\1"),
)


def _taming_torch_key(path: Tuple[str, ...]) -> str:
  parts = []
  for name in path[:-1]:
    for pattern, repl in _TAMING_MODULE_RULES:
      if pattern.match(name):
        name = pattern.sub(repl, name)
        break
    parts.append(name)
  leaf = path[-1]
  if leaf == "embedding":
    parts += ["embedding", "weight"]
  elif leaf in ("kernel", "scale"):
    parts.append("weight")
  elif leaf == "bias":
    parts.append("bias")
  else:
    raise ValueError(f"no torch name for parameter {'/'.join(path)}")
  return ".".join(parts)


def _torch_shape(path: Tuple[str, ...], shape: Tuple[int, ...]) -> Tuple[int, ...]:
  if path[-1] == "kernel":  # flax (kh, kw, in, out) <- torch (out, in, kh, kw)
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _abstract_params(module: nn.Module, image_size: int, channels: int) -> Dict[Tuple[str, ...], Any]:
  images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
  return _flatten(flax.core.unfreeze(shapes)["params"])


@functools.lru_cache(maxsize=16)
def _taming_layout_cached(config: TamingConfig):
  flat = _abstract_params(TamingVQGAN(config), config.resolution, config.in_channels)
  return tuple((_taming_torch_key(p), p, _torch_shape(p, s.shape)) for p, s in flat.items())


def taming_param_layout(config: TamingConfig = TamingConfig()) -> Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...]]]:
  """Expected torch state-dict keys -> ``(flax param path, torch shape)`` for ``config``."""
  return {key: (path, shape) for key, path, shape in _taming_layout_cached(config)}


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch tensor; imported lazily by the caller
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def convert_taming_state_dict(state_dict: Mapping[str, Any],
                              config: TamingConfig = TamingConfig(),
                              param_dtype: Dtype = jnp.float32,
                              source: str = "state_dict") -> Params:
  """Taming ``VQModel`` PyTorch state dict -> ``TamingVQGAN`` params (the inner ``params`` tree).

  Accepts a plain state dict or a Lightning checkpoint dict holding one under ``state_dict``.
  Keys under ``loss.`` (perceptual loss / discriminator) are ignored. Any missing or extra key,
  or a shape mismatch, raises ``ValueError`` listing the names and shapes.
  """
  if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
    state_dict = state_dict["state_dict"]
  layout = taming_param_layout(config)
  given = {k: v for k, v in state_dict.items() if not str(k).startswith("loss.")}
  missing = [k for k in layout if k not in given]
  unexpected = [k for k in given if k not in layout]
  arrays = {}
  mismatched = []
  for key, (path, shape) in layout.items():
    if key not in given:
      continue
    arr = _to_numpy(given[key])
    if tuple(arr.shape) != tuple(shape):
      mismatched.append((key, arr.shape, shape))
      continue
    if path[-1] == "kernel":
      arr = np.transpose(arr, (2, 3, 1, 0))
    arrays[path] = jnp.asarray(arr, dtype=param_dtype)
  if missing or unexpected or mismatched:
    raise ValueError(_format_problems(
        source, missing, unexpected, mismatched,
        f"Pass a Taming-transformers VQModel checkpoint whose architecture matches {config} "
        "(or adjust the TamingConfig)."))
  return _unflatten(arrays)


def load_taming_checkpoint(path: str, config: TamingConfig = TamingConfig(),
                           param_dtype: Dtype = jnp.float32) -> Params:
  """Load a Taming VQGAN ``.ckpt`` / ``.pth`` (Lightning or plain state dict) -> ``{'params': ...}``.

  Reads with ``torch.load(weights_only=True)``; torch is imported here only.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Taming VQGAN checkpoint not found: {path}")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("load_taming_checkpoint needs PyTorch to read the checkpoint; "
                      "install it with `pip install torch`.") from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError / RuntimeError for disallowed objects
    raise ValueError(
        f"{path}: cannot be read with torch.load(weights_only=True) ({e}). If you trust the "
        "file, re-save only its tensors: torch.save(torch.load(path, weights_only=False)"
        "['state_dict'], 'vqgan_state_dict.pth') and load that file.") from e
  if not isinstance(state, Mapping):
    raise ValueError(f"{path}: expected a state dict (mapping of names to tensors), "
                     f"got {type(state).__name__}.")
  return {"params": convert_taming_state_dict(state, config, param_dtype, source=path)}


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
  flat = _abstract_params(GoogleVQGAN(config), config.image_size, 3)
  return tuple(("/".join(p), tuple(s.shape)) for p, s in flat.items())


def google_param_shapes(config: GoogleVQGANConfig = GoogleVQGANConfig()) -> Dict[str, Tuple[int, ...]]:
  """Expected ``'/'``-joined parameter paths (inside ``params``) -> shapes for ``config``."""
  return dict(_google_shapes_cached(config))


def check_google_params(params: Mapping[str, Any], config: GoogleVQGANConfig = GoogleVQGANConfig(),
                        source: str = "params") -> None:
  """Raise ``ValueError`` naming every missing, extra or mis-shaped parameter."""
  expected = google_param_shapes(config)
  given = {"/".join(p): np.shape(v) for p, v in _flatten(params).items()}
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  mismatched = [(k, given[k], expected[k]) for k in expected
                if k in given and tuple(given[k]) != tuple(expected[k])]
  if missing or unexpected or mismatched:
    raise ValueError(_format_problems(
        source, missing, unexpected, mismatched,
        f"Pass a Google MaskGIT tokenizer checkpoint whose architecture matches {config} "
        "(or adjust the GoogleVQGANConfig)."))


def load_google_tokenizer(path: str, config: GoogleVQGANConfig = GoogleVQGANConfig(),
                          param_dtype: Optional[Dtype] = jnp.float32) -> Params:
  """Load Google's msgpack tokenizer checkpoint -> ``{'params': ...}`` for ``GoogleVQGAN``.

  The file is ``flax.serialization.to_bytes({'params': ...})``; it is parsed with
  ``msgpack_restore`` (no pickle). A bare params tree (top keys ``encoder``/``decoder``/
  ``quantizer``) is accepted too. Keys and shapes are checked strictly.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Google VQGAN tokenizer checkpoint not found: {path}")
  with open(path, "rb") as f:
    data = f.read()
  try:
    state = flax.serialization.msgpack_restore(data)
  except Exception as e:
    raise ValueError(f"{path}: not a flax msgpack checkpoint ({e}).") from e
  if not isinstance(state, Mapping):
    raise ValueError(f"{path}: expected a mapping at the top level, got {type(state).__name__}.")
  if "params" in state and isinstance(state["params"], Mapping):
    params = state["params"]
  elif {"encoder", "decoder", "quantizer"} <= set(state):
    params = state
  else:
    raise ValueError(f"{path}: top-level keys {sorted(state)} hold neither 'params' nor "
                     "'encoder'/'decoder'/'quantizer'; is this the tokenizer checkpoint?")
  check_google_params(params, config, source=path)
  flat = _flatten(params)
  if param_dtype is not None:
    flat = {p: jnp.asarray(v, dtype=param_dtype) for p, v in flat.items()}
  return {"params": _unflatten(flat)}


__all__ = [
    "TamingConfig", "TamingVQGAN", "TamingEncoder", "TamingDecoder", "TamingResnetBlock",
    "TamingAttnBlock", "decode_tokens", "taming_param_layout", "convert_taming_state_dict",
    "load_taming_checkpoint", "GoogleVQGANConfig", "GoogleVQGAN", "GoogleEncoder",
    "GoogleDecoder", "GoogleResBlock", "google_decode_tokens", "google_param_shapes",
    "check_google_params", "load_google_tokenizer",
]
