"""Scaled dot-product attention, unmasked or causal, shared by the transformer families.

``attention(q, k, v, implementation, causal=False)`` on ``[B, S, heads, D]`` (scale ``1 / sqrt(D)``;
``causal``: query ``i`` sees keys ``0..i``, the CLIP text tower's mask) goes through
``jax.nn.dot_product_attention``; ``implementation`` (a network's ``attention_impl``, the configs'
``model.attention_impl``) picks what is computed and what the backward pass keeps:

- ``""`` / ``None`` / ``"xla"`` (the default): XLA's attention with a fused kernel's backward pass.
  Without differentiation it is ``jax.nn.dot_product_attention``'s XLA path. Differentiated, the
  forward keeps q, k, v, the output and the float32 log-sum-exp of each score row, and the
  backward recomputes the ``[B, heads, S, S]`` probabilities from them one layer at a time instead
  of reading float32 scores and probabilities of every layer from memory. This holds under every
  remat policy (``REMAT_POLICIES``: the ``dots`` policies also save the two small named residuals, so
  that the score product is never kept to recompute them). The extra work is one ``q k^T`` per layer in the backward pass (about 3 % of a
  MaskGIT layer's FLOPs at 257 tokens).
- ``"cudnn"``: cuDNN's fused kernel (NVIDIA GPUs, bf16 / fp16). A sequence length that is not a
  multiple of 64 is padded to the next multiple with sequence-length masks (cuDNN's flash kernel
  rejects 257). The kernel itself keeps only the output and the softmax statistics.
- ``"xla_saved"``: XLA's attention as JAX differentiates it: the float32 probabilities (and the
  compute-dtype copy the second matmul reads) of every layer are kept for the backward pass. The
  unfused baseline of the speed levers (the default before the fused backward).

Every choice computes the same function; ``tests/test_attention.py`` checks each against an
explicit einsum softmax, values and gradients.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

IMPLEMENTATIONS = ("", "xla", "cudnn", "xla_saved")

# The fused backward's small residuals, named so that the ``dots`` policies save them: otherwise a
# policy that saves matrix products would keep the [B, heads, S, S] score product to recompute the
# log-sum-exp from it.
RESIDUAL_NAMES = ("attention_lse", "attention_out")
_keep_residuals = jax.checkpoint_policies.save_only_these_names(*RESIDUAL_NAMES)

# Rematerialisation policies of the transformer layers (``remat``; "none" applies no remat).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots,
                                                            _keep_residuals),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _keep_residuals),
}


def check_implementation(implementation: Optional[str], key: str = "attention_impl") -> str:
  """The implementation's name (``None`` -> ``""``); raises ValueError naming ``key`` when unknown."""
  name = implementation or ""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"{key}={implementation!r} is not an attention implementation; choose one of "
                     f"{list(IMPLEMENTATIONS)} ('' = XLA with the scores recomputed in the backward pass)")
  return name


def _xla(q, k, v, causal: bool = False):
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


def _scores(q, k, causal: bool):
  """``q k^T / sqrt(D)`` as ``[B, heads, S_q, S_k]``, accumulated in float32; with ``causal`` the
  scores of later keys are ``-inf`` (every row keeps its diagonal, so no row is empty)."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  s = s * jnp.float32(1.0 / np.sqrt(q.shape[-1]))
  if causal:
    t_q, t_k = s.shape[-2], s.shape[-1]
    s = jnp.where(jnp.tril(jnp.ones((t_q, t_k), bool)), s, -jnp.inf)
  return s


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _xla_fused(q, k, v, causal):
  return _xla(q, k, v, causal)


def _xla_fused_fwd(q, k, v, causal):
  """The output and what the backward pass keeps: q, k, v, the output and the float32 log-sum-exp
  of each score row (``[B, heads, S, 1]``), as a fused kernel does; no ``[B, heads, S, S]`` array."""
  s = _scores(q, k, causal)
  lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
  p = jnp.exp(s - lse)
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)
  lse, out = checkpoint_name(lse, RESIDUAL_NAMES[0]), checkpoint_name(out, RESIDUAL_NAMES[1])
  return out, (q, k, v, out, lse)


def _xla_fused_bwd(causal, residuals, g):
  """The probabilities recomputed from q, k and the log-sum-exp; then the softmax's vjp
  ``dS = P * (dP - rowsum(dO * O))`` in float32, the matrix products in the inputs' dtype."""
  q, k, v, out, lse = residuals
  f32 = jnp.float32
  p = jnp.exp(_scores(q, k, causal) - lse)
  dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(g.dtype), g, preferred_element_type=f32)
  dp = jnp.einsum("bqhd,bkhd->bhqk", g, v, preferred_element_type=f32)
  delta = jnp.einsum("bqhd,bqhd->bhq", g.astype(f32), out.astype(f32))[..., None]
  ds = p * (dp - delta) * f32(1.0 / np.sqrt(q.shape[-1]))
  dq = jnp.einsum("bhqk,bkhd->bqhd", ds.astype(k.dtype), k, preferred_element_type=f32)
  dk = jnp.einsum("bhqk,bqhd->bkhd", ds.astype(q.dtype), q, preferred_element_type=f32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_xla_fused.defvjp(_xla_fused_fwd, _xla_fused_bwd)


def _cudnn(q, k, v, causal: bool = False):
  t = q.shape[1]
  if t % 64 == 0:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
  pad = ((0, 0), (0, 64 - t % 64), (0, 0), (0, 0))
  lengths = jnp.full((q.shape[0],), t, jnp.int32)
  out = jax.nn.dot_product_attention(jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad),
                                     query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                     is_causal=causal, implementation="cudnn")
  return out[:, :t]


def attention(q, k, v, implementation: Optional[str] = None, causal: bool = False):
  """``softmax(q k^T / sqrt(D)) v`` per head: ``[B, S, heads, D]`` (three times) -> ``[B, S, heads, D]``.

  ``causal``: query ``i`` attends to keys ``0..i`` only. The output has the inputs' dtype; the
  scores are accumulated and normalised in float32."""
  name = check_implementation(implementation)
  causal = bool(causal)
  if name == "cudnn":
    return _cudnn(q, k, v, causal)
  if name == "xla_saved":
    return _xla(q, k, v, causal)
  return _xla_fused(q, k, v, causal)
