"""Taming-transformers VQGAN checkpoints (PyTorch state dict) to ``networks.vqgan`` parameters."""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Dict, Mapping, Tuple

import jax.numpy as jnp
import numpy as np

from dimo_jax.converters.common import check_weights, to_numpy
from dimo_jax.converters.torch_files import find_placeholders, load_torch_file
from dimo_jax.core.trees import unflatten_paths
from dimo_jax.networks.vqgan import TamingConfig, TamingVQGAN, abstract_params, format_problems

Dtype = Any
Params = Dict[str, Any]

_TAMING_MODULE_RULES = (
    (re.compile(r"^(down|up)_(\d+)_(block|attn)_(\d+)$"), r"\1.\2.\3.\4"),
    (re.compile(r"^(down|up)_(\d+)_(downsample|upsample)$"), r"\1.\2.\3"),
    (re.compile(r"^mid_(block_1|attn_1|block_2)$"), r"mid.\1"),
)


def _taming_torch_key(path: Tuple[str, ...]) -> str:
  parts = []
  for name in path[:-1]:
    for pattern, repl in _TAMING_MODULE_RULES:
      if pattern.match(name):
        name = pattern.sub(repl, name)
        break
    parts.append(name)
  leaf = path[-1]
  if leaf == "embedding":
    parts += ["embedding", "weight"]
  elif leaf in ("kernel", "scale"):
    parts.append("weight")
  elif leaf == "bias":
    parts.append("bias")
  else:
    raise ValueError(f"no torch name for parameter {'/'.join(path)}")
  return ".".join(parts)


def _torch_shape(path: Tuple[str, ...], shape: Tuple[int, ...]) -> Tuple[int, ...]:
  if path[-1] == "kernel":  # flax (kh, kw, in, out) <- torch (out, in, kh, kw)
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


@functools.lru_cache(maxsize=16)
def _taming_layout_cached(config: TamingConfig):
  flat = abstract_params(TamingVQGAN(config), config.resolution, config.in_channels)
  return tuple((_taming_torch_key(p), p, _torch_shape(p, s.shape)) for p, s in flat.items())


def taming_param_layout(config: TamingConfig = TamingConfig()) -> Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...]]]:
  """Expected torch state-dict keys -> ``(flax param path, torch shape)`` for ``config``."""
  return {key: (path, shape) for key, path, shape in _taming_layout_cached(config)}


def convert_taming_state_dict(state_dict: Mapping[str, Any],
                              config: TamingConfig = TamingConfig(),
                              param_dtype: Dtype = jnp.float32,
                              source: str = "state_dict", allow_nonfinite: bool = False) -> Params:
  """Taming ``VQModel`` PyTorch state dict -> ``TamingVQGAN`` params (the inner ``params`` tree).

  Accepts a plain state dict or a Lightning checkpoint dict holding one under ``state_dict``.
  Keys under ``loss.`` (perceptual loss / discriminator) are ignored. Any missing or extra key,
  or a shape mismatch, raises ``ValueError`` listing the names and shapes; integer-typed weights
  and (unless ``allow_nonfinite``) weights holding NaN / inf are refused by name.
  """
  if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
    state_dict = state_dict["state_dict"]
  layout = taming_param_layout(config)
  given = {k: v for k, v in state_dict.items() if not str(k).startswith("loss.")}
  missing = [k for k in layout if k not in given]
  unexpected = [k for k in given if k not in layout]
  arrays = {}
  mismatched = []
  for key, (path, shape) in layout.items():
    if key not in given:
      continue
    arr = to_numpy(given[key])
    if tuple(arr.shape) != tuple(shape):
      mismatched.append((key, arr.shape, shape))
      continue
    if path[-1] == "kernel":
      arr = np.transpose(arr, (2, 3, 1, 0))
    arrays[path] = jnp.asarray(arr, dtype=param_dtype)
  if missing or unexpected or mismatched:
    raise ValueError(format_problems(
        source, missing, unexpected, mismatched,
        f"Pass a Taming-transformers VQModel checkpoint whose architecture matches {config} "
        "(or adjust the TamingConfig)."))
  check_weights({k: given[k] for k in layout}, source, allow_nonfinite=allow_nonfinite)
  return unflatten_paths(arrays)


def load_taming_checkpoint(path: str, config: TamingConfig = TamingConfig(),
                           param_dtype: Dtype = jnp.float32, allow_nonfinite: bool = False) -> Params:
  """Load a Taming VQGAN ``.ckpt`` / ``.pth`` (Lightning or plain state dict) -> ``{'params': ...}``.

  Read without executing code (``torch_files.load_torch_file`` with placeholders): the
  ``last.ckpt`` files PyTorch Lightning 1.x writes, whose ``callbacks`` are keyed by Lightning
  classes, load without pytorch_lightning; those objects become inert placeholders and only the
  ``state_dict`` is used. torch is imported here only.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Taming VQGAN checkpoint not found: {path}")
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ImportError("load_taming_checkpoint needs PyTorch to read the checkpoint; "
                      "install it with `pip install torch`.") from e
  state = load_torch_file(path, placeholders=True)
  if not isinstance(state, Mapping):
    raise ValueError(f"{path}: expected a state dict (mapping of names to tensors), "
                     f"got {type(state).__name__}.")
  weights = state["state_dict"] if isinstance(state.get("state_dict"), Mapping) else state
  used = {k: v for k, v in weights.items() if not str(k).startswith("loss.")}
  odd = find_placeholders(used, "state_dict" if weights is not state else "")
  if odd:
    raise ValueError(f"{path}: the state dict holds objects that are not tensors: "
                     + ", ".join(f"{where}: {label}" for where, label in odd))
  return {"params": convert_taming_state_dict(state, config, param_dtype, source=path,
                                             allow_nonfinite=allow_nonfinite)}
