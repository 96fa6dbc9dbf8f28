"""Samplers for masked token models: MaskGIT confidence, random-order ancestral and one-step.

Every sampler is a pure function of ``(apply_fn, params, key, ...)`` where
``apply_fn(params, tokens, labels) -> logits [B, L, K + 1]`` (the caller closes over the model,
embedding noise and determinism). Only the first ``K`` columns (the codebook) are drawn from; the
mask id is ``K``. The loops run inside ``lax.scan`` and the samplers are jit-compiled with
``apply_fn`` as a static argument: keep passing the same ``apply_fn`` object to reuse the
compiled program. Numeric knobs (temperature, r_temp, top_p, a non-static guidance weight) are
traced, so sweeping them does not recompile.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.core import masking

pass

def one_step_generate(model, params, key, labels, *, r_init=0.6, sigma=0.1, temperature=1.0,
                      top_k=0, top_p=1.0):
  """One-step samples from a generator: x_init -> one forward (with embedding noise) -> draw."""
  k_x, k_noise, k_draw = jax.random.split(key, 3)
  batch = labels.shape[0]
  x_init = masking.make_x_init(k_x, batch, model.seq_len, model.codebook_size, r_init)
  logits = model.apply({"params": params}, x_init, labels, deterministic=True, noise_sigma=sigma,
                       rngs={"noise": k_noise})
  z = filter_logits(logits[..., : model.codebook_size], temperature, top_k, top_p)
  return sample_categorical(k_draw, z)

GUIDANCE_SCHEDULES = ("constant", "linear")


# --------------------------------------------------------------------------- helpers


def _static_number(x) -> Optional[float]:
  """``float(x)`` for a Python / NumPy scalar, ``None`` for anything traced or array-like."""
  if isinstance(x, bool):
    return float(x)
  if isinstance(x, (numbers.Number, np.number)):
    return float(x)
  if isinstance(x, np.ndarray) and x.ndim == 0:
    return float(x)
  return None


def sample_categorical(key, logits):
  """Draws one index per row of ``logits[..., V]`` from Cat(softmax(logits)); int32.

  Entries at ``-inf`` are never drawn (Gumbel-max over the last axis).
  """
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_top_k(top_k) -> int:
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"top_k must be a static Python int >= 0 (0 = off), got {top_k!r}")
  return int(top_k)


def _temperature_mode(temperature) -> str:
  """'scale' (static > 0), 'greedy' (static 0) or 'dynamic' (traced: <= 0 means greedy)."""
  value = _static_number(temperature)
  if value is None:
    return "dynamic"
  if not np.isfinite(value) or value < 0:
    raise ValueError(f"temperature must be a finite number >= 0 (0 = argmax), got {temperature!r}")
  return "greedy" if value == 0.0 else "scale"


def _use_top_p(top_p) -> bool:
  value = _static_number(top_p)
  if value is None:
    return True
  if not 0.0 < value <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
  return value < 1.0


def _greedy_logits(logits):
  best = jnp.argmax(logits, axis=-1)
  hit = jnp.arange(logits.shape[-1]) == best[..., None]
  return jnp.where(hit, jnp.zeros_like(logits), -jnp.inf)


def _tempered(logits, temperature, temp_mode: str):
  """``logits / temperature`` (the raw logits where the temperature is 0: greedy draws)."""
  if temp_mode == "greedy":
    return logits
  t = jnp.asarray(temperature, logits.dtype)
  if temp_mode == "dynamic":
    t = jnp.where(t <= 0, jnp.ones_like(t), t)
  return logits / t


def _filter(logits, temperature, top_p, *, top_k: int, temp_mode: str, use_top_p: bool):
  """Temperature, then top-k, then top-p (on the renormalised top-k set). -inf outside."""
  if temp_mode == "greedy":
    return _greedy_logits(logits)
  scaled = _tempered(logits, temperature, temp_mode)
  if temp_mode == "dynamic":
    greedy = jnp.asarray(temperature, logits.dtype) <= 0
    scaled = jnp.where(greedy, _greedy_logits(logits), scaled)
  logits = scaled
  vocab = logits.shape[-1]
  use_top_k = 0 < top_k < vocab
  if not (use_top_k or use_top_p):
    return logits
  order = jnp.argsort(-logits, axis=-1)  # descending, stable: ties keep the lower index first
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  rank = jnp.arange(vocab)
  keep = jnp.ones(sorted_logits.shape, bool)
  if use_top_k:
    keep = keep & (rank < top_k)
  if use_top_p:
    p = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(p, axis=-1) - p
    p_thr = jnp.asarray(top_p, jnp.float32)
    minimal = (mass_before < p_thr) | (rank == 0)
    keep = keep & (minimal | (p_thr >= 1.0))
  keep = jnp.put_along_axis(jnp.zeros(keep.shape, bool), order, keep, axis=-1, inplace=False)
  return jnp.where(keep, logits, -jnp.inf)


def filter_logits(logits, temperature=1.0, top_k: int = 0, top_p=1.0):
  """Temperature scaling, then top-k, then top-p (nucleus) filtering over the last axis.

  ``temperature`` 0 keeps only the argmax (a traced temperature <= 0 does the same); ``top_k``
  (static int, 0 = off) keeps exactly the k largest (ties: lower index first); ``top_p`` (float
  or array, 1 = off) keeps the minimal prefix of the sorted distribution (after top-k,
  renormalised) whose mass reaches ``top_p``. Removed entries are ``-inf``.
  """
  return _filter(jnp.asarray(logits), temperature, top_p, top_k=_check_top_k(top_k),
                 temp_mode=_temperature_mode(temperature), use_top_p=_use_top_p(top_p))


def _guidance_mode(w) -> str:
  """'cond' (static 1), 'uncond' (static 0) or 'mix' (anything else)."""
  value = _static_number(w)
  if value == 1.0:
    return "cond"
  if value == 0.0:
    return "uncond"
  return "mix"


def _guided(apply_fn, params, tokens, labels, w, null_label, mode: str):
  if mode == "cond":
    return apply_fn(params, tokens, labels)
  null = jnp.full_like(labels, null_label)
  if mode == "uncond":
    return apply_fn(params, tokens, null)
  batch = tokens.shape[0]
  both = apply_fn(params, jnp.concatenate([tokens, tokens], axis=0),
                  jnp.concatenate([labels, null], axis=0))
  cond, uncond = both[:batch], both[batch:]
  w = jnp.asarray(w, cond.dtype)
  return uncond + w * (cond - uncond)


def _check_null_label(null_label, what: str):
  if null_label is None:
    raise ValueError(
        f"{what} needs null_label (the model's null class id, e.g. model.null_label); a model "
        "without a null class (the 'bert' layout) only supports guidance=1.0")
  if isinstance(null_label, bool) or not isinstance(null_label, (int, np.integer)):
    raise ValueError(f"null_label must be a Python int, got {null_label!r}")


def guided_logits(apply_fn, params, tokens, labels, w, null_label=None):
  """Classifier-free guidance ``l_uncond + w (l_cond - l_uncond)`` in one batched forward.

  The conditional (``labels``) and unconditional (``null_label``) branches are concatenated
  along the batch. A static ``w`` of 1 returns the conditional model's logits (one forward,
  ``null_label`` may be None); a static 0 returns the unconditional logits.
  """
  mode = _guidance_mode(w)
  if mode != "cond":
    _check_null_label(null_label, f"guidance weight {w!r}")
  return _guided(apply_fn, params, tokens, jnp.asarray(labels), w, null_label, mode)


def _codebook_logits(logits, batch: int, seq_len: int, codebook_size: int):
  if logits.ndim != 3 or logits.shape[:2] != (batch, seq_len):
    raise ValueError(
        f"apply_fn must return logits [B={batch}, L={seq_len}, K+1], got shape {logits.shape}")
  if logits.shape[-1] not in (codebook_size, codebook_size + 1):
    raise ValueError(
        f"apply_fn returned {logits.shape[-1]} logit columns but codebook_size={codebook_size}: "
        f"expected {codebook_size + 1} (codes + mask column); pass the model's codebook size")
  return logits[..., :codebook_size].astype(jnp.float32)


# --------------------------------------------------------------------------- iterative samplers


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "seq_len", "codebook_size", "counts", "guidance_mode",
                     "guidance_schedule", "null_label", "top_k", "temp_mode", "use_top_p",
                     "order", "return_history"))
def _iterative(apply_fn, params, key, labels, init_tokens, temperature, r_temp, guidance, top_p,
               *, seq_len, codebook_size, counts, guidance_mode, guidance_schedule, null_label,
               top_k, temp_mode, use_top_p, order, return_history):
  steps = len(counts)
  batch = labels.shape[0]
  mask_id = codebook_size
  remaining = jnp.asarray(masking.masks_for_step(seq_len, np.asarray(counts)), jnp.int32)
  n0 = jnp.sum(init_tokens == mask_id, axis=-1, dtype=jnp.int32)  # [B]

  def step(tokens, xs):
    t, step_key, remain_full = xs
    masked = tokens == mask_id
    progress = (t + 1).astype(jnp.float32) / steps
    w = guidance * progress if guidance_schedule == "linear" else guidance
    logits = _guided(apply_fn, params, tokens, labels, w, null_label, guidance_mode)
    raw = _codebook_logits(logits, batch, seq_len, codebook_size)
    logits = _filter(raw, temperature, top_p, top_k=top_k, temp_mode=temp_mode,
                     use_top_p=use_top_p)
    # One Gumbel draw per step: Gumbel-max over the K codes, the last column ranks positions.
    gumbel = jax.random.gumbel(step_key, (batch, seq_len, codebook_size + 1), jnp.float32)
    draw = jnp.argmax(logits + gumbel[..., :codebook_size], axis=-1).astype(jnp.int32)
    if order == "confidence":
      logp = jax.nn.log_softmax(_tempered(raw, temperature, temp_mode), axis=-1)
      logp = jnp.take_along_axis(logp, draw[..., None], axis=-1)[..., 0]
      conf = logp + gumbel[..., codebook_size] * (r_temp * (1.0 - progress))
    else:
      conf = gumbel[..., codebook_size]  # i.i.d. scores: a uniformly random reveal order
    conf = jnp.where(jnp.isnan(conf), -jnp.inf, conf)
    conf = jnp.where(masked, conf, jnp.inf)
    # Rows that started with n0 masks keep round(n0 * remaining / L) of them after this step.
    target = (n0 * remain_full + seq_len // 2) // seq_len
    ranks = jnp.argsort(jnp.argsort(conf, axis=-1), axis=-1)
    stay = ranks < target[:, None]
    new = jnp.where(masked, jnp.where(stay, mask_id, draw), tokens).astype(jnp.int32)
    return new, (new if return_history else None)

  xs = (jnp.arange(steps), jax.random.split(key, steps), remaining)
  tokens, history = jax.lax.scan(step, init_tokens.astype(jnp.int32), xs)
  if return_history:
    return tokens, history
  return tokens


def _run_iterative(order, apply_fn, params, key, labels, *, seq_len, codebook_size, steps,
                   schedule, temperature, r_temp, guidance, guidance_schedule, null_label, top_k,
                   top_p, return_history, init_tokens):
  for name, value in (("seq_len", seq_len), ("codebook_size", codebook_size), ("steps", steps)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive Python int, got {value!r}")
  seq_len, codebook_size, steps = int(seq_len), int(codebook_size), int(steps)
  if schedule not in masking.SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {masking.SCHEDULES}")
  with jax.ensure_compile_time_eval():  # static counts, also when called under an outer jit
    counts = tuple(int(c) for c in masking.step_counts(schedule, seq_len, steps))
  if guidance_schedule not in GUIDANCE_SCHEDULES:
    raise ValueError(
        f"unknown guidance_schedule {guidance_schedule!r}; choose one of {GUIDANCE_SCHEDULES}")
  mode = _guidance_mode(guidance)
  if guidance_schedule == "linear" and mode == "cond":
    mode = "mix"  # the ramp w (t+1)/T is below 1 before the last step
  if mode != "cond":
    _check_null_label(null_label, f"guidance={guidance!r} ({guidance_schedule})")
    null_label = int(null_label)
  else:
    null_label = None
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be int [B], got shape {labels.shape}")
  batch = labels.shape[0]
  if init_tokens is None:
    init_tokens = jnp.full((batch, seq_len), codebook_size, jnp.int32)
  else:
    init_tokens = jnp.asarray(init_tokens)
    if init_tokens.shape != (batch, seq_len):
      raise ValueError(
          f"init_tokens must have shape [B={batch}, seq_len={seq_len}] (mask id {codebook_size} "
          f"marks positions to fill), got {init_tokens.shape}")
  guidance_value = _static_number(guidance)
  guidance = jnp.float32(guidance_value) if guidance_value is not None else guidance
  return _iterative(
      apply_fn, params, key, labels.astype(jnp.int32), init_tokens, temperature, r_temp,
      guidance, top_p, seq_len=seq_len, codebook_size=codebook_size, counts=counts,
      guidance_mode=mode, guidance_schedule=guidance_schedule, null_label=null_label,
      top_k=_check_top_k(top_k), temp_mode=_temperature_mode(temperature),
      use_top_p=_use_top_p(top_p), order=order, return_history=bool(return_history))


def confidence_sampler(apply_fn: Callable, params, key, labels, *, seq_len: int,
                       codebook_size: int, steps: int, schedule: str = "arccos",
                       temperature=1.0, r_temp=4.5, guidance=1.0,
                       guidance_schedule: str = "constant", null_label: Optional[int] = None,
                       top_k: int = 0, top_p=1.0, return_history: bool = False,
                       init_tokens=None):
  """MaskGIT confidence sampler over ``steps`` steps.

  Step t (0-based) of T: logits with guidance weight ``w`` (``constant``) or ``w (t+1)/T``
  (``linear``), filtered by temperature / top-k / top-p; every masked position draws
  x ~ Cat(softmax(filtered logits)) with confidence log p(x) + Gumbel * r_temp (1 - (t+1)/T),
  p = softmax(logits / temperature) before top-k / top-p (the raw logits at temperature 0);
  the lowest-confidence masked positions stay masked so that exactly
  ``L - cumsum(step_counts(schedule, L, T))[t]`` masks remain. ``init_tokens`` [B, L]
  (default: all masks) may hold visible codes, which are kept; a row starting with n0 masks
  keeps round(n0 * remaining_t / L) of them. Randomness: step t draws
  ``g = gumbel(split(key, T)[t], [B, L, K + 1])``; x = argmax(filtered logits + g[..., :K])
  and the confidence noise is g[..., K].

  Returns tokens int32 [B, L], and the state after each step [T, B, L] when ``return_history``.
  """
  return _run_iterative(
      "confidence", apply_fn, params, key, labels, seq_len=seq_len, codebook_size=codebook_size,
      steps=steps, schedule=schedule, temperature=temperature, r_temp=r_temp, guidance=guidance,
      guidance_schedule=guidance_schedule, null_label=null_label, top_k=top_k, top_p=top_p,
      return_history=return_history, init_tokens=init_tokens)


def ancestral_sampler(apply_fn: Callable, params, key, labels, *, seq_len: int,
                      codebook_size: int, steps: int, schedule: str = "arccos",
                      temperature=1.0, guidance=1.0, guidance_schedule: str = "constant",
                      null_label: Optional[int] = None, top_k: int = 0, top_p=1.0,
                      return_history: bool = False, init_tokens=None):
  """Random-order unmasking: like ``confidence_sampler`` but the positions revealed at each
  step are chosen uniformly at random among the masked ones (the same per-step counts), each
  drawn from the model's (guided, filtered) per-position distribution.
  """
  return _run_iterative(
      "random", apply_fn, params, key, labels, seq_len=seq_len, codebook_size=codebook_size,
      steps=steps, schedule=schedule, temperature=temperature, r_temp=0.0, guidance=guidance,
      guidance_schedule=guidance_schedule, null_label=null_label, top_k=top_k, top_p=top_p,
      return_history=return_history, init_tokens=init_tokens)


# --------------------------------------------------------------------------- one-step sampler


@functools.partial(jax.jit, static_argnames=("apply_fn", "codebook_size", "top_k", "temp_mode",
                                             "use_top_p"))
def _one_step(apply_fn, params, key, labels, x_init, temperature, top_p, *, codebook_size, top_k,
              temp_mode, use_top_p):
  logits = apply_fn(params, x_init, labels)
  logits = _codebook_logits(logits, x_init.shape[0], x_init.shape[1], codebook_size)
  logits = _filter(logits, temperature, top_p, top_k=top_k, temp_mode=temp_mode,
                   use_top_p=use_top_p)
  return sample_categorical(key, logits)


def one_step_sampler(apply_fn: Callable, params, key, labels, x_init, *, codebook_size: int,
                     temperature=1.0, top_k: int = 0, top_p=1.0):
  """The distilled generator's sampler: one forward pass on ``x_init`` [B, L], then every
  position (masked in ``x_init`` or not) is drawn from the generator's filtered distribution
  over the first ``codebook_size`` columns with ``key``. Returns int32 [B, L].
  """
  if isinstance(codebook_size, bool) or not isinstance(codebook_size, (int, np.integer)) \
      or codebook_size < 1:
    raise ValueError(f"codebook_size must be a positive Python int, got {codebook_size!r}")
  x_init = jnp.asarray(x_init)
  labels = jnp.asarray(labels)
  if x_init.ndim != 2:
    raise ValueError(f"x_init must be int tokens [B, L], got shape {x_init.shape}")
  if labels.shape != (x_init.shape[0],):
    raise ValueError(f"labels must have shape [B={x_init.shape[0]}], got {labels.shape}")
  return _one_step(apply_fn, params, key, labels.astype(jnp.int32), x_init.astype(jnp.int32),
                   temperature, top_p, codebook_size=int(codebook_size),
                   top_k=_check_top_k(top_k), temp_mode=_temperature_mode(temperature),
                   use_top_p=_use_top_p(top_p))


SAMPLERS = ("confidence", "ancestral")


# --------------------------------------------------------------------------- condition pytrees
# The samplers of text-conditioned networks (Meissonic, the captioned digits): ``apply_fn(params,
# tokens, cond, timestep, noise_sigma=0.0, rng=None) -> logits [B, L, codebook_size]``, ``cond``
# a pytree whose leaves lead with the batch axis. Jit-compiled with ``apply_fn`` static.
_LOG_MIN_PROB = math.log(1e-20)


def cosine_mask_lengths(seq_len: int, steps: int) -> np.ndarray:
  """``floor(seq_len * cos(pi/2 * (i+1)/steps))`` per step, in float32 arithmetic as upstream."""
  ratio = (np.arange(1, steps + 1, dtype=np.float32) / np.float32(steps)).astype(np.float32)
  mask_ratio = np.cos(ratio * np.float32(math.pi / 2)).astype(np.float32)
  return np.floor(np.float32(seq_len) * mask_ratio).astype(np.int32)


def mask_schedule_counts(seq_len: int, steps: int) -> np.ndarray:
  """Masked tokens left after each of ``steps`` steps of ``gumbel_ramp_sampler`` (``[steps]``;
  the last entry is 0): step ``i`` re-masks ``max(1, min(#masked - 1, floor(seq_len cos(pi/2
  (i+1)/steps))))`` tokens, ``#masked`` being the count before the step (``seq_len`` at first)."""
  base = cosine_mask_lengths(seq_len, steps)
  counts, masked = [], seq_len
  for i in range(steps):
    masked = 0 if i == steps - 1 else max(1, min(masked - 1, int(base[i])))
    counts.append(masked)
  return np.asarray(counts, np.int32)


