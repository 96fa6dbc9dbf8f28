"""The Meissonic text-to-image transformer (the Di[M]O text-to-image teacher), in Linen.

This module owns the network only: its configuration, its layers and the pure helpers the
layers are built from (RoPE tables, the 2x2 token compression, the sinusoidal embedding). The
diffusers-checkpoint converter lives in ``dimo_jax/converters/meissonic.py`` and the multi-step
sampler in ``dimo_jax/core/meissonic_sampler.py``.

Architecture (a Flux-style MMDiT with an aMUSEd-style token embedding and output head)::

    logits = MeissonicTransformer(config).apply(
        {'params': p}, tokens, cond, timestep=0, noise_sigma=0.0, rngs={'noise': key})

- ``tokens`` int ``[B, H*W]``: codes ``0..codebook_size-1`` and the mask id ``vocab_size - 1``;
  position index ``row * W + col`` (row-major over the token grid, 64 x 64 at 1024 px).
- ``cond`` a dict pytree: ``text`` ``[B, T, text_dim]`` (CLIP's penultimate hidden states, T = 77),
  ``pooled`` ``[B, pooled_dim]`` (CLIP's projected text embedding) and ``micro`` ``[B, 5]``
  (original width, original height, crop top, crop left, aesthetic score; Meissonic's default
  ``[1024, 1024, 0, 0, 6]`` is used where ``micro`` is absent).
- returns ``[B, H*W, codebook_size]`` logits (no mask column).

Forward pass: token embedding -> RMSNorm -> 1x1 conv (``embed``); the Di[M]O embedding noise
``e <- sigma * eps + sqrt(1 - sigma^2) * e`` on every image-token embedding (generator only, when
``noise_sigma`` is non-zero; it draws from the ``'noise'`` rng); 2x2 stride-2 token compression
(64x64 -> 32x32, ``down_block``); ``project_to_hidden``; ``num_layers`` dual-stream blocks (text and
image streams with separate weights, joint attention over ``[text; image]``) under one
``nn.scan``; ``num_single_layers`` single-stream blocks on the concatenation under a second
``nn.scan``; ``project_from_hidden``; the transposed 2x2 decompression (``up_block``); the
``mlm_layer`` head to the codebook. Every block is modulated AdaLN-Zero style by
``temb = time_text_embed(timestep * 1000, cond_embed([pooled; sinusoid(micro)]))``; attention uses
RMSNorm on queries and keys (eps 1e-6, learnable scale, variance in fp32) and an axial RoPE whose
ids are zeros for the text and ``(0, row, col)`` on the compressed grid for the image, rotating
adjacent dimension pairs.

The timestep quirk: the network multiplies ``timestep`` by 1000 before its sinusoidal
embedding, and the callers disagree on what they feed. Di[M]O feeds 0 to the teacher, the
auxiliary and the generator (its mask ratio truncates to an integer 0), Meissonic's own sampler
feeds the step index ``N - 1 - i`` (so ``1000 * (N - 1 - i)`` is embedded) and Meissonic's
training script fed ``mask_prob * 1000``. The default here is 0 (the Di[M]O convention); the
multi-step sampler passes the step index.

``dtype`` is the computation dtype and ``param_dtype`` the storage dtype (both names, so that a
config serialises to JSON); ``remat`` picks a rematerialisation policy applied to each block
inside the scans; ``scan=False`` unrolls the blocks (params ``transformer_blocks_0``, ... instead
of stacked along axis 0 under ``transformer_blocks``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Cond = Mapping[str, jax.Array]

REMAT_POLICIES: Dict[str, Optional[Callable]] = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

DEFAULT_MICRO_CONDS = (1024.0, 1024.0, 0.0, 0.0, 6.0)
NUM_MICRO_CONDS = 5


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class MeissonicConfig:
  """Sizes and compute settings of the Meissonic transformer (defaults: the released model).

  The size fields mirror the released diffusers ``transformer/config.json``: ``num_heads`` x
  ``head_dim`` = ``num_attention_heads`` x ``attention_head_dim``, ``text_dim`` =
  ``joint_attention_dim``, ``pooled_dim`` = ``pooled_projection_dim``.
  """
  vocab_size: int = 8256
  codebook_size: int = 8192
  num_heads: int = 8
  head_dim: int = 128
  num_layers: int = 14
  num_single_layers: int = 28
  text_dim: int = 1024
  pooled_dim: int = 1024
  axes_dims_rope: Tuple[int, ...] = (16, 56, 56)
  rope_theta: float = 10000.0
  micro_cond_dim: int = 256
  mlp_ratio: int = 4
  grid: int = 64
  downsample: bool = True
  upsample: bool = True
  norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  logits_dtype: str = "float32"
  remat: str = "none"
  scan: bool = True
  attention_impl: Optional[str] = None

  def __post_init__(self):
    object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
    if sum(self.axes_dims_rope) != self.head_dim or any(d % 2 for d in self.axes_dims_rope):
      raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be even and sum to head_dim "
                       f"{self.head_dim}")
    if self.pooled_dim != self.width:
      # time_text_embed.text_embedder takes pooled_dim inputs but is fed cond_embed's output,
      # which is `width` wide: the upstream class only runs when the two agree.
      raise ValueError(f"pooled_dim ({self.pooled_dim}) must equal num_heads * head_dim "
                       f"({self.width}), as in the upstream model")
    if self.downsample != self.upsample:
      raise ValueError("downsample and upsample must both be on or both off")
    if self.downsample and self.grid % 2:
      raise ValueError(f"the token grid ({self.grid}) must be even with downsample=True")
    if self.micro_cond_dim % 2:
      raise ValueError(f"micro_cond_dim must be even, got {self.micro_cond_dim}")
    if self.remat not in ("none", *REMAT_POLICIES):
      raise ValueError(f"unknown remat policy {self.remat!r}; choose one of "
                       f"{['none', *REMAT_POLICIES]}")
    for name in ("dtype", "param_dtype", "logits_dtype"):
      jnp.dtype(getattr(self, name))  # raises on an unknown dtype name

  @property
  def width(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def mask_id(self) -> int:
    return self.vocab_size - 1

  @property
  def seq_len(self) -> int:
    return self.grid * self.grid

  @property
  def cond_in_dim(self) -> int:
    return self.pooled_dim + NUM_MICRO_CONDS * self.micro_cond_dim

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def storage_dtype(self):
    return jnp.dtype(self.param_dtype)

  @classmethod
  def tiny(cls, **overrides) -> "MeissonicConfig":
    """A CPU-sized config for tests: 2 heads x 16, 2 dual + 2 single blocks, 8x8 tokens."""
    fields = dict(vocab_size=40, codebook_size=32, num_heads=2, head_dim=16, num_layers=2,
                  num_single_layers=2, text_dim=24, pooled_dim=32, axes_dims_rope=(4, 6, 6),
                  grid=8)
    fields.update(overrides)
    return cls(**fields)

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d["axes_dims_rope"] = list(self.axes_dims_rope)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "MeissonicConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown MeissonicConfig fields {unknown}; known: {sorted(known)}")
    return cls(**dict(d))


# --------------------------------------------------------------------------- pure helpers


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding ``[cos(t w), sin(t w)]`` (flip_sin_to_cos, no frequency shift); fp32.

  ``t`` ``[N]`` -> ``[N, dim]`` with ``w_k = max_period^(-k / (dim / 2))``.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def position_ids(text_len: int, grid_h: int, grid_w: int) -> np.ndarray:
  """RoPE ids ``[text_len + grid_h * grid_w, 3]``: zeros for text, ``(0, row, col)`` for image."""
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  img = np.stack([np.zeros(grid_h * grid_w), rows.reshape(-1), cols.reshape(-1)], axis=-1)
  return np.concatenate([np.zeros((text_len, 3)), img], axis=0).astype(np.float64)


def rope_tables(ids: np.ndarray, axes_dims: Sequence[int],
                theta: float = 10000.0) -> Tuple[np.ndarray, np.ndarray]:
  """Axial RoPE ``cos``, ``sin`` tables ``[S, sum(axes_dims)]`` (float32, computed in float64).

  Axis ``i`` of ``ids`` rotates ``axes_dims[i]`` dimensions with frequencies
  ``theta^(-2k / d_i)``; each angle covers an adjacent pair of dimensions (repeat-interleaved).
  """
  cos, sin = [], []
  for axis, d in enumerate(axes_dims):
    freqs = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.repeat(np.outer(ids[:, axis].astype(np.float64), freqs), 2, axis=-1)
    cos.append(np.cos(angles))
    sin.append(np.sin(angles))
  return (np.concatenate(cos, -1).astype(np.float32), np.concatenate(sin, -1).astype(np.float32))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates adjacent pairs ``(x[2k], x[2k+1])`` of ``x [B, S, heads, D]`` in fp32.

  ``out = x * cos + rot(x) * sin`` with ``rot(x)[2k] = -x[2k+1]``, ``rot(x)[2k+1] = x[2k]``.
  """
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  cos = jnp.asarray(cos, jnp.float32)[None, :, None, :]
  sin = jnp.asarray(sin, jnp.float32)[None, :, None, :]
  return (x32 * cos + rotated * sin).astype(x.dtype)


