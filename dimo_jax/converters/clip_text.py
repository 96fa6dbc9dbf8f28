"""Meissonic's released text encoder (``CLIPTextModelWithProjection``) -> ``CLIPTextModel`` params.

Input: the released ``text_encoder/`` folder (``config.json`` + ``model.safetensors``; the float32
file is taken when the ``.fp16`` variant lies beside it), the Meissonic folder holding
``text_encoder/``, or a ``.safetensors`` file (with a ``config.json`` beside it when there is one).
Only safetensors are read (no pickle).

Architecture: from ``config.json`` when present (a ``clip_text_model`` config, or a full CLIP
config's ``text_config``), fields it omits taking transformers' ``CLIPTextConfig`` defaults (its
``save_pretrained`` drops values equal to them); otherwise from the tensor shapes with 64-wide
heads, exact GELU and ``eos_token_id`` 2 (OpenCLIP ViT-H's values).

Every key is checked by name and shape against ``clip_text_layout(config)`` (389 keys at the
released size); every missing, unexpected or mis-shaped key is named. The buffer
``text_model.embeddings.position_ids``, saved by transformers before 4.31, is accepted and ignored.
Conversions: Linear ``(out, in)`` -> kernel ``(in, out)``; LayerNorm ``weight`` -> ``scale``;
the 24 layers stacked on axis 0 under ``layers`` (the ``nn.scan`` layout).

Output folder: ``params.msgpack`` (``flax.serialization.to_bytes({'params': ...})``, float32) and
``config.json`` (``{"kind": "clip-text", "config": {...}, "source": ...}``), both written
atomically; read it back with ``load_clip_text``. Command line (wired in ``dimo_jax.convert``)::

  python -m dimo_jax.convert clip-text --input=<Meissonic>/text_encoder --output=<dir>
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from dimo_jax.converters import common
from dimo_jax.converters.safetensors_io import load_safetensors
from dimo_jax.networks.clip_text import ACTIVATIONS, CLIPTextConfig, CLIPTextModel
from dimo_jax.storage import text_files
from dimo_jax.storage.checkpoints import UserError

KIND = "clip-text"
PARAMS_FILE = common.CONVERTED_PARAMS
CONFIG_FILE = common.CONVERTED_CONFIG
WEIGHTS_FILE = "model.safetensors"
POSITION_IDS = "text_model.embeddings.position_ids"
_WHAT = "CLIP text tower (transformers CLIPTextModelWithProjection) layout"

# transformers' CLIPTextConfig defaults, for fields a saved config.json leaves out.
_TRANSFORMERS_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                              projection_dim=512, num_hidden_layers=12, num_attention_heads=8,
                              max_position_embeddings=77, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, eos_token_id=49407)
_FIELDS = dict(vocab_size="vocab_size", width="hidden_size", mlp_dim="intermediate_size",
               projection_dim="projection_dim", layers="num_hidden_layers",
               heads="num_attention_heads", max_positions="max_position_embeddings",
               activation="hidden_act", ln_eps="layer_norm_eps", eos_token_id="eos_token_id")
_FIELD_KINDS = dict(vocab_size="size", hidden_size="size", intermediate_size="size", projection_dim="size",
                   num_hidden_layers="size", num_attention_heads="size", max_position_embeddings="size",
                   hidden_act="text", layer_norm_eps="number", eos_token_id="count", architectures="texts",
                   text_config="object")

# Per-layer released names (after ``text_model.encoder.layers.<i>.``) -> scanned parameter paths.
_LAYER_MODULES = {
    "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
    "self_attn.out_proj": "out_proj", "layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2",
    "mlp.fc1": "fc1", "mlp.fc2": "fc2",
}
_LAYER_PREFIX = "text_model.encoder.layers."


def convert_command(output: str = "<dir>") -> str:
  return f"python -m dimo_jax.convert {KIND} --input=<Meissonic>/text_encoder --output={output}"


# ------------------------------------------------------------------------------------- layout


def _layer_shapes(c: CLIPTextConfig) -> Dict[str, Tuple[int, ...]]:
  w, m = c.width, c.mlp_dim
  out: Dict[str, Tuple[int, ...]] = {}
  for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
    out[f"self_attn.{proj}.weight"] = (w, w)
    out[f"self_attn.{proj}.bias"] = (w,)
  for ln in ("layer_norm1", "layer_norm2"):
    out[f"{ln}.weight"] = out[f"{ln}.bias"] = (w,)
  out.update({"mlp.fc1.weight": (m, w), "mlp.fc1.bias": (m,), "mlp.fc2.weight": (w, m),
              "mlp.fc2.bias": (w,)})
  return out


def clip_text_layout(config: CLIPTextConfig = CLIPTextConfig()) -> Dict[str, Tuple[int, ...]]:
  """``{released key: torch shape}`` of ``CLIPTextModelWithProjection`` (no ``position_ids``)."""
  c = config
  out: Dict[str, Tuple[int, ...]] = {
      "text_model.embeddings.token_embedding.weight": (c.vocab_size, c.width),
      "text_model.embeddings.position_embedding.weight": (c.max_positions, c.width),
  }
  per_layer = _layer_shapes(c)
  for i in range(c.layers):
    out.update({f"{_LAYER_PREFIX}{i}.{k}": s for k, s in per_layer.items()})
  out["text_model.final_layer_norm.weight"] = out["text_model.final_layer_norm.bias"] = (c.width,)
  out["text_projection.weight"] = (c.projection_dim, c.width)
  return out


def _leaf(module: str, torch_leaf: str) -> str:
  if torch_leaf == "bias":
    return "bias"
  return "scale" if "norm" in module else "kernel"


def flax_layout(config: CLIPTextConfig = CLIPTextConfig()) -> Dict[str, Tuple[int, ...]]:
  """``{parameter path: shape}`` of ``CLIPTextModel`` (equals its ``eval_shape`` tree)."""
  c = config
  out = {"token_embedding/embedding": (c.vocab_size, c.width),
         "position_embedding/embedding": (c.max_positions, c.width),
         "final_layer_norm/scale": (c.width,), "final_layer_norm/bias": (c.width,),
         "text_projection/kernel": (c.width, c.projection_dim)}
  for key, shape in _layer_shapes(c).items():
    module, leaf = key.rsplit(".", 1)
    path = f"layers/{_LAYER_MODULES[module]}/{_leaf(module, leaf)}"
    out[path] = (c.layers,) + tuple(reversed(shape))
  return out


# ------------------------------------------------------------------------------------- config


def config_from_transformers(d: Mapping[str, Any], source: str = "config.json") -> CLIPTextConfig:
  """A transformers CLIP (text) ``config.json`` -> ``CLIPTextConfig``."""
  fix = f"pass Meissonic's text_encoder/ folder with its released config.json: {convert_command()}"
  d = common.check_config_fields(d, _FIELD_KINDS, source, fix)
  if "text_config" in d and isinstance(d["text_config"], Mapping):
    projection = d.get("projection_dim")
    d = dict(common.check_config_fields(d["text_config"], _FIELD_KINDS, f"{source} (text_config)", fix))
    if projection is not None:
      d.setdefault("projection_dim", projection)
  architectures = d.get("architectures") or []
  if architectures and not any("CLIP" in a for a in architectures):
    raise UserError(f"{source}: describes {architectures}, not a CLIP text model; pass "
                    f"Meissonic's text_encoder/ folder: {convert_command()}")
  values = {ours: d.get(theirs, _TRANSFORMERS_DEFAULTS[theirs]) for ours, theirs in _FIELDS.items()}
  if values["activation"] not in ACTIVATIONS:
    raise UserError(f"{source}: hidden_act {values['activation']!r} is not supported; "
                    f"supported: {sorted(ACTIVATIONS)}.")
  return common.build_config(CLIPTextConfig, values, f"{source}: not a CLIP text model config", fix)


def infer_config(state_dict: Mapping[str, Any]) -> CLIPTextConfig:
  """The architecture read from tensor shapes; heads of 64, exact GELU, ``eos_token_id`` 2."""
  shape = {k: common.shape_of(v) for k, v in state_dict.items()}
  kwargs: Dict[str, Any] = {}
  tok = shape.get("text_model.embeddings.token_embedding.weight")
  if tok and len(tok) == 2:
    kwargs["vocab_size"], kwargs["width"] = tok
    kwargs["heads"] = max(1, tok[1] // 64)
  pos = shape.get("text_model.embeddings.position_embedding.weight")
  if pos:
    kwargs["max_positions"] = pos[0]
  fc1 = shape.get(f"{_LAYER_PREFIX}0.mlp.fc1.weight")
  if fc1:
    kwargs["mlp_dim"] = fc1[0]
  proj = shape.get("text_projection.weight")
  if proj:
    kwargs["projection_dim"] = proj[0]
  layers = 0
  while f"{_LAYER_PREFIX}{layers}.layer_norm1.weight" in shape:
    layers += 1
  if layers:
    kwargs["layers"] = layers
  return CLIPTextConfig(**kwargs)


# ------------------------------------------------------------------------------------- conversion


def convert_state_dict(state_dict: Mapping[str, Any], config: CLIPTextConfig, *,
                       source: str = "state dict", allow_nonfinite: bool = False) -> Dict[str, Any]:
  """Released tensors -> nested float32 params of ``CLIPTextModel(config)``, strictly checked
  (names, shapes, float dtypes and finite values: ``common.check_state_dict``)."""
  state_dict = {k: v for k, v in state_dict.items() if k != POSITION_IDS}
  common.check_state_dict(
      state_dict, clip_text_layout(config), source=source, what=_WHAT,
      fix=("Pass Meissonic's released text_encoder/ folder (config.json + model.safetensors; a "
           "CLIPTextModelWithProjection, with text_projection.weight) or its .safetensors file: "
           f"{convert_command()}; if the architecture differs from config.json, the file and the "
           "config do not belong together."), allow_nonfinite=allow_nonfinite)
  get = lambda k: common.to_numpy(state_dict[k]).astype(np.float32)
  flat = {
      "token_embedding/embedding": get("text_model.embeddings.token_embedding.weight"),
      "position_embedding/embedding": get("text_model.embeddings.position_embedding.weight"),
      "final_layer_norm/scale": get("text_model.final_layer_norm.weight"),
      "final_layer_norm/bias": get("text_model.final_layer_norm.bias"),
      "text_projection/kernel": get("text_projection.weight").T,
  }
  for key in _layer_shapes(config):
    module, leaf = key.rsplit(".", 1)
    stacked = np.stack([get(f"{_LAYER_PREFIX}{i}.{key}") for i in range(config.layers)])
    if stacked.ndim == 3:
      stacked = np.swapaxes(stacked, 1, 2)
    flat[f"layers/{_LAYER_MODULES[module]}/{_leaf(module, leaf)}"] = stacked
  return common.unflatten({k: np.ascontiguousarray(v) for k, v in flat.items()})


def convert_clip_text(input_path: str, output_dir: str,
                      config: Optional[CLIPTextConfig] = None, allow_nonfinite: bool = False) -> str:
  """Converts a released CLIP text encoder into ``output_dir``; returns ``output_dir``.

  ``config`` overrides the architecture read from ``config.json`` or inferred from the shapes;
  ``allow_nonfinite`` converts weights holding NaN / inf (refused otherwise).
  """
  weights, cfg_path = common.resolve_released_input(input_path, "text_encoder", WEIGHTS_FILE,
                                                     convert_command())
  state_dict = load_safetensors(weights)
  if config is None:
    if cfg_path is not None:
      config = config_from_transformers(text_files.read_json(cfg_path), cfg_path)
    else:
      config = infer_config(state_dict)
  params = convert_state_dict(state_dict, config, source=weights, allow_nonfinite=allow_nonfinite)
  common.write_converted(output_dir, KIND, config.to_dict(), params, weights)
  return output_dir


def load_clip_text(folder: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   **model_kwargs) -> Tuple[CLIPTextModel, Dict[str, Any]]:
  """A converted folder -> ``(CLIPTextModel, params)`` for ``model.apply({'params': params}, ids)``.

  ``dtype`` is the computation dtype, ``param_dtype`` the dtype the params are cast to;
  ``model_kwargs`` go to the module (``remat``, ``attention_impl``).
  """
  folder = os.fspath(folder)
  meta, flat = common.read_converted(folder, KIND, "CLIP text encoder", convert_command(folder))
  config = CLIPTextConfig.from_dict(meta["config"])
  common.check_converted(flat, flax_layout(config), folder, "CLIPTextModel parameters", convert_command(folder))
  params = common.unflatten({k: jnp.asarray(v, param_dtype) for k, v in flat.items()})
  return CLIPTextModel(config, dtype=dtype, param_dtype=param_dtype, **model_kwargs), params
