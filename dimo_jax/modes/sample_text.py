"""Text-to-image sampling with Meissonic (``mode=sample`` with ``config.sample.model='meissonic'``).

``run(config, workdir)`` reads ``config.sample.prompts`` (a UTF-8 file, one prompt per line),
tokenises the prompts with the released CLIP tokenizer (``config.meissonic.tokenizer``), encodes
them with the converted CLIP text tower in batches under ``jax.jit`` (the penultimate hidden
states and the projected pooled embedding; the negative prompt once), draws the image tokens with
Meissonic's multi-step sampler (``core.meissonic_sampler.meissonic_sample``, jit-compiled once:
guidance against ``config.sample.negative_prompt``, the Gumbel temperature ramp, the
micro-conditions) in batches of ``config.sample.batch_size``, and decodes each image on its own in
float32 with the converted VQ model. Image ``i`` draws with its own key
``PRNGKey(config.sample.seed + i)``, so it does not depend on the other prompts of its batch: a
prompt file holding that prompt alone, run with ``--config.sample.seed=<its seed>``, draws it
again (up to floating-point differences between batch sizes).

Written to ``config.sample.output`` (default ``<workdir>/samples``):

- ``<NNNNN>_<slug>.png``: one PNG per prompt, ``NNNNN`` its line number among the prompts
  (from 0) and ``slug`` the prompt's first words, lower case, joined by ``-``;
- ``index.jsonl``: one JSON object per image, ``{"index", "file", "prompt", "seed"}``, the prompt
  in full;
- ``grid.png``: every image, ``config.sample.grid_columns`` per row, each shrunk to
  ``config.sample.grid_image_size`` pixels (0: full size);
- ``settings.json``: the negative prompt, steps, guidance, temperatures, micro-conditions and the
  folders the networks came from.

A missing or wrong converted folder stops before anything is loaded, with the convert command to
run (``converters.commands.check_meissonic_paths``); so do a missing prompt file, an empty one and
a tokenizer folder lacking its files.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile
import time
import unicodedata
from typing import Any, Dict, List, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dimo_jax.converters import clip_text as clip_conv
from dimo_jax.converters import commands
from dimo_jax.converters import meissonic as meissonic_conv
from dimo_jax.converters import meissonic_vq as vq_conv
from dimo_jax.core import meissonic_sampler as ms
from dimo_jax.data import image_grids, text
from dimo_jax.networks.meissonic import MeissonicTransformer

INDEX_FILE = "index.jsonl"
GRID_FILE = "grid.png"
SETTINGS_FILE = "settings.json"
SLUG_CHARS = 48


# ---------------------------------------------------------------------------- names


def prompt_slug(prompt: str, max_chars: int = SLUG_CHARS) -> str:
  """The prompt's words as ``a-cat-on-a-mat``: ASCII letters and digits, lower case, cut at a
  word boundary within ``max_chars`` characters (``prompt`` when nothing is left)."""
  ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
  words = re.findall(r"[a-z0-9]+", ascii_text.lower())
  slug = ""
  for word in words:
    candidate = f"{slug}-{word}" if slug else word
    if len(candidate) > max_chars:
      break
    slug = candidate
  if not slug and words:
    slug = words[0][:max_chars]
  return slug or "prompt"


def image_name(index: int, prompt: str) -> str:
  """``<NNNNN>_<slug>.png``: the prompt's index (from 0) and its slug."""
  return f"{index:05d}_{prompt_slug(prompt)}.png"


# ---------------------------------------------------------------------------- settings


class Settings(NamedTuple):
  prompts_file: str
  resolution: int
  negative_prompt: str
  steps: int
  guidance: float
  temperature: Tuple[float, float]
  micro_conds: Tuple[float, ...]
  batch_size: int
  seed: int
  output: str
  grid_columns: int
  grid_image_size: int