def downsample_2x2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """2x2 stride-2 convolution, channel-last: ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), O]``.

  ``out[i, j, o] = sum_{a, c, ch} x[2i + a, 2j + c, ch] * kernel[a, c, ch, o]``, the input padded
  with one zero row / column at the bottom / right when odd (as upstream, which always pads one
  and never reads it for even sizes). ``kernel[a, c, ch, o]`` = torch ``weight[o, ch, a, c]``.
  """
  b, h, w, ch = x.shape
  x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  x = x.reshape(b, (h + 1) // 2, 2, (w + 1) // 2, 2, ch)
  return jnp.einsum("biajcd,acdo->bijo", x, kernel)


def upsample_2x2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """2x2 stride-2 transposed convolution: ``[B, h, w, C] -> [B, 2h, 2w, O]``.

  The output windows do not overlap: ``out[2i + a, 2j + c, o] = sum_ch x[i, j, ch] *
  kernel[a, c, ch, o]``, with ``kernel[a, c, ch, o]`` = torch ``weight[ch, o, a, c]``.
  """
  b, h, w, _ = x.shape
  out = jnp.einsum("bijd,acdo->biajco", x, kernel)
  return out.reshape(b, 2 * h, 2 * w, kernel.shape[-1])


def _attention(q, k, v, implementation: Optional[str]):
  """Scaled dot-product attention (scale 1/sqrt(D), no mask) on ``[B, S, heads, D]``."""
  t = q.shape[1]
  if implementation == "cudnn" and t % 64:
    pad = 64 - t % 64
    padder = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
    lengths = jnp.full((q.shape[0],), t, jnp.int32)
    return jax.nn.dot_product_attention(
        padder(q), padder(k), padder(v), query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        implementation="cudnn")[:, :t]
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


def _gelu_tanh(x):
  return nn.gelu(x, approximate=True)


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
  """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, the statistics in fp32."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class _Module(nn.Module):
  """A layer configured by a ``MeissonicConfig`` (dense / norm factories in its dtypes)."""
  config: MeissonicConfig

  def dense(self, features: int, name: str, use_bias: bool = True, zero: bool = False):
    init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
    return nn.Dense(features, use_bias=use_bias, kernel_init=init, dtype=self.config.compute_dtype,
                    param_dtype=self.config.storage_dtype, name=name)

  def rms(self, name: str):
    return RMSNorm(self.config.norm_eps, self.config.compute_dtype, self.config.storage_dtype,
                   name=name)

  def layer_norm(self, x):
    """LayerNorm without affine parameters (eps 1e-6), as inside AdaLN-Zero."""
    return nn.LayerNorm(epsilon=self.config.norm_eps, use_bias=False, use_scale=False,
                        dtype=self.config.compute_dtype)(x)


class _TwoLayer(_Module):
  """``linear_2(silu(linear_1(x)))``: cond_embed, timestep_embedder and text_embedder."""
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    x = self.dense(self.config.width, "linear_1", self.use_bias)(x)
    return self.dense(self.config.width, "linear_2", self.use_bias)(nn.silu(x))


class _TimeTextEmbed(_Module):
  """``timestep_embedder(sinusoid_256(t)) + text_embedder(pooled)`` (``time_text_embed``)."""

  @nn.compact
  def __call__(self, t, pooled):
    t_emb = timestep_embedding(t, 256).astype(self.config.compute_dtype)
    return (_TwoLayer(self.config, name="timestep_embedder")(t_emb)
            + _TwoLayer(self.config, name="text_embedder")(pooled))


class _AdaLNZero(_Module):
  """``chunks`` modulation vectors ``Linear(silu(temb))`` (zero-initialised), each ``[B, D]``."""
  chunks: int = 6

  @nn.compact
  def __call__(self, temb):
    mod = self.dense(self.chunks * self.config.width, "linear", zero=True)(nn.silu(temb))
    return jnp.split(mod, self.chunks, axis=-1)


class _FeedForward(_Module):
  """Linear D -> 4D, GELU (tanh), Linear 4D -> D (diffusers ``ff.net.0.proj`` / ``ff.net.2``)."""

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = _gelu_tanh(self.dense(cfg.mlp_ratio * cfg.width, "fc1")(x))
    return self.dense(cfg.width, "fc2")(x)


class _Attention(_Module):
  """Multi-head attention with RMS QK-norm and RoPE; ``joint`` adds the text stream's weights.

  Joint: the text (``add_*_proj``) and image (``to_*``) queries, keys and values are concatenated
  as ``[text; image]``, attended together, and split again into ``to_add_out`` / ``to_out``.
  Not joint (single-stream blocks): no output projection.
  """
  joint: bool = False

  def _heads(self, x, proj: str, norm: Optional[str]):
    cfg = self.config
    h = self.dense(cfg.width, proj)(x).reshape(*x.shape[:-1], cfg.num_heads, cfg.head_dim)
    return self.rms(norm)(h) if norm else h

  @nn.compact
  def __call__(self, x, c, rope):
    cfg = self.config
    q = self._heads(x, "to_q", "norm_q")
    k = self._heads(x, "to_k", "norm_k")
    v = self._heads(x, "to_v", None)
    if self.joint:
      q = jnp.concatenate([self._heads(c, "add_q_proj", "norm_added_q"), q], axis=1)
      k = jnp.concatenate([self._heads(c, "add_k_proj", "norm_added_k"), k], axis=1)
      v = jnp.concatenate([self._heads(c, "add_v_proj", None), v], axis=1)
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = _attention(q, k, v.astype(q.dtype), cfg.attention_impl)
    out = out.reshape(*out.shape[:2], cfg.width)
    if not self.joint:
      return out
    t = c.shape[1]
    return self.dense(cfg.width, "to_out")(out[:, t:]), self.dense(cfg.width, "to_add_out")(out[:, :t])


def _clip_fp16(x):
  return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


class DualBlock(_Module):
  """Dual-stream (MM-DiT) block, a scan body ``((text, image), temb, rope) -> ((text, image), None)``."""

  @nn.compact
  def __call__(self, carry, temb, rope):
    c, x = carry
    ln = self.layer_norm
    sx, scx, gx, sx2, scx2, gx2 = _AdaLNZero(self.config, 6, name="norm1")(temb)
    sc, scc, gc, sc2, scc2, gc2 = _AdaLNZero(self.config, 6, name="norm1_context")(temb)
    xa, ca = _Attention(self.config, joint=True, name="attn")(
        _modulate(ln(x), sx, scx), _modulate(ln(c), sc, scc), rope)
    x = x + gx[:, None] * xa
    x = x + gx2[:, None] * _FeedForward(self.config, name="ff")(_modulate(ln(x), sx2, scx2))
    c = c + gc[:, None] * ca
    c = c + gc2[:, None] * _FeedForward(self.config, name="ff_context")(_modulate(ln(c), sc2, scc2))
    return (_clip_fp16(c), x), None


class SingleBlock(_Module):
  """Single-stream block on ``[text; image]``, a scan body ``(h, temb, rope) -> (h, None)``.

  ``h += gate * proj_out([attn(n); gelu(proj_mlp(n))])`` with ``n`` the AdaLN-modulated ``h``.
  """

  @nn.compact
  def __call__(self, h, temb, rope):
    cfg = self.config
    shift, scale, gate = _AdaLNZero(cfg, 3, name="norm")(temb)
    n = _modulate(self.layer_norm(h), shift, scale)
    mlp = _gelu_tanh(self.dense(cfg.mlp_ratio * cfg.width, "proj_mlp")(n))
    attn = _Attention(cfg, joint=False, name="attn")(n, None, rope)
    out = self.dense(cfg.width, "proj_out")(jnp.concatenate([attn, mlp], axis=-1))
    return _clip_fp16(h + gate[:, None] * out), None


def _blocks(config: MeissonicConfig, block_cls, depth: int, name: str, carry, *broadcast):
  """``depth`` blocks: scanned (params stacked on axis 0 under ``name``) or unrolled."""
  cls = block_cls
  if config.remat != "none":
    cls = nn.remat(block_cls, policy=REMAT_POLICIES[config.remat], prevent_cse=not config.scan)
  if config.scan:
    scanned = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast,) * len(broadcast), length=depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    carry, _ = scanned(config, name=name)(carry, *broadcast)
    return carry
  for i in range(depth):
    carry, _ = cls(config, name=f"{name}_{i}")(carry, *broadcast)
  return carry


class _TokenEmbed(_Module):
  """Embedding table (with the mask row) -> RMSNorm -> 1x1 conv (``embed``)."""

  @nn.compact
  def __call__(self, tokens):
    cfg = self.config
    e = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.initializers.normal(0.02),
                 dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, name="embeddings")(tokens)
    return self.dense(cfg.width, "conv", use_bias=False)(self.rms("layer_norm")(e))


class _Resample(_Module):
  """RMSNorm over channels, then the 2x2 stride-2 conv (``down``) or transposed conv (up)."""
  down: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    in_axis = (0, 1, 2) if self.down else 2
    kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=in_axis, out_axis=3),
                        (2, 2, cfg.width, cfg.width), cfg.storage_dtype)
    x = self.rms("norm")(x)
    kernel = kernel.astype(cfg.compute_dtype)
    return downsample_2x2(x, kernel) if self.down else upsample_2x2(x, kernel)


class _MLMHead(_Module):
  """1x1 conv -> RMSNorm -> 1x1 conv to ``codebook_size`` logits (``mlm_layer``)."""

  @nn.compact
  def __call__(self, x):
    x = self.rms("layer_norm")(self.dense(self.config.width, "conv1", use_bias=False)(x))
    return self.dense(self.config.codebook_size, "conv2", use_bias=False)(x)


class MeissonicTransformer(nn.Module):
  """The Meissonic transformer; see the module docstring for the calling convention."""
  config: MeissonicConfig

  @property
  def mask_id(self) -> int:
    return self.config.mask_id

  def _grid(self, seq_len: int, grid_hw: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    if grid_hw is not None:
      h, w = (int(v) for v in grid_hw)
    elif seq_len == self.config.grid ** 2:
      h = w = self.config.grid
    else:
      h = w = int(round(math.sqrt(seq_len)))
    if h * w != seq_len:
      raise ValueError(f"{seq_len} tokens do not fill a {h}x{w} grid; pass grid_hw=(H, W)")
    if self.config.downsample and (h % 2 or w % 2):
      raise ValueError(f"the token grid {h}x{w} must be even with downsample=True")
    return h, w

  def _noisy(self, e, noise_sigma):
    """Di[M]O embedding noise ``sigma * eps + sqrt(1 - sigma^2) * e`` (fp32, 'noise' rng)."""
    if isinstance(noise_sigma, (int, float)) and noise_sigma == 0:
      return e
    sigma = jnp.asarray(noise_sigma, jnp.float32)
    eps = jax.random.normal(self.make_rng("noise"), e.shape, jnp.float32)
    return (sigma * eps + jnp.sqrt(1.0 - sigma**2) * e.astype(jnp.float32)).astype(e.dtype)

  @nn.compact
  def __call__(self, tokens, cond: Cond, *, timestep=0.0, noise_sigma=0.0,
               grid_hw: Optional[Tuple[int, int]] = None):
    cfg = self.config
    dtype = cfg.compute_dtype
    b, seq_len = tokens.shape
    h, w = self._grid(seq_len, grid_hw)
    text, pooled = cond["text"], cond["pooled"]
    micro = cond.get("micro")
    if micro is None:
      micro = jnp.broadcast_to(jnp.asarray(DEFAULT_MICRO_CONDS, jnp.float32), (b, NUM_MICRO_CONDS))
    if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
      raise ValueError(f"cond['text'] must be [B={b}, T, {cfg.text_dim}], got {text.shape}")
    if pooled.shape != (b, cfg.pooled_dim):
      raise ValueError(f"cond['pooled'] must be [{b}, {cfg.pooled_dim}], got {pooled.shape}")
    if micro.shape != (b, NUM_MICRO_CONDS):
      raise ValueError(f"cond['micro'] must be [{b}, {NUM_MICRO_CONDS}], got {micro.shape}")
    dense = functools.partial(nn.Dense, dtype=dtype, param_dtype=cfg.storage_dtype)
    rms = lambda name: RMSNorm(cfg.norm_eps, dtype, cfg.storage_dtype, name=name)

    # Conditioning vector: pooled text + micro-conds, then the timestep (x 1000, see docstring).
    micro_emb = timestep_embedding(micro.reshape(-1), cfg.micro_cond_dim).reshape(b, -1)
    pooled = _TwoLayer(cfg, use_bias=False, name="cond_embed")(
        jnp.concatenate([pooled.astype(jnp.float32), micro_emb], axis=-1).astype(dtype))
    t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,)) * 1000.0
    temb = _TimeTextEmbed(cfg, name="time_text_embed")(t, pooled)

    # Image tokens -> embeddings (+ Di[M]O noise) -> compressed grid -> hidden width.
    x = self._noisy(_TokenEmbed(cfg, name="embed")(tokens), noise_sigma)
    x = x.reshape(b, h, w, cfg.width)
    if cfg.downsample:
      x = _Resample(cfg, down=True, name="down_block")(x)
    gh, gw = x.shape[1:3]
    x = x.reshape(b, gh * gw, cfg.width)
    x = dense(cfg.width, use_bias=False, name="project_to_hidden")(rms("project_to_hidden_norm")(x))
    c = rms("encoder_proj_layer_norm")(dense(cfg.width, name="context_embedder")(text))

    cos, sin = rope_tables(position_ids(text.shape[1], gh, gw), cfg.axes_dims_rope, cfg.rope_theta)
    rope = (jnp.asarray(cos), jnp.asarray(sin))
    c, x = _blocks(cfg, DualBlock, cfg.num_layers, "transformer_blocks", (c, x), temb, rope)
    hcat = jnp.concatenate([c, x], axis=1)
    hcat = _blocks(cfg, SingleBlock, cfg.num_single_layers, "single_transformer_blocks", hcat,
                   temb, rope)
    x = hcat[:, text.shape[1]:]

    x = dense(cfg.width, use_bias=False, name="project_from_hidden")(rms("project_from_hidden_norm")(x))
    x = x.reshape(b, gh, gw, cfg.width)
    if cfg.upsample:
      x = _Resample(cfg, down=False, name="up_block")(x)
    logits = _MLMHead(cfg, name="mlm_layer")(x.reshape(b, seq_len, cfg.width))
    return logits.astype(jnp.dtype(cfg.logits_dtype))


# --------------------------------------------------------------------------- params


def dummy_inputs(config: MeissonicConfig, batch: int = 1, text_len: int = 77):
  """Zero tokens and condition of the right shapes (for init and ``eval_shape``)."""
  tokens = jnp.zeros((batch, config.seq_len), jnp.int32)
  cond = {"text": jnp.zeros((batch, text_len, config.text_dim), jnp.float32),
          "pooled": jnp.zeros((batch, config.pooled_dim), jnp.float32),
          "micro": jnp.zeros((batch, NUM_MICRO_CONDS), jnp.float32)}
  return tokens, cond


def init_params(config: MeissonicConfig, key, *, text_len: int = 77):
  """Randomly initialised params (AdaLN modulation zero-initialised)."""
  tokens, cond = dummy_inputs(config, text_len=text_len)
  init = jax.jit(lambda k: MeissonicTransformer(config).init({"params": k}, tokens, cond)["params"])
  return init(key)


def param_shapes(config: MeissonicConfig) -> Dict[str, Tuple[int, ...]]:
  """``{"a/b/c": shape}`` of the params, by ``jax.eval_shape`` (nothing is allocated)."""
  tree = jax.eval_shape(lambda k: init_params(config, k, text_len=1), jax.random.PRNGKey(0))
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(p.key) for p in path): tuple(leaf.shape) for path, leaf in flat}


def count_params(config_or_params) -> int:
  """Parameter count of a config (by ``eval_shape``) or of a params pytree."""
  if isinstance(config_or_params, MeissonicConfig):
    return int(sum(int(np.prod(s)) for s in param_shapes(config_or_params).values()))
  return int(sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(config_or_params)))


_GROUPS = (("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers"))


def unstack_layers(params, config: MeissonicConfig):
  """Scanned params (blocks stacked on axis 0) -> unrolled params (``<group>_<i>``)."""
  params = dict(params)
  for group, field in _GROUPS:
    stacked = params.pop(group)
    for i in range(getattr(config, field)):
      params[f"{group}_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
  return params


def stack_layers(params, config: MeissonicConfig):
  """Unrolled params -> scanned params (inverse of ``unstack_layers``)."""
  params = dict(params)
  for group, field in _GROUPS:
    layers = [params.pop(f"{group}_{i}") for i in range(getattr(config, field))]
    params[group] = jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(x) for x in a]), *layers)
  return params
