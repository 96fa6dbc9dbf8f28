"""What every converter shares: tensors to NumPy, flat key paths (from ``core.trees``) and the strict
key report."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from dimo_jax.core.trees import flatten, unflatten  # noqa: F401  (the converters' key paths)

Params = Dict[str, Any]


def to_numpy(value) -> np.ndarray:
  """A torch tensor or array-like -> NumPy (floating torch tensors as float32)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def shape_of(value) -> Tuple[int, ...]:
  return tuple(int(d) for d in (value.shape if hasattr(value, "shape") else np.shape(value)))


def problems(source: str, what: str, missing: Iterable[str], unexpected: Iterable[str],
             mismatched: Iterable[Tuple[str, Tuple, Tuple]], fix: str) -> Optional[str]:
  """The report of a strict key check, or None when the keys and shapes all match.

  Every missing, unexpected and mis-shaped key is named, then ``fix``.
  """
  missing, unexpected, mismatched = sorted(missing), sorted(unexpected), sorted(mismatched)
  if not (missing or unexpected or mismatched):
    return None
  lines = [f"{source} does not match the {what}:"]
  if missing:
    lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
  if unexpected:
    lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
  for name, got, want in mismatched:
    lines.append(f"  wrong shape: {name}: got {tuple(got)}, expected {tuple(want)}")
  lines.append(fix)
  return "\n".join(lines)


def check_state_dict(state_dict: Mapping[str, Any], expected: Mapping[str, Tuple[int, ...]], *,
                     source: str, what: str, fix: str) -> None:
  """Raises ValueError naming every missing, unexpected or mis-shaped key of ``state_dict``."""
  mismatched = [(k, shape_of(v), tuple(expected[k])) for k, v in state_dict.items()
                if k in expected and shape_of(v) != tuple(expected[k])]
  report = problems(source, what, set(expected) - set(state_dict), set(state_dict) - set(expected),
                    mismatched, fix)
  if report:
    raise ValueError(report)