def read_settings(config, workdir: str) -> Settings:
  """``config.sample``'s text-to-image settings, checked (a ``ValueError`` names the flag)."""
  sc = config.sample
  prompts = sc.get("prompts", "")
  if not prompts:
    raise ValueError("config.sample.prompts is not set; pass --config.sample.prompts=<file>, a UTF-8 "
                     "text file with one prompt per line")
  steps = int(sc.get("steps", ms.DEFAULT_STEPS))
  if steps < 1:
    raise ValueError(f"config.sample.steps must be >= 1, got {steps}")
  temperature = tuple(float(t) for t in sc.get("temperature", ms.DEFAULT_TEMPERATURE))
  if len(temperature) != 2:
    raise ValueError(f"config.sample.temperature must be (first, last), got {temperature}")
  micro = tuple(float(m) for m in sc.get("micro_conds", ms.DEFAULT_MICRO_CONDS))
  if len(micro) != 5:
    raise ValueError(f"config.sample.micro_conds must hold 5 values (width, height, crop top, crop "
                     f"left, aesthetic score), got {micro}")
  batch_size = int(sc.get("batch_size", 1))
  if batch_size < 1:
    raise ValueError(f"config.sample.batch_size must be >= 1, got {batch_size}")
  output = sc.get("output", "") or os.path.join(workdir, "samples")
  if output.endswith(".npy") or output.endswith(".png"):
    raise ValueError(f"config.sample.output={output!r} names a file; text-to-image sampling writes a "
                     "folder of PNGs, pass a folder (default <workdir>/samples)")
  resolution = int(sc.get("resolution", 1024))
  if resolution < 1:
    raise ValueError(f"config.sample.resolution must be a positive number of pixels, got {resolution}")
  return Settings(prompts_file=prompts, resolution=resolution, negative_prompt=str(sc.get("negative_prompt", "")),
                  steps=steps, guidance=float(sc.get("guidance", ms.DEFAULT_GUIDANCE)),
                  temperature=temperature, micro_conds=micro, batch_size=batch_size,
                  seed=int(sc.get("seed", config.get("seed", 0))), output=output,
                  grid_columns=int(sc.get("grid_columns", 4)),
                  grid_image_size=int(sc.get("grid_image_size", 256)))


# ---------------------------------------------------------------------------- networks


@dataclasses.dataclass
class Networks:
  """The loaded networks of ``config.meissonic``; parameters on the default device."""
  transformer: MeissonicTransformer
  transformer_params: Any
  text_model: Any
  text_params: Any
  vq_model: Any
  vq_params: Any
  tokenizer: text.CLIPTokenizer


def load_networks(config, resolution: int = 1024) -> Networks:
  """Tokenizer, CLIP text tower, transformer and VQ model of ``config.meissonic``, with their
  sizes checked against each other (a ``ValueError`` names the two folders that disagree); the
  transformer's token grid is ``resolution`` over the VQ model's downsampling factor (64 x 64
  tokens at 1024 px)."""
  mc = config.meissonic
  commands.check_meissonic_paths(config)
  text_model, text_params = clip_conv.load_clip_text(
      mc.text_encoder, dtype=jnp.dtype(mc.get("text_dtype", "float32")))
  tokenizer = text.load_tokenizer(mc.tokenizer, max_length=text_model.config.max_positions)
  tcfg, tparams = meissonic_conv.load_meissonic(mc.transformer,
                                                dtype=mc.get("param_dtype", "bfloat16"))
  tcfg = dataclasses.replace(tcfg, dtype=mc.get("dtype", "bfloat16"),
                             remat=mc.get("remat", "none"),
                             attention_impl=mc.get("attention_impl", "") or None)
  vq_model, vq_params = vq_conv.load_meissonic_vq(mc.vqvae, dtype=jnp.dtype(mc.get("vq_dtype", "float32")))
  clip_cfg, vq_cfg = text_model.config, vq_model.config
  factor = vq_cfg.downsample_factor
  grid = resolution // factor
  if resolution % factor or grid < 1 or (tcfg.downsample and grid % 2):
    raise ValueError(f"config.sample.resolution={resolution} must be a multiple of "
                     f"{factor * (2 if tcfg.downsample else 1)} pixels (the VQ model's factor {factor}"
                     f"{', times 2 for the token compression' if tcfg.downsample else ''})")
  tcfg = dataclasses.replace(tcfg, grid=grid)
  checks = [
      (clip_cfg.width == tcfg.text_dim, f"the text encoder's width {clip_cfg.width} is not the "
       f"transformer's text width {tcfg.text_dim}", mc.text_encoder, mc.transformer),
      (clip_cfg.projection_dim == tcfg.pooled_dim, f"the text encoder's projection "
       f"{clip_cfg.projection_dim} is not the transformer's pooled width {tcfg.pooled_dim}",
       mc.text_encoder, mc.transformer),
      (vq_cfg.num_vq_embeddings == tcfg.codebook_size, f"the VQ model's {vq_cfg.num_vq_embeddings} "
       f"codes are not the transformer's codebook of {tcfg.codebook_size}", mc.vqvae, mc.transformer),
      (tokenizer.vocab_size <= clip_cfg.vocab_size, f"the tokenizer's {tokenizer.vocab_size} tokens "
       f"exceed the text encoder's vocabulary of {clip_cfg.vocab_size}", mc.tokenizer, mc.text_encoder),
  ]
  for ok, what, a, b in checks:
    if not ok:
      raise ValueError(f"{what} ({a} and {b}): these folders do not belong to one Meissonic release; "
                       "convert all three networks from the same release")
  return Networks(MeissonicTransformer(tcfg), jax.device_put(tparams), text_model,
                  jax.device_put(text_params), vq_model, jax.device_put(vq_params), tokenizer)


