"""The text masked-diffusion teacher: an MD4 / MDLM-style bidirectional transformer.

It speaks the token networks' calling convention (``networks.maskgit``), so ``method.mdm`` trains
it and ``method.dimo`` distils it unchanged::

    logits = model.apply({'params': p}, tokens, labels, deterministic=True, noise_sigma=0.0,
                         rngs={'dropout': k1, 'noise': k2})

``tokens`` int32 ``[B, L]`` holds token ids ``0..K-1`` and the mask id ``K``; ``labels`` int32
``[B]`` are ignored when ``num_classes`` is 0 (unconditional text: callers pass zeros, the null
label of an unconditional model, as for the token tables of ``configs/tokens.py``). With classes,
a label embedding (rows ``0..C-1`` and the null class ``C``) is added at every position. The
output is ``[B, L, K + 1]``: the K token columns and a mask column held at ``MASK_LOGIT`` (the
model never predicts the mask, as MD4 / MDLM's zero-masking parameterisation).

Layout: token embedding (K + 1 rows), rotary positions in every attention layer, pre-LN blocks
(``RotaryBlock``, shared with the causal reference LM of ``networks.causal_lm``), final LayerNorm
and an untied output projection. Layers run under ``nn.scan`` with optional rematerialisation;
``dtype`` is the computation dtype and ``param_dtype`` the storage dtype.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax.networks import maskgit

MASK_LOGIT = -1e4  # the mask column: far below any token logit, finite in bfloat16 and float16


def rotary(x, positions, base: float = 10000.0):
  """Rotary position embedding of ``x [B, T, H, D]`` (D even) at integer ``positions [T]``: the
  feature pairs ``(i, i + D/2)`` rotate by ``positions * base^(-2i/D)``; computed in float32."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angle = positions.astype(jnp.float32)[:, None] * freq[None, :]
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)


class RotaryAttention(nn.Module):
  """Multi-head self-attention with rotary positions; ``causal`` masks the future."""
  width: int
  heads: int
  causal: bool = False
  dtype: maskgit.Dtype = jnp.float32
  param_dtype: maskgit.Dtype = jnp.float32
  dropout: float = 0.0
  deterministic: bool = True
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    head_dim = self.width // self.heads
    if head_dim % 2:
      raise ValueError(f"width / heads = {head_dim} must be even for rotary positions; "
                       "change config.model.width or config.model.heads")
    qkv = nn.Dense(3 * self.width, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="qkv")(x)
    q, k, v = (a[:, :, 0] for a in jnp.split(qkv.reshape(b, t, 3, self.heads, head_dim), 3, axis=2))
    positions = jnp.arange(t, dtype=jnp.int32)
    q, k = rotary(q, positions), rotary(k, positions)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal, implementation=self.implementation)
    out = nn.Dense(self.width, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="out")(out.reshape(b, t, self.width))
    return nn.Dropout(self.dropout)(out, deterministic=self.deterministic)


class RotaryBlock(maskgit._Block):  # pylint: disable=protected-access
  """x + Attn(LN(x)); x + MLP(LN(x)), with rotary attention (bidirectional unless ``causal``)."""
  causal: bool = False

  @nn.compact
  def __call__(self, x, _=None):
    ln = maskgit.layer_norm(self.ln_eps, self.dtype, self.param_dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
    x = x + RotaryAttention(self.width, self.heads, self.causal, self.dtype, self.param_dtype, self.dropout,
                            self.deterministic, self.attention_impl, name="attn")(ln(name="ln1")(x))
    h = nn.gelu(dense(self.mlp_dim, name="fc1")(ln(name="ln2")(x)), approximate=self.gelu_approximate)
    return x + drop(dense(self.width, name="fc2")(drop(h))), None


def block_kwargs(module, deterministic: bool) -> dict:
  """The ``RotaryBlock`` fields of a transformer module (its width, heads, dtypes, ...)."""
  return dict(width=module.width, heads=module.heads, mlp_dim=module.mlp_dim, dropout=module.dropout,
              ln_eps=module.ln_eps, gelu_approximate=module.gelu_approximate, dtype=module.dtype,
              param_dtype=module.param_dtype, deterministic=deterministic,
              attention_impl=module.attention_impl)


class TextMaskTransformer(maskgit._Base):  # pylint: disable=protected-access
  """The text teacher (see the module docstring). ``codebook_size`` is the vocabulary K."""
  ln_eps: float = 1e-5
  gelu_approximate: bool = True

  @property
  def has_null_class(self) -> bool:
    return self.num_classes > 0

  def init_params(self, key):
    return maskgit.init_params(self, key)

  @nn.compact
  def __call__(self, tokens, labels, *, deterministic: bool = True, noise_sigma=0.0):
    k = self.codebook_size
    tokens = jnp.asarray(tokens, jnp.int32)
    embed = nn.Embed(k + 1, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.initializers.normal(0.02), name="tok_emb")
    x = self._noisy(embed(tokens), noise_sigma)
    self.sow("intermediates", "token_embeddings", x)
    if self.num_classes > 0:
      labels = jnp.clip(jnp.asarray(labels, jnp.int32), 0, self.num_classes)
      cls = nn.Embed(self.num_classes + 1, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.initializers.normal(0.02), name="cls_emb")
      x = x + cls(labels)[:, None, :]
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = maskgit._stack(RotaryBlock, self.depth, self.scan, self.remat,  # pylint: disable=protected-access
                       block_kwargs(self, deterministic), x)
    x = maskgit.layer_norm(self.ln_eps, self.dtype, self.param_dtype)(name="out_ln")(x)
    logits = nn.Dense(k, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros,
                      name="head")(x).astype(self.logits_dtype)
    mask_col = jnp.full(logits.shape[:-1] + (1,), MASK_LOGIT, self.logits_dtype)
    return jnp.concatenate([logits, mask_col], axis=-1)


def build_model(model_cfg, *, vocab_size: int, seq_len: int, num_classes: int = 0) -> TextMaskTransformer:
  """The text teacher from a ``config.model`` ConfigDict and the corpus' sizes."""
  get = model_cfg.get
  width, heads = int(get("width", 128)), int(get("heads", 4))
  if width % heads:
    raise ValueError(f"config.model.width={width} must be divisible by config.model.heads={heads}")
  return TextMaskTransformer(
      codebook_size=int(vocab_size), seq_len=int(seq_len), num_classes=int(num_classes), width=width,
      depth=int(get("depth", 4)), heads=heads, mlp_dim=int(get("mlp_dim", 4 * width)),
      dropout=float(get("dropout", 0.0)), dtype=maskgit.to_dtype(get("dtype", "float32")),
      param_dtype=maskgit.to_dtype(get("param_dtype", "float32")),
      logits_dtype=maskgit.to_dtype(get("logits_dtype", "float32")), scan=bool(get("scan", True)),
      remat=get("remat", "none"), attention_impl=get("attention_impl", None) or None,
      ln_eps=float(get("ln_eps", 1e-5)), gelu_approximate=bool(get("gelu_approximate", True)))