def _cond_batch(cond) -> int:
  return int(jax.tree_util.tree_leaves(cond)[0].shape[0])


def _is_key_batch(key, batch: int) -> bool:
  """Whether ``key`` is one key per batch row (``[B]`` typed or ``[B, 2]`` raw) or one key."""
  single_ndim = 0 if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else 1
  if key.ndim == single_ndim:
    return False
  if key.ndim == single_ndim + 1 and key.shape[0] == batch:
    return True
  raise ValueError(f"key must be one PRNG key or one per row ({batch} rows); got shape {key.shape}")


def _check_cond_sizes(seq_len: int, mask_id: int, codebook_size: int, steps: int = 1) -> None:
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  if 0 <= mask_id < codebook_size:
    raise ValueError(f"mask_id {mask_id} lies inside the codebook [0, {codebook_size})")


def _cond_logits(logits, batch: int, seq_len: int, codebook_size: int):
  if logits.shape != (batch, seq_len, codebook_size):
    raise ValueError(f"apply_fn returned logits of shape {logits.shape}, expected "
                     f"{(batch, seq_len, codebook_size)}")
  return logits.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("apply_fn", "seq_len", "mask_id", "codebook_size",
                                             "steps", "return_trace"))
def gumbel_ramp_sampler(apply_fn: Callable, params, key, cond, neg_cond=None, *, seq_len: int,
                        mask_id: int, codebook_size: int, steps: int, guidance=1.0,
                        temperature=(2.0, 0.0), return_trace: bool = False):
  """The confidence sampler of Meissonic's pipeline (aMUSEd's scheduler) on condition pytrees;
  returns tokens ``[B, seq_len]`` int32 (no mask left).

  All tokens start masked; at step ``i`` of ``N`` the network sees timestep ``N - 1 - i``, every
  position draws a token from the softmax (known tokens are kept), and the ``floor(L cos(pi/2
  (i+1)/N))`` (clamped to ``[1, #masked - 1]``) least confident new tokens are masked again,
  confidence being ``log p(token) + tau_i Gumbel`` with ``tau = linspace(*temperature, N)``; the
  last step keeps everything. ``neg_cond`` (batch 1 or B, the structure of ``cond``) switches on
  guidance ``u + guidance (c - u)`` from ONE batched call on ``[negative; prompt]`` (``guidance=0``
  samples the negative condition, 1 the prompt); ``None`` samples ``cond`` without guidance.
  ``key`` is one key for the batch or one per row (``[B]`` typed or ``[B, 2]`` raw): then row
  ``b`` draws what a batch of one with ``key[b]`` draws. With ``return_trace`` also returns the
  masked counts after each step ``[steps, B]``.
  """
  _check_cond_sizes(seq_len, mask_id, codebook_size, steps)
  batch = _cond_batch(cond)
  if neg_cond is not None:
    grow = lambda x: jnp.broadcast_to(x, (batch, *x.shape[1:])) if x.shape[0] == 1 else x  # noqa: E731
    neg_cond = jax.tree_util.tree_map(lambda x: grow(jnp.asarray(x)), neg_cond)
    both = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, jnp.asarray(c, u.dtype)]), neg_cond, cond)

  def logits_fn(tokens, timestep):
    if neg_cond is None:
      return _cond_logits(apply_fn(params, tokens, cond, timestep), batch, seq_len, codebook_size)
    out = _cond_logits(apply_fn(params, jnp.concatenate([tokens, tokens]), both, timestep), 2 * batch,
                       seq_len, codebook_size)
    uncond, c = out[:batch], out[batch:]
    return uncond + jnp.asarray(guidance, jnp.float32) * (c - uncond)

  base = jnp.asarray(cosine_mask_lengths(seq_len, steps))
  taus = jnp.linspace(jnp.asarray(temperature[0], jnp.float32), jnp.asarray(temperature[1], jnp.float32), steps)
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
    return jnp.where(remask, mask_id, drawn), remask.sum(-1)

  tokens, trace = jax.lax.scan(step, jnp.full((batch, seq_len), mask_id, jnp.int32), jnp.arange(steps))
  return (tokens, trace) if return_trace else tokens


