"""Cross-entropy losses of masked diffusion models.

Logits are ``[B, L, K + 1]``: ``K`` code columns plus the mask column. Targets are clean codes
in ``[0, K)``. Label smoothing ``eps`` spreads ``eps`` uniformly over the ``K`` code columns
(the mask column never receives target mass): the target of a position with code ``c`` is
``(1 - eps) * onehot(c) + eps / K`` on every code column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_ON = ("masked", "all")


def smoothed_targets(targets, num_columns: int, codebook_size: int, label_smoothing: float = 0.0):
  """Target distribution ``[..., num_columns]`` for codes ``targets`` with smoothing over K codes."""
  onehot = jax.nn.one_hot(targets, num_columns, dtype=jnp.float32)
  if not label_smoothing:
    return onehot
  eps = jnp.float32(label_smoothing)
  uniform = (jnp.arange(num_columns) < codebook_size).astype(jnp.float32) / codebook_size
  return (1.0 - eps) * onehot + eps * uniform


def _check(logits, targets, mask, label_smoothing):
  if logits.ndim != 3:
    raise ValueError(f"logits must be [B, L, K+1], got shape {logits.shape}")
  if targets.shape != logits.shape[:2]:
    raise ValueError(f"targets shape {targets.shape} does not match logits {logits.shape[:2]}")
  if mask.shape != logits.shape[:2]:
    raise ValueError(f"mask shape {mask.shape} does not match logits {logits.shape[:2]}")
  if not 0.0 <= float(label_smoothing) < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def token_cross_entropy(logits, target_probs):
  """Per-position cross-entropy ``-sum_k q_k log softmax(logits)_k`` over all K+1 columns."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(target_probs * logp, axis=-1)


def mdm_loss(logits, targets, mask, *, loss_on: str = "masked", label_smoothing: float = 0.0):
  """MDM training loss. Returns ``(loss, metrics)``.

  ``loss_on='masked'``: mean cross-entropy over masked positions (sum / number of masked
  tokens in the batch). ``loss_on='all'``: mean over all ``B * L`` positions (the model also
  learns to copy visible tokens). Metrics: ``loss``, ``nll_masked`` (unsmoothed cross-entropy
  per masked token), ``acc_masked`` (argmax over codes equals target) and ``mask_fraction``.
  """
  if loss_on not in LOSS_ON:
    raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
  _check(logits, targets, mask, label_smoothing)
  num_columns = logits.shape[-1]
  codebook_size = num_columns - 1
  mask_f = mask.astype(jnp.float32)
  q = smoothed_targets(targets, num_columns, codebook_size, label_smoothing)
  ce = token_cross_entropy(logits, q)
  n_masked = jnp.maximum(mask_f.sum(), 1.0)
  if loss_on == "masked":
    loss = jnp.sum(ce * mask_f) / n_masked
  else:
    loss = jnp.mean(ce)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  pred = jnp.argmax(logits[..., :codebook_size], axis=-1)
  metrics = {
      "loss": loss,
      "nll_masked": jnp.sum(nll * mask_f) / n_masked,
      "acc_masked": jnp.sum((pred == targets) * mask_f) / n_masked,
      "mask_fraction": jnp.mean(mask_f),
  }
  return loss, metrics


def aux_loss(logits, targets, mask, label_smoothing: float = 0.0, soft_target_probs=None):
  """Auxiliary-model loss: cross-entropy at masked positions, mean over masked positions.

  ``targets`` are the generator's sampled codes. With ``soft_target_probs`` (``[B, L, K]`` or
  ``[B, L, K+1]``, rows summing to 1) the target is that distribution instead of the one-hot
  code (smoothing, if any, is applied on top of it). Returns ``(loss, metrics)``.
  """
  _check(logits, targets, mask, label_smoothing)
  num_columns = logits.shape[-1]
  codebook_size = num_columns - 1
  if soft_target_probs is None:
    q = smoothed_targets(targets, num_columns, codebook_size, label_smoothing)
  else:
    q = jnp.asarray(soft_target_probs, jnp.float32)
    if q.shape[:2] != logits.shape[:2] or q.shape[-1] not in (codebook_size, num_columns):
      raise ValueError(f"soft_target_probs must be [B, L, K] or [B, L, K+1] matching logits "
                       f"{logits.shape}, got {q.shape}")
    if q.shape[-1] == codebook_size:
      q = jnp.pad(q, ((0, 0), (0, 0), (0, 1)))
    if label_smoothing:
      eps = jnp.float32(label_smoothing)
      uniform = (jnp.arange(num_columns) < codebook_size).astype(jnp.float32) / codebook_size
      q = (1.0 - eps) * q + eps * uniform
  mask_f = mask.astype(jnp.float32)
  n_masked = jnp.maximum(mask_f.sum(), 1.0)
  ce = token_cross_entropy(logits, q)
  loss = jnp.sum(ce * mask_f) / n_masked
  pred = jnp.argmax(logits[..., :codebook_size], axis=-1)
  metrics = {
      "aux_loss": loss,
      "aux_acc_masked": jnp.sum((pred == targets) * mask_f) / n_masked,
  }
  return loss, metrics
