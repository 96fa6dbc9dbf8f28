"""Masked-diffusion transformers.

Two families share one calling convention::

    logits = model.apply({'params': p}, tokens, labels, deterministic=True, noise_sigma=0.0,
                         rngs={'dropout': k1, 'noise': k2})

``tokens`` int32 ``[B, L]`` holds codes ``0..K-1`` and the mask sentinel ``K``; ``labels`` int32
``[B]`` holds classes ``0..C-1`` and ``C`` for the null (unconditional) class. The output is
``[B, L, K + 1]``: one column per code plus the mask column (kept as in the published models;
samplers only draw codes).

- ``MaskTransformer`` (``arch='preln'``): the valeoai MaskGIT layout used as the Di[M]O teacher.
  Embedding rows: codes, mask (K), classes (K+1..K+C), null class (K+C+1); the class token is
  appended last (or first); learned positions; an input MLP block, pre-LN blocks, an output
  block, and a head tied to the token embedding with a per-position bias.
- ``BertMaskTransformer`` (``arch='bert'``): Google's JAX MaskGIT layout. Embedding rows: codes,
  classes (K..K+C-1), mask (K+C); class token first; post-LN blocks; no null class, hence no
  classifier-free guidance.

Layers run under ``nn.scan`` (``scan=True``) with optional rematerialisation; ``dtype`` is the
computation dtype and ``param_dtype`` the storage dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax.core import optim
from dimo_jax.networks import attention

Dtype = Any

REMAT_POLICIES = attention.REMAT_POLICIES


def _gelu(approximate: bool):
  return functools.partial(nn.gelu, approximate=approximate)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype):
  """LayerNorm with the two-pass variance (mean of ``(x - mean)^2``), as PyTorch computes it.

  Flax's default ``E[x^2] - E[x]^2`` loses precision when the features share a large offset
  (about 7e-4 relative error at an offset of 100x the spread, against 3e-6 here)."""
  return functools.partial(nn.LayerNorm, epsilon=eps, use_fast_variance=False, dtype=dtype,
                           param_dtype=param_dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a packed q/k/v projection (torch ``in_proj`` layout)."""
  width: int
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout: float = 0.0
  deterministic: bool = True
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    head_dim = self.width // self.heads
    qkv = nn.Dense(3 * self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, self.heads, head_dim), 3, axis=2)
    q, k, v = (a[:, :, 0] for a in (q, k, v))
    out = attention.attention(q, k, v, self.implementation)
    out = out.reshape(b, t, self.width)
    out = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(out)
    return nn.Dropout(self.dropout)(out, deterministic=self.deterministic)


class _Block(nn.Module):
  """Fields shared by the transformer layers; a layer is a scan body ``(x, None) -> (x, None)``."""
  width: int
  heads: int
  mlp_dim: int
  dropout: float = 0.0
  ln_eps: float = 1e-5
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  deterministic: bool = True
  attention_impl: Optional[str] = None


