"""Text-to-image sampling with Meissonic (``mode=sample`` of ``config.family='meissonic'``; the
images ``evaluation.t2i_export`` writes for the benchmarks are drawn here too).

``write_prompt_images(config, workdir)`` reads ``config.sample.prompts`` (a UTF-8 file, one prompt per line),
tokenises the prompts with the released CLIP tokenizer (``config.meissonic.tokenizer``), encodes
them with the converted CLIP text tower in batches under ``jax.jit`` (the penultimate hidden
states and the projected pooled embedding; the negative prompt once), draws the image tokens with
Meissonic's multi-step sampler (``core.samplers.gumbel_ramp_sampler``, jit-compiled once:
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

One-step sampling from a distilled generator: ``config.sample.generator`` names a Di[M]O workdir's
``generator`` folder (``mode=distill`` writes it; its EMA parameters are used when present; the
workdir itself is accepted too) or a converted transformer folder (``python -m dimo_jax.convert
meissonic`` of a released one-step generator, e.g. ``Yuanzhi/DiMO``'s ``meissonic/transformer``).
Each image is then ONE forward of the generator (``core.samplers.one_step_cond_sampler``,
per image with its own key, no guidance) with ``config.sample.one_step``'s ``r_init``, ``sigma``
and ``temperature``; the teacher's transformer folder is not read, the VQ model, text encoder and
tokenizer are. ``settings.json`` records the generator folder and the three values in place of the
steps and guidance.

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
from dimo_jax.core import samplers
from dimo_jax.data import image_grids, text
from dimo_jax.evaluation.settings import sampler_settings_from_config
from dimo_jax.networks import conditioning
from dimo_jax.networks.meissonic import DEFAULT_MICRO_CONDS, MeissonicConfig, MeissonicTransformer
from dimo_jax.storage import checkpoints, loaders

INDEX_FILE = "index.jsonl"
GRID_FILE = "grid.png"
SETTINGS_FILE = "settings.json"
SLUG_CHARS = 48
DEFAULT_GUIDANCE = 9.0
DEFAULT_TEMPERATURE = (2.0, 0.0)  # the Gumbel noise on the confidence, first step -> last step


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
  generator: str = ""  # a one-step generator folder; "" = the teacher's multi-step sampler
  one_step: Tuple[float, float, float] = (0.5, 0.3, 1.0)  # r_init, sigma, temperature


def read_settings(config, workdir: str, require_prompts: bool = True) -> Settings:
  """``config.sample``'s text-to-image settings, checked (a ``ValueError`` names the flag).

  ``require_prompts=False`` (``mode=evaluate``, whose prompts are the benchmarks') lets
  ``config.sample.prompts`` be empty.
  """
  sc = config.sample
  prompts = sc.get("prompts", "")
  if not prompts and require_prompts:
    raise ValueError("config.sample.prompts is not set; pass --config.sample.prompts=<file>, a UTF-8 "
                     "text file with one prompt per line")
  common = sampler_settings_from_config(config)
  steps = common.steps
  temperature = tuple(float(t) for t in sc.get("temperature", DEFAULT_TEMPERATURE))
  if len(temperature) != 2:
    raise ValueError(f"config.sample.temperature must be (first, last), got {temperature}")
  micro = tuple(float(m) for m in sc.get("micro_conds", DEFAULT_MICRO_CONDS))
  if len(micro) != 5:
    raise ValueError(f"config.sample.micro_conds must hold 5 values (width, height, crop top, crop "
                     f"left, aesthetic score), got {micro}")
  batch_size = common.batch_size or 1
  output = sc.get("output", "") or os.path.join(workdir, "samples")
  if output.endswith(".npy") or output.endswith(".png"):
    raise ValueError(f"config.sample.output={output!r} names a file; text-to-image sampling writes a "
                     "folder of PNGs, pass a folder (default <workdir>/samples)")
  resolution = int(sc.get("resolution", 1024))
  if resolution < 1:
    raise ValueError(f"config.sample.resolution must be a positive number of pixels, got {resolution}")
  one = sc.get("one_step", None) or {}
  r_init, sigma, gen_temp = (float(one.get("r_init", 0.5)), float(one.get("sigma", 0.3)),
                             float(one.get("temperature", 1.0)))
  if not 0.0 <= r_init <= 1.0:
    raise ValueError(f"config.sample.one_step.r_init must lie in [0, 1] (the share of masked "
                     f"tokens in x_init), got {r_init}")
  if sigma < 0.0 or gen_temp <= 0.0:
    raise ValueError(f"config.sample.one_step.sigma must be >= 0 and temperature > 0, got "
                     f"sigma={sigma}, temperature={gen_temp}")
  return Settings(prompts_file=prompts, resolution=resolution, negative_prompt=str(sc.get("negative_prompt", "")),
                  steps=steps, guidance=float(sc.get("guidance", DEFAULT_GUIDANCE)),
                  temperature=temperature, micro_conds=micro, batch_size=batch_size,
                  seed=common.seed, output=output,
                  grid_columns=int(sc.get("grid_columns", 4)),
                  grid_image_size=int(sc.get("grid_image_size", 256)),
                  generator=str(sc.get("generator", "") or ""), one_step=(r_init, sigma, gen_temp))


def sampler_settings(settings: Settings) -> Dict[str, Any]:
  """What decides the pixels besides the networks and the prompt: the teacher's steps, guidance,
  negative prompt and temperature ramp, or the generator's folder, ``r_init``, ``sigma`` and
  temperature; the micro-conditions, seed and resolution either way (for ``settings.json``)."""
  common = {"micro_conds": list(settings.micro_conds), "seed": settings.seed,
            "resolution": settings.resolution}
  if settings.generator:
    r_init, sigma, temperature = settings.one_step
    folder = os.path.abspath(resolve_generator(settings.generator)[1])
    return {"model": "generator", "generator": folder, "steps": 1,
            "r_init": r_init, "sigma": sigma, "gen_temperature": temperature, **common}
  return {"model": "teacher", "steps": settings.steps, "guidance": settings.guidance,
          "negative_prompt": settings.negative_prompt, "temperature": list(settings.temperature),
          **common}


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


GENERATOR_HINT = ("point --config.sample.generator at the generator/ folder of a finished "
                  "mode=distill run (<workdir>/generator), or at a converted one-step transformer: "
                  "python -m dimo_jax.convert meissonic --input=models/meissonic/transformer "
                  "--output=pretrained/dimo_meissonic/transformer (the released Yuanzhi/DiMO)")


def resolve_generator(path: str) -> Tuple[str, str]:
  """``(kind, folder)`` of a one-step generator given as ``path``: ``"converted"`` (a folder of
  ``python -m dimo_jax.convert meissonic``) or ``"checkpoint"`` (``<workdir>/generator`` of
  ``mode=distill``; its workdir is accepted too). A ``FileNotFoundError`` names the fix."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, "params.msgpack")):
    return "converted", path
  if os.path.isdir(loaders.generator_dir(path)):
    path = loaders.generator_dir(path)
  if os.path.isdir(checkpoints.checkpoint_dir(path)):
    return "checkpoint", path
  what = "does not exist" if not os.path.exists(path) else "holds no generator"
  raise FileNotFoundError(f"config.sample.generator={path!r} {what}; {GENERATOR_HINT}")


def load_generator(path: str, param_dtype: str) -> Tuple[MeissonicConfig, Any]:
  """A one-step generator's ``(config, params)`` (see ``resolve_generator``): a Di[M]O
  generator's EMA parameters when it has them, else its parameters; cast to ``param_dtype``."""
  kind, folder = resolve_generator(path)
  if kind == "converted":
    return meissonic_conv.load_meissonic(folder, dtype=param_dtype)
  params, ema_params, stored = checkpoints.load_params(folder)
  if not stored or "meissonic_config" not in stored:
    raise ValueError(f"config.sample.generator={folder!r}: its config.json has no meissonic_config, "
                     f"so it is not a Meissonic Di[M]O generator; {GENERATOR_HINT}")
  tcfg = dataclasses.replace(MeissonicConfig.from_dict(stored["meissonic_config"]),
                             param_dtype=jnp.dtype(param_dtype).name)
  params = ema_params if ema_params is not None else params
  logging.info("One-step generator %s: %s parameters", folder,
               "EMA" if ema_params is not None else "raw (no EMA stored)")
  cast = tcfg.storage_dtype
  return tcfg, jax.tree_util.tree_map(lambda a: np.asarray(a).astype(cast, copy=False), params)


def load_networks(config, resolution: int = 1024, generator: str = "") -> Networks:
  """Tokenizer, CLIP text tower, transformer and VQ model of ``config.meissonic``, with their
  sizes checked against each other (a ``ValueError`` names the two folders that disagree); the
  transformer's token grid is ``resolution`` over the VQ model's downsampling factor (64 x 64
  tokens at 1024 px). With ``generator`` (a folder, see ``resolve_generator``) the transformer is
  that one-step generator and ``config.meissonic.transformer`` is not read."""
  mc = config.meissonic
  commands.check_meissonic_paths(config, ("vqvae", "text_encoder", "tokenizer") if generator
                                 else ("transformer", "vqvae", "text_encoder", "tokenizer"))
  attention_impl = mc.get("attention_impl", "") or None  # the text tower's and the transformer's
  text_model, text_params = clip_conv.load_clip_text(
      mc.text_encoder, dtype=jnp.dtype(mc.get("text_dtype", "float32")), attention_impl=attention_impl)
  tokenizer = text.load_tokenizer(mc.tokenizer, max_length=text_model.config.max_positions,
                                  embedding_rows=text_model.config.vocab_size)  # ids the encoder cannot embed stop here
  if generator:
    tcfg, tparams = load_generator(generator, mc.get("param_dtype", "bfloat16"))
  else:
    tcfg, tparams = meissonic_conv.load_meissonic(mc.transformer,
                                                  dtype=mc.get("param_dtype", "bfloat16"))
  mt = generator or mc.transformer  # the transformer's folder, for the messages below
  tcfg = dataclasses.replace(tcfg, dtype=mc.get("dtype", "bfloat16"),
                             remat=mc.get("remat", "none"),
                             attention_impl=attention_impl)
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
       f"transformer's text width {tcfg.text_dim}", mc.text_encoder, mt),
      (clip_cfg.projection_dim == tcfg.pooled_dim, f"the text encoder's projection "
       f"{clip_cfg.projection_dim} is not the transformer's pooled width {tcfg.pooled_dim}",
       mc.text_encoder, mt),
      (vq_cfg.num_vq_embeddings == tcfg.codebook_size, f"the VQ model's {vq_cfg.num_vq_embeddings} "
       f"codes are not the transformer's codebook of {tcfg.codebook_size}", mc.vqvae, mt),
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


