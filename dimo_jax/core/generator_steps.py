"""A k-step generator: the schedule of re-masking levels and the sampling loop.

Step 0 reads x_init (random codes, round(L r_init) masks) exactly as the one-step generator does.
Step j >= 1 reads the previous step's output re-masked to level t_j: exactly round(L t_j)
positions, placed uniformly, set to the mask id; the generator predicts every token again and
the last step's output is the sample. With one step nothing is re-masked and ``generate`` draws
what ``core.samplers.one_step_generate`` draws, key for key.

Schedules (``generator_schedule``): a name of ``core.masking.SCHEDULES`` gives
t_j = r0 * mask_ratio(name, 1 - j/k), decreasing from the first step's own ratio r0 (``linear``:
t_j = r0 (k - j) / k); a tuple of k - 1 ratios in (0, 1), strictly decreasing, gives them as they
are. Keys: step 0 uses the keys of ``one_step_generate`` (``split(key, 3)``: x_init, noise, draw);
step j >= 1 splits ``fold_in(key, j)`` into (re-mask, noise, draw).
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.core import masking
from dimo_jax.core.samplers import filter_logits, sample_categorical

Schedule = Union[str, Sequence[float]]


def check_schedule(schedule: Schedule, steps: int, prefix: str = "") -> None:
  """Raises ValueError naming ``<prefix>generator_steps`` / ``<prefix>generator_schedule`` and the
  fix when ``steps`` or ``schedule`` cannot drive a k-step generator."""
  name = prefix + "generator_schedule"
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"{prefix}generator_steps must be an int >= 1 (1: the one-step generator), got {steps!r}")
  if isinstance(schedule, str):
    if schedule not in masking.SCHEDULES:
      raise ValueError(f"{name}={schedule!r} is not valid; choose one of {list(masking.SCHEDULES)} "
                       f"or give {steps - 1} decreasing ratios in (0, 1)")
    return
  try:
    ratios = [float(r) for r in schedule]
  except (TypeError, ValueError):
    raise ValueError(f"{name}={schedule!r} is not valid; give a schedule name or a tuple of ratios") from None
  if len(ratios) != steps - 1:
    raise ValueError(f"{name}={tuple(ratios)} has {len(ratios)} ratios; {steps} generator steps need "
                     f"{steps - 1} (the re-masking levels of steps 2..{steps})")
  if any(not 0.0 < r < 1.0 for r in ratios) or any(a <= b for a, b in zip(ratios, ratios[1:])):
    raise ValueError(f"{name}={tuple(ratios)} must be strictly decreasing ratios in (0, 1)")


def step_ratios(schedule: Schedule, steps: int, r0):
  """The mask ratio of each step's input: ``[steps, *shape(r0)]`` float32, row 0 is ``r0`` (the
  first step's r_init, a scalar or one per example), row j the re-masking level t_j."""
  check_schedule(schedule, steps)
  r0 = jnp.asarray(r0, jnp.float32)
  if isinstance(schedule, str):
    with jax.ensure_compile_time_eval():
      frac = masking.mask_ratio(schedule, 1.0 - np.arange(1, steps, dtype=np.float32) / steps)
    later = jnp.asarray(frac, jnp.float32).reshape(-1, *([1] * r0.ndim)) * r0
  else:
    later = jnp.broadcast_to(jnp.asarray(schedule, jnp.float32).reshape(-1, *([1] * r0.ndim)),
                             (steps - 1, *r0.shape))
  return jnp.concatenate([r0[None], later])


def remask(key, tokens, ratio, mask_id: int):
  """``tokens`` with exactly round(L * ratio) positions per row (uniformly placed) set to ``mask_id``;
  ``ratio``: a scalar or one per row."""
  batch, seq_len = tokens.shape
  count = jnp.clip(jnp.round(seq_len * jnp.asarray(ratio, jnp.float32)).astype(jnp.int32), 0, seq_len)
  mask = masking.exact_count_mask(key, tokens.shape, jnp.broadcast_to(count, (batch,)))
  return masking.apply_mask(tokens, mask, mask_id)


def step_keys(key, j):
  """(re-mask, noise, draw) keys of step ``j`` >= 1 (``j`` may be traced)."""
  k_mask, k_noise, k_draw = jax.random.split(jax.random.fold_in(key, j), 3)
  return k_mask, k_noise, k_draw


