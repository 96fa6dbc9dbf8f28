"""Reading PyTorch checkpoint files without executing code (``torch.load(weights_only=True)``) and
finding the state dict inside them.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping

_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model", "module", "net", "network", "vit",
                 "ema", "model_ema", "ema_state_dict")
_PREFIXES = ("module.", "_orig_mod.")


# ------------------------------------------------------------------------------------ torch loading


def load_torch_file(path: str) -> Any:
  """``torch.load(path, map_location='cpu', weights_only=True)`` with clear errors."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Converting a PyTorch checkpoint needs torch (an optional extra): "
                      "pip install torch") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # UnpicklingError / RuntimeError for objects other than tensors
    raise ValueError(
        f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e}). "
        "If you trust the file, re-save its tensors only: "
        "torch.save(torch.load(path, weights_only=False)['model_state_dict'], 'state_dict.pth').") from e


def extract_state_dict(obj: Any, marker: str = "tok_emb.weight", source: str = "checkpoint") -> Dict[str, Any]:
  """Finds the state dict in a checkpoint object and strips ``module.`` / ``_orig_mod.`` prefixes.

  ``obj`` is a state dict (its keys include ``marker``) or a dict wrapping one under
  ``model_state_dict``, ``state_dict``, ``model``, ``ema``, ... (searched in that order).
  """
  if not isinstance(obj, Mapping):
    raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got "
                     f"{type(obj).__name__}.")

  def strip(key: str) -> str:
    changed = True
    while changed:
      changed = False
      for p in _PREFIXES:
        if key.startswith(p):
          key, changed = key[len(p):], True
    return key

  stripped: Dict[str, Any] = {}
  for k, v in obj.items():
    name = strip(str(k))
    if name in stripped:
      raise ValueError(f"{source}: key {k!r} collides with another key after removing the "
                       f"prefixes {list(_PREFIXES)}.")
    stripped[name] = v
  if marker in stripped:
    return stripped
  for key in _WRAPPER_KEYS:
    if key in obj and isinstance(obj[key], Mapping):
      try:
        return extract_state_dict(obj[key], marker, f"{source}[{key!r}]")
      except ValueError:
        continue
  keys = sorted(str(k) for k in obj)
  shown = ", ".join(keys[:40]) + (f", ... ({len(keys)} keys)" if len(keys) > 40 else "")
  raise ValueError(f"{source}: no state dict with {marker!r} found. Top-level keys: [{shown}]. "
                   f"Expected a state dict or a dict wrapping one under one of {list(_WRAPPER_KEYS)}.")