class PreLNBlock(_Block):
  """x + Attn(LN(x)); x + MLP(LN(x))."""

  @nn.compact
  def __call__(self, x, _=None):
    ln = layer_norm(self.ln_eps, self.dtype, self.param_dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + SelfAttention(self.width, self.heads, self.dtype, self.param_dtype, self.dropout,
                          self.deterministic, self.attention_impl, name="attn")(ln(name="ln1")(x))
    h = dense(self.mlp_dim, name="fc1")(ln(name="ln2")(x))
    h = nn.Dropout(self.dropout)(_gelu(self.gelu_approximate)(h), deterministic=self.deterministic)
    h = dense(self.width, name="fc2")(h)
    x = x + nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
    return x, None


class PostLNBlock(_Block):
  """BERT layer: LN(x + Attn(x)); LN(x + MLP(x))."""

  @nn.compact
  def __call__(self, x, _=None):
    ln = layer_norm(self.ln_eps, self.dtype, self.param_dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    a = SelfAttention(self.width, self.heads, self.dtype, self.param_dtype, self.dropout,
                      self.deterministic, self.attention_impl, name="attn")(x)
    x = ln(name="ln1")(x + a)
    h = _gelu(self.gelu_approximate)(dense(self.mlp_dim, name="fc1")(x))
    h = nn.Dropout(self.dropout)(dense(self.width, name="fc2")(h), deterministic=self.deterministic)
    x = ln(name="ln2")(x + h)
    return x, None


def _stack(block_cls, depth: int, scan: bool, remat: str, block_kwargs, x):
  """Applies ``depth`` blocks, scanned (params stacked on axis 0 under 'blocks') or unrolled."""
  cls = block_cls
  if remat and remat != "none":
    if remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {remat!r}; choose one of {['none', *REMAT_POLICIES]}")
    cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
  if scan:
    scanned = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      length=depth, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(**block_kwargs, name="blocks")(x, None)
    return x
  for i in range(depth):
    x, _ = cls(**block_kwargs, name=f"block_{i}")(x, None)
  return x


class _Base(nn.Module):
  codebook_size: int = 16
  seq_len: int = 16
  num_classes: int = 0
  width: int = 64
  depth: int = 2
  heads: int = 4
  mlp_dim: int = 256
  dropout: float = 0.0
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  logits_dtype: Dtype = jnp.float32
  scan: bool = True
  remat: str = "none"
  attention_impl: Optional[str] = None

  @property
  def mask_id(self) -> int:
    return self.codebook_size

  @property
  def null_label(self) -> int:
    return self.num_classes

  def init_params(self, key):
    """Fresh parameters (``init_params`` of this module)."""
    return init_params(self, key)

  def _noisy(self, e, noise_sigma):
    """Di[M]O embedding noise on the visual-token embeddings: sigma*eps + sqrt(1-sigma^2)*e."""
    if isinstance(noise_sigma, (int, float)) and noise_sigma == 0:
      return e
    sigma = jnp.asarray(noise_sigma, jnp.float32)
    eps = jax.random.normal(self.make_rng("noise"), e.shape, jnp.float32)
    return (sigma * eps + jnp.sqrt(1.0 - sigma**2) * e.astype(jnp.float32)).astype(e.dtype)


class MaskTransformer(_Base):
  """valeoai MaskGIT layout (pre-LN); see the module docstring."""
  class_token: str = "last"
  ln_eps: float = 1e-5
  ln_eps_io: float = 1e-12

  @property
  def num_rows(self) -> int:
    return self.codebook_size + self.num_classes + 2

  @property
  def has_null_class(self) -> bool:
    return True

  @nn.compact
  def __call__(self, tokens, labels, *, deterministic: bool = True, noise_sigma=0.0):
    if self.class_token not in ("first", "last"):
      raise ValueError(f"class_token must be 'first' or 'last', got {self.class_token!r}")
    k, c = self.codebook_size, self.num_classes
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    ln_io = layer_norm(self.ln_eps_io, self.dtype, self.param_dtype)
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=deterministic)
    gelu = _gelu(self.gelu_approximate)

    embed = nn.Embed(self.num_rows, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.initializers.normal(0.02), name="tok_emb")
    tokens = jnp.asarray(tokens, jnp.int32)
    labels = jnp.asarray(labels, jnp.int32)
    class_ids = jnp.where(labels >= c, k + c + 1, k + 1 + labels)
    e_tok = self._noisy(embed(tokens), noise_sigma)
    self.sow("intermediates", "token_embeddings", e_tok)
    e_cls = embed(class_ids)[:, None, :]
    first = self.class_token == "first"
    x = jnp.concatenate([e_cls, e_tok] if first else [e_tok, e_cls], axis=1)
    pos = self.param("pos_emb", nn.initializers.normal(0.02), (1, self.seq_len + 1, self.width),
                     self.param_dtype)
    x = drop(x + pos.astype(self.dtype))

    # Input block: LN, dropout, Linear, GELU, LN, dropout, Linear.
    x = dense(self.width, name="in_fc1")(drop(ln_io(name="in_ln1")(x)))
    x = dense(self.width, name="in_fc2")(drop(ln_io(name="in_ln2")(gelu(x))))

    x = _stack(PreLNBlock, self.depth, self.scan, self.remat, dict(
        width=self.width, heads=self.heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
        ln_eps=self.ln_eps, gelu_approximate=self.gelu_approximate, dtype=self.dtype,
        param_dtype=self.param_dtype, deterministic=deterministic,
        attention_impl=self.attention_impl), x)

    # Output block: LN, dropout, Linear, GELU, LN.
    x = dense(self.width, name="out_fc")(drop(ln_io(name="out_ln1")(x)))
    x = ln_io(name="out_ln2")(gelu(x))
    x = x[:, 1:] if first else x[:, :-1]
    bias = self.param("out_bias", nn.initializers.zeros, (self.seq_len + 1, self.num_rows), self.param_dtype)
    bias = bias[1:] if first else bias[:-1]
    logits = embed.attend(x) + bias.astype(self.dtype)
    return logits[..., : k + 1].astype(self.logits_dtype)


class BertMaskTransformer(_Base):
  """Google MaskGIT layout (post-LN BERT, class token first, no null class)."""
  ln_eps: float = 1e-12
  gelu_approximate: bool = True

  @property
  def num_rows(self) -> int:
    return self.codebook_size + self.num_classes + 1

  @property
  def has_null_class(self) -> bool:
    return False

  @nn.compact
  def __call__(self, tokens, labels, *, deterministic: bool = True, noise_sigma=0.0):
    k, c = self.codebook_size, self.num_classes
    ln = layer_norm(self.ln_eps, self.dtype, self.param_dtype)
    tokens = jnp.asarray(tokens, jnp.int32)
    ids = jnp.where(tokens >= k, k + c, tokens)
    class_ids = k + jnp.clip(jnp.asarray(labels, jnp.int32), 0, max(c - 1, 0))
    embed = nn.Embed(self.num_rows, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.initializers.normal(0.02), name="tok_emb")
    e_tok = self._noisy(embed(ids), noise_sigma)
    self.sow("intermediates", "token_embeddings", e_tok)
    x = jnp.concatenate([embed(class_ids)[:, None, :], e_tok], axis=1)
    pos = nn.Embed(self.seq_len + 1, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                   embedding_init=nn.initializers.normal(0.02), name="pos_emb")
    x = x + pos(jnp.arange(self.seq_len + 1))[None]
    x = nn.Dropout(self.dropout)(ln(name="emb_ln")(x), deterministic=deterministic)
    x = _stack(PostLNBlock, self.depth, self.scan, self.remat, dict(
        width=self.width, heads=self.heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
        ln_eps=self.ln_eps, gelu_approximate=self.gelu_approximate, dtype=self.dtype,
        param_dtype=self.param_dtype, deterministic=deterministic,
        attention_impl=self.attention_impl), x)
    x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="head_fc")(x[:, 1:])
    x = ln(name="head_ln")(_gelu(self.gelu_approximate)(x))
    bias = self.param("out_bias", nn.initializers.zeros, (self.num_rows,), self.param_dtype)
    logits = embed.attend(x) + bias.astype(self.dtype)
    logits = jnp.concatenate([logits[..., :k], logits[..., k + c: k + c + 1]], axis=-1)
    return logits.astype(self.logits_dtype)


