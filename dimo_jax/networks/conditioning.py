"""The calling conventions by which the samplers, objectives and evaluations call a token network.

A class-conditional network is called as ``apply_fn(params, tokens [B, L], labels [B]) -> logits``;
the null class (label ``num_classes``) is the unconditional branch of classifier-free guidance.
A text-conditioned network (Meissonic, the captioned digits' ``TextTokenModel``) is called by the
condition samplers of ``core.samplers`` as ``apply_fn(params, tokens, cond, timestep,
noise_sigma=0.0, rng=None)``. ``make_apply_fn`` builds both.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np

# ---------------------------------------------------------------------------- labels
def balanced_labels(num: int, num_classes: int) -> np.ndarray:
  """``0, 1, ..., C-1, 0, 1, ...`` (length ``num``); all null labels (0) when unconditional."""
  if num_classes <= 0:
    return np.zeros((num,), np.int32)
  return (np.arange(num) % num_classes).astype(np.int32)


# ---------------------------------------------------------------------------- model helpers
@functools.lru_cache(maxsize=64)
def make_apply_fn(model, *, conditions: bool = False, feed_timestep: bool = True,
                  num_logits: Optional[int] = None) -> Callable:
  """The network ``model`` (a Linen module or a wrapper with the same ``apply``) as the function the
  samplers call; cached per model and arguments, so jit-compiled users reuse their programs.

  - default: ``apply_fn(params, tokens, labels) -> logits`` in eval mode (``deterministic=True``),
    the convention of the label samplers, the objectives' validation and the bounds.
  - ``conditions=True``: ``apply_fn(params, tokens, cond, timestep, noise_sigma=0.0, rng=None)``,
    the convention of the condition samplers. The sampler's ``timestep`` goes to the network's
    ``timestep`` argument, or, with ``feed_timestep=False``, is not fed at all (a network trained
    at one timestep, that it holds itself); ``rng`` is the embedding noise's key; the logits keep
    their first ``num_logits`` entries (a wrapper's mask column dropped) unless it is None.
  """
  if not conditions:
    if not feed_timestep or num_logits is not None:
      raise ValueError("make_apply_fn: feed_timestep and num_logits apply to conditions=True only.")

    def apply_labels(params, tokens, labels):
      return model.apply({"params": params}, tokens, labels, deterministic=True)
    return apply_labels

  def apply_conditions(params, tokens, cond, timestep, noise_sigma=0.0, rng=None):
    kwargs = {"timestep": timestep} if feed_timestep else {}
    logits = model.apply({"params": params}, tokens, cond, noise_sigma=noise_sigma,
                         rngs={} if rng is None else {"noise": rng}, **kwargs)
    return logits if num_logits is None else logits[..., :num_logits]
  return apply_conditions


def null_labels(batch: int, num_classes: int):
  return np.full((batch,), num_classes, np.int32)


# ---------------------------------------------------------------------------- sample grids
def sample_label_grid(num_classes: int, per_class: int = 8, unconditional: int = 64):
  """Labels for a grid: ``per_class`` rows of 0..C-1 (one class per column), or null labels."""
  if num_classes <= 0:
    return np.zeros((unconditional,), np.int32)
  return np.tile(np.arange(num_classes, dtype=np.int32), per_class)
