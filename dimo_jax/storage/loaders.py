"""Loading what a run or a converter wrote: a teacher or a generator with the network its
``config.json`` describes, converted MaskGIT and VQGAN folders, and msgpack files (never a pickle).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Tuple, Union

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dimo_jax.core.trees import flatten, unflatten
from dimo_jax.networks import maskgit, vqgan, vqgan_google
from dimo_jax.storage import checkpoints


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


def load_converted(path: str):
  """A converted checkpoint directory -> ``(params, ema_params, config dict)`` (``checkpoints.load_params``)."""
  return checkpoints.load_params(path)


# ------------------------------------------------------------------------------------- VQGAN


def _vqgan_config(kind: str, fields: Optional[Mapping[str, Any]]):
  cls = {"taming": vqgan.TamingConfig, "google": vqgan_google.GoogleVQGANConfig}.get(kind)
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
  tree = {"params": unflatten({k: np.asarray(v) for k, v in flatten(tree["params"]).items()})}
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
    vqgan_google.check_google_params(tree["params"], cfg, source=params_path)
    module = vqgan_google.GoogleVQGAN(cfg, **({"dtype": dtype} if dtype else {}))
  variables = {"params": unflatten({k: jnp.asarray(v) for k, v in flatten(tree["params"]).items()})}
  return module, variables



GENERATOR_SUBDIR = "generator"


def generator_dir(workdir) -> str:
  """Where a distillation workdir keeps its params-only generator checkpoint."""
  return os.path.join(os.fspath(workdir), GENERATOR_SUBDIR)


def load_generator(path, *, use_ema: bool = True, overrides: Optional[dict] = None):
  """``(model, params, stored_config)`` of a one-step generator: a distillation workdir (its
  ``generator/`` folder) or a converted generator folder. EMA parameters when present."""
  path = os.fspath(path)
  source = generator_dir(path) if os.path.isdir(generator_dir(path)) else path
  if not os.path.isdir(source):
    raise FileNotFoundError(
        f"no generator at {path!r}: pass a distillation workdir (made by --config.mode=distill) or a "
        "folder written by `python -m dimo_jax.convert dimo-generator`")
  stored = checkpoints.read_config(source) if os.path.isdir(source) else None
  problem = _not_a_generator(path, stored)
  if problem:
    raise ValueError(problem)
  params, ema, stored = checkpoints.load_params(source)
  if stored is None:
    raise FileNotFoundError(f"no config.json in {source!r}; it is written by distillation or the converter")
  problem = _not_a_generator(path, stored)
  if problem:
    raise ValueError(problem)
  model = model_from_stored(stored, source, overrides)
  return model, (ema if use_ema and ema is not None else params), stored


def _not_a_generator(path, stored: Optional[dict]) -> Optional[str]:
  """The message for a folder whose ``config.json`` says it holds a teacher or an unfinished
  distillation (None for a generator, or a config that does not say)."""
  if not stored or stored.get("role") == "generator":
    return None
  path = os.fspath(path)
  role, mode = stored.get("role"), stored.get("mode")
  if role == "distill" or (role is None and mode == "distill"):
    return (f"{path} is a distillation that has not finished (no generator/ folder yet): rerun it to the end, "
            "or sample its teacher with --config.sample.model=teacher")
  converted = (stored.get("converted") or {}).get("kind", "")
  if role == "teacher" or (role is None and (mode == "teacher" or converted in ("valeoai", "google-maskgit"))):
    return (f"{path} holds a teacher, not a one-step generator (its config.json has no role 'generator'): "
            "sample it with --config.sample.model=teacher, or point --config.sample.checkpoint at a "
            "distillation workdir")
  return None


# ---------------------------------------------------------------------------- loading
def _sizes(stored: dict, path) -> dict:
  sizes = stored.get("dataset") or stored.get("data") or {}
  missing = [k for k in ("vocab_size", "seq_len", "num_classes") if sizes.get(k) is None]
  if missing:
    raise ValueError(f"config.json in {os.fspath(path)!r} lacks the data sizes {missing} under 'dataset'; "
                     "it was not written by teacher training or the converter")
  return sizes


def model_from_stored(stored: dict, path="", overrides: Optional[dict] = None):
  """Builds the network described by a stored ``config.json`` dict (``model`` + ``dataset``)."""
  if not stored or "model" not in stored:
    raise ValueError(f"no model config in {os.fspath(path)!r}/config.json; the checkpoint folder needs the "
                     "config.json written by `--config.mode=teacher` (or the converter)")
  model_cfg = dict(stored["model"])
  model_cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
  sizes = _sizes(stored, path)
  return maskgit.build_model(ml_collections.ConfigDict(model_cfg), codebook_size=int(sizes["vocab_size"]),
                            seq_len=int(sizes["seq_len"]), num_classes=int(sizes["num_classes"]))


def load_teacher(path, *, use_ema: bool = True, overrides: Optional[dict] = None):
  """``(model, params, stored_config)`` of a teacher workdir (EMA parameters when present and
  ``use_ema``). ``overrides`` replaces compute-only model fields (e.g. ``dtype``)."""
  if not path:
    raise ValueError("no teacher checkpoint given: set --config.sample.checkpoint=<teacher workdir> "
                     "(or --workdir)")
  params, ema, stored = checkpoints.load_params(path)
  if stored is None:
    raise FileNotFoundError(f"no config.json beside the checkpoints in {os.fspath(path)!r}; it is written "
                            "by `--config.mode=teacher` (or the converter) and is needed to rebuild the model")
  model = model_from_stored(stored, path, overrides)
  if use_ema and ema is None:
    logging.info("%s has no EMA parameters; sampling with the raw parameters.", path)
  chosen = ema if use_ema and ema is not None else params
  warn_nonfinite(chosen, f"the teacher in {os.fspath(path)}")
  return model, chosen, stored


def first_nonfinite(params) -> Optional[Tuple[str, int, int]]:
  """``(leaf path, non-finite entries, entries)`` of the first leaf (in key order) holding a NaN
  or an infinity; None when every value is finite."""
  for key, leaf in sorted(flatten(params).items()):
    if not (jnp.issubdtype(leaf.dtype, jnp.floating) or jnp.issubdtype(leaf.dtype, jnp.complexfloating)):
      continue
    bad = int(leaf.size - jnp.count_nonzero(jnp.isfinite(leaf)))
    if bad:
      return key, bad, int(leaf.size)
  return None


def warn_nonfinite(params, what: str) -> Optional[str]:
  """Checks ``params`` once; logs (and returns) a one-line warning naming the first non-finite
  leaf. A run goes on: the distillation step zeroes non-finite token gradients, counts them, and
  stops after ``config.distill.max_nonfinite_steps`` consecutive steps with any."""
  found = first_nonfinite(params)
  if found is None:
    return None
  key, bad, size = found
  message = (f"{what} has non-finite parameters: {key} holds {bad} of {size} values that are NaN or "
             "infinite (the first such leaf); its outputs will be non-finite where it is used. "
             "Retrain or reconvert it")
  logging.warning("%s.", message)
  return message
