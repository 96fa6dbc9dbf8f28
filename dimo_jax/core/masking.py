"""Mask schedules, the forward masking process q(x_t | x_0) and the Di[M]O initial state.

Conventions: token sequences are int32 ``[B, L]`` with values in ``[0, K)`` where ``K`` is the
codebook size; the mask token is ``K`` (``mask_id``). A schedule maps ``u`` in ``[0, 1]`` to a
mask ratio ``r`` in ``[0, 1]``: ``u = 0`` masks nothing, ``u = 1`` masks everything.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "square", "cosine", "arccos", "root", "truncnorm", "cosine_clamped")


def _truncnorm_ratio(u, mean=1.0, std=0.25):
  """Inverse CDF of N(mean, std) truncated to [0, 1] (mean 1: masks are mostly heavy)."""
  lo = jax.scipy.stats.norm.cdf((0.0 - mean) / std)
  hi = jax.scipy.stats.norm.cdf((1.0 - mean) / std)
  p = lo + u * (hi - lo)
  p = jnp.clip(p, 1e-7, 1 - 1e-7)
  return jnp.clip(mean + std * jax.scipy.special.ndtri(p), 0.0, 1.0)


def mask_ratio(schedule: str, u):
  """Mask ratio r(u) for ``u`` in [0, 1]; monotone increasing with r(0) = 0 and r(1) = 1.

  Each is the authors' decreasing form g(u) read as r(u) = g(1 - u) (so ``u ~ U(0, 1)`` draws the
  same ratios): arccos (2/pi) arccos(1 - u), cosine sin(pi u / 2) (MaskGIT's cos), square u^2,
  linear u, root sqrt(u). A sampler with T steps leaves r(1 - (t+1)/T) of the tokens masked
  after step t, which for ``cosine`` is Google MaskGIT's cos(pi/2 (t+1)/T).
  """
  u = jnp.asarray(u, jnp.float32)
  if schedule == "linear":
    return u
  if schedule == "square":
    return u**2
  if schedule == "cosine":
    return jnp.sin(0.5 * jnp.pi * u)
  if schedule == "arccos":
    return (2.0 / jnp.pi) * jnp.arccos(jnp.clip(1.0 - u, -1.0, 1.0))
  if schedule == "root":
    return jnp.sqrt(u)
  if schedule == "truncnorm":
    return _truncnorm_ratio(u)
  if schedule == "cosine_clamped":  # Di[M]O's text-to-image intermediate states: cosine in [0.02, 0.98]
    return jnp.clip(jnp.sin(0.5 * jnp.pi * u), 0.02, 0.98)
  raise ValueError(f"unknown mask schedule {schedule!r}; choose one of {SCHEDULES}")


def sample_mask_ratio(key, schedule: str, shape=()):
  """Training-time draw of mask ratios: r = mask_ratio(schedule, u), u ~ U(0, 1)."""
  return mask_ratio(schedule, jax.random.uniform(key, shape))


def step_counts(schedule: str, seq_len: int, steps: int) -> np.ndarray:
  """Number of tokens each sampler step reveals: sums to ``seq_len``, each at least 1.

  Step ``t`` (0-based) ends with ``round(L * r(1 - (t+1)/steps))`` tokens still masked; counts are
  then repaired so that every step reveals at least one token. Requires ``steps <= seq_len``.
  """
  if not 1 <= steps <= seq_len:
    raise ValueError(f"sampler steps must be in [1, seq_len={seq_len}], got {steps}")
  grid = 1.0 - np.arange(1, steps + 1, dtype=np.float64) / steps
  with jax.ensure_compile_time_eval():  # a static schedule, also when called under jit
    ratios = np.asarray(mask_ratio(schedule, grid), np.float64)
  remaining = np.round(seq_len * ratios).astype(int)
  remaining = np.clip(remaining, 0, seq_len)
  remaining[-1] = 0
  counts = np.diff(np.concatenate([[seq_len], remaining]))
  counts = -counts
  # Every step reveals at least one token; take the excess from the largest steps.
  counts = np.maximum(counts, 1)
  while counts.sum() > seq_len:
    counts[np.argmax(counts)] -= 1
  return counts.astype(np.int32)


def num_masked(seq_len: int, ratio):
  """Exactly max(1, round(L * r)) positions, as an int32 array shaped like ``ratio``."""
  n = jnp.round(seq_len * jnp.asarray(ratio, jnp.float32)).astype(jnp.int32)
  return jnp.clip(n, 1, seq_len)


def random_ranks(key, shape):
  """Per-row random permutation ranks: each row of the result is a permutation of 0..L-1."""
  return jnp.argsort(jax.random.uniform(key, shape), axis=-1).argsort(axis=-1)


def unique_random_scores(key, shape):
  """uint32 scores, distinct within each row: random high bits, the position in the low bits
  (ties of the random part, rare, resolve by position, as a stable argsort of floats would)."""
  seq_len = shape[-1]
  pos_bits = max(1, int(seq_len - 1).bit_length())
  if pos_bits > 16:
    raise ValueError(f"sequence length {seq_len} is too long for exact-count masks (at most 65536)")
  high = jax.random.bits(key, shape, jnp.uint32) >> pos_bits << pos_bits
  return high | jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)


def exact_count_mask(key, shape, count):
  """Boolean mask ``[B, L]`` with exactly ``count[b]`` True entries in row b, uniformly placed.

  One sort per row: the ``count``-th smallest of distinct random scores is the threshold
  (cheaper than ranking by a double argsort)."""
  scores = unique_random_scores(key, shape)
  count = jnp.broadcast_to(jnp.asarray(count, jnp.int32).reshape(-1, 1), (shape[0], 1))
  ordered = jnp.sort(scores, axis=-1)
  kth = jnp.take_along_axis(ordered, jnp.clip(count - 1, 0, shape[-1] - 1), axis=-1)
  return (scores <= kth) & (count > 0)


def bernoulli_mask(key, shape, ratio):
  """Boolean mask with each position masked independently with probability ``ratio[b]``."""
  ratio = jnp.asarray(ratio, jnp.float32).reshape(-1, *([1] * (len(shape) - 1)))
  return jax.random.uniform(key, shape) < ratio


def apply_mask(tokens, mask, mask_id: int):
  return jnp.where(mask, jnp.asarray(mask_id, tokens.dtype), tokens)


def forward_mask(key, tokens, mask_id: int, schedule: str = "arccos", *, exact: bool = True,
                 ratio=None):
  """Draws x_t ~ q(x_t | x_0). Returns ``(x_t, mask, ratio)``.

  ``exact=True`` masks exactly max(1, round(L r)) positions per sample (the authors'); ``False``
  masks each position independently with probability r.
  """
  batch, seq_len = tokens.shape
  k_ratio, k_mask = jax.random.split(key)
  if ratio is None:
    ratio = sample_mask_ratio(k_ratio, schedule, (batch,))
  ratio = jnp.broadcast_to(jnp.asarray(ratio, jnp.float32), (batch,))
  if exact:
    mask = exact_count_mask(k_mask, tokens.shape, num_masked(seq_len, ratio))
  else:
    mask = bernoulli_mask(k_mask, tokens.shape, ratio)
  return apply_mask(tokens, mask, mask_id), mask, ratio


def make_x_init(key, batch: int, seq_len: int, vocab_size: int, r_init, mask_id=None):
  """Di[M]O's initial state ``[batch, seq_len]`` int32: uniform random codes in
  ``[0, vocab_size)``, then exactly round(L * r_init) positions set to ``mask_id`` (default
  ``vocab_size``, the token networks' mask id; Meissonic's lies past its codebook).

  ``r_init = 1`` gives all masks, ``r_init = 0`` all random codes (no mask at all). Every
  one-step draw of every family starts here.
  """
  k_tok, k_mask = jax.random.split(key)
  tokens = jax.random.randint(k_tok, (batch, seq_len), 0, vocab_size, jnp.int32)
  n = jnp.round(seq_len * jnp.asarray(r_init, jnp.float32)).astype(jnp.int32)
  n = jnp.clip(n, 0, seq_len)
  mask = exact_count_mask(k_mask, (batch, seq_len), jnp.broadcast_to(n, (batch,)))
  return apply_mask(tokens, mask, vocab_size if mask_id is None else mask_id)


def parse_r_init(spec) -> Callable:
  """Returns ``fn(key) -> r_init``. ``spec``: a float, ``'fix_0.6'`` or ``'random_0.4_0.8'``."""
  if isinstance(spec, (int, float)):
    value = float(spec)
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"r_init must be in [0, 1], got {value}")
    return lambda key: jnp.float32(value)
  if not isinstance(spec, str):
    raise ValueError(f"r_init must be a number or a string like 'fix_0.6' / 'random_0.4_0.8', got {spec!r}")
  parts = spec.split("_")
  try:
    if parts[0] == "fix" and len(parts) == 2:
      return parse_r_init(float(parts[1]))
    if parts[0] == "random" and len(parts) == 3:
      lo, hi = float(parts[1]), float(parts[2])
      if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError
      return lambda key: jax.random.uniform(key, (), minval=lo, maxval=hi)
  except ValueError:
    pass
  raise ValueError(
      f"cannot parse r_init {spec!r}: use a number in [0, 1], 'fix_R' or 'random_LO_HI' with 0 <= LO <= HI <= 1")


def masks_for_step(seq_len: int, counts: np.ndarray) -> np.ndarray:
  """Tokens still masked after each sampler step, from ``step_counts``."""
  return seq_len - np.cumsum(counts)
