"""valeoai MaskGIT checkpoints (``MaskGIT_ImageNet_256.pth``) and the Di[M]O authors' generator
(the same layout) to the pre-LN ``networks.maskgit.MaskTransformer``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from dimo_jax.converters.common import check_weights, problems, shape_of, to_numpy
from dimo_jax.converters.maskgit_common import (
  PRELN_FIELDS,
  PUBLISHED_HEADS,
  PUBLISHED_WIDTH,
  apply_overrides,
  save_converted,
  split_sizes,
  stack_blocks,
)
from dimo_jax.converters.torch_files import extract_state_dict, load_torch_file
from dimo_jax.core.trees import unflatten

Params = Dict[str, Any]

# The published models' vocabulary sizes (embedding rows) and attention heads.
VALEOAI_ROWS = 2026  # 1024 codes + mask + 1000 classes + null class


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


def convert_valeoai_state_dict(state_dict: Mapping[str, Any],
                               model_cfg_overrides: Optional[Mapping[str, Any]] = None,
                               *, source: str = "state_dict",
                               allow_nonfinite: bool = False) -> Tuple[Params, Dict[str, Any]]:
  """valeoai MaskGIT state dict -> (``MaskTransformer`` params, constructor kwargs).

  ``state_dict`` may be wrapped (``model_state_dict``, ...) and carry DDP ``module.`` prefixes.
  Width, depth, MLP size, sequence length and vocabulary come from the tensors. The caller gives
  ``heads`` in ``model_cfg_overrides`` (default 16 only for the published width 768) and, when the
  table is not the published 2026 rows, ``codebook_size`` or ``num_classes``. Other
  ``MaskTransformer`` fields in the overrides (``scan``, ``dropout``, ``dtype``, ...) are passed
  through; ``scan=False`` gives unrolled ``block_i`` params, otherwise layers are stacked on
  axis 0 under ``blocks``. Params are float32 NumPy arrays.

  Raises ``ValueError`` listing every missing, unexpected or mis-shaped key, every integer-typed
  weight and (unless ``allow_nonfinite``) every weight holding NaN / inf.
  """
  sd = extract_state_dict(state_dict, "tok_emb.weight", source)
  overrides = dict(model_cfg_overrides or {})
  emb = sd["tok_emb.weight"]
  if len(shape_of(emb)) != 2:
    raise ValueError(f"{source}: tok_emb.weight must be 2-D (rows, width), got shape {shape_of(emb)}.")
  rows, width = shape_of(emb)
  layer_ids = sorted({int(m.group(1)) for k in sd for m in [_LAYER_RE.match(k)] if m})
  if not layer_ids:
    raise ValueError(f"{source}: no 'transformer.layers.<i>.*' keys; is this a valeoai MaskGIT "
                     f"transformer state dict? Keys: {sorted(sd)[:20]}")
  depth = layer_ids[-1] + 1
  fc1 = sd.get("transformer.layers.0.1.fn.net.0.weight")
  mlp_dim = shape_of(fc1)[0] if fc1 is not None and len(shape_of(fc1)) == 2 else 4 * width
  positions = 0
  if "pos_emb" in sd and len(shape_of(sd["pos_emb"])) == 3:
    positions = shape_of(sd["pos_emb"])[1]
  elif "bias" in sd and len(shape_of(sd["bias"])) == 2:
    positions = shape_of(sd["bias"])[0]
  layout = valeoai_layout(depth=depth, width=width, mlp_dim=mlp_dim, rows=rows, positions=positions)
  mismatched = [(k, shape_of(sd[k]), s) for k, s in layout.items() if k in sd and shape_of(sd[k]) != s]
  msg = problems(source, "valeoai MaskGIT transformer layout "
                  f"(depth {depth}, width {width}, mlp {mlp_dim}, {rows} embedding rows, {positions} positions)",
                  [k for k in layout if k not in sd], [k for k in sd if k not in layout], mismatched,
                  "Pass the MaskGIT transformer checkpoint (e.g. MaskGIT_ImageNet_256.pth or the Di[M]O "
                  "generator's pytorch_model.bin), not a VQGAN or optimizer file.")
  if msg:
    raise ValueError(msg)
  check_weights(sd, source, allow_nonfinite=allow_nonfinite)

  codebook_size, num_classes = split_sizes(
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
  kwargs = apply_overrides(kwargs, overrides, PRELN_FIELDS, fixed, source)

  def take(key: str, transpose: bool) -> np.ndarray:
    a = to_numpy(sd[key]).astype(np.float32)
    return np.ascontiguousarray(a.T) if transpose else a

  flat = {path: take(k, t) for k, (path, t) in _VALEOAI_TOP.items()}
  per_layer = [{path: take(f"transformer.layers.{i}.{k}", t) for k, (path, t) in _VALEOAI_LAYER.items()}
               for i in range(depth)]
  params = unflatten(flat)
  params.update(stack_blocks(per_layer, bool(kwargs.get("scan", True))))
  return params, kwargs


# ------------------------------------------------------------------------------------ commands


def convert_valeoai_file(input_path: str, output: str, *, heads: Optional[int] = None,
                         codebook_size: Optional[int] = None, num_classes: Optional[int] = None,
                         overwrite: bool = False, allow_nonfinite: bool = False) -> str:
  """valeoai ``.pth`` -> teacher checkpoint directory at ``output`` (``allow_nonfinite``: convert
  weights holding NaN / inf, refused otherwise)."""
  overrides = {"heads": heads, "codebook_size": codebook_size, "num_classes": num_classes}
  params, kwargs = convert_valeoai_state_dict(load_torch_file(input_path),
                                              {k: v for k, v in overrides.items() if v is not None},
                                              source=os.fspath(input_path), allow_nonfinite=allow_nonfinite)
  return save_converted(output, params, kwargs, arch="preln", kind="valeoai", input_path=input_path,
                        overwrite=overwrite)


def convert_dimo_generator(input_path: str, output: str, *, heads: Optional[int] = None,
                           codebook_size: Optional[int] = None, num_classes: Optional[int] = None,
                           r_init: Any = 0.6, sigma: float = 0.1, overwrite: bool = False,
                           allow_nonfinite: bool = False) -> str:
  """The Di[M]O authors' ``pytorch_model.bin`` -> one-step generator checkpoint at ``output``.

  Same layout as the teacher; ``config.json`` also records ``role: generator`` and the
  generator's input settings (``sample.r_init``, ``sample.sigma``).
  """
  overrides = {"heads": heads, "codebook_size": codebook_size, "num_classes": num_classes}
  params, kwargs = convert_valeoai_state_dict(load_torch_file(input_path),
                                              {k: v for k, v in overrides.items() if v is not None},
                                              source=os.fspath(input_path), allow_nonfinite=allow_nonfinite)
  extra = {"role": "generator", "sample": {"model": "generator", "steps": 1, "r_init": r_init, "sigma": sigma}}
  return save_converted(output, params, kwargs, arch="preln", kind="dimo-generator",
                        input_path=input_path, extra=extra, overwrite=overwrite)
