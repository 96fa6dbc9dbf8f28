"""Converters from published MaskGIT checkpoints to dimo_jax checkpoints.

Sources (layouts: ``reference/dimo_reference.md`` section 3):

- ``valeoai``: the valeoai MaskGIT PyTorch teacher (``MaskGIT_ImageNet_256.pth``), the Di[M]O
  paper's teacher -> ``MaskTransformer`` (arch ``'preln'``).
- ``dimo-generator``: the Di[M]O authors' one-step generator (``pytorch_model.bin``, the same
  layout) -> a generator checkpoint.
- ``google-maskgit``: Google's JAX MaskGIT msgpack (``maskgit_imagenet256_checkpoint``) ->
  ``BertMaskTransformer`` (arch ``'bert'``).
- ``taming-vqgan`` / ``google-vqgan``: the two VQGAN tokenizers (see ``dimo_jax.vqgan``).

Transformer outputs are checkpoint directories: the orbax checkpoint of
``{'params', 'ema_params'}`` (both the converted weights) plus ``config.json`` with the model
configuration and the data sizes (``dimo_jax.checkpoints`` format, read by ``load_params``).
VQGAN outputs are directories holding ``params.msgpack`` (``flax.serialization.to_bytes`` of
``{'params': ...}``) and ``vqgan.json`` (``{"kind": "taming"|"google", "config": {...}}``); read
them with ``load_vqgan``.

Files are read without executing code: ``torch.load(..., weights_only=True)`` (torch is imported
only here, inside the functions) and ``flax.serialization.msgpack_restore``. Every converter
checks names and shapes strictly and lists every missing, unexpected or mis-shaped entry.

Command line::

  python -m dimo_jax.convert valeoai --input=MaskGIT_ImageNet_256.pth --output=pretrained/maskgit_teacher --heads=16
  python -m dimo_jax.convert dimo-generator --input=pytorch_model.bin --output=pretrained/dimo_generator --heads=16
  python -m dimo_jax.convert google-maskgit --input=maskgit_imagenet256_checkpoint --output=pretrained/maskgit_google
  python -m dimo_jax.convert taming-vqgan --input=last.ckpt --output=pretrained/vqgan_taming
  python -m dimo_jax.convert google-vqgan --input=tokenizer_imagenet256_checkpoint --output=pretrained/vqgan_google
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

Params = Dict[str, Any]

# The published models' vocabulary sizes (embedding rows) and attention heads.
VALEOAI_ROWS = 2026  # 1024 codes + mask + 1000 classes + null class
GOOGLE_ROWS = 2025  # 1024 codes + 1000 classes + mask
PUBLISHED_CODEBOOK = 1024
PUBLISHED_WIDTH = 768
PUBLISHED_HEADS = 16

KINDS = ("valeoai", "dimo-generator", "google-maskgit", "taming-vqgan", "google-vqgan")

_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model", "module", "net", "network", "vit",
                 "ema", "model_ema", "ema_state_dict")
_PREFIXES = ("module.", "_orig_mod.")

# MaskTransformer constructor fields a caller may set on top of what the tensors determine.
_PRELN_FIELDS = ("codebook_size", "seq_len", "num_classes", "width", "depth", "heads", "mlp_dim",
                 "dropout", "gelu_approximate", "dtype", "param_dtype", "logits_dtype", "scan",
                 "remat", "attention_impl", "class_token", "ln_eps", "ln_eps_io")
_BERT_FIELDS = tuple(f for f in _PRELN_FIELDS if f not in ("class_token", "ln_eps_io"))
# Fields of the returned model kwargs that config.json stores under "model" (the rest are data sizes).
_SIZE_FIELDS = ("codebook_size", "seq_len", "num_classes")
_ARCH_FIELDS = ("width", "depth", "heads", "mlp_dim", "class_token", "ln_eps", "ln_eps_io",
                "gelu_approximate")


# ------------------------------------------------------------------------------------------ helpers


def _to_numpy(value) -> np.ndarray:
  """A torch tensor or array-like -> NumPy (floating tensors as float32)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _problems(source: str, what: str, missing: Iterable[str], unexpected: Iterable[str],
              mismatched: Iterable[Tuple[str, Tuple, Tuple]], fix: str) -> Optional[str]:
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