@functools.partial(jax.jit, static_argnames=("apply_fn", "seq_len", "mask_id", "codebook_size",
                                             "return_init"))
def one_step_cond_sampler(apply_fn: Callable, params, key, cond, *, seq_len: int, mask_id: int,
                          codebook_size: int, r_init=0.5, noise_sigma=0.3, temperature=1.0,
                          x_init=None, return_init: bool = False):
  """A distilled generator's one-step draw on a condition pytree; returns tokens ``[B, seq_len]``
  int32 (with ``return_init`` also ``x_init``).

  ``key`` splits into three: ``x_init`` (``masking.make_x_init``: uniform codes, exactly
  ``round(L r_init)`` positions at ``mask_id``; or the given ``x_init``), the embedding noise
  ``noise_sigma`` and the categorical draw at ``temperature`` (> 0), one forward at timestep 0
  (the Di[M]O convention).
  """
  _check_cond_sizes(seq_len, mask_id, codebook_size)
  batch = _cond_batch(cond)
  k_init, k_noise, k_draw = jax.random.split(key, 3)
  if x_init is None:
    x_init = masking.make_x_init(k_init, batch, seq_len, codebook_size, r_init, mask_id=mask_id)
  logits = apply_fn(params, x_init, cond, jnp.zeros((), jnp.float32), noise_sigma=noise_sigma, rng=k_noise)
  logits = _cond_logits(logits, batch, seq_len, codebook_size) / jnp.asarray(temperature, jnp.float32)
  tokens = jax.random.categorical(k_draw, logits, axis=-1).astype(jnp.int32)
  return (tokens, x_init) if return_init else tokens