# ---------------------------------------------------------------------------- stages


def _padded_batches(n: int, batch_size: int):
  """``(rows, count)`` per batch: ``batch_size`` row indices, the last batch padded by repeating
  its last row, and how many of them are real."""
  for start in range(0, n, batch_size):
    rows = list(range(start, min(start + batch_size, n)))
    count = len(rows)
    rows += [rows[-1]] * (batch_size - count)
    yield np.asarray(rows), count


@functools.lru_cache(maxsize=8)
def _text_encoder(model):
  """``encode(params, ids) -> (penultimate, pooled)`` in float32, jit-compiled once per model."""
  def encode(params, ids):
    out = model.apply({"params": params}, ids)
    return out["penultimate"].astype(jnp.float32), out["pooled"].astype(jnp.float32)
  return jax.jit(encode)


@functools.lru_cache(maxsize=8)
def _image_decoder(model):
  """``decode(params, ids [1, h, w]) -> [1, H, W, 3]``, jit-compiled once per model."""
  return jax.jit(lambda params, ids: model.apply({"params": params}, ids, method="decode_ids"))


def encode_prompts(nets: Networks, prompts: Sequence[str], batch_size: int) -> Dict[str, np.ndarray]:
  """Prompts -> ``{"text": [N, T, D], "pooled": [N, P]}`` (float32, on the host), in batches of
  ``batch_size`` (the last one padded) under one jit-compiled program."""
  encode = _text_encoder(nets.text_model)
  ids = nets.tokenizer.encode(list(prompts))
  batch_size = min(batch_size, len(prompts))
  texts, pooled = [], []
  for rows, count in _padded_batches(len(prompts), batch_size):
    t, p = encode(nets.text_params, jnp.asarray(ids[rows]))
    texts.append(np.asarray(t)[:count])
    pooled.append(np.asarray(p)[:count])
  return {"text": np.concatenate(texts), "pooled": np.concatenate(pooled)}


def make_decoder(nets: Networks):
  """``decode(ids [g*g]) -> image [H, W, 3]`` in ``[0, 1]``: one image at a time, jit-compiled."""
  decode, grid = _image_decoder(nets.vq_model), nets.transformer.config.grid
  return lambda ids: np.asarray(decode(nets.vq_params, jnp.asarray(ids).reshape(1, grid, grid)))[0]


