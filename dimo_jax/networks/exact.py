"""``ExactConditionalTeacher``: the exact conditionals p(x_i | visible tokens) of an enumerable
joint (``data.joints``) as a parameter-free Linen module with the token networks' calling
convention, for checking distillation against a known teacher.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np



class ExactConditionalTeacher(nn.Module):
  """p(x_i | visible tokens) of an enumerable joint, per position, by summing over the support.

  Inputs follow the models' convention (mask id = V, ``[B, L]``); the output is ``[B, L, V + 1]``
  log-probabilities with the mask column at -1e9. At visible positions it predicts the visible
  token (the behaviour of a teacher trained with the loss on all positions).
  """
  support: np.ndarray
  probs: np.ndarray
  codebook_size: int
  num_classes: int = 0
  dropout: float = 0.0

  @property
  def seq_len(self) -> int:
    return int(self.support.shape[1])

  @property
  def has_null_class(self) -> bool:
    return True

  @nn.compact
  def __call__(self, tokens, labels, *, deterministic: bool = True, noise_sigma=0.0):
    v = self.codebook_size
    support = jnp.asarray(self.support)  # [S, L]
    log_p = jnp.log(jnp.maximum(jnp.asarray(self.probs, jnp.float32), 1e-30))  # [S]
    visible = tokens < v  # [B, L]
    agree = (support[None] == tokens[:, None]) | ~visible[:, None]  # [B, S, L]
    consistent = jnp.all(agree, axis=-1)  # [B, S]
    w = jnp.where(consistent, log_p[None], -jnp.inf)  # [B, S]
    w = w - jax.scipy.special.logsumexp(w, axis=-1, keepdims=True)
    onehot = jax.nn.one_hot(support, v)  # [S, L, V]
    probs = jnp.einsum("bs,slv->blv", jnp.exp(w), onehot)
    logits = jnp.log(jnp.maximum(probs, 1e-30))
    return jnp.concatenate([logits, jnp.full(logits.shape[:-1] + (1,), -1e9)], axis=-1)


def exact_teacher(joint) -> ExactConditionalTeacher:
  """The exact teacher of a ``data.joints.Joint`` (anything with ``support``, ``probs``, ``vocab_size``)."""
  return ExactConditionalTeacher(support=joint.support, probs=joint.probs, codebook_size=joint.vocab_size)
