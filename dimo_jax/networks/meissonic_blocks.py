"""The layers of the Meissonic transformer and the pure helpers they are built from.

``dimo_jax.networks.meissonic`` holds the configuration (``MeissonicConfig``) and the assembled
network (``MeissonicTransformer``); this module holds its parts, each a Linen module configured by
that config (passed as the ``config`` field, not imported, so the two modules do not import each
other):

- helpers: the sinusoidal embedding (``timestep_embedding``), the axial RoPE (``position_ids``,
  ``rope_tables``, ``apply_rope``), the 2x2 token compression (``downsample_2x2``,
  ``upsample_2x2``) (attention: ``dimo_jax.networks.attention``);
- ``RMSNorm`` (statistics in fp32, learnable scale);
- the conditioning MLPs (``TwoLayer``: ``cond_embed``, ``timestep_embedder``, ``text_embedder``;
  ``TimeTextEmbed``), AdaLN-Zero modulation (``AdaLNZero``), the tanh-GELU MLP (``FeedForward``),
  attention with RMS QK-norm and RoPE (``Attention``, joint over ``[text; image]`` in the
  dual-stream blocks);
- the two block kinds as scan bodies (``DualBlock``, ``SingleBlock``) and ``stack_blocks``, which
  scans (or unrolls) them with a rematerialisation policy;
- the token embedding (``TokenEmbed``), the compression convolutions (``Resample``) and the output
  head (``MLMHead``).

Parameter names follow the released diffusers keys (``dimo_jax/converters/meissonic.py`` maps
them); every submodule is named explicitly, so the parameter tree does not depend on the Python
class names.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.networks.attention import REMAT_POLICIES, attention  # pylint: disable=unused-import

Dtype = Any



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


def modulate(x, shift, scale):
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


class ConfiguredModule(nn.Module):
  """A layer configured by a ``MeissonicConfig`` (dense / norm factories in its dtypes)."""
  config: Any

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


class TwoLayer(ConfiguredModule):
  """``linear_2(silu(linear_1(x)))``: cond_embed, timestep_embedder and text_embedder."""
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    x = self.dense(self.config.width, "linear_1", self.use_bias)(x)
    return self.dense(self.config.width, "linear_2", self.use_bias)(nn.silu(x))


class TimeTextEmbed(ConfiguredModule):
  """``timestep_embedder(sinusoid_256(t)) + text_embedder(pooled)`` (``time_text_embed``)."""

  @nn.compact
  def __call__(self, t, pooled):
    t_emb = timestep_embedding(t, 256).astype(self.config.compute_dtype)
    return (TwoLayer(self.config, name="timestep_embedder")(t_emb)
            + TwoLayer(self.config, name="text_embedder")(pooled))


class AdaLNZero(ConfiguredModule):
  """``chunks`` modulation vectors ``Linear(silu(temb))`` (zero-initialised), each ``[B, D]``."""
  chunks: int = 6

  @nn.compact
  def __call__(self, temb):
    mod = self.dense(self.chunks * self.config.width, "linear", zero=True)(nn.silu(temb))
    return jnp.split(mod, self.chunks, axis=-1)


class FeedForward(ConfiguredModule):
  """Linear D -> 4D, GELU (tanh), Linear 4D -> D (diffusers ``ff.net.0.proj`` / ``ff.net.2``)."""

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = _gelu_tanh(self.dense(cfg.mlp_ratio * cfg.width, "fc1")(x))
    return self.dense(cfg.width, "fc2")(x)


class Attention(ConfiguredModule):
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
    out = attention(q, k, v.astype(q.dtype), cfg.attention_impl)
    out = out.reshape(*out.shape[:2], cfg.width)
    if not self.joint:
      return out
    t = c.shape[1]
    return self.dense(cfg.width, "to_out")(out[:, t:]), self.dense(cfg.width, "to_add_out")(out[:, :t])


def _clip_fp16(x):
  return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


class DualBlock(ConfiguredModule):
  """Dual-stream (MM-DiT) block, a scan body ``((text, image), temb, rope) -> ((text, image), None)``."""

  @nn.compact
  def __call__(self, carry, temb, rope):
    c, x = carry
    ln = self.layer_norm
    sx, scx, gx, sx2, scx2, gx2 = AdaLNZero(self.config, 6, name="norm1")(temb)
    sc, scc, gc, sc2, scc2, gc2 = AdaLNZero(self.config, 6, name="norm1_context")(temb)
    xa, ca = Attention(self.config, joint=True, name="attn")(
        modulate(ln(x), sx, scx), modulate(ln(c), sc, scc), rope)
    x = x + gx[:, None] * xa
    x = x + gx2[:, None] * FeedForward(self.config, name="ff")(modulate(ln(x), sx2, scx2))
    c = c + gc[:, None] * ca
    c = c + gc2[:, None] * FeedForward(self.config, name="ff_context")(modulate(ln(c), sc2, scc2))
    return (_clip_fp16(c), x), None


class SingleBlock(ConfiguredModule):
  """Single-stream block on ``[text; image]``, a scan body ``(h, temb, rope) -> (h, None)``.

  ``h += gate * proj_out([attn(n); gelu(proj_mlp(n))])`` with ``n`` the AdaLN-modulated ``h``.
  """

  @nn.compact
  def __call__(self, h, temb, rope):
    cfg = self.config
    shift, scale, gate = AdaLNZero(cfg, 3, name="norm")(temb)
    n = modulate(self.layer_norm(h), shift, scale)
    mlp = _gelu_tanh(self.dense(cfg.mlp_ratio * cfg.width, "proj_mlp")(n))
    attn = Attention(cfg, joint=False, name="attn")(n, None, rope)
    out = self.dense(cfg.width, "proj_out")(jnp.concatenate([attn, mlp], axis=-1))
    return _clip_fp16(h + gate[:, None] * out), None


def stack_blocks(config: Any, block_cls, depth: int, name: str, carry, *broadcast):
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


class TokenEmbed(ConfiguredModule):
  """Embedding table (with the mask row) -> RMSNorm -> 1x1 conv (``embed``)."""

  @nn.compact
  def __call__(self, tokens):
    cfg = self.config
    e = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.initializers.normal(0.02),
                 dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, name="embeddings")(tokens)
    return self.dense(cfg.width, "conv", use_bias=False)(self.rms("layer_norm")(e))


class Resample(ConfiguredModule):
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


class MLMHead(ConfiguredModule):
  """1x1 conv -> RMSNorm -> 1x1 conv to ``codebook_size`` logits (``mlm_layer``)."""

  @nn.compact
  def __call__(self, x):
    x = self.rms("layer_norm")(self.dense(self.config.width, "conv1", use_bias=False)(x))
    return self.dense(self.config.codebook_size, "conv2", use_bias=False)(x)


