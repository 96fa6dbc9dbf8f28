"""Exact categorical sampling in float64, and the text samplers that use it.

Gumbel-max with float32 noise draws from a distorted categorical: the uniform behind
``-log(-log u)`` has 2^-24 resolution near 1, so the noise never exceeds about 16.6 and its upper
tail (what lets a low-probability token win) is quantised; the draws are sharper than the
model, as if the temperature were lowered (Zheng et al. 2024, "Masked diffusion models are
secretly time-agnostic masked models and exploit inaccurate categorical sampling"). With
hundreds of tokens per sequence that flatters generative perplexity. Here the draws are made in
float64: ``gumbel_max`` (float64 Gumbel noise added to float64 log-probabilities) or
``inverse_cdf`` (a float64 uniform against the float64 cumulative distribution).

float64 needs JAX's x64 mode. The functions below check it at trace time and name the fix;
``float64_mode()`` is the context to trace and run them in (the network keeps its own float32
or bfloat16 computation: only the draw is made in float64). The samplers follow the calling
convention of ``core.samplers`` (``apply_fn(params, tokens, labels) -> logits [B, L, K(+1)]``,
mask id ``K``) and the same per-step unmasking counts (``masking.step_counts``).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.core import masking

METHODS = ("gumbel_max", "inverse_cdf", "float32_gumbel")
ORDERS = ("ancestral", "confidence")


def float64_mode():
  """The context in which the float64 draws are traced and run: ``with float64_mode(): ...``."""
  return jax.enable_x64(True)


def _check_x64():
  if jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
    raise ValueError("float64 categorical sampling needs JAX's x64 mode: call it inside "
                     "`with dimo_jax.core.categorical.float64_mode():` (or set JAX_ENABLE_X64=1)")


def log_probs64(logits, temperature=1.0):
  """float64 log-softmax of ``logits / temperature`` over the last axis (``-inf`` stays excluded)."""
  _check_x64()
  z = jnp.asarray(logits).astype(jnp.float64) / jnp.asarray(temperature, jnp.float64)
  return jax.nn.log_softmax(z, axis=-1)


def gumbel_max(key, logits, temperature=1.0):
  """One index per row of ``logits[..., V]``, argmax of float64 log-probabilities plus float64
  Gumbel noise (a uniform with 2^-53 resolution). Returns int32."""
  logp = log_probs64(logits, temperature)
  g = jax.random.gumbel(key, logp.shape, jnp.float64)
  return jnp.argmax(logp + g, axis=-1).astype(jnp.int32)


def inverse_cdf(key, logits, temperature=1.0):
  """One index per row of ``logits[..., V]``: the first index whose float64 cumulative probability
  exceeds a float64 uniform. Returns int32."""
  p = jnp.exp(log_probs64(logits, temperature))
  cdf = jnp.cumsum(p, axis=-1)
  u = jax.random.uniform(key, p.shape[:-1] + (1,), jnp.float64) * cdf[..., -1:]
  idx = jnp.sum(cdf <= u, axis=-1)
  # u < cdf[-1] always; guard against a zero-probability tail that rounding reaches.
  last = jnp.max(jnp.where(p > 0, jnp.arange(p.shape[-1]), 0), axis=-1)
  return jnp.minimum(idx, last).astype(jnp.int32)


def float32_gumbel(key, logits, temperature=1.0):
  """The inaccurate draw, for comparison: float32 Gumbel-max (``jax.random.categorical``)."""
  z = jnp.asarray(logits).astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


_DRAWS = {"gumbel_max": gumbel_max, "inverse_cdf": inverse_cdf, "float32_gumbel": float32_gumbel}


def check_method(method: str) -> Callable:
  if method not in _DRAWS:
    raise ValueError(f"unknown categorical sampling method {method!r}; choose one of {list(METHODS)}")
  return _DRAWS[method]


def sample(key, logits, temperature=1.0, method: str = "gumbel_max"):
  """One index per row of ``logits[..., V]`` from Cat(softmax(logits / temperature)) with ``method``."""
  return check_method(method)(key, logits, temperature)


# ---------------------------------------------------------------------------- samplers
@functools.partial(jax.jit, static_argnames=("apply_fn", "codebook_size", "counts", "order", "method"))
def _iterate(apply_fn, params, key, labels, temperature, r_temp, *, codebook_size, counts, order, method):
  steps = len(counts)
  batch, seq_len = labels.shape[0], int(sum(counts))
  mask_id = codebook_size
  remaining = jnp.asarray(masking.masks_for_step(seq_len, np.asarray(counts)), jnp.int32)
  draw_fn = check_method(method)

  def step(tokens, xs):
    t, step_key, remain = xs
    k_draw, k_order = jax.random.split(step_key)
    masked = tokens == mask_id
    logits = apply_fn(params, tokens, labels)[..., :codebook_size]
    draw = draw_fn(k_draw, logits, temperature)
    noise = jax.random.gumbel(k_order, (batch, seq_len), jnp.float32)
    if order == "confidence":
      logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
      logp = jnp.take_along_axis(logp, draw[..., None], axis=-1)[..., 0]
      progress = (t + 1).astype(jnp.float32) / steps
      score = logp + noise * (r_temp * (1.0 - progress))
    else:
      score = noise  # a uniformly random reveal order
    score = jnp.where(masked, score, jnp.inf)
    ranks = jnp.argsort(jnp.argsort(score, axis=-1), axis=-1)
    stay = ranks < remain
    return jnp.where(masked & ~stay, draw, tokens).astype(jnp.int32), None

  init = jnp.full((batch, seq_len), mask_id, jnp.int32)
  xs = (jnp.arange(steps), jax.random.split(key, steps), remaining)
  return jax.lax.scan(step, init, xs)[0]


def iterative_sample(apply_fn: Callable, params, key, labels, *, seq_len: int, codebook_size: int,
                     steps: int, order: str = "ancestral", schedule: str = "cosine", temperature=1.0,
                     r_temp=4.5, method: str = "gumbel_max"):
  """A masked diffusion model's samples from all masks in ``steps`` steps. Returns int32 [B, L].

  Step t reveals ``step_counts(schedule, L, steps)[t]`` of the masked positions, each drawn with
  ``method`` from softmax(logits / temperature) over the first ``codebook_size`` columns:
  ``order='ancestral'`` reveals uniformly random positions (the model's reverse process),
  ``'confidence'`` the most confident ones (MaskGIT: log p(draw) + Gumbel * r_temp (1 - (t+1)/T)).
  ``apply_fn`` is a static argument: pass the same object to reuse the compiled program. The
  float64 methods must run inside ``float64_mode()``.
  """
  if order not in ORDERS:
    raise ValueError(f"unknown sampler order {order!r}; choose one of {list(ORDERS)}")
  if not 1 <= int(steps) <= int(seq_len):
    raise ValueError(f"steps must be in [1, seq_len={seq_len}], got {steps}")
  check_method(method)
  if method != "float32_gumbel":
    _check_x64()
  counts = tuple(int(c) for c in masking.step_counts(schedule, int(seq_len), int(steps)))
  return _iterate(apply_fn, params, key, jnp.asarray(labels, jnp.int32), jnp.float32(temperature),
                  jnp.float32(r_temp), codebook_size=int(codebook_size), counts=counts, order=order,
                  method=method)


@functools.partial(jax.jit, static_argnames=("model", "method"))
def _one_step(model, params, key, labels, r_init, sigma, temperature, *, method):
  k_x, k_noise, k_draw = jax.random.split(key, 3)
  x_init = masking.make_x_init(k_x, labels.shape[0], model.seq_len, model.codebook_size, r_init)
  logits = model.apply({"params": params}, x_init, labels, deterministic=True, noise_sigma=sigma,
                       rngs={"noise": k_noise})
  return check_method(method)(k_draw, logits[..., :model.codebook_size], temperature)


def one_step_sample(model, params, key, labels, *, r_init=0.6, sigma=0.0, temperature=1.0,
                    method: str = "gumbel_max"):
  """Di[M]O generator samples: x_init (random codes, round(L r_init) masks) -> one forward with
  embedding noise ``sigma`` -> every position drawn with ``method``. Returns int32 [B, L]."""
  check_method(method)
  if method != "float32_gumbel":
    _check_x64()
  return _one_step(model, params, key, jnp.asarray(labels, jnp.int32), jnp.float32(r_init),
                   jnp.float32(sigma), jnp.float32(temperature), method=method)
