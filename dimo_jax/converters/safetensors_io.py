"""Reading and writing ``.safetensors`` files without executing anything from them.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw bytes. It is parsed here directly (bfloat16 through
``ml_dtypes``), so no framework is needed to read released weights; a folder may hold one file or
a sharded set with a ``*.safetensors.index.json``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
from typing import Dict, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np

from dimo_jax.storage.checkpoints import UserError
from dimo_jax.storage.text_files import read_json

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20
_FIX = "download the file again, or convert the original with the safetensors library"


def _unique_keys(pairs):
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"the key {key!r} appears twice")
    out[key] = value
  return out


def _is_count(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(path: str, name: str, info) -> Tuple[str, Tuple[int, ...], int, int]:
  """One header entry -> (dtype name, shape, begin, end), or UserError naming what is wrong."""
  bad = lambda what: UserError(f"{path}: tensor {name!r} {what} in the header (a corrupt or "
                               f"hand-made file); {_FIX}")
  if not isinstance(info, dict):
    raise bad(f"is described by a JSON {type(info).__name__}, not an object with dtype, shape and "
              "data_offsets")
  missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
  if missing:
    raise bad(f"has no {', '.join(missing)}")
  dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
  if not isinstance(dtype, str) or dtype not in _DTYPES:
    raise UserError(f"{path}: tensor {name!r} has dtype {dtype!r}, which cannot be read (known: "
                    f"{sorted(_DTYPES)}); {_FIX}")
  if (not isinstance(shape, list) or len(shape) > 32
      or not all(_is_count(d) and d < 2**48 for d in shape)):
    raise bad(f"has shape {str(shape)[:80]}, not a list of at most 32 non-negative integers")
  if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
      or offsets[0] > offsets[1]):
    raise bad(f"has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
  return dtype, tuple(shape), offsets[0], offsets[1]


def _read_header(path: str, size: int) -> Tuple[dict, int]:
  """The header object of a ``.safetensors`` file and its length in bytes."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise UserError(f"{path}: not a safetensors file (shorter than its 8-byte header length); {_FIX}")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER, size - 8):
      raise UserError(f"{path}: not a safetensors file (header length {n} exceeds the file); {_FIX}")
    blob = f.read(n)
  try:
    header = json.loads(blob.decode("utf-8"), object_pairs_hook=_unique_keys)
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise UserError(f"{path}: not a safetensors file (its header is not JSON: {str(e)[:160]}); "
                    f"{_FIX}") from None
  if not isinstance(header, dict):
    raise UserError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an "
                    f"object of tensors; {_FIX}")
  meta = header.get("__metadata__", {})
  if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
    raise UserError(f"{path}: the header's __metadata__ is not an object of strings; {_FIX}")
  return header, n


def _read_one(path: str, dtype: Optional[np.dtype]) -> Dict[str, np.ndarray]:
  size = os.path.getsize(path)
  header, n = _read_header(path, size)
  entries = {name: _check_entry(path, name, info) for name, info in header.items() if name != "__metadata__"}
  data_size = size - 8 - n
  previous = None
  for name, (kind, shape, begin, end) in sorted(entries.items(), key=lambda e: (e[1][2], e[1][3])):
    want = np.dtype(_DTYPES[kind]).itemsize * math.prod(shape)
    if end > data_size or end - begin != want:
      raise UserError(f"{path}: tensor {name!r} lies outside the file or has the wrong byte count "
                      f"(bytes {begin}..{end} of {data_size}, {want} expected for {kind} {list(shape)}; "
                      f"a truncated or corrupt download); {_FIX}")
    if previous is not None and begin < previous[1] and end > begin:
      raise UserError(f"{path}: tensors {previous[0]!r} and {name!r} overlap (bytes {begin}..{previous[1]}); "
                      f"a corrupt file; {_FIX}")
    if end > begin:
      previous = (name, end)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if data_size > 0 else np.zeros(0, np.uint8)
  out = {}
  for name, (kind, shape, begin, end) in entries.items():
    array = np.frombuffer(data[begin:end], dtype=_DTYPES[kind]).reshape(shape)
    floating = array.dtype.kind == "f" or array.dtype == _DTYPES["BF16"]
    out[name] = array.astype(dtype) if dtype is not None and floating else np.array(array)
  return out


def _index_files(index: str):
  """The weight files an ``*.safetensors.index.json`` names (plain names in its folder)."""
  data = read_json(index, fix=_FIX)
  weight_map = data.get("weight_map") if isinstance(data, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise UserError(f"{index}: expected an object with a non-empty \"weight_map\" of tensor names to "
                    f"file names; {_FIX}")
  files = sorted(set(weight_map.values()), key=str)
  for f in files:
    if not isinstance(f, str) or os.path.basename(f) != f or not f.endswith(".safetensors"):
      raise UserError(f"{index}: weight_map names {f!r}, not a .safetensors file beside the index; {_FIX}")
  return files


def load_safetensors(path: str, dtype: Optional[np.dtype] = np.float32) -> Dict[str, np.ndarray]:
  """Tensors of a ``.safetensors`` file, or of every ``*.safetensors`` in a folder.

  In a folder, an ``*.index.json`` (sharded weights) names the files; otherwise exactly one
  ``.safetensors`` file must be there, or the float32 one beside a ``.fp16`` variant. Floating
  tensors are cast to ``dtype`` (None keeps the stored dtype).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    index = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
    if index:
      files = [os.path.join(path, f) for f in _index_files(index[0])]
    else:
      files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
      full = [f for f in files if ".fp16." not in os.path.basename(f)]
      files = full if len(full) == 1 else files
      if len(files) != 1:
        raise FileNotFoundError(
            f"{path}: expected one .safetensors file (or an .index.json), found "
            f"{[os.path.basename(f) for f in files] or 'none'}; pass the file itself with --input.")
    out: Dict[str, np.ndarray] = {}
    for f in files:
      out.update(load_safetensors(f, dtype))
    return out
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file not found: {path}")
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: only .safetensors weights are read (no pickles); convert or "
                     "download the .safetensors file of the release.")
  return _read_one(path, dtype)


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                     metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes ``tensors`` as a ``.safetensors`` file (used by tests to make released layouts)."""
  header, chunks, offset = {}, [], 0
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    b = a.tobytes()
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + len(b)]}
    chunks.append(b)
    offset += len(b)
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for b in chunks:
      f.write(b)
  os.replace(tmp, path)