def _shape_of(value) -> Tuple[int, ...]:
  return tuple(int(d) for d in (value.shape if hasattr(value, "shape") else np.shape(value)))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flatten(v, name))
    else:
      out[name] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> Params:
  out: Params = {}
  for path, v in flat.items():
    node = out
    parts = path.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def _split_sizes(rows: int, codebook_size: Optional[int], num_classes: Optional[int],
                 extra_rows: int, published_rows: int, source: str) -> Tuple[int, int]:
  """Embedding rows = codes + classes + ``extra_rows`` -> (codebook_size, num_classes)."""
  if codebook_size is None and num_classes is None:
    if rows != published_rows:
      raise ValueError(
          f"{source}: the embedding table has {rows} rows, not the published {published_rows}; "
          f"give codebook_size or num_classes (rows = codes + classes + {extra_rows}), e.g. "
          f"--codebook_size=... on the command line.")
    codebook_size = PUBLISHED_CODEBOOK
  if codebook_size is None:
    codebook_size = rows - extra_rows - int(num_classes)
  if num_classes is None:
    num_classes = rows - extra_rows - int(codebook_size)
  codebook_size, num_classes = int(codebook_size), int(num_classes)
  if codebook_size < 1 or num_classes < 0 or codebook_size + num_classes + extra_rows != rows:
    raise ValueError(
        f"{source}: codebook_size={codebook_size} and num_classes={num_classes} do not fit an "
        f"embedding table of {rows} rows (rows = codes + classes + {extra_rows}).")
  return codebook_size, num_classes


def _apply_overrides(kwargs: Dict[str, Any], overrides: Optional[Mapping[str, Any]],
                     allowed: Sequence[str], fixed: Mapping[str, Any], source: str) -> Dict[str, Any]:
  """Adds caller fields; a field the tensors fix must agree with them."""
  overrides = dict(overrides or {})
  unknown = sorted(k for k in overrides if k not in allowed)
  if unknown:
    raise ValueError(f"{source}: unknown model fields {unknown}; allowed: {sorted(allowed)}.")
  conflicts = [f"{k}={overrides[k]!r} (checkpoint: {v!r})" for k, v in fixed.items()
               if k in overrides and overrides[k] is not None and overrides[k] != v]
  if conflicts:
    raise ValueError(f"{source}: the requested model fields disagree with the checkpoint's "
                     f"tensors: {', '.join(conflicts)}. Drop them or use a matching checkpoint.")
  kwargs.update({k: v for k, v in overrides.items() if v is not None})
  return kwargs


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


# ------------------------------------------------------------------------------ valeoai (pre-LN)

_LAYER_RE = re.compile(r"^transformer\.layers\.(\d+)\.")


def valeoai_layout(*, depth: int, width: int, mlp_dim: int, rows: int, positions: int) -> Dict[str, Tuple[int, ...]]:
  """Expected valeoai MaskGIT state-dict keys -> torch shapes."""
  w = width
  lay: Dict[str, Tuple[int, ...]] = {
      "tok_emb.weight": (rows, w), "pos_emb": (1, positions, w), "bias": (positions, rows)}
  for name, idx in (("first_layer", (0, 2, 4, 6)), ("last_layer", (0, 2, 4))):
    for j, i in enumerate(idx):
      is_linear = j % 2 == 1
      lay[f"{name}.{i}.weight"] = (w, w) if is_linear else (w,)
      lay[f"{name}.{i}.bias"] = (w,)
  for i in range(depth):
    p = f"transformer.layers.{i}"
    lay.update({
        f"{p}.0.norm.weight": (w,), f"{p}.0.norm.bias": (w,),
        f"{p}.0.fn.mha.in_proj_weight": (3 * w, w), f"{p}.0.fn.mha.in_proj_bias": (3 * w,),
        f"{p}.0.fn.mha.out_proj.weight": (w, w), f"{p}.0.fn.mha.out_proj.bias": (w,),
        f"{p}.1.norm.weight": (w,), f"{p}.1.norm.bias": (w,),
        f"{p}.1.fn.net.0.weight": (mlp_dim, w), f"{p}.1.fn.net.0.bias": (mlp_dim,),
        f"{p}.1.fn.net.3.weight": (w, mlp_dim), f"{p}.1.fn.net.3.bias": (w,),
    })
  return lay


# torch key (without the layer prefix) -> (flax path, transpose?)
_VALEOAI_TOP = {
    "tok_emb.weight": ("tok_emb/embedding", False),
    "pos_emb": ("pos_emb", False),
    "bias": ("out_bias", False),
    "first_layer.0.weight": ("in_ln1/scale", False), "first_layer.0.bias": ("in_ln1/bias", False),
    "first_layer.2.weight": ("in_fc1/kernel", True), "first_layer.2.bias": ("in_fc1/bias", False),
    "first_layer.4.weight": ("in_ln2/scale", False), "first_layer.4.bias": ("in_ln2/bias", False),
    "first_layer.6.weight": ("in_fc2/kernel", True), "first_layer.6.bias": ("in_fc2/bias", False),
    "last_layer.0.weight": ("out_ln1/scale", False), "last_layer.0.bias": ("out_ln1/bias", False),
    "last_layer.2.weight": ("out_fc/kernel", True), "last_layer.2.bias": ("out_fc/bias", False),
    "last_layer.4.weight": ("out_ln2/scale", False), "last_layer.4.bias": ("out_ln2/bias", False),
}
_VALEOAI_LAYER = {
    "0.norm.weight": ("ln1/scale", False), "0.norm.bias": ("ln1/bias", False),
    "0.fn.mha.in_proj_weight": ("attn/qkv/kernel", True), "0.fn.mha.in_proj_bias": ("attn/qkv/bias", False),
    "0.fn.mha.out_proj.weight": ("attn/out/kernel", True), "0.fn.mha.out_proj.bias": ("attn/out/bias", False),
    "1.norm.weight": ("ln2/scale", False), "1.norm.bias": ("ln2/bias", False),
    "1.fn.net.0.weight": ("fc1/kernel", True), "1.fn.net.0.bias": ("fc1/bias", False),
    "1.fn.net.3.weight": ("fc2/kernel", True), "1.fn.net.3.bias": ("fc2/bias", False),
}


