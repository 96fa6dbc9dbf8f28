"""Text-conditioned sampling for Meissonic-style token models: the multi-step teacher sampler and
the one-step Di[M]O generator draw.

Both samplers are pure functions of ``(apply_fn, params, key, cond, ...)`` and jit-compiled with
``apply_fn`` static: keep passing the same ``apply_fn`` object (``model_apply_fn(model)`` caches
one per model) to reuse the compiled program. ``apply_fn(params, tokens, cond, timestep,
noise_sigma=0.0, rng=None) -> logits [B, L, codebook_size]``; ``cond`` is the condition pytree
``{"text": [B, T, Dt], "pooled": [B, Dp], "micro": [B, 5]}`` (``micro`` defaults to Meissonic's
``[1024, 1024, 0, 0, 6]``).

``meissonic_sample`` follows Meissonic's pipeline and aMUSEd-style scheduler: all tokens start
masked; at step ``i`` of ``N`` the network sees timestep ``N - 1 - i`` (the network multiplies it
by 1000), guidance mixes the negative prompt's and the prompt's logits ``u + g (c - u)`` from ONE
batched call on ``[negative; prompt]``, every position draws a token from the softmax (known
tokens are kept), and the ``floor(L cos(pi/2 (i+1)/N))`` (clamped to ``[1, #masked - 1]``) least
confident newly drawn tokens are masked again, confidence being ``log p(token) + tau_i Gumbel``
with ``tau = linspace(2, 0, N)``; the last step keeps everything. The loop is a ``lax.scan``.

``one_step_text_sample`` is the distilled generator's draw: ``x_init`` = uniform random codes
with exactly ``round(L r_init)`` random positions masked, one forward with the embedding noise
``sigma`` and timestep 0 (the Di[M]O convention), one categorical draw per position.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_MICRO_CONDS = (1024.0, 1024.0, 0.0, 0.0, 6.0)
DEFAULT_STEPS = 48
DEFAULT_GUIDANCE = 9.0
DEFAULT_TEMPERATURE = (2.0, 0.0)
_LOG_MIN_PROB = math.log(1e-20)

Cond = Mapping[str, Any]


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=32)
def model_apply_fn(model) -> Callable:
  """``apply_fn(params, tokens, cond, timestep, noise_sigma=0.0, rng=None)`` for a Linen model.

  Cached per model, so that repeated sampler calls reuse their compiled programs.
  """
  def apply_fn(params, tokens, cond, timestep, noise_sigma=0.0, rng=None):
    rngs = {} if rng is None else {"noise": rng}
    return model.apply({"params": params}, tokens, cond, timestep=timestep,
                       noise_sigma=noise_sigma, rngs=rngs)
  return apply_fn


def _batch_size(cond: Cond) -> int:
  return int(cond["text"].shape[0])


def with_micro_conds(cond: Cond, micro=DEFAULT_MICRO_CONDS) -> dict:
  """``cond`` with ``micro`` ``[B, 5]`` filled in (from ``micro``) where absent."""
  cond = dict(cond)
  if cond.get("micro") is None:
    cond["micro"] = jnp.broadcast_to(jnp.asarray(micro, jnp.float32), (_batch_size(cond), len(micro)))
  return cond


def _broadcast_batch(cond: Cond, batch: int) -> dict:
  """Leaves with a leading batch of 1 (one negative prompt for all) broadcast to ``batch``."""
  def grow(x):
    x = jnp.asarray(x)
    return jnp.broadcast_to(x, (batch, *x.shape[1:])) if x.shape[0] == 1 else x
  return {k: grow(v) for k, v in cond.items()}


def cosine_mask_lengths(seq_len: int, steps: int) -> np.ndarray:
  """``floor(seq_len * cos(pi/2 * (i+1)/steps))`` per step, in float32 arithmetic as upstream."""
  ratio = (np.arange(1, steps + 1, dtype=np.float32) / np.float32(steps)).astype(np.float32)
  mask_ratio = np.cos(ratio * np.float32(math.pi / 2)).astype(np.float32)
  return np.floor(np.float32(seq_len) * mask_ratio).astype(np.int32)


def mask_schedule_counts(seq_len: int, steps: int) -> np.ndarray:
  """Masked tokens left after each of ``steps`` steps (``[steps]``; the last entry is 0).

  Step ``i`` re-masks ``max(1, min(#masked - 1, floor(seq_len cos(pi/2 (i+1)/steps))))`` tokens,
  ``#masked`` being the count before the step (``seq_len`` at the start).
  """
  base = cosine_mask_lengths(seq_len, steps)
  counts, masked = [], seq_len
  for i in range(steps):
    masked = 0 if i == steps - 1 else max(1, min(masked - 1, int(base[i])))
    counts.append(masked)
  return np.asarray(counts, np.int32)


def _is_key_batch(key, batch: int) -> bool:
  """Whether ``key`` is one key per batch row (``[B]`` typed or ``[B, 2]`` raw) or one key."""
  single_ndim = 0 if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else 1
  if key.ndim == single_ndim:
    return False
  if key.ndim == single_ndim + 1 and key.shape[0] == batch:
    return True
  raise ValueError(f"key must be one PRNG key or one per row ({batch} rows); got shape {key.shape}")


def _check(seq_len: int, mask_id: int, codebook_size: int, steps: int = 1) -> None:
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  if 0 <= mask_id < codebook_size:
    raise ValueError(f"mask_id {mask_id} lies inside the codebook [0, {codebook_size})")


def _check_logits(logits, batch: int, seq_len: int, codebook_size: int) -> None:
  if logits.shape != (batch, seq_len, codebook_size):
    raise ValueError(f"apply_fn returned logits of shape {logits.shape}, expected "
                     f"{(batch, seq_len, codebook_size)}")


# --------------------------------------------------------------------------- multi-step


@functools.partial(jax.jit, static_argnames=("apply_fn", "seq_len", "mask_id", "codebook_size",
                                             "steps", "return_trace"))
def meissonic_sample(apply_fn: Callable, params, key, cond: Cond, neg_cond: Optional[Cond] = None,
                     *, seq_len: int, mask_id: int, codebook_size: int,
                     steps: int = DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE,
                     temperature: Tuple[float, float] = DEFAULT_TEMPERATURE,
                     return_trace: bool = False):
  """Meissonic's multi-step sampler; returns tokens ``[B, seq_len]`` int32 (no mask left).

  ``neg_cond`` (the negative prompt's condition, batch 1 or B) switches on guidance
  ``u + guidance * (c - u)``, so ``guidance=0`` samples from the negative condition alone and
  ``guidance=1`` from the prompt alone (upstream skips guidance for ``guidance <= 1``, which
  differs from this formula below 1). ``None`` samples from ``cond`` without guidance.
  ``temperature = (tau_first, tau_last)``: the Gumbel noise on the confidence ramps linearly.
  ``key`` is one key for the batch, or one key per row (``[B]`` typed or ``[B, 2]`` raw keys): then
  row ``b`` draws exactly what a batch of one with ``key[b]`` draws, whatever else is in the batch
  (up to floating-point differences of the network between batch sizes).
  With ``return_trace`` also returns the masked counts after each step ``[steps, B]``.
  """
  _check(seq_len, mask_id, codebook_size, steps)
  cond = with_micro_conds(cond)
  batch = _batch_size(cond)
  if neg_cond is not None:
    neg_cond = _broadcast_batch(with_micro_conds(neg_cond), batch)
    both = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, jnp.asarray(c, u.dtype)]),
                                  neg_cond, cond)

  def logits_fn(tokens, timestep):
    if neg_cond is None:
      logits = apply_fn(params, tokens, cond, timestep)
      _check_logits(logits, batch, seq_len, codebook_size)
      return logits.astype(jnp.float32)
    out = apply_fn(params, jnp.concatenate([tokens, tokens]), both, timestep)
    _check_logits(out, 2 * batch, seq_len, codebook_size)
    out = out.astype(jnp.float32)
    uncond, c = out[:batch], out[batch:]
    return uncond + jnp.asarray(guidance, jnp.float32) * (c - uncond)

  base = jnp.asarray(cosine_mask_lengths(seq_len, steps))
  taus = jnp.linspace(jnp.asarray(temperature[0], jnp.float32),
                      jnp.asarray(temperature[1], jnp.float32), steps)
  per_row = _is_key_batch(key, batch)

  def noise(k, logits):
    """A categorical draw from ``logits`` and Gumbel noise of the confidence's shape."""
    k_draw, k_gumbel = jax.random.split(k)
    drawn = jax.random.categorical(k_draw, logits, axis=-1).astype(jnp.int32)
    return drawn, jax.random.gumbel(k_gumbel, logits.shape[:-1])

  def step(tokens, i):
    logits = logits_fn(tokens, (steps - 1 - i).astype(jnp.float32))
    if per_row:
      drawn, gumbel = jax.vmap(noise)(jax.vmap(lambda k: jax.random.fold_in(k, i))(key), logits)
    else:
      drawn, gumbel = noise(jax.random.fold_in(key, i), logits)
    unknown = tokens == mask_id
    drawn = jnp.where(unknown, drawn, tokens)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), drawn[..., None], axis=-1)[..., 0]
    confidence = jnp.maximum(logp, _LOG_MIN_PROB) + taus[i] * gumbel
    confidence = jnp.where(unknown, confidence, jnp.inf)   # known tokens are never re-masked
    mask_len = jnp.maximum(1, jnp.minimum(unknown.sum(-1) - 1, base[i]))
    rank = jnp.argsort(jnp.argsort(confidence, axis=-1), axis=-1)
    remask = (rank < mask_len[:, None]) & (i < steps - 1)
    tokens = jnp.where(remask, mask_id, drawn)
    return tokens, remask.sum(-1)

  tokens = jnp.full((batch, seq_len), mask_id, jnp.int32)
  tokens, trace = jax.lax.scan(step, tokens, jnp.arange(steps))
  return (tokens, trace) if return_trace else tokens


# --------------------------------------------------------------------------- one step


def initial_tokens(key, batch: int, seq_len: int, mask_id: int, codebook_size: int, r_init):
  """Di[M]O's ``x_init``: uniform codes, then exactly ``round(seq_len * r_init)`` random positions masked."""
  k_codes, k_perm = jax.random.split(key)
  codes = jax.random.randint(k_codes, (batch, seq_len), 0, codebook_size, jnp.int32)
  n_mask = jnp.round(seq_len * jnp.asarray(r_init, jnp.float32)).astype(jnp.int32)
  rank = jnp.argsort(jax.random.uniform(k_perm, (batch, seq_len)), axis=-1)
  rank = jnp.argsort(rank, axis=-1)
  return jnp.where(rank < n_mask, mask_id, codes)


@functools.partial(jax.jit, static_argnames=("apply_fn", "seq_len", "mask_id", "codebook_size",
                                             "return_init"))
def one_step_text_sample(apply_fn: Callable, params, key, cond: Cond, *, seq_len: int,
                         mask_id: int, codebook_size: int, r_init=0.5, noise_sigma=0.3,
                         temperature=1.0, return_init: bool = False):
  """The distilled generator's one-step draw; returns tokens ``[B, seq_len]`` int32.

  Defaults are Di[M]O's training values (``r_init`` 0.5, ``sigma`` 0.3, temperature 1; its
  sampling script defaults to 0.6 / 0.1). ``temperature`` must be > 0. With ``return_init``
  also returns ``x_init``.
  """
  _check(seq_len, mask_id, codebook_size)
  cond = with_micro_conds(cond)
  batch = _batch_size(cond)
  k_init, k_noise, k_draw = jax.random.split(key, 3)
  x_init = initial_tokens(k_init, batch, seq_len, mask_id, codebook_size, r_init)
  logits = apply_fn(params, x_init, cond, jnp.zeros((), jnp.float32), noise_sigma=noise_sigma,
                    rng=k_noise)
  _check_logits(logits, batch, seq_len, codebook_size)
  logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  tokens = jax.random.categorical(k_draw, logits, axis=-1).astype(jnp.int32)
  return (tokens, x_init) if return_init else tokens
