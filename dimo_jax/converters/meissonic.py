"""Meissonic's released transformer (diffusers ``transformer/``) -> ``MeissonicTransformer`` params.

Input: the released ``transformer/`` folder (``config.json`` + ``diffusion_pytorch_model
.safetensors``; the float32 file is taken when the ``.fp16`` variant lies beside it), the Meissonic
folder holding ``transformer/``, or a ``.safetensors`` file (with a ``config.json`` beside it when
there is one). Only safetensors are read (no pickle). The sizes come from the released
``config.json`` (``num_layers``, ``num_single_layers``, ``num_attention_heads``,
``attention_head_dim``, ``vocab_size``, ``codebook_size``, ``joint_attention_dim``,
``pooled_projection_dim``, ``axes_dims_rope``, ``downsample`` / ``upsample``); without one, the
released defaults of ``MeissonicConfig``.

Every key is checked by name and shape against ``transformer_layout(config)`` (867 keys, 1,006,946,304
parameters at the released size) and every missing, unexpected or mis-shaped key is named.
Conversions: Linear ``(out, in)`` -> ``kernel (in, out)``; 1x1 conv ``(out, in, 1, 1)`` -> ``(in, out)``;
the 2x2 down conv ``(out, in, 2, 2)`` -> ``(2, 2, in, out)``; the transposed 2x2 up conv ``(in, out, 2, 2)``
-> ``(2, 2, in, out)``; RMSNorm ``weight`` -> ``scale``; the per-layer tensors of the dual and single
blocks are stacked on axis 0 for the scanned layout (``config.scan``).

Output folder: ``params.msgpack`` (``flax.serialization.to_bytes({'params': ...})`` in
``config.param_dtype``) and ``config.json`` (``{"kind": "meissonic", "config": {MeissonicConfig
fields}, "source": ...}``), both written atomically; read it back with ``load_meissonic``.
Command line (wired in ``dimo_jax.convert``)::

  python -m dimo_jax.convert meissonic --input=<Meissonic>/transformer --output=<dir>
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from dimo_jax.converters import common
from dimo_jax.converters.safetensors_io import load_safetensors
from dimo_jax.networks.meissonic import MeissonicConfig, param_shapes, stack_layers, unstack_layers
from dimo_jax.storage import text_files

KIND = "meissonic"
PARAMS_FILE = common.CONVERTED_PARAMS
CONFIG_FILE = common.CONVERTED_CONFIG
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_WHAT = "Meissonic transformer (diffusers Transformer2DModel) layout"

# diffusers config.json key -> MeissonicConfig field.
_CONFIG_KEYS = {
    "num_layers": "num_layers", "num_single_layers": "num_single_layers",
    "num_attention_heads": "num_heads", "attention_head_dim": "head_dim",
    "vocab_size": "vocab_size", "codebook_size": "codebook_size",
    "joint_attention_dim": "text_dim", "pooled_projection_dim": "pooled_dim",
    "axes_dims_rope": "axes_dims_rope", "downsample": "downsample", "upsample": "upsample",
}

_CONFIG_KINDS = dict(num_layers="size", num_single_layers="size", num_attention_heads="size",
                     attention_head_dim="size", vocab_size="size", codebook_size="size",
                     joint_attention_dim="size", pooled_projection_dim="size", axes_dims_rope="sizes",
                     downsample="flag", upsample="flag")


def convert_command(output: str = "<dir>") -> str:
  return f"python -m dimo_jax.convert {KIND} --input=<Meissonic>/transformer --output={output}"


# ------------------------------------------------------------------------------------- layout


class _Entry(NamedTuple):
  key: str                 # diffusers state-dict key
  shape: Tuple[int, ...]   # its torch shape
  path: str                # flax path ("a/b/kernel") inside the block or at the top
  kind: str                # how the tensor is transposed (see _KINDS)


# kind -> (tensor transform, shape transform), torch -> flax.
_KINDS: Dict[str, Tuple[Callable, Callable]] = {
    "copy": (lambda a: a, lambda s: tuple(s)),
    "linear": (lambda a: a.T, lambda s: (s[1], s[0])),
    "conv1x1": (lambda a: a[:, :, 0, 0].T, lambda s: (s[1], s[0])),
    "down": (lambda a: a.transpose(2, 3, 1, 0), lambda s: (s[2], s[3], s[1], s[0])),
    "up": (lambda a: a.transpose(2, 3, 0, 1), lambda s: (s[2], s[3], s[0], s[1])),
}


def _linear(key: str, path: str, out: int, inp: int, bias: bool = True) -> List[_Entry]:
  entries = [_Entry(f"{key}.weight", (out, inp), f"{path}/kernel", "linear")]
  if bias:
    entries.append(_Entry(f"{key}.bias", (out,), f"{path}/bias", "copy"))
  return entries


def _norm(key: str, path: str, dim: int) -> List[_Entry]:
  return [_Entry(f"{key}.weight", (dim,), f"{path}/scale", "copy")]


def _dual_block(cfg: MeissonicConfig) -> List[_Entry]:
  d, hd, f = cfg.width, cfg.head_dim, cfg.mlp_ratio * cfg.width
  e = _linear("norm1.linear", "norm1/linear", 6 * d, d)
  e += _linear("norm1_context.linear", "norm1_context/linear", 6 * d, d)
  for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
    e += _linear(f"attn.{name}", f"attn/{name}", d, d)
  e += _linear("attn.to_out.0", "attn/to_out", d, d)
  for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
    e += _norm(f"attn.{name}", f"attn/{name}", hd)
  for ff in ("ff", "ff_context"):
    e += _linear(f"{ff}.net.0.proj", f"{ff}/fc1", f, d)
    e += _linear(f"{ff}.net.2", f"{ff}/fc2", d, f)
  return e


def _single_block(cfg: MeissonicConfig) -> List[_Entry]:
  d, hd, f = cfg.width, cfg.head_dim, cfg.mlp_ratio * cfg.width
  e = _linear("norm.linear", "norm/linear", 3 * d, d)
  for name in ("to_q", "to_k", "to_v"):
    e += _linear(f"attn.{name}", f"attn/{name}", d, d)
  for name in ("norm_q", "norm_k"):
    e += _norm(f"attn.{name}", f"attn/{name}", hd)
  e += _linear("proj_mlp", "proj_mlp", f, d)
  e += _linear("proj_out", "proj_out", d, d + f)
  return e


def _entries(cfg: MeissonicConfig) -> List[Tuple[_Entry, Optional[str], Optional[int]]]:
  """``(entry, block group or None, layer index or None)`` in state-dict (registration) order."""
  d = cfg.width
  top = lambda entries: [(e, None, None) for e in entries]
  out = top(_linear("time_text_embed.timestep_embedder.linear_1",
                    "time_text_embed/timestep_embedder/linear_1", d, 256)
            + _linear("time_text_embed.timestep_embedder.linear_2",
                      "time_text_embed/timestep_embedder/linear_2", d, d)
            + _linear("time_text_embed.text_embedder.linear_1",
                      "time_text_embed/text_embedder/linear_1", d, cfg.pooled_dim)
            + _linear("time_text_embed.text_embedder.linear_2",
                      "time_text_embed/text_embedder/linear_2", d, d)
            + _linear("context_embedder", "context_embedder", d, cfg.text_dim))
  for group, n, block in (("transformer_blocks", cfg.num_layers, _dual_block(cfg)),
                          ("single_transformer_blocks", cfg.num_single_layers, _single_block(cfg))):
    for i in range(n):
      out += [(e._replace(key=f"{group}.{i}.{e.key}"), group, i) for e in block]
  tail = [
      _Entry("embed.embeddings.weight", (cfg.vocab_size, d), "embed/embeddings/embedding", "copy"),
      *_norm("embed.layer_norm", "embed/layer_norm", d),
      _Entry("embed.conv.weight", (d, d, 1, 1), "embed/conv/kernel", "conv1x1"),
      _Entry("mlm_layer.conv1.weight", (d, d, 1, 1), "mlm_layer/conv1/kernel", "conv1x1"),
      *_norm("mlm_layer.layer_norm", "mlm_layer/layer_norm", d),
      _Entry("mlm_layer.conv2.weight", (cfg.codebook_size, d, 1, 1), "mlm_layer/conv2/kernel",
             "conv1x1"),
      *_linear("cond_embed.linear_1", "cond_embed/linear_1", d, cfg.cond_in_dim, bias=False),
      *_linear("cond_embed.linear_2", "cond_embed/linear_2", d, d, bias=False),
      *_norm("encoder_proj_layer_norm", "encoder_proj_layer_norm", d),
      *_norm("project_to_hidden_norm", "project_to_hidden_norm", d),
      *_linear("project_to_hidden", "project_to_hidden", d, d, bias=False),
      *_norm("project_from_hidden_norm", "project_from_hidden_norm", d),
      *_linear("project_from_hidden", "project_from_hidden", d, d, bias=False),
  ]
  if cfg.downsample:
    tail += [*_norm("down_block.downsample.norm", "down_block/norm", d),
             _Entry("down_block.downsample.conv.weight", (d, d, 2, 2), "down_block/kernel", "down")]
  if cfg.upsample:
    tail += [*_norm("up_block.upsample.norm", "up_block/norm", d),
             _Entry("up_block.upsample.conv.weight", (d, d, 2, 2), "up_block/kernel", "up")]
  return out + top(tail)


def transformer_layout(config: MeissonicConfig = MeissonicConfig()) -> Dict[str, Tuple[int, ...]]:
  """``{diffusers key: torch shape}`` of the released transformer at ``config`` (867 keys)."""
  return {e.key: e.shape for e, _, _ in _entries(config)}


def _flax_key(path: str, group: Optional[str], index: Optional[int], scan: bool) -> str:
  if group is None:
    return path
  return f"{group}/{path}" if scan else f"{group}_{index}/{path}"


def flax_layout(config: MeissonicConfig = MeissonicConfig()) -> Dict[str, Tuple[int, ...]]:
  """``{"a/b/kernel": shape}`` the conversion produces (scanned blocks stacked on axis 0)."""
  out = {}
  for e, group, index in _entries(config):
    shape = _KINDS[e.kind][1](e.shape)
    if group is not None and config.scan:
      n = config.num_layers if group == "transformer_blocks" else config.num_single_layers
      shape = (n, *shape)
    out[_flax_key(e.path, group, index, config.scan)] = shape
  return out


# ------------------------------------------------------------------------------------- config


def config_from_diffusers(d: Mapping[str, Any], source: str = "config.json",
                          **overrides) -> MeissonicConfig:
  """A ``MeissonicConfig`` from the released ``transformer/config.json`` (plus overrides)."""
  d = common.check_config_fields(d, _CONFIG_KINDS, source, f"pass Meissonic's transformer/ folder with its "
                                 f"released config.json: {convert_command()}")
  fields = {}
  for key, field in _CONFIG_KEYS.items():
    if key in d and d[key] is not None:
      fields[field] = tuple(d[key]) if key == "axes_dims_rope" else d[key]
  fields.update(overrides)
  return common.build_config(MeissonicConfig, fields, f"{source}: not a Meissonic transformer config",
                             f"pass Meissonic's transformer/ folder: {convert_command()}")


# ------------------------------------------------------------------------------------- convert


def convert_meissonic_state_dict(state_dict: Mapping[str, Any], config: MeissonicConfig, *,
                                 source: str = "state dict", allow_nonfinite: bool = False) -> Dict[str, Any]:
  """Released tensors -> nested params of ``MeissonicTransformer(config)``, strictly checked.

  Tensors are stored in ``config.param_dtype``; the dual / single blocks are stacked on axis 0
  when ``config.scan`` (else ``transformer_blocks_<i>`` / ``single_transformer_blocks_<i>``).
  """
  entries = _entries(config)
  common.check_state_dict(
      state_dict, {e.key: e.shape for e, _, _ in entries}, source=source, what=_WHAT,
      fix=("Pass Meissonic's released transformer/ folder (config.json + diffusion_pytorch_model"
           f".safetensors) or its .safetensors file: {convert_command()}; the sizes come from the "
           "config.json beside the weights, so a file and a config that do not belong together "
           "(or a file without its config.json at non-default sizes) show up here."),
      allow_nonfinite=allow_nonfinite)
  dtype = config.storage_dtype
  flat: Dict[str, Any] = {}
  for e, group, index in entries:
    value = _KINDS[e.kind][0](common.to_numpy(state_dict[e.key]).astype(np.float32))
    flat[_flax_key(e.path, group, index, False)] = np.ascontiguousarray(value.astype(dtype))
  params = common.unflatten(flat)
  if config.scan:
    params = stack_layers(params, config)
  got = {k: common.shape_of(v) for k, v in common.flatten(params).items()}
  want = param_shapes(config)
  if got != want:  # a bug in the tables above, not in the user's file
    raise RuntimeError(common.problems(
        "the converted params", "MeissonicTransformer's own layout", set(want) - set(got),
        set(got) - set(want), [(k, got[k], want[k]) for k in got if k in want and got[k] != want[k]],
        "This is a converter bug; please report it."))
  return params


def convert_meissonic(input_path: str, output_dir: str, config: Optional[MeissonicConfig] = None,
                      allow_nonfinite: bool = False, **overrides) -> MeissonicConfig:
  """Converts a released transformer into ``output_dir``; returns the config written.

  ``config`` replaces the sizes read from ``config.json``; ``overrides`` replace single fields
  (e.g. ``param_dtype="bfloat16"`` to store half the bytes, ``scan=False``); ``allow_nonfinite``
  converts weights holding NaN / inf (refused otherwise).
  """
  weights, cfg_path = common.resolve_released_input(input_path, "transformer", WEIGHTS_FILE,
                                                     convert_command())
  if config is None:
    if cfg_path is not None:
      config = config_from_diffusers(text_files.read_json(cfg_path), cfg_path)
    else:
      config = MeissonicConfig()
  if overrides:
    config = dataclasses.replace(config, **overrides)
  params = convert_meissonic_state_dict(load_safetensors(weights), config, source=weights,
                                        allow_nonfinite=allow_nonfinite)
  common.write_converted(output_dir, KIND, config.to_dict(), params, weights)
  return config


def load_meissonic(folder: str, dtype: Any = None,
                   **overrides) -> Tuple[MeissonicConfig, Dict[str, Any]]:
  """A converted folder -> ``(config, params)`` (NumPy leaves; ``MeissonicTransformer(config)``).

  ``dtype`` casts the stored params (and sets ``config.param_dtype``); ``overrides`` replace
  config fields, e.g. ``dtype="bfloat16"`` compute or ``scan=False`` (the blocks are unstacked).
  """
  folder = os.fspath(folder)
  meta, flat = common.read_converted(folder, KIND, "Meissonic transformer", convert_command(folder))
  stored = MeissonicConfig.from_dict(meta["config"])
  common.check_converted(flat, flax_layout(stored), folder, "MeissonicTransformer parameters",
                         convert_command(folder))
  if dtype is not None:
    overrides["param_dtype"] = jnp.dtype(dtype).name
  config = dataclasses.replace(stored, **overrides)
  cast = config.storage_dtype
  params = common.unflatten({k: np.asarray(v).astype(cast, copy=False) for k, v in flat.items()})
  if config.scan != stored.scan:
    params = stack_layers(params, config) if config.scan else unstack_layers(params, stored)
  return config, params