@functools.partial(jax.jit, static_argnames=("apply_fn", "seq_len", "mask_id", "codebook_size"))
def one_step_rows(apply_fn, params, keys, cond, *, seq_len: int, mask_id: int, codebook_size: int,
                  r_init, noise_sigma, temperature):
  """``samplers.one_step_cond_sampler`` for every row on its own: row ``b`` draws with ``keys[b]`` exactly
  what a batch of one with that key draws (``x_init``, embedding noise and the draw), whatever
  else is in the batch (up to floating-point differences of the network between batch sizes)."""
  def row(key, c):
    one = jax.tree_util.tree_map(lambda x: x[None], c)
    return samplers.one_step_cond_sampler(apply_fn, params, key, one, seq_len=seq_len, mask_id=mask_id,
                                          codebook_size=codebook_size, r_init=r_init,
                                          noise_sigma=noise_sigma, temperature=temperature)[0]
  return jax.vmap(row)(keys, cond)


def draw_tokens(nets: Networks, settings: Settings, cond: Dict[str, np.ndarray],
                neg_cond: Dict[str, np.ndarray], seeds: Sequence[int]) -> np.ndarray:
  """Image tokens ``[B, seq_len]`` for the rows of ``cond`` (``text``, ``pooled``, ``micro``),
  row ``b`` drawn with ``PRNGKey(seeds[b])``: the teacher's multi-step sampler with guidance
  against ``neg_cond``, or, with ``settings.generator``, the generator's one step (no guidance)."""
  tcfg = nets.transformer.config
  apply_fn = conditioning.make_apply_fn(nets.transformer, conditions=True)
  keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
  sizes = dict(seq_len=tcfg.seq_len, mask_id=tcfg.mask_id, codebook_size=tcfg.codebook_size)
  if settings.generator:
    r_init, sigma, temperature = settings.one_step
    tokens = one_step_rows(apply_fn, nets.transformer_params, keys, cond, r_init=r_init,
                           noise_sigma=sigma, temperature=temperature, **sizes)
  else:
    tokens = samplers.gumbel_ramp_sampler(apply_fn, nets.transformer_params, keys, cond, neg_cond,
                                          steps=settings.steps, guidance=settings.guidance,
                                          temperature=settings.temperature, **sizes)
  return np.asarray(tokens)


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
  checkpoints.atomic_write_bytes(path, content.encode("utf-8"))