def _thumbnail(image: np.ndarray, size: int) -> np.ndarray:
  """``image`` shrunk to ``size`` pixels on its longer side (box filter); as it is when smaller."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  h, w = image.shape[:2]
  if size <= 0 or max(h, w) <= size:
    return image
  scale = size / max(h, w)
  pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  small = Image.fromarray(pixels).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                         Image.BOX)
  return np.asarray(small, np.float32) / 255.0


def _write_text_atomic(path: str, content: str) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(content)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# ---------------------------------------------------------------------------- run


def run(config, workdir: str) -> Dict[str, Any]:
  """``mode=sample`` for Meissonic: prompts file -> PNGs, ``index.jsonl``, ``grid.png``.

  Returns ``{"output", "images", "index", "grid", "num"}`` (paths; ``num`` images).
  """
  if "meissonic" not in config:
    raise ValueError("text-to-image sampling needs the meissonic section of configs/meissonic.py; "
                     "use --config=configs/meissonic.py")
  settings = read_settings(config, workdir)
  commands.check_meissonic_paths(config)
  prompts = text.read_prompts(settings.prompts_file)
  text.load_tokenizer(config.meissonic.tokenizer)  # a missing tokenizer file stops here, early
  t0 = time.perf_counter()
  nets = load_networks(config, settings.resolution)
  logging.info("Loaded the Meissonic networks in %.1f s", time.perf_counter() - t0)

  # The negative prompt rides along as row 0: one compiled text program for both.
  encoded = encode_prompts(nets, [settings.negative_prompt, *prompts], settings.batch_size)
  negative = {k: v[:1] for k, v in encoded.items()}
  conds = {k: v[1:] for k, v in encoded.items()}
  nets.text_params = None  # the text tower is no longer needed
  tcfg = nets.transformer.config
  micro = np.asarray(settings.micro_conds, np.float32)
  neg_cond = {"text": negative["text"], "pooled": negative["pooled"], "micro": micro[None]}
  apply_fn = ms.model_apply_fn(nets.transformer)
  decode = make_decoder(nets)

  out = settings.output
  is_writer = jax.process_index() == 0
  if is_writer:
    os.makedirs(out, exist_ok=True)
  batch_size = min(settings.batch_size, len(prompts))
  records: List[Dict[str, Any]] = []
  thumbs, paths = [], []
  for number, (rows, count) in enumerate(_padded_batches(len(prompts), batch_size)):
    t0 = time.perf_counter()
    cond = {"text": conds["text"][rows], "pooled": conds["pooled"][rows],
            "micro": np.broadcast_to(micro, (len(rows), micro.size))}
    seeds = [settings.seed + int(r) for r in rows]
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    tokens = ms.meissonic_sample(
        apply_fn, nets.transformer_params, keys, cond, neg_cond, seq_len=tcfg.seq_len,
        mask_id=tcfg.mask_id, codebook_size=tcfg.codebook_size, steps=settings.steps,
        guidance=settings.guidance, temperature=settings.temperature)
    tokens = np.asarray(tokens)
    t_sample = time.perf_counter() - t0
    for j in range(count):
      index = int(rows[j])
      image = decode(tokens[j])
      name = image_name(index, prompts[index])
      path = os.path.join(out, name)
      if is_writer:
        image_grids.save_image_grid(image[None], path, ncols=1, scale=1)
      thumbs.append(_thumbnail(image, settings.grid_image_size))
      paths.append(path)
      records.append({"index": index, "file": name, "prompt": prompts[index], "seed": seeds[j]})
    logging.info("Batch %d: %d images, sampled in %.1f s (%d steps), decoded in %.1f s", number,
                 count, t_sample, settings.steps, time.perf_counter() - t0 - t_sample)

  index_path, grid_path = os.path.join(out, INDEX_FILE), os.path.join(out, GRID_FILE)
  if is_writer:
    _write_text_atomic(index_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    columns = max(1, min(settings.grid_columns, len(thumbs)))
    image_grids.save_image_grid(np.stack(thumbs), grid_path, ncols=columns, scale=1)
    mc = config.meissonic
    meta = {"prompts": os.path.abspath(settings.prompts_file), "num": len(prompts),
            "negative_prompt": settings.negative_prompt, "steps": settings.steps,
            "guidance": settings.guidance, "temperature": list(settings.temperature),
            "micro_conds": list(settings.micro_conds), "seed": settings.seed,
            "seed_rule": "image i draws with PRNGKey(seed + i)", "batch_size": batch_size,
            "transformer": mc.transformer, "vqvae": mc.vqvae, "text_encoder": mc.text_encoder,
            "tokenizer": mc.tokenizer, "dtype": tcfg.dtype, "param_dtype": tcfg.param_dtype,
            "resolution": settings.resolution}
    _write_text_atomic(os.path.join(out, SETTINGS_FILE), json.dumps(meta, indent=2) + "\n")
  logging.info("Wrote %d images, %s and %s to %s", len(paths), INDEX_FILE, GRID_FILE, out)
  return {"output": out, "images": paths, "index": index_path, "grid": grid_path, "num": len(paths)}
