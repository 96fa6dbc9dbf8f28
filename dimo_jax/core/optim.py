"""Optimisers, learning-rate schedules and the parameter EMA of both training loops.

``make_lr_schedule`` / ``weight_decay_mask`` serve the teacher (AdamW, warm-up then cosine or
constant); ``make_schedule`` / ``make_optimizer`` serve Di[M]O (Adam, NaN-zeroing, clipping,
frozen groups); ``ema_update`` is shared.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

pass






from typing import Callable

pass

LR_SCHEDULES = ("constant", "cosine")


def make_schedule(lr: float, *, warmup_steps: int = 0, kind: str = "constant", steps: int = 0,
                  key: str = "config.distill.gen_lr_schedule"):
  """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then ``constant`` (the authors') or
  ``cosine`` decay from ``lr`` to 0 at ``steps``."""
  if kind not in LR_SCHEDULES:
    raise ValueError(f"{key}={kind!r} is not valid; choose one of {list(LR_SCHEDULES)}")
  if kind == "constant":
    return optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0 else lr
  if steps <= warmup_steps:
    raise ValueError(f"{key}='cosine' decays to 0 at config.distill.steps={steps}, which must exceed "
                     f"config.distill.warmup_steps={warmup_steps}")
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, steps, end_value=0.0)


def make_optimizer(lr: float, *, warmup_steps: int = 0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0,
                   frozen: Optional[Any] = None, schedule_kind: str = "constant",
                   steps: int = 0) -> optax.GradientTransformation:
  """Adam with linear warm-up then a constant (or cosine-decaying) rate, optional global-norm
  clipping, NaN/inf gradients zeroed, and ``frozen`` (a pytree of bools, True = frozen)
  parameters left unchanged."""
  schedule = make_schedule(lr, warmup_steps=warmup_steps, kind=schedule_kind, steps=steps)
  parts = [optax.zero_nans()]
  if grad_clip and grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adam(schedule, b1=b1, b2=b2, eps=eps))
  tx = optax.chain(*parts)
  if frozen is not None:
    labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "train", frozen)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


def frozen_mask(params, names):
  """Pytree of bools, True where a leaf lies under one of ``names`` (top-level keys)."""
  return {k: jax.tree_util.tree_map(lambda _: k in names, v) for k, v in params.items()}


def ema_update(ema, params, step, decay):
  """EMA with the warm-up rate min(decay, (1 + t) / (10 + t))."""
  t = jnp.asarray(step, jnp.float32)
  rate = jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))
  # e + (1 - rate)(p - e): frozen parameters (p == e) stay bit-exact.
  return jax.tree_util.tree_map(lambda e, p: (e + (1.0 - rate) * (p - e)).astype(e.dtype), ema, params)


# ---------------------------------------------------------------------------- schedules / optimizer
def make_lr_schedule(lr: float, steps: int, warmup_steps: int = 0, kind: str = "cosine",
                     end_value: float = 0.0) -> Callable:
  """Learning rate per step: linear warm-up ``lr * (step + 1) / warmup_steps`` for the first
  ``warmup_steps`` steps, then ``constant`` at ``lr`` or ``cosine`` from ``lr`` (at the end of
  warm-up) to ``end_value`` (at ``steps``)."""
  if kind not in LR_SCHEDULES:
    raise ValueError(f"unknown learning-rate schedule {kind!r} (config lr_schedule); choose one of {LR_SCHEDULES}")
  if warmup_steps < 0 or steps < 1:
    raise ValueError(f"need steps >= 1 and warmup_steps >= 0, got steps={steps}, warmup_steps={warmup_steps}")
  lr, end_value = float(lr), float(end_value)
  warmup = int(warmup_steps)
  decay_steps = max(int(steps) - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if kind == "constant":
      main = jnp.full_like(step, lr)
    else:
      frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
      main = end_value + (lr - end_value) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    if warmup == 0:
      return main
    return jnp.where(step < warmup, lr * (step + 1.0) / warmup, main)

  return schedule


def weight_decay_mask(params):
  """True for matrices (``kernel``) and embedding tables; biases, LayerNorms, positions and
  the output bias are not decayed."""
  def decay(path, _):
    name = getattr(path[-1], "key", getattr(path[-1], "name", ""))
    return name in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(decay, params)
