"""Google's MaskGIT tokenizer checkpoint (flax msgpack) to ``networks.vqgan_google`` parameters."""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

import jax.numpy as jnp

from dimo_jax.converters.common import check_weights
from dimo_jax.core.trees import flatten_paths, unflatten_paths
from dimo_jax.networks import vqgan_google
from dimo_jax.networks.vqgan_google import GoogleVQGANConfig
from dimo_jax.storage import loaders

Dtype = Any
Params = Dict[str, Any]

def load_google_tokenizer(path: str, config: GoogleVQGANConfig = GoogleVQGANConfig(),
                          param_dtype: Optional[Dtype] = jnp.float32, allow_nonfinite: bool = False) -> Params:
  """Load Google's msgpack tokenizer checkpoint -> ``{'params': ...}`` for ``GoogleVQGAN``.

  The file is ``flax.serialization.to_bytes({'params': ...})``; it is parsed with
  ``msgpack_restore`` (no pickle). A bare params tree (top keys ``encoder``/``decoder``/
  ``quantizer``) is accepted too. Keys and shapes are checked strictly, then dtypes and (unless
  ``allow_nonfinite``) finite values by ``common.check_weights``.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Google VQGAN tokenizer checkpoint not found: {path}")
  state, _ = loaders.read_msgpack(path)
  if not isinstance(state, Mapping):
    raise ValueError(f"{path}: expected a mapping at the top level, got {type(state).__name__}.")
  if "params" in state and isinstance(state["params"], Mapping):
    params = state["params"]
  elif {"encoder", "decoder", "quantizer"} <= set(state):
    params = state
  else:
    raise ValueError(f"{path}: top-level keys {sorted(state)} hold neither 'params' nor "
                     "'encoder'/'decoder'/'quantizer'; is this the tokenizer checkpoint?")
  vqgan_google.check_google_params(params, config, source=path)
  flat = flatten_paths(params)
  check_weights({"/".join(map(str, p)): v for p, v in flat.items()}, path, allow_nonfinite=allow_nonfinite)
  if param_dtype is not None:
    flat = {p: jnp.asarray(v, dtype=param_dtype) for p, v in flat.items()}
  return {"params": unflatten_paths(flat)}
