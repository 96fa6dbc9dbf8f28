"""What every converter shares: tensors to NumPy, flat key paths (from ``core.trees``) and the strict
key report."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from dimo_jax.core.trees import flatten, unflatten  # noqa: F401  (the converters' key paths)
from dimo_jax.storage import checkpoints, text_files

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
                     source: str, what: str, fix: str, allow_nonfinite: bool = False) -> None:
  """Raises ValueError naming every missing, unexpected or mis-shaped key of ``state_dict``, then
  checks the expected tensors' dtypes and values with ``check_weights``."""
  mismatched = [(k, shape_of(v), tuple(expected[k])) for k, v in state_dict.items()
                if k in expected and shape_of(v) != tuple(expected[k])]
  report = problems(source, what, set(expected) - set(state_dict), set(state_dict) - set(expected),
                    mismatched, fix)
  if report:
    raise ValueError(report)
  check_weights({k: v for k, v in state_dict.items() if k in expected}, source,
                allow_nonfinite=allow_nonfinite)


# Buffers whose role is an integer (an index table or a counter), not a weight.
INTEGER_BUFFERS = ("position_ids", "num_batches_tracked")
NONFINITE_FLAG = "--allow_nonfinite"


def _is_float_dtype(dtype) -> bool:
  name = str(dtype).replace("torch.", "")
  return name.startswith(("float", "bfloat", "complex"))


def check_weights(tensors: Mapping[str, Any], source: str, *, allow_nonfinite: bool = False) -> None:
  """Refuses weights whose dtype does not fit their role and non-finite weights.

  Every tensor except the integer buffers (names ending in ``INTEGER_BUFFERS``) is a weight and
  must be stored as floats: an integer or boolean weight means a file of another model or a
  corrupt header. NaN / inf entries are reported by name with their count; ``allow_nonfinite``
  (the converter flag ``--allow_nonfinite``) accepts them. Raises ``UserError``.
  """
  wrong, nonfinite = [], []
  for name in sorted(tensors):
    if str(name).rsplit(".", 1)[-1] in INTEGER_BUFFERS:
      continue
    value = tensors[name]
    dtype = getattr(value, "dtype", None)
    if dtype is None or not _is_float_dtype(dtype):
      wrong.append(f"{name} ({str(dtype).replace('torch.', '') if dtype is not None else type(value).__name__})")
      continue
    if not allow_nonfinite:
      array = to_numpy(value)
      bad = int(array.size - np.count_nonzero(np.isfinite(array)))
      if bad:
        nonfinite.append(f"{name} ({bad} of {array.size})")
  if wrong:
    raise checkpoints.UserError(
        f"{source}: weights stored as integers, booleans or non-arrays: {_listed(wrong)}; a weight is a "
        "float tensor: this file holds another model's tensors or is corrupt")
  if nonfinite:
    raise checkpoints.UserError(
        f"{source}: non-finite (NaN / inf) weights: {_listed(nonfinite)}; the file is damaged or "
        f"the training diverged: use an intact file, or pass {NONFINITE_FLAG} to convert it anyway")


def _listed(items, limit: int = 8) -> str:
  return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------------- config.json readers
# A field's kind: "size" (an int >= 1), "count" (an int >= 0), "number" (a finite int or float),
# "flag" (a bool), "text" (a string), "sizes" (a list of sizes), "texts" (a list of strings),
# "object" (a JSON object).
def _kind_ok(kind: str, value) -> bool:
  is_int = isinstance(value, int) and not isinstance(value, bool)
  checks = {
      "size": lambda v: is_int and v >= 1,
      "count": lambda v: is_int and v >= 0,
      "number": lambda v: (is_int or isinstance(v, float)) and np.isfinite(float(v)),
      "flag": lambda v: isinstance(v, bool),
      "text": lambda v: isinstance(v, str),
      "sizes": lambda v: isinstance(v, list) and all(_kind_ok("size", x) for x in v),
      "texts": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
      "object": lambda v: isinstance(v, dict),
  }
  return checks[kind](value)


_KIND_WORDS = {"size": "an integer >= 1", "count": "an integer >= 0", "number": "a finite number",
               "flag": "true or false", "text": "a string", "sizes": "a list of integers >= 1",
               "texts": "a list of strings", "object": "a JSON object"}


def check_config_fields(d: Any, fields: Mapping[str, str], source: str, fix: str) -> dict:
  """``d`` (a parsed ``config.json``), less the keys of ``fields`` set to ``null`` (absent), when it
  is an object whose keys named in ``fields`` have the kind given there (see ``_KIND_WORDS``); else
  ``UserError`` naming the file, the key, the value and ``fix``."""
  if not isinstance(d, dict):
    raise checkpoints.UserError(f"{source}: holds a JSON {type(d).__name__}, not an object of "
                                f"settings; {fix}")
  for key, kind in fields.items():
    value = d.get(key)
    if value is not None and not _kind_ok(kind, value):
      raise checkpoints.UserError(f"{source}: \"{key}\" is {json.dumps(value)[:80]}, expected "
                                  f"{_KIND_WORDS[kind]}; {fix}")
  return {k: v for k, v in d.items() if v is not None or k not in fields}


def build_config(cls, kwargs: Mapping[str, Any], what: str, fix: str):
  """``cls(**kwargs)``; a value the config class refuses becomes ``UserError("<what> (<reason>);
  <fix>")``."""
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise checkpoints.UserError(f"{what} ({e}); {fix}") from None


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
  meta = check_config_fields(text_files.read_json(os.path.join(folder, CONVERTED_CONFIG), f"convert again: {command}"),
                             {"kind": "text", "config": "object"}, f"{folder}/{CONVERTED_CONFIG}",
                             f"convert again: {command}")
  if meta.get("kind") != kind:
    raise ValueError(f"{folder}/{CONVERTED_CONFIG}: kind {meta.get('kind')!r}, expected {kind!r}; "
                     f"this folder holds another converted model. {command}")
  from flax import serialization  # pylint: disable=import-outside-toplevel
  with open(os.path.join(folder, CONVERTED_PARAMS), "rb") as f:
    blob = f.read()
  try:
    restored = serialization.msgpack_restore(blob)
  except Exception as e:  # msgpack raises its own types for truncated or foreign bytes
    raise checkpoints.UserError(f"{folder}/{CONVERTED_PARAMS}: not a flax msgpack file ({type(e).__name__}); "
                                f"convert again: {command}") from None
  if not isinstance(restored, dict) or not isinstance(restored.get("params", {}), dict):
    raise checkpoints.UserError(f"{folder}/{CONVERTED_PARAMS}: holds no params tree; convert again: {command}")
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