def _stack_blocks(per_layer: List[Dict[str, np.ndarray]], scan: bool) -> Params:
  if scan:
    return {"blocks": _unflatten({k: np.stack([layer[k] for layer in per_layer]) for k in per_layer[0]})}
  return {f"block_{i}": _unflatten(layer) for i, layer in enumerate(per_layer)}


def convert_valeoai_state_dict(state_dict: Mapping[str, Any],
                               model_cfg_overrides: Optional[Mapping[str, Any]] = None,
                               *, source: str = "state_dict") -> Tuple[Params, Dict[str, Any]]:
  """valeoai MaskGIT state dict -> (``MaskTransformer`` params, constructor kwargs).

  ``state_dict`` may be wrapped (``model_state_dict``, ...) and carry DDP ``module.`` prefixes.
  Width, depth, MLP size, sequence length and vocabulary come from the tensors. The caller gives
  ``heads`` in ``model_cfg_overrides`` (default 16 only for the published width 768) and, when the
  table is not the published 2026 rows, ``codebook_size`` or ``num_classes``. Other
  ``MaskTransformer`` fields in the overrides (``scan``, ``dropout``, ``dtype``, ...) are passed
  through; ``scan=False`` gives unrolled ``block_i`` params, otherwise layers are stacked on
  axis 0 under ``blocks``. Params are float32 NumPy arrays.

  Raises ``ValueError`` listing every missing, unexpected or mis-shaped key.
  """
  sd = extract_state_dict(state_dict, "tok_emb.weight", source)
  overrides = dict(model_cfg_overrides or {})
  emb = sd["tok_emb.weight"]
  if len(_shape_of(emb)) != 2:
    raise ValueError(f"{source}: tok_emb.weight must be 2-D (rows, width), got shape {_shape_of(emb)}.")
  rows, width = _shape_of(emb)
  layer_ids = sorted({int(m.group(1)) for k in sd for m in [_LAYER_RE.match(k)] if m})
  if not layer_ids:
    raise ValueError(f"{source}: no 'transformer.layers.<i>.*' keys; is this a valeoai MaskGIT "
                     f"transformer state dict? Keys: {sorted(sd)[:20]}")
  depth = layer_ids[-1] + 1
  fc1 = sd.get("transformer.layers.0.1.fn.net.0.weight")
  mlp_dim = _shape_of(fc1)[0] if fc1 is not None and len(_shape_of(fc1)) == 2 else 4 * width
  positions = 0
  if "pos_emb" in sd and len(_shape_of(sd["pos_emb"])) == 3:
    positions = _shape_of(sd["pos_emb"])[1]
  elif "bias" in sd and len(_shape_of(sd["bias"])) == 2:
    positions = _shape_of(sd["bias"])[0]
  layout = valeoai_layout(depth=depth, width=width, mlp_dim=mlp_dim, rows=rows, positions=positions)
  mismatched = [(k, _shape_of(sd[k]), s) for k, s in layout.items() if k in sd and _shape_of(sd[k]) != s]
  msg = _problems(source, "valeoai MaskGIT transformer layout "
                  f"(depth {depth}, width {width}, mlp {mlp_dim}, {rows} embedding rows, {positions} positions)",
                  [k for k in layout if k not in sd], [k for k in sd if k not in layout], mismatched,
                  "Pass the MaskGIT transformer checkpoint (e.g. MaskGIT_ImageNet_256.pth or the Di[M]O "
                  "generator's pytorch_model.bin), not a VQGAN or optimizer file.")
  if msg:
    raise ValueError(msg)

  codebook_size, num_classes = _split_sizes(
      rows, overrides.pop("codebook_size", None), overrides.pop("num_classes", None),
      extra_rows=2, published_rows=VALEOAI_ROWS, source=source)
  heads = overrides.pop("heads", None)
  if heads is None:
    if width != PUBLISHED_WIDTH:
      raise ValueError(f"{source}: the number of attention heads cannot be read from the tensors; "
                       f"give heads (e.g. --heads=16 for the published model, width {width} here).")
    heads = PUBLISHED_HEADS
  heads = int(heads)
  if heads < 1 or width % heads:
    raise ValueError(f"{source}: heads={heads} does not divide the width {width}.")
  kwargs: Dict[str, Any] = dict(
      codebook_size=codebook_size, seq_len=positions - 1, num_classes=num_classes, width=width,
      depth=depth, heads=heads, mlp_dim=mlp_dim, class_token="last", ln_eps=1e-5, ln_eps_io=1e-12,
      gelu_approximate=False)
  fixed = {k: kwargs[k] for k in ("codebook_size", "seq_len", "num_classes", "width", "depth", "mlp_dim")}
  kwargs = _apply_overrides(kwargs, overrides, _PRELN_FIELDS, fixed, source)

  def take(key: str, transpose: bool) -> np.ndarray:
    a = _to_numpy(sd[key]).astype(np.float32)
    return np.ascontiguousarray(a.T) if transpose else a

  flat = {path: take(k, t) for k, (path, t) in _VALEOAI_TOP.items()}
  per_layer = [{path: take(f"transformer.layers.{i}.{k}", t) for k, (path, t) in _VALEOAI_LAYER.items()}
               for i in range(depth)]
  params = _unflatten(flat)
  params.update(_stack_blocks(per_layer, bool(kwargs.get("scan", True))))
  return params, kwargs