ARCHS = {"preln": MaskTransformer, "bert": BertMaskTransformer}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name) -> Dtype:
  if not isinstance(name, str):
    return name
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def build_model(model_cfg, *, codebook_size: int, seq_len: int, num_classes: int) -> nn.Module:
  """Builds a transformer from a ``config.model`` ConfigDict and the data's sizes."""
  get = model_cfg.get
  arch = get("arch", "preln")
  if arch not in ARCHS:
    raise ValueError(f"config.model.arch={arch!r} is not known; choose one of {sorted(ARCHS)}")
  width, heads = int(get("width", 64)), int(get("heads", 4))
  if width % heads:
    raise ValueError(f"config.model.width={width} must be divisible by config.model.heads={heads}")
  kwargs = dict(
      codebook_size=codebook_size, seq_len=seq_len, num_classes=num_classes, width=width,
      depth=int(get("depth", 2)), heads=heads, mlp_dim=int(get("mlp_dim", 4 * width)),
      dropout=float(get("dropout", 0.0)), dtype=to_dtype(get("dtype", "float32")),
      param_dtype=to_dtype(get("param_dtype", "float32")),
      logits_dtype=to_dtype(get("logits_dtype", "float32")), scan=bool(get("scan", True)),
      remat=get("remat", "none"),
      attention_impl=attention.check_implementation(get("attention_impl", None), "config.model.attention_impl") or None)
  if arch == "preln":
    kwargs.update(class_token=get("class_token", "last"), ln_eps=float(get("ln_eps", 1e-5)),
                  ln_eps_io=float(get("ln_eps_io", 1e-12)),
                  gelu_approximate=bool(get("gelu_approximate", False)))
  else:
    kwargs.update(ln_eps=float(get("ln_eps", 1e-12)), gelu_approximate=bool(get("gelu_approximate", True)))
  return ARCHS[arch](**kwargs)


