"""Meissonic's released VQ model (diffusers ``VQModel``, ``vqvae/``) -> ``MeissonicVQModel`` params.

Input: the released ``vqvae/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``;
the float32 file is taken when the ``.fp16`` variant lies beside it), the Meissonic folder holding
``vqvae/``, or a ``.safetensors`` file (with a ``config.json`` beside it when there is one).
Only safetensors are read (no pickle). The architecture comes from the released ``config.json``
when present, else from the tensor shapes (GroupNorm groups cannot be read from shapes: 32).

Every key is checked by name and shape against ``meissonic_vq_layout(config)`` (277 keys at the
released size) and every missing, unexpected or mis-shaped key is named. Conversions: conv
``(out, in, kh, kw)`` -> ``(kh, kw, in, out)``, GroupNorm ``weight`` -> ``scale``, the codebook
``quantize.embedding.weight`` -> ``quantize/embedding``; module paths fold ``.<i>`` into ``_<i>``.

Output folder: ``params.msgpack`` (``flax.serialization.to_bytes({'params': ...})``, float32) and
``config.json`` (``{"kind": "meissonic-vq", "config": {...}, "source": ...}``), both written
atomically; read it back with ``load_meissonic_vq``. Command line (wired in ``dimo_jax.convert``)::

  python -m dimo_jax.convert meissonic-vq --input=<Meissonic>/vqvae --output=<dir>
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from dimo_jax.converters import common
from dimo_jax.converters.safetensors_io import load_safetensors
from dimo_jax.networks.meissonic_vq import MeissonicVQConfig, MeissonicVQModel
from dimo_jax.storage import text_files
from dimo_jax.storage.checkpoints import UserError

KIND = "meissonic-vq"
PARAMS_FILE = common.CONVERTED_PARAMS
CONFIG_FILE = common.CONVERTED_CONFIG
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_WHAT = "Meissonic VQ model (diffusers VQModel) layout"

_CONFIG_KINDS = dict(_class_name="text", mid_block_add_attention="flag", norm_type="text", act_fn="text",
                     down_block_types="texts", up_block_types="texts", in_channels="size",
                     out_channels="size", block_out_channels="sizes", layers_per_block="size",
                     latent_channels="size", num_vq_embeddings="size", vq_embed_dim="size",
                     norm_num_groups="size")


def convert_command(output: str = "<dir>") -> str:
  return f"python -m dimo_jax.convert {KIND} --input=<Meissonic>/vqvae --output={output}"


# ------------------------------------------------------------------------------------- layout


def _resnet_keys(prefix: str, cin: int, cout: int) -> Dict[str, Tuple[int, ...]]:
  out = {
      f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
      f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.conv1.bias": (cout,),
      f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
      f"{prefix}.conv2.weight": (cout, cout, 3, 3), f"{prefix}.conv2.bias": (cout,),
  }
  if cin != cout:
    out[f"{prefix}.conv_shortcut.weight"] = (cout, cin, 1, 1)
    out[f"{prefix}.conv_shortcut.bias"] = (cout,)
  return out


def meissonic_vq_layout(
    config: MeissonicVQConfig = MeissonicVQConfig()) -> Dict[str, Tuple[int, ...]]:
  """``{released key: torch shape}`` of a diffusers ``VQModel`` with this architecture."""
  c = config
  chans, latent, embed = c.block_out_channels, c.latent_channels, c.embed_dim
  out: Dict[str, Tuple[int, ...]] = {
      "quantize.embedding.weight": (c.num_vq_embeddings, embed),
      "quant_conv.weight": (embed, latent, 1, 1), "quant_conv.bias": (embed,),
      "post_quant_conv.weight": (latent, embed, 1, 1), "post_quant_conv.bias": (latent,),
  }
  # Encoder.
  out["encoder.conv_in.weight"] = (chans[0], c.in_channels, 3, 3)
  out["encoder.conv_in.bias"] = (chans[0],)
  prev = chans[0]
  for i, ch in enumerate(chans):
    for j in range(c.layers_per_block):
      out.update(_resnet_keys(f"encoder.down_blocks.{i}.resnets.{j}", prev if j == 0 else ch, ch))
    if i < len(chans) - 1:
      out[f"encoder.down_blocks.{i}.downsamplers.0.conv.weight"] = (ch, ch, 3, 3)
      out[f"encoder.down_blocks.{i}.downsamplers.0.conv.bias"] = (ch,)
    prev = ch
  for j in range(2):
    out.update(_resnet_keys(f"encoder.mid_block.resnets.{j}", chans[-1], chans[-1]))
  out["encoder.conv_norm_out.weight"] = out["encoder.conv_norm_out.bias"] = (chans[-1],)
  out["encoder.conv_out.weight"] = (latent, chans[-1], 3, 3)
  out["encoder.conv_out.bias"] = (latent,)
  # Decoder.
  rev = tuple(reversed(chans))
  out["decoder.conv_in.weight"] = (rev[0], latent, 3, 3)
  out["decoder.conv_in.bias"] = (rev[0],)
  for j in range(2):
    out.update(_resnet_keys(f"decoder.mid_block.resnets.{j}", rev[0], rev[0]))
  prev = rev[0]
  for i, ch in enumerate(rev):
    for j in range(c.layers_per_block + 1):
      out.update(_resnet_keys(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else ch, ch))
    if i < len(rev) - 1:
      out[f"decoder.up_blocks.{i}.upsamplers.0.conv.weight"] = (ch, ch, 3, 3)
      out[f"decoder.up_blocks.{i}.upsamplers.0.conv.bias"] = (ch,)
    prev = ch
  out["decoder.conv_norm_out.weight"] = out["decoder.conv_norm_out.bias"] = (chans[0],)
  out["decoder.conv_out.weight"] = (c.out_channels, chans[0], 3, 3)
  out["decoder.conv_out.bias"] = (c.out_channels,)
  return out


_INDEXED = re.compile(r"\.(\d+)(?=\.|$)")


def flax_path(key: str) -> str:
  """Released key -> ``/``-joined parameter path of ``MeissonicVQModel``."""
  if key == "quantize.embedding.weight":
    return "quantize/embedding"
  module, leaf = key.rsplit(".", 1)
  module = _INDEXED.sub(r"_\1", module)
  last = module.rsplit(".", 1)[-1]
  if leaf == "weight":
    leaf = "scale" if last.startswith("norm") or last == "conv_norm_out" else "kernel"
  return module.replace(".", "/") + "/" + leaf


def _flax_shape(shape: Tuple[int, ...]) -> Tuple[int, ...]:
  return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else tuple(shape)


def flax_layout(config: MeissonicVQConfig = MeissonicVQConfig()) -> Dict[str, Tuple[int, ...]]:
  """``{parameter path: shape}`` of ``MeissonicVQModel`` (equals its ``eval_shape`` tree)."""
  return {flax_path(k): _flax_shape(s) for k, s in meissonic_vq_layout(config).items()}


# ------------------------------------------------------------------------------------- config


def config_from_diffusers(d: Mapping[str, Any], source: str = "config.json") -> MeissonicVQConfig:
  """The released ``vqvae/config.json`` (diffusers ``VQModel``) -> ``MeissonicVQConfig``."""
  d = common.check_config_fields(d, _CONFIG_KINDS, source, f"pass Meissonic's vqvae/ folder with its released "
                                 f"config.json: {convert_command()}")
  name = d.get("_class_name", "VQModel")
  if name != "VQModel":
    raise UserError(f"{source}: describes a {name!r}, not a diffusers VQModel; pass Meissonic's "
                    f"vqvae/ folder: {convert_command()}")
  unsupported = []
  if d.get("mid_block_add_attention", True):  # diffusers' default builds mid-block attention
    unsupported.append("mid_block_add_attention=true or absent (Meissonic's VQ has no attention)")
  if d.get("norm_type", "group") != "group":
    unsupported.append(f"norm_type={d['norm_type']!r} (only 'group')")
  if d.get("act_fn", "silu") != "silu":
    unsupported.append(f"act_fn={d['act_fn']!r} (only 'silu')")
  for field, want in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):
    if any(t != want for t in d.get(field, ())):
      unsupported.append(f"{field}={list(d[field])} (only {want})")
  if unsupported:
    raise UserError(f"{source}: this VQModel differs from Meissonic's: " + "; ".join(unsupported))
  fields = dict(in_channels="in_channels", out_channels="out_channels",
                block_out_channels="block_out_channels", layers_per_block="layers_per_block",
                latent_channels="latent_channels", num_vq_embeddings="num_vq_embeddings",
                vq_embed_dim="vq_embed_dim", norm_num_groups="norm_num_groups")
  kwargs = {ours: d[theirs] for ours, theirs in fields.items() if theirs in d}
  return common.build_config(MeissonicVQConfig, kwargs, f"{source}: not a Meissonic VQ model config",
                             f"pass Meissonic's vqvae/ folder: {convert_command()}")


def infer_config(state_dict: Mapping[str, Any]) -> MeissonicVQConfig:
  """The architecture read from tensor shapes (defaults where a key is absent; groups: 32)."""
  shape = {k: common.shape_of(v) for k, v in state_dict.items()}
  base = MeissonicVQConfig()
  chans = []
  while f"encoder.down_blocks.{len(chans)}.resnets.0.conv1.weight" in shape:
    chans.append(shape[f"encoder.down_blocks.{len(chans)}.resnets.0.conv1.weight"][0])
  layers = 0
  while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in shape:
    layers += 1
  kwargs: Dict[str, Any] = {}
  if chans:
    kwargs["block_out_channels"] = tuple(chans)
  if layers:
    kwargs["layers_per_block"] = layers
  if "post_quant_conv.weight" in shape:
    kwargs["latent_channels"] = shape["post_quant_conv.weight"][0]
  if "quantize.embedding.weight" in shape:
    rows, width = shape["quantize.embedding.weight"]
    kwargs["num_vq_embeddings"] = rows
    if width != kwargs.get("latent_channels", base.latent_channels):
      kwargs["vq_embed_dim"] = width
  if "encoder.conv_in.weight" in shape:
    kwargs["in_channels"] = shape["encoder.conv_in.weight"][1]
  if "decoder.conv_out.weight" in shape:
    kwargs["out_channels"] = shape["decoder.conv_out.weight"][0]
  groups = base.norm_num_groups
  if any(c % groups for c in kwargs.get("block_out_channels", ())):
    groups = int(np.gcd.reduce(np.asarray(kwargs["block_out_channels"])))
  return MeissonicVQConfig(norm_num_groups=groups, **kwargs)


# ------------------------------------------------------------------------------------- conversion


def convert_state_dict(state_dict: Mapping[str, Any], config: MeissonicVQConfig, *,
                       source: str = "state dict", allow_nonfinite: bool = False) -> Dict[str, Any]:
  """Released tensors -> nested float32 params of ``MeissonicVQModel(config)``, strictly checked."""
  layout = meissonic_vq_layout(config)
  common.check_state_dict(
      state_dict, layout, source=source, what=_WHAT,
      fix=("Pass Meissonic's released vqvae/ folder (config.json + diffusion_pytorch_model"
           f".safetensors) or its .safetensors file: {convert_command()}; if the architecture "
           "differs from config.json, the file and the config do not belong together."),
      allow_nonfinite=allow_nonfinite)
  flat = {}
  for key in layout:
    value = common.to_numpy(state_dict[key]).astype(np.float32)
    if value.ndim == 4:
      value = np.transpose(value, (2, 3, 1, 0))
    flat[flax_path(key)] = np.ascontiguousarray(value)
  return common.unflatten(flat)


def convert_meissonic_vq(input_path: str, output_dir: str,
                         config: Optional[MeissonicVQConfig] = None, allow_nonfinite: bool = False) -> str:
  """Converts a released VQ model into ``output_dir``; returns ``output_dir``.

  ``config`` overrides the architecture read from ``config.json`` or inferred from the shapes;
  ``allow_nonfinite`` converts weights holding NaN / inf (refused otherwise).
  """
  weights, cfg_path = common.resolve_released_input(input_path, "vqvae", WEIGHTS_FILE, convert_command())
  state_dict = load_safetensors(weights)
  if config is None:
    if cfg_path is not None:
      config = config_from_diffusers(text_files.read_json(cfg_path), cfg_path)
    else:
      config = infer_config(state_dict)
  params = convert_state_dict(state_dict, config, source=weights, allow_nonfinite=allow_nonfinite)
  common.write_converted(output_dir, KIND, config.to_dict(), params, weights)
  return output_dir


def load_meissonic_vq(folder: str, dtype: Any = jnp.float32,
                      param_dtype: Any = jnp.float32) -> Tuple[MeissonicVQModel, Dict[str, Any]]:
  """A converted folder -> ``(MeissonicVQModel, params)``, for ``model.apply({'params': params})``.

  ``dtype`` is the computation dtype, ``param_dtype`` the dtype the params are cast to.
  """
  folder = os.fspath(folder)
  meta, flat = common.read_converted(folder, KIND, "Meissonic VQ model", convert_command(folder))
  config = MeissonicVQConfig.from_dict(meta["config"])
  common.check_converted(flat, flax_layout(config), folder, "MeissonicVQModel parameters",
                         convert_command(folder))
  params = common.unflatten({k: jnp.asarray(v, param_dtype) for k, v in flat.items()})
  return MeissonicVQModel(config, dtype=dtype, param_dtype=param_dtype), params
