"""Token-level divergences between the teacher p = softmax(z_phi) and the student q = softmax(z).

Di[M]O needs the gradient of D(p || q) with respect to the student's logits z at every masked
position of an intermediate state (q is approximated by the auxiliary model). The closed forms:

- forward KL  D(p||q) = sum p log(p/q):          dD/dz = q - p
- reverse KL  D(q||p) = sum q log(q/p):          dD/dz = q * (log q - log p - KL(q||p))
- generalised Jeffreys with weight beta:         (1 - beta) * forward + beta * reverse
  (any real beta, negative ones included; beta = 0 is forward KL, the authors' default)
  beta < 0 is unbounded below where p is (near) zero: it rewards q's mass on tokens the teacher
  rules out, so use it only with teachers whose probabilities stay away from zero.

Any other f-divergence is given by its per-token formula and differentiated with ``jax.grad``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

CLOSED_FORM = ("fkl", "rkl", "jeffreys")


def _log_softmax(z):
  return jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)


def forward_kl(p_logits, q_logits):
  """D(p || q) per token (summed over the vocabulary)."""
  log_p, log_q = _log_softmax(p_logits), _log_softmax(q_logits)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def reverse_kl(p_logits, q_logits):
  """D(q || p) per token."""
  return forward_kl(q_logits, p_logits)


def jeffreys(p_logits, q_logits, beta: float = 0.0):
  return (1.0 - beta) * forward_kl(p_logits, q_logits) + beta * reverse_kl(p_logits, q_logits)


def total_variation(p_logits, q_logits):
  p, q = jax.nn.softmax(p_logits.astype(jnp.float32), -1), jax.nn.softmax(q_logits.astype(jnp.float32), -1)
  return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)


def jensen_shannon(p_logits, q_logits):
  log_p, log_q = _log_softmax(p_logits), _log_softmax(q_logits)
  log_m = jnp.logaddexp(log_p, log_q) - jnp.log(2.0)
  kl = lambda la, lb: jnp.sum(jnp.exp(la) * (la - lb), axis=-1)
  return 0.5 * kl(log_p, log_m) + 0.5 * kl(log_q, log_m)


def squared_hellinger(p_logits, q_logits):
  log_p, log_q = _log_softmax(p_logits), _log_softmax(q_logits)
  return 1.0 - jnp.sum(jnp.exp(0.5 * (log_p + log_q)), axis=-1)


PER_TOKEN: dict[str, Callable] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "tv": total_variation,
    "js": jensen_shannon,
    "hellinger": squared_hellinger,
}


def divergence(kind: str, p_logits, q_logits, beta: float = 0.0):
  """Per-token divergence value ``[...]`` for logging and for the autodiff path."""
  if kind == "jeffreys":
    return jeffreys(p_logits, q_logits, beta)
  if kind not in PER_TOKEN:
    raise ValueError(f"unknown divergence {kind!r}; choose one of {sorted([*PER_TOKEN, 'jeffreys'])}")
  return PER_TOKEN[kind](p_logits, q_logits)


def grad_fkl(p_logits, q_logits):
  return jax.nn.softmax(q_logits.astype(jnp.float32), -1) - jax.nn.softmax(p_logits.astype(jnp.float32), -1)


def grad_rkl(p_logits, q_logits):
  log_p, log_q = _log_softmax(p_logits), _log_softmax(q_logits)
  q = jnp.exp(log_q)
  diff = log_q - log_p
  kl = jnp.sum(q * diff, axis=-1, keepdims=True)
  return q * (diff - kl)


def token_gradient(kind: str, p_logits, q_logits, beta: float = 0.0):
  """dD(p || q)/dz_q per token, shape of ``q_logits``; float32.

  Closed form for ``fkl``, ``rkl`` and ``jeffreys``; autodiff of the per-token formula otherwise.
  """
  if kind == "fkl":
    return grad_fkl(p_logits, q_logits)
  if kind == "rkl":
    return grad_rkl(p_logits, q_logits)
  if kind == "jeffreys":
    beta = jnp.float32(beta)
    return (1.0 - beta) * grad_fkl(p_logits, q_logits) + beta * grad_rkl(p_logits, q_logits)
  return autodiff_token_gradient(kind, p_logits, q_logits)


def autodiff_token_gradient(kind: str, p_logits, q_logits, beta: float = 0.0):
  """Gradient of ``divergence(kind)`` with respect to the student logits by ``jax.grad``."""
  fn = lambda z: jnp.sum(divergence(kind, p_logits, z, beta))
  return jax.grad(fn)(q_logits.astype(jnp.float32))


def entropy(logits):
  log_q = _log_softmax(logits)
  return -jnp.sum(jnp.exp(log_q) * log_q, axis=-1)