# Fields of ``config.model`` that change how a stored network computes, not what it holds.
COMPUTE_FIELDS = ("dtype", "param_dtype", "logits_dtype", "remat", "attention_impl", "scan", "dropout")


def compute_overrides(model_cfg) -> dict:
  """The compute-only fields set in ``config.model``, to apply to a stored (teacher) network."""
  return {k: model_cfg.get(k) for k in COMPUTE_FIELDS if model_cfg.get(k) not in (None, "")}


def cast_floating(params, dtype):
  """``params`` with every floating-point leaf in ``dtype`` (integer leaves unchanged).

  A frozen teacher held in its compute dtype (``cast_floating(p, jnp.bfloat16)``) needs no float32
  copy: the layers' ``promote_dtype`` then finds the weights already in the compute dtype."""
  dtype = to_dtype(dtype)
  return jax.tree_util.tree_map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


def init_params(model: nn.Module, key, batch: int = 1):
  tokens = jnp.zeros((batch, model.seq_len), jnp.int32)
  labels = jnp.zeros((batch,), jnp.int32)
  return model.init({"params": key}, tokens, labels)["params"]


def with_dropout(model: nn.Module, rate: float) -> nn.Module:
  """The same network with another dropout rate (parameters are shared unchanged)."""
  return model.clone(dropout=float(rate))


def unstack_layers(params, depth: int):
  """Scanned params ('blocks', stacked on axis 0) -> unrolled params ('block_0', ...)."""
  params = dict(params)
  blocks = params.pop("blocks")
  for i in range(depth):
    params[f"block_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], blocks)
  return params


def stack_layers(params, depth: int):
  """Unrolled params -> scanned params (inverse of ``unstack_layers``)."""
  params = dict(params)
  layers = [params.pop(f"block_{i}") for i in range(depth)]
  params["blocks"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)
  return params


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


# Parameters Di[M]O keeps frozen: token / position embeddings and the output bias (the output
# head is tied to the token embedding, so it is frozen too).
FROZEN_NAMES = ("tok_emb", "pos_emb", "out_bias")


def frozen_mask(params, names=FROZEN_NAMES):
  """Pytree of bools, True where a leaf lies under one of ``names`` (top-level keys)."""
  return optim.frozen_mask(params, names)
