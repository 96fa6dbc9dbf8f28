"""The class-conditional calling convention the token networks share.

A network is called as ``apply_fn(params, tokens [B, L], labels [B]) -> logits``; the null
class (label ``num_classes``) is the unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

import functools

import numpy as np

pass



from typing import Callable

pass

# ---------------------------------------------------------------------------- labels
def balanced_labels(num: int, num_classes: int) -> np.ndarray:
  """``0, 1, ..., C-1, 0, 1, ...`` (length ``num``); all null labels (0) when unconditional."""
  if num_classes <= 0:
    return np.zeros((num,), np.int32)
  return (np.arange(num) % num_classes).astype(np.int32)


# ---------------------------------------------------------------------------- model helpers
@functools.lru_cache(maxsize=32)
def make_apply_fn(model) -> Callable:
  """``apply_fn(params, tokens, labels) -> logits`` in eval mode (samplers' convention).

  Cached per model, so jit-compiled users (samplers, validation) reuse their programs."""
  def apply_fn(params, tokens, labels):
    return model.apply({"params": params}, tokens, labels, deterministic=True)
  return apply_fn


def null_labels(batch: int, num_classes: int):
  return np.full((batch,), num_classes, np.int32)


# ---------------------------------------------------------------------------- sample grids
def sample_label_grid(num_classes: int, per_class: int = 8, unconditional: int = 64):
  """Labels for a grid: ``per_class`` rows of 0..C-1 (one class per column), or null labels."""
  if num_classes <= 0:
    return np.zeros((unconditional,), np.int32)
  return np.tile(np.arange(num_classes, dtype=np.int32), per_class)
