"""The Meissonic text-to-image transformer (the Di[M]O text-to-image teacher), in Linen.

This module owns the network's configuration and its assembly; the layers and the pure helpers
they are built from (RMSNorm, RoPE tables, the 2x2 token compression, the sinusoidal embedding,
the dual- and single-stream blocks) live in ``dimo_jax/networks/meissonic_blocks.py``. The
diffusers-checkpoint converter lives in ``dimo_jax/converters/meissonic.py`` and the multi-step
sampler in ``dimo_jax/core/samplers.py`` (``gumbel_ramp_sampler``).

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
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.networks.attention import check_implementation
from dimo_jax.networks.meissonic_blocks import (REMAT_POLICIES, DualBlock, MLMHead, Resample,
                                                RMSNorm, SingleBlock, TimeTextEmbed, TokenEmbed,
                                                TwoLayer, position_ids, rope_tables,
                                                stack_blocks, timestep_embedding)

Dtype = Any
Cond = Mapping[str, jax.Array]

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
    check_implementation(self.attention_impl, "attention_impl")

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
    pooled = TwoLayer(cfg, use_bias=False, name="cond_embed")(
        jnp.concatenate([pooled.astype(jnp.float32), micro_emb], axis=-1).astype(dtype))
    t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,)) * 1000.0
    temb = TimeTextEmbed(cfg, name="time_text_embed")(t, pooled)

    # Image tokens -> embeddings (+ Di[M]O noise) -> compressed grid -> hidden width.
    x = self._noisy(TokenEmbed(cfg, name="embed")(tokens), noise_sigma)
    x = x.reshape(b, h, w, cfg.width)
    if cfg.downsample:
      x = Resample(cfg, down=True, name="down_block")(x)
    gh, gw = x.shape[1:3]
    x = x.reshape(b, gh * gw, cfg.width)
    x = dense(cfg.width, use_bias=False, name="project_to_hidden")(rms("project_to_hidden_norm")(x))
    c = rms("encoder_proj_layer_norm")(dense(cfg.width, name="context_embedder")(text))

    cos, sin = rope_tables(position_ids(text.shape[1], gh, gw), cfg.axes_dims_rope, cfg.rope_theta)
    rope = (jnp.asarray(cos), jnp.asarray(sin))
    c, x = stack_blocks(cfg, DualBlock, cfg.num_layers, "transformer_blocks", (c, x), temb, rope)
    hcat = jnp.concatenate([c, x], axis=1)
    hcat = stack_blocks(cfg, SingleBlock, cfg.num_single_layers, "single_transformer_blocks", hcat,
                   temb, rope)
    x = hcat[:, text.shape[1]:]

    x = dense(cfg.width, use_bias=False, name="project_from_hidden")(rms("project_from_hidden_norm")(x))
    x = x.reshape(b, gh, gw, cfg.width)
    if cfg.upsample:
      x = Resample(cfg, down=False, name="up_block")(x)
    logits = MLMHead(cfg, name="mlm_layer")(x.reshape(b, seq_len, cfg.width))
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
