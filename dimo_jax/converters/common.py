"""What every converter shares: tensors to NumPy, flat key paths (from ``core.trees``) and the strict
key report."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from dimo_jax.core.trees import flatten, unflatten  # noqa: F401  (the converters' key paths)
from dimo_jax.storage import checkpoints

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


# ---------------------------------------------------------------------------- released and converted folders
CONVERTED_CONFIG = "config.json"
CONVERTED_PARAMS = "params.msgpack"


def resolve_released_input(input_path: str, subfolder: str, weights_file: str,
                           command: str) -> Tuple[str, Optional[str]]:
  """A released ``<subfolder>/`` folder, the folder holding it, or a ``.safetensors`` file ->
  (weights path for ``safetensors_io.load_safetensors``, the ``config.json`` beside it or None)."""
  path = os.path.abspath(os.path.expanduser(os.fspath(input_path)))

  def has_weights(p):
    return any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(p))

  if os.path.isdir(path):
    if not has_weights(path) and os.path.isdir(os.path.join(path, subfolder)):
      path = os.path.join(path, subfolder)
    if not has_weights(path):
      raise FileNotFoundError(
          f"{path}: no .safetensors weights here; pass Meissonic's {subfolder}/ folder "
          f"(config.json + {weights_file}) or the .safetensors file: {command}")
    cfg = os.path.join(path, CONVERTED_CONFIG)
    return path, cfg if os.path.isfile(cfg) else None
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found; pass Meissonic's {subfolder}/ folder or its "
                            f".safetensors file: {command}")
  cfg = os.path.join(os.path.dirname(path), CONVERTED_CONFIG)
  return path, cfg if os.path.isfile(cfg) else None


def write_converted(output_dir: str, kind: str, config: Mapping[str, Any], params, source: str) -> None:
  """Writes ``params.msgpack`` (``{"params": ...}``) and ``config.json`` (``kind``, ``config``,
  ``source``), each atomically with the user's umask."""
  from flax import serialization  # pylint: disable=import-outside-toplevel
  os.makedirs(output_dir, exist_ok=True)
  checkpoints.atomic_write_bytes(os.path.join(output_dir, CONVERTED_PARAMS),
                                 serialization.to_bytes({"params": params}))
  meta = {"kind": kind, "config": dict(config), "source": source}
  checkpoints.atomic_write_bytes(os.path.join(output_dir, CONVERTED_CONFIG),
                                 (json.dumps(meta, indent=2) + "\n").encode())


def read_converted(folder: str, kind: str, name: str, command: str) -> Tuple[dict, Dict[str, Any]]:
  """A folder written by ``write_converted`` -> (its ``config.json`` dict, flat ``"a/b"`` params);
  a missing file or another kind of model fails with ``command``."""
  folder = os.fspath(folder)
  missing = [f for f in (CONVERTED_CONFIG, CONVERTED_PARAMS) if not os.path.isfile(os.path.join(folder, f))]
  if missing:
    raise FileNotFoundError(
        f"{folder}: no converted {name} here (missing {', '.join(missing)}). "
        f"Convert the released weights first: {command}")
  with open(os.path.join(folder, CONVERTED_CONFIG)) as f:
    meta = json.load(f)
  if meta.get("kind") != kind:
    raise ValueError(f"{folder}/{CONVERTED_CONFIG}: kind {meta.get('kind')!r}, expected {kind!r}; "
                     f"this folder holds another converted model. {command}")
  from flax import serialization  # pylint: disable=import-outside-toplevel
  with open(os.path.join(folder, CONVERTED_PARAMS), "rb") as f:
    restored = serialization.msgpack_restore(f.read())
  return meta, flatten(restored.get("params", {}))


def check_converted(flat: Mapping[str, Any], want: Mapping[str, Tuple[int, ...]], folder: str, what: str,
                    command: str) -> None:
  """Raises naming every missing, unexpected or mis-shaped key of converted params."""
  report = problems(
      f"{folder}/{CONVERTED_PARAMS}", what, set(want) - set(flat), set(flat) - set(want),
      [(k, shape_of(v), want[k]) for k, v in flat.items() if k in want and shape_of(v) != tuple(want[k])],
      f"Convert again: {command}")
  if report:
    raise ValueError(report)