# ------------------------------------------------------------------------------- Google (BERT)

_GOOGLE_LAYER_RE = re.compile(r"^TransformerLayer_(\d+)/")


def google_maskgit_layout(*, depth: int, width: int, heads: int, mlp_dim: int, rows: int,
                          positions: int) -> Dict[str, Tuple[int, ...]]:
  """Expected Google MaskGIT ``params`` paths (``'/'``-joined Linen names) -> shapes."""
  w, h = width, heads
  d = w // h
  lay: Dict[str, Tuple[int, ...]] = {
      "Embed_0/word_embeddings/embedding": (rows, w),
      "Embed_0/position_embeddings/embedding": (positions, w),
      "Embed_0/embeddings_ln/scale": (w,), "Embed_0/embeddings_ln/bias": (w,),
      "MlmLayer_0/mlm_dense/kernel": (w, w), "MlmLayer_0/mlm_dense/bias": (w,),
      "MlmLayer_0/mlm_ln/scale": (w,), "MlmLayer_0/mlm_ln/bias": (w,),
      "MlmLayer_0/mlm_bias/bias": (rows,),
  }
  for i in range(depth):
    a = f"TransformerLayer_{i}/Attention_0"
    m = f"TransformerLayer_{i}/Mlp_0"
    for name in ("query", "key", "value"):
      lay[f"{a}/self_attention/{name}/kernel"] = (w, h, d)
      lay[f"{a}/self_attention/{name}/bias"] = (h, d)
    lay.update({
        f"{a}/self_attention/out/kernel": (h, d, w), f"{a}/self_attention/out/bias": (w,),
        f"{a}/attention_output_ln/scale": (w,), f"{a}/attention_output_ln/bias": (w,),
        f"{m}/intermediate_output/kernel": (w, mlp_dim), f"{m}/intermediate_output/bias": (mlp_dim,),
        f"{m}/layer_output/kernel": (mlp_dim, w), f"{m}/layer_output/bias": (w,),
        f"{m}/layer_output_ln/scale": (w,), f"{m}/layer_output_ln/bias": (w,),
    })
  return lay


def read_msgpack(src: Union[str, bytes, os.PathLike], what: str = "checkpoint") -> Tuple[Any, str]:
  """Bytes or a file path -> (``flax.serialization.msgpack_restore`` tree, source name)."""
  from flax import serialization  # pylint: disable=import-outside-toplevel
  if isinstance(src, (bytes, bytearray, memoryview)):
    data, source = bytes(src), "msgpack bytes"
  else:
    source = os.fspath(src)
    if not os.path.isfile(source):
      raise FileNotFoundError(f"{what} not found: {source}")
    with open(source, "rb") as f:
      data = f.read()
  try:
    return serialization.msgpack_restore(data), source
  except Exception as e:
    raise ValueError(f"{source}: not a flax msgpack {what} ({type(e).__name__}: {e}).") from e