def chain(step_fn: Callable, x_init, first_keys, key, ratios, mask_id: int, select=None):
  """Runs steps 0..k-2 of the generator from ``x_init``; returns ``(last_input, selected)``.

  ``step_fn(x, k_noise, k_draw) -> tokens`` is one generator step (logits and draw); step 0 uses
  ``first_keys`` (noise, draw), step j >= 1 ``step_keys(key, j)``; ``ratios`` is ``step_ratios``
  (k rows). ``last_input`` is the input of step k-1; ``selected[b]`` the input of step
  ``select[b]`` (int ``[B]`` in [0, k); ``None``: ``last_input``). Steps 2..k-1 run in one
  ``lax.scan``. Both results are constants to autodiff: the steps draw tokens."""
  steps = ratios.shape[0]
  if steps == 1:
    return x_init, x_init
  if select is None:
    select = jnp.full((x_init.shape[0],), steps - 1, jnp.int32)
  x = remask(step_keys(key, 1)[0], step_fn(x_init, *first_keys), ratios[1], mask_id)
  chosen = jnp.where((select == 1)[:, None], x, x_init)

  def body(carry, j):
    x, chosen = carry
    y = step_fn(x, *step_keys(key, j - 1)[1:])
    x = remask(step_keys(key, j)[0], y, jax.lax.dynamic_index_in_dim(ratios, j, keepdims=False), mask_id)
    return (x, jnp.where((select == j)[:, None], x, chosen)), None

  (x, chosen), _ = jax.lax.scan(body, (x, chosen), jnp.arange(2, steps))
  return jax.lax.stop_gradient(x), jax.lax.stop_gradient(chosen)


def token_step(apply_fn: Callable, params, cond, codebook_size: int, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0) -> Callable:
  """``step_fn(x, k_noise, k_draw) -> tokens`` of ``chain`` for ``apply_fn(params, x, cond, k_noise) -> logits``:
  the codes drawn from softmax(filtered logits / temperature)."""
  def step_fn(x, k_noise, k_draw):
    logits = apply_fn(params, x, cond, k_noise)
    return sample_categorical(k_draw, filter_logits(logits[..., :codebook_size], temperature, top_k, top_p))
  return step_fn


def model_apply_fn(model, sigma: float = 0.1) -> Callable:
  """``apply_fn(params, x, cond, k_noise)`` of a token network in eval mode with embedding noise ``sigma``
  (the calling convention of ``generate``)."""
  def apply_fn(params, x, cond, k_noise):
    return model.apply({"params": params}, x, cond, deterministic=True, noise_sigma=sigma, rngs={"noise": k_noise})
  return apply_fn


def generate(apply_fn: Callable, params, key, cond, *, steps: int, schedule: Schedule = "linear", seq_len: int,
             codebook_size: int, r_init=0.6, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             mask_id=None):
  """k-step samples ``[B, seq_len]`` int32 of a generator.

  ``apply_fn(params, x, cond, k_noise) -> logits [B, L, >= codebook_size]`` (``model_apply_fn``);
  ``cond``: labels ``[B]`` or a condition pytree with a leading batch axis; ``steps`` and
  ``schedule`` are static, ``r_init`` (the first step's mask ratio) may be traced. Usable under
  ``jax.jit``; with ``steps=1`` it draws what ``core.samplers.one_step_generate`` draws."""
  check_schedule(schedule, steps)
  batch = jax.tree_util.tree_leaves(cond)[0].shape[0]
  mask_id = codebook_size if mask_id is None else int(mask_id)
  k_x, k_noise, k_draw = jax.random.split(key, 3)
  x_init = masking.make_x_init(k_x, batch, seq_len, codebook_size, r_init)
  if mask_id != codebook_size:
    x_init = jnp.where(x_init == codebook_size, mask_id, x_init)
  step_fn = token_step(apply_fn, params, cond, codebook_size, temperature=temperature, top_k=top_k, top_p=top_p)
  ratios = step_ratios(schedule, steps, r_init)
  x, _ = chain(step_fn, x_init, (k_noise, k_draw), key, ratios, mask_id)
  last = (k_noise, k_draw) if steps == 1 else step_keys(key, steps - 1)[1:]
  return step_fn(x, *last)