# ---------------------------------------------------------------------------- run


def check_paths(config, settings: Settings) -> None:
  """Stops before anything is loaded when a folder the run reads is missing or wrong: the
  converted folders (the teacher's transformer only without a generator) and the generator."""
  if settings.generator:
    commands.check_meissonic_paths(config, ("vqvae", "text_encoder", "tokenizer"))
    resolve_generator(settings.generator)
  else:
    commands.check_meissonic_paths(config)


def write_prompt_images(config, workdir: str) -> Dict[str, Any]:
  """``mode=sample`` for Meissonic: prompts file -> PNGs, ``index.jsonl``, ``grid.png``.

  Returns ``{"output", "images", "index", "grid", "num"}`` (paths; ``num`` images).
  """
  if "meissonic" not in config:
    raise ValueError("text-to-image sampling needs the meissonic section of configs/meissonic.py; "
                     "use --config=configs/meissonic.py")
  settings = read_settings(config, workdir)
  check_paths(config, settings)
  prompts = text.read_prompts(settings.prompts_file)
  text.load_tokenizer(config.meissonic.tokenizer)  # a missing tokenizer file stops here, early
  t0 = time.perf_counter()
  nets = load_networks(config, settings.resolution, settings.generator)
  logging.info("Loaded the Meissonic networks in %.1f s", time.perf_counter() - t0)

  # The negative prompt rides along as row 0: one compiled text program for both.
  encoded = encode_prompts(nets, [settings.negative_prompt, *prompts], settings.batch_size)
  negative = {k: v[:1] for k, v in encoded.items()}
  conds = {k: v[1:] for k, v in encoded.items()}
  nets.text_params = None  # the text tower is no longer needed
  tcfg = nets.transformer.config
  micro = np.asarray(settings.micro_conds, np.float32)
  neg_cond = {"text": negative["text"], "pooled": negative["pooled"], "micro": micro[None]}
  decode = make_decoder(nets)
  steps = 1 if settings.generator else settings.steps

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
    tokens = draw_tokens(nets, settings, cond, neg_cond, seeds)
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
                 count, t_sample, steps, time.perf_counter() - t0 - t_sample)

  index_path, grid_path = os.path.join(out, INDEX_FILE), os.path.join(out, GRID_FILE)
  if is_writer:
    _write_text_atomic(index_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    columns = max(1, min(settings.grid_columns, len(thumbs)))
    image_grids.save_image_grid(np.stack(thumbs), grid_path, ncols=columns, scale=1)
    mc = config.meissonic
    meta = {"prompts": os.path.abspath(settings.prompts_file), "num": len(prompts),
            **sampler_settings(settings),
            "seed_rule": "image i draws with PRNGKey(seed + i)", "batch_size": batch_size,
            "transformer": settings.generator or mc.transformer, "vqvae": mc.vqvae,
            "text_encoder": mc.text_encoder, "tokenizer": mc.tokenizer, "dtype": tcfg.dtype,
            "param_dtype": tcfg.param_dtype}
    _write_text_atomic(os.path.join(out, SETTINGS_FILE), json.dumps(meta, indent=2) + "\n")
  logging.info("Wrote %d images, %s and %s to %s", len(paths), INDEX_FILE, GRID_FILE, out)
  return {"output": out, "images": paths, "index": index_path, "grid": grid_path, "num": len(paths)}
