"""Google's JAX MaskGIT checkpoints (flax msgpack, post-LN BERT) to
``networks.maskgit.BertMaskTransformer``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from dimo_jax.converters.common import check_weights, problems, shape_of
from dimo_jax.converters.maskgit_common import (
  BERT_FIELDS,
  apply_overrides,
  save_converted,
  split_sizes,
  stack_blocks,
)
from dimo_jax.core.trees import flatten, unflatten
from dimo_jax.storage.loaders import read_msgpack

Params = Dict[str, Any]

GOOGLE_ROWS = 2025  # 1024 codes + 1000 classes + mask


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


def convert_google_maskgit(src: Union[str, bytes, os.PathLike, Mapping[str, Any]],
                           model_cfg_overrides: Optional[Mapping[str, Any]] = None,
                           *, source: Optional[str] = None,
                           allow_nonfinite: bool = False) -> Tuple[Params, Dict[str, Any]]:
  """Google MaskGIT transformer checkpoint -> (``BertMaskTransformer`` params, constructor kwargs).

  ``src`` is the msgpack file path, its bytes (``flax.serialization.to_bytes({'params': ...})``,
  parsed with ``msgpack_restore``) or an already restored tree. Heads, width, depth, MLP size and
  sequence length come from the tensors; for a table other than the published 2025 rows give
  ``codebook_size`` or ``num_classes`` in ``model_cfg_overrides``. Raises ``ValueError`` listing
  every missing, unexpected or mis-shaped parameter, every integer-typed one and (unless
  ``allow_nonfinite``) every one holding NaN / inf.
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
  flat = flatten(tree)
  overrides = dict(model_cfg_overrides or {})

  def dim(key, axis, default=0):
    s = shape_of(flat[key]) if key in flat else ()
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
  mismatched = [(k, shape_of(flat[k]), s) for k, s in layout.items()
                if k in flat and shape_of(flat[k]) != s]
  msg = problems(source, "Google MaskGIT transformer layout "
                  f"(depth {depth}, width {width}, {heads} heads, mlp {mlp_dim}, {rows} rows, {positions} positions)",
                  [k for k in layout if k not in flat], [k for k in flat if k not in layout], mismatched,
                  "Pass Google's MaskGIT transformer checkpoint (e.g. maskgit_imagenet256_checkpoint).")
  if msg:
    raise ValueError(msg)
  check_weights(flat, source, allow_nonfinite=allow_nonfinite)

  codebook_size, num_classes = split_sizes(
      rows, overrides.pop("codebook_size", None), overrides.pop("num_classes", None),
      extra_rows=1, published_rows=GOOGLE_ROWS, source=source)
  kwargs: Dict[str, Any] = dict(codebook_size=codebook_size, seq_len=positions - 1, num_classes=num_classes,
                                width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, ln_eps=1e-12,
                                gelu_approximate=True)
  fixed = {k: kwargs[k] for k in ("codebook_size", "seq_len", "num_classes", "width", "depth", "heads",
                                  "mlp_dim")}
  kwargs = apply_overrides(kwargs, overrides, BERT_FIELDS, fixed, source)

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
  params = unflatten(out)
  params.update(stack_blocks(per_layer, bool(kwargs.get("scan", True))))
  return params, kwargs


def convert_google_maskgit_file(input_path: str, output: str, *, codebook_size: Optional[int] = None,
                                num_classes: Optional[int] = None, overwrite: bool = False,
                                allow_nonfinite: bool = False) -> str:
  """Google MaskGIT msgpack -> teacher checkpoint directory at ``output`` (``allow_nonfinite``:
  convert weights holding NaN / inf, refused otherwise)."""
  overrides = {"codebook_size": codebook_size, "num_classes": num_classes}
  params, kwargs = convert_google_maskgit(input_path, {k: v for k, v in overrides.items() if v is not None},
                                          allow_nonfinite=allow_nonfinite)
  return save_converted(output, params, kwargs, arch="bert", kind="google-maskgit", input_path=input_path,
                        overwrite=overwrite)
