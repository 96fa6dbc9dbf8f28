"""What the two MaskGIT transformer converters share: the published sizes, the split of the
embedding rows into codes and classes, model-field overrides, stacking layers for ``nn.scan``,
and writing a converted folder.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dimo_jax.core.trees import unflatten
from dimo_jax.storage import checkpoints

Params = Dict[str, Any]
PUBLISHED_CODEBOOK = 1024
PUBLISHED_WIDTH = 768
PUBLISHED_HEADS = 16

# MaskTransformer constructor fields a caller may set on top of what the tensors determine.
PRELN_FIELDS = ("codebook_size", "seq_len", "num_classes", "width", "depth", "heads", "mlp_dim",
                 "dropout", "gelu_approximate", "dtype", "param_dtype", "logits_dtype", "scan",
                 "remat", "attention_impl", "class_token", "ln_eps", "ln_eps_io")
BERT_FIELDS = tuple(f for f in PRELN_FIELDS if f not in ("class_token", "ln_eps_io"))
# Fields of the returned model kwargs that config.json stores under "model" (the rest are data sizes).
SIZE_FIELDS = ("codebook_size", "seq_len", "num_classes")
ARCH_FIELDS = ("width", "depth", "heads", "mlp_dim", "class_token", "ln_eps", "ln_eps_io",
                "gelu_approximate")


def split_sizes(rows: int, codebook_size: Optional[int], num_classes: Optional[int],
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


def apply_overrides(kwargs: Dict[str, Any], overrides: Optional[Mapping[str, Any]],
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


def stack_blocks(per_layer: List[Dict[str, np.ndarray]], scan: bool) -> Params:
  if scan:
    return {"blocks": unflatten({k: np.stack([layer[k] for layer in per_layer]) for k in per_layer[0]})}
  return {f"block_{i}": unflatten(layer) for i, layer in enumerate(per_layer)}


# ------------------------------------------------------------------------------ checkpoints


def model_config_from_kwargs(model_kwargs: Mapping[str, Any], arch: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Constructor kwargs -> (``config.model`` fields, ``config.data`` sizes) as plain dicts."""
  model = {"arch": arch}
  model.update({k: model_kwargs[k] for k in ARCH_FIELDS if k in model_kwargs})
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
