"""Reading and writing ``.safetensors`` files without executing anything from them.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw bytes. It is parsed here directly (bfloat16 through
``ml_dtypes``), so no framework is needed to read released weights; a folder may hold one file or
a sharded set with a ``*.safetensors.index.json``.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Dict, Mapping, Optional

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20


def _read_one(path: str, dtype: Optional[np.dtype]) -> Dict[str, np.ndarray]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER, size - 8):
      raise ValueError(f"{path}: not a safetensors file (header length {n} exceeds the file).")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e}).") from e
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info.get("dtype") not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which cannot be "
                       f"read (known: {sorted(_DTYPES)}).")
    begin, end = (int(x) for x in info["data_offsets"])
    shape = tuple(int(d) for d in info["shape"])
    want = np.dtype(_DTYPES[info["dtype"]])
    if end > data.size or end - begin != int(np.prod(shape)) * want.itemsize:
      raise ValueError(f"{path}: tensor {name!r} lies outside the file or has the wrong byte "
                       "count (a truncated or corrupt download); download the file again.")
    array = np.frombuffer(data[begin:end], dtype=want).reshape(shape)
    out[name] = array.astype(dtype) if dtype is not None and array.dtype.kind == "f" else np.array(array)
  return out


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
      with open(index[0]) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
      files = [os.path.join(path, f) for f in files]
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