def convert_google_maskgit(src: Union[str, bytes, os.PathLike, Mapping[str, Any]],
                           model_cfg_overrides: Optional[Mapping[str, Any]] = None,
                           *, source: Optional[str] = None) -> Tuple[Params, Dict[str, Any]]:
  """Google MaskGIT transformer checkpoint -> (``BertMaskTransformer`` params, constructor kwargs).

  ``src`` is the msgpack file path, its bytes (``flax.serialization.to_bytes({'params': ...})``,
  parsed with ``msgpack_restore``) or an already restored tree. Heads, width, depth, MLP size and
  sequence length come from the tensors; for a table other than the published 2025 rows give
  ``codebook_size`` or ``num_classes`` in ``model_cfg_overrides``. Raises ``ValueError`` listing
  every missing, unexpected or mis-shaped parameter.
  """
  if isinstance(src, Mapping):
    tree, name = src, "params"
  else:
    tree, name = read_msgpack(src, "Google MaskGIT checkpoint")
  source = source or name
  if not isinstance(tree, Mapping):
    raise ValueError(f"{source}: expected a mapping at the top level, got {type(tree).__name__}.")
  if "params" in tree and isinstance(tree["params"], Mapping):
    tree = tree["params"]
  elif "Embed_0" not in tree:
    raise ValueError(f"{source}: top-level keys {sorted(map(str, tree))} hold neither 'params' nor "
                     "'Embed_0'; is this the MaskGIT transformer checkpoint (not the tokenizer)?")
  flat = _flatten(tree)
  overrides = dict(model_cfg_overrides or {})

  def dim(key, axis, default=0):
    s = _shape_of(flat[key]) if key in flat else ()
    return s[axis] if len(s) > axis else default

  rows = dim("Embed_0/word_embeddings/embedding", 0)
  width = dim("Embed_0/word_embeddings/embedding", 1)
  positions = dim("Embed_0/position_embeddings/embedding", 0)
  q0 = "TransformerLayer_0/Attention_0/self_attention/query/kernel"
  heads = dim(q0, 1, 1)
  mlp_dim = dim("TransformerLayer_0/Mlp_0/intermediate_output/kernel", 1, 4 * max(width, 1))
  layer_ids = sorted({int(m.group(1)) for k in flat for m in [_GOOGLE_LAYER_RE.match(k)] if m})
  if not rows or not width or not layer_ids:
    raise ValueError(f"{source}: missing Embed_0/word_embeddings/embedding or TransformerLayer_<i> "
                     f"entries; found {sorted(flat)[:20]}. Pass the MaskGIT transformer checkpoint.")
  depth = layer_ids[-1] + 1
  if width % max(heads, 1):
    heads = 1  # the shape check below reports the kernel
  layout = google_maskgit_layout(depth=depth, width=width, heads=heads, mlp_dim=mlp_dim, rows=rows,
                                 positions=positions)
  mismatched = [(k, _shape_of(flat[k]), s) for k, s in layout.items()
                if k in flat and _shape_of(flat[k]) != s]
  msg = _problems(source, "Google MaskGIT transformer layout "
                  f"(depth {depth}, width {width}, {heads} heads, mlp {mlp_dim}, {rows} rows, {positions} positions)",
                  [k for k in layout if k not in flat], [k for k in flat if k not in layout], mismatched,
                  "Pass Google's MaskGIT transformer checkpoint (e.g. maskgit_imagenet256_checkpoint).")
  if msg:
    raise ValueError(msg)

  codebook_size, num_classes = _split_sizes(
      rows, overrides.pop("codebook_size", None), overrides.pop("num_classes", None),
      extra_rows=1, published_rows=GOOGLE_ROWS, source=source)
  kwargs: Dict[str, Any] = dict(codebook_size=codebook_size, seq_len=positions - 1, num_classes=num_classes,
                                width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, ln_eps=1e-12,
                                gelu_approximate=True)
  fixed = {k: kwargs[k] for k in ("codebook_size", "seq_len", "num_classes", "width", "depth", "heads",
                                  "mlp_dim")}
  kwargs = _apply_overrides(kwargs, overrides, _BERT_FIELDS, fixed, source)

  f32 = lambda k: np.asarray(flat[k], np.float32)
  out = {
      "tok_emb/embedding": f32("Embed_0/word_embeddings/embedding"),
      "pos_emb/embedding": f32("Embed_0/position_embeddings/embedding"),
      "emb_ln/scale": f32("Embed_0/embeddings_ln/scale"), "emb_ln/bias": f32("Embed_0/embeddings_ln/bias"),
      "head_fc/kernel": f32("MlmLayer_0/mlm_dense/kernel"), "head_fc/bias": f32("MlmLayer_0/mlm_dense/bias"),
      "head_ln/scale": f32("MlmLayer_0/mlm_ln/scale"), "head_ln/bias": f32("MlmLayer_0/mlm_ln/bias"),
      "out_bias": f32("MlmLayer_0/mlm_bias/bias"),
  }
  per_layer = []
  for i in range(depth):
    a = f"TransformerLayer_{i}/Attention_0"
    m = f"TransformerLayer_{i}/Mlp_0"
    sa = f"{a}/self_attention"
    per_layer.append({
        "attn/qkv/kernel": np.concatenate(
            [f32(f"{sa}/{n}/kernel").reshape(width, width) for n in ("query", "key", "value")], axis=1),
        "attn/qkv/bias": np.concatenate([f32(f"{sa}/{n}/bias").reshape(width) for n in ("query", "key", "value")]),
        "attn/out/kernel": f32(f"{sa}/out/kernel").reshape(width, width),
        "attn/out/bias": f32(f"{sa}/out/bias"),
        "ln1/scale": f32(f"{a}/attention_output_ln/scale"), "ln1/bias": f32(f"{a}/attention_output_ln/bias"),
        "fc1/kernel": f32(f"{m}/intermediate_output/kernel"), "fc1/bias": f32(f"{m}/intermediate_output/bias"),
        "fc2/kernel": f32(f"{m}/layer_output/kernel"), "fc2/bias": f32(f"{m}/layer_output/bias"),
        "ln2/scale": f32(f"{m}/layer_output_ln/scale"), "ln2/bias": f32(f"{m}/layer_output_ln/bias"),
    })
  params = _unflatten(out)
  params.update(_stack_blocks(per_layer, bool(kwargs.get("scan", True))))
  return params, kwargs


# ------------------------------------------------------------------------------ checkpoints


def model_config_from_kwargs(model_kwargs: Mapping[str, Any], arch: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Constructor kwargs -> (``config.model`` fields, ``config.data`` sizes) as plain dicts."""
  model = {"arch": arch}
  model.update({k: model_kwargs[k] for k in _ARCH_FIELDS if k in model_kwargs})
  data = {"vocab_size": int(model_kwargs["codebook_size"]), "num_classes": int(model_kwargs["num_classes"]),
          "seq_len": int(model_kwargs["seq_len"])}
  side = int(round(data["seq_len"] ** 0.5))
  if side * side == data["seq_len"]:
    data["image_shape"] = [side, side]
  return model, data


def save_converted(output: str, params: Params, model_kwargs: Mapping[str, Any], *, arch: str,
                   kind: str, input_path: str = "", extra: Optional[Mapping[str, Any]] = None,
                   overwrite: bool = False) -> str:
  """Writes a converted transformer as a checkpoint directory; returns its path.

  ``<output>/`` receives the orbax checkpoint of ``{'params', 'ema_params'}`` (both ``params``)
  and ``config.json`` = ``{"model": ..., "data": ..., "dataset": ..., "converted": {"kind", "input"},
  ...extra}`` (``data`` and ``dataset`` hold the sizes ``vocab_size``, ``num_classes``, ``seq_len``
  and, for a square token grid, ``image_shape``). Existing checkpoints in ``output`` raise
  ``FileExistsError`` unless ``overwrite``.
  """
  import shutil  # pylint: disable=import-outside-toplevel
  from dimo_jax import checkpoints  # pylint: disable=import-outside-toplevel
  ckpt_dir = checkpoints.checkpoint_dir(output)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    if not overwrite:
      raise FileExistsError(f"{ckpt_dir} already holds checkpoints; choose another --output or pass "
                            "--overwrite to replace them.")
    shutil.rmtree(ckpt_dir)
  model, data = model_config_from_kwargs(model_kwargs, arch)
  config = {"model": model, "data": data, "dataset": dict(data),
            "converted": {"kind": kind, "input": os.fspath(input_path)}}
  config.update(dict(extra or {}))
  return checkpoints.save_params(output, params, config, ema_params=params)


def load_converted(path: str):
  """A converted checkpoint directory -> ``(params, ema_params, config dict)`` (``checkpoints.load_params``)."""
  from dimo_jax import checkpoints  # pylint: disable=import-outside-toplevel
  return checkpoints.load_params(path)


# ------------------------------------------------------------------------------------- VQGAN


def _vqgan_config(kind: str, fields: Optional[Mapping[str, Any]]):
  from dimo_jax import vqgan  # pylint: disable=import-outside-toplevel
  cls = {"taming": vqgan.TamingConfig, "google": vqgan.GoogleVQGANConfig}.get(kind)
  if cls is None:
    raise ValueError(f"unknown VQGAN kind {kind!r}; choose 'taming' or 'google'.")
  fields = dict(fields or {})
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {unknown}; allowed: {sorted(known)}.")
  return cls(**fields)


def save_vqgan(output: str, variables: Mapping[str, Any], kind: str, vqgan_config) -> str:
  """Writes ``<output>/params.msgpack`` and ``<output>/vqgan.json``; returns ``output``."""
  from flax import serialization  # pylint: disable=import-outside-toplevel
  output = os.fspath(output)
  os.makedirs(output, exist_ok=True)
  tree = {"params": dict(variables["params"]) if "params" in variables else dict(variables)}
  tree = {"params": _unflatten({k: np.asarray(v) for k, v in _flatten(tree["params"]).items()})}
  with open(os.path.join(output, "params.msgpack"), "wb") as f:
    f.write(serialization.msgpack_serialize(tree))
  meta = {"kind": kind, "config": dataclasses.asdict(vqgan_config)}
  with open(os.path.join(output, "vqgan.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return output


def load_vqgan(path: str, dtype: Any = None):
  """A converted VQGAN directory -> ``(module, variables)``.

  Decode with ``module.apply(variables, tokens, method='decode_tokens')`` (tokens ``[B, h*w]``
  -> images ``[B, H, W, 3]`` in ``[0, 1]``).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dimo_jax import vqgan  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  meta_path = os.path.join(path, "vqgan.json")
  params_path = os.path.join(path, "params.msgpack")
  for p in (meta_path, params_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"converted VQGAN file not found: {p}; create the directory with "
                              "`python -m dimo_jax.convert taming-vqgan|google-vqgan --input=... "
                              f"--output={path}`.")
  with open(meta_path) as f:
    meta = json.load(f)
  kind = meta.get("kind")
  cfg = _vqgan_config(kind, meta.get("config"))
  tree, _ = read_msgpack(params_path, "VQGAN parameters")
  if kind == "taming":
    module = vqgan.TamingVQGAN(cfg, **({"dtype": dtype} if dtype else {}))
  else:
    vqgan.check_google_params(tree["params"], cfg, source=params_path)
    module = vqgan.GoogleVQGAN(cfg, **({"dtype": dtype} if dtype else {}))
  variables = {"params": _unflatten({k: jnp.asarray(v) for k, v in _flatten(tree["params"]).items()})}
  return module, variables


# ----------------------------------------------------------------------------- path checks

_DEFAULT_INPUTS = {
    "valeoai": "MaskGIT_ImageNet_256.pth",
    "dimo-generator": "pytorch_model.bin",
    "google-maskgit": "maskgit_imagenet256_checkpoint",
    "taming-vqgan": "VQGAN/last.ckpt",
    "google-vqgan": "tokenizer_imagenet256_checkpoint",
}


def convert_command(kind: str, output: str, input_path: str = "", heads: Optional[int] = None) -> str:
  """The ``python -m dimo_jax.convert`` command line that writes ``output``."""
  cmd = (f"python -m dimo_jax.convert {kind} --input={input_path or _DEFAULT_INPUTS[kind]} "
         f"--output={output}")
  if heads and kind in ("valeoai", "dimo-generator"):
    cmd += f" --heads={heads}"
  return cmd


def _is_checkpoint_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def check_paths(config, which: Sequence[str] = ("teacher", "vqgan")) -> None:
  """Raises ``FileNotFoundError`` naming a missing configured file and the command that makes it.

  ``which`` selects the sections: ``teacher`` (``config.teacher.checkpoint``: a converted
  checkpoint or teacher workdir with ``config.json``), ``vqgan`` (``config.vqgan.checkpoint``,
  skipped when empty or absent) and ``sample`` (``config.sample.checkpoint`` when set).
  """
  arch = config.model.get("arch", "preln")
  heads = config.model.get("heads", None)
  if "teacher" in which:
    path = config.teacher.get("checkpoint", "")
    if not path or not _is_checkpoint_dir(path):
      kind = "google-maskgit" if arch == "bert" else "valeoai"
      what = "is not set" if not path else f"{path!r} does not exist or has no config.json"
      raise FileNotFoundError(
          f"config.teacher.checkpoint {what}. Convert the published teacher first:\n  "
          + convert_command(kind, path or "pretrained/teacher", config.teacher.get("source", ""), heads)
          + "\nor point --config.teacher.checkpoint at a teacher workdir.")
  if "vqgan" in which and "vqgan" in config and config.vqgan.get("checkpoint", ""):
    path = config.vqgan.checkpoint
    if not (os.path.isfile(os.path.join(path, "params.msgpack"))
            and os.path.isfile(os.path.join(path, "vqgan.json"))):
      kind = f"{config.vqgan.get('kind', 'taming')}-vqgan"
      if kind not in _DEFAULT_INPUTS:
        raise ValueError(f"config.vqgan.kind={config.vqgan.get('kind')!r}; choose 'taming' or 'google'.")
      raise FileNotFoundError(
          f"config.vqgan.checkpoint {path!r} does not exist or lacks params.msgpack / vqgan.json. "
          "Convert the VQGAN first:\n  " + convert_command(kind, path, config.vqgan.get("source", "")))
  if "sample" in which and "sample" in config and config.sample.get("checkpoint", ""):
    path = config.sample.checkpoint
    if not _is_checkpoint_dir(path):
      raise FileNotFoundError(
          f"config.sample.checkpoint {path!r} does not exist or has no config.json. Use a distillation "
          "workdir, or convert the Di[M]O authors' generator:\n  "
          + convert_command("dimo-generator", path, "", heads))


# ------------------------------------------------------------------------------------ commands


def convert_valeoai_file(input_path: str, output: str, *, heads: Optional[int] = None,
                         codebook_size: Optional[int] = None, num_classes: Optional[int] = None,
                         overwrite: bool = False) -> str:
  """valeoai ``.pth`` -> teacher checkpoint directory at ``output``."""
  overrides = {"heads": heads, "codebook_size": codebook_size, "num_classes": num_classes}
  params, kwargs = convert_valeoai_state_dict(load_torch_file(input_path),
                                              {k: v for k, v in overrides.items() if v is not None},
                                              source=os.fspath(input_path))
  return save_converted(output, params, kwargs, arch="preln", kind="valeoai", input_path=input_path,
                        overwrite=overwrite)


def convert_dimo_generator(input_path: str, output: str, *, heads: Optional[int] = None,
                           codebook_size: Optional[int] = None, num_classes: Optional[int] = None,
                           r_init: Any = 0.6, sigma: float = 0.1, overwrite: bool = False) -> str:
  """The Di[M]O authors' ``pytorch_model.bin`` -> one-step generator checkpoint at ``output``.

  Same layout as the teacher; ``config.json`` also records ``role: generator`` and the
  generator's input settings (``sample.r_init``, ``sample.sigma``).
  """
  overrides = {"heads": heads, "codebook_size": codebook_size, "num_classes": num_classes}
  params, kwargs = convert_valeoai_state_dict(load_torch_file(input_path),
                                              {k: v for k, v in overrides.items() if v is not None},
                                              source=os.fspath(input_path))
  extra = {"role": "generator", "sample": {"model": "generator", "steps": 1, "r_init": r_init, "sigma": sigma}}
  return save_converted(output, params, kwargs, arch="preln", kind="dimo-generator",
                        input_path=input_path, extra=extra, overwrite=overwrite)


def convert_google_maskgit_file(input_path: str, output: str, *, codebook_size: Optional[int] = None,
                                num_classes: Optional[int] = None, overwrite: bool = False) -> str:
  """Google MaskGIT msgpack -> teacher checkpoint directory at ``output``."""
  overrides = {"codebook_size": codebook_size, "num_classes": num_classes}
  params, kwargs = convert_google_maskgit(input_path, {k: v for k, v in overrides.items() if v is not None})
  return save_converted(output, params, kwargs, arch="bert", kind="google-maskgit", input_path=input_path,
                        overwrite=overwrite)


def convert_vqgan_file(kind: str, input_path: str, output: str,
                       vqgan_fields: Optional[Mapping[str, Any]] = None) -> str:
  """Taming ``.ckpt`` (``kind='taming'``) or Google tokenizer msgpack (``'google'``) -> ``output``."""
  from dimo_jax import vqgan  # pylint: disable=import-outside-toplevel
  cfg = _vqgan_config(kind, vqgan_fields)
  if kind == "taming":
    variables = vqgan.load_taming_checkpoint(input_path, cfg)
  else:
    variables = vqgan.load_google_tokenizer(input_path, cfg)
  return save_vqgan(output, variables, kind, cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dimo_jax.convert",
      description="Convert published MaskGIT / Di[M]O / VQGAN checkpoints into dimo_jax checkpoints.")
  parser.add_argument("kind", choices=KINDS)
  parser.add_argument("--input", required=True, help="the published checkpoint file")
  parser.add_argument("--output", required=True, help="the directory to write")
  parser.add_argument("--heads", type=int, default=None,
                      help="attention heads (valeoai / dimo-generator; default 16 for width 768)")
  parser.add_argument("--codebook_size", type=int, default=None,
                      help="codes in the vocabulary (needed when the table is not the published size)")
  parser.add_argument("--num_classes", type=int, default=None)
  parser.add_argument("--overwrite", action="store_true", help="replace checkpoints already in --output")
  parser.add_argument("--vqgan_config", default="",
                      help="JSON object of TamingConfig / GoogleVQGANConfig fields (default: published)")
  args = parser.parse_args(argv)
  if args.kind == "valeoai":
    out = convert_valeoai_file(args.input, args.output, heads=args.heads,
                               codebook_size=args.codebook_size, num_classes=args.num_classes,
                               overwrite=args.overwrite)
  elif args.kind == "dimo-generator":
    out = convert_dimo_generator(args.input, args.output, heads=args.heads,
                                 codebook_size=args.codebook_size, num_classes=args.num_classes,
                                 overwrite=args.overwrite)
  elif args.kind == "google-maskgit":
    out = convert_google_maskgit_file(args.input, args.output, codebook_size=args.codebook_size,
                                      num_classes=args.num_classes, overwrite=args.overwrite)
  else:
    try:
      fields = json.loads(args.vqgan_config) if args.vqgan_config else {}
    except json.JSONDecodeError as e:
      raise ValueError(f"--vqgan_config is not valid JSON: {e}") from e
    if not isinstance(fields, dict):
      raise ValueError(f"--vqgan_config must be a JSON object of config fields, got {args.vqgan_config!r}")
    out = convert_vqgan_file(args.kind.split("-")[0], args.input, args.output, fields)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
