"""Text-to-image benchmark images for the official PyTorch scorers: the evaluator ``t2i_export``
of ``mode=evaluate`` for ``config.family='meissonic'`` (``evaluation.evaluators``): HPS v2.0 and
GenEval, from Meissonic's multi-step sampler or a one-step Di[M]O generator.

The model and how it samples are ``config.sample``'s, as in ``mode=sample``
(``evaluation.text_to_image``): without ``config.sample.generator`` the teacher with
``steps`` steps, ``guidance`` against ``negative_prompt`` and the temperature ramp; with it the
generator's one step with ``config.sample.one_step`` (``r_init``, ``sigma``, ``temperature``).
``config.evaluate``:

- ``suite``: ``hps``, ``geneval`` or ``hps,geneval`` (``both``);
- ``hps_prompts``: the folder of the HPS v2 benchmark prompts (``anime.json``,
  ``concept-art.json``, ``paintings.json``, ``photo.json``), ``hps_styles`` the styles drawn;
- ``geneval_metadata``: GenEval's ``evaluation_metadata.jsonl``; ``geneval_samples`` images per
  prompt (GenEval: 4);
- ``output``: the folder (default ``<workdir>/t2i_eval``); ``max_prompts``: only the first
  prompts of each style / of the metadata file (a smoke test: the scorers need them all).

Written (layouts: ``evaluation.prompt_suites``):

- ``<output>/hps/<style>/<index:05d>.jpg``: one image per prompt, JPEG (the authors saved .jpg);
  ``<output>/hps`` holds the style folders and nothing else, as ``hpsv2.evaluate`` takes every
  entry of it for a style;
- ``<output>/geneval/<index:05d>/metadata.jsonl`` (the prompt's line of the metadata file, as
  written) and ``<output>/geneval/<index:05d>/samples/<k:04d>.png``, ``k < geneval_samples``;
- ``<output>/settings.json``: the sampler's settings, the networks, the prompt files (with their
  SHA-1) and the scoring commands, which are printed at the end.

Seeds: HPS image ``index`` of every style draws with ``PRNGKey(seed + index)``; GenEval sample
``k`` of EVERY prompt with ``PRNGKey(seed + k)`` (the seed reset before each prompt of GenEval's
and the authors' scripts). Each image has its own key, so it does not depend on the batch it was
drawn in: ``mode=sample`` with that prompt alone and ``--config.sample.seed=<its seed>`` draws it
again. Every image is written to a temporary name and renamed; a rerun skips the images that exist
(resumes), and refuses an output folder written with other sampler settings or other prompt files.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import jax
import numpy as np
from absl import logging

from dimo_jax.data.prompt_cache import file_sha1
from dimo_jax.evaluation import prompt_suites as ps
from dimo_jax.evaluation import text_to_image as sample_text
from dimo_jax.evaluation.evaluators import Request, Result, register
from dimo_jax.storage import preflight

SUITES = ("hps", "geneval")
DEFAULT_OUTPUT = "t2i_eval"
HPS_DIR = "hps"
GENEVAL_DIR = "geneval"
GENEVAL_RESULTS = "geneval_results.jsonl"
SETTINGS_FILE = "settings.json"
JPEG_QUALITY = 75  # PIL's default, with which the authors' script saved the HPS images


# ---------------------------------------------------------------------------- settings


class EvalSettings(NamedTuple):
  suites: Tuple[str, ...]
  hps_prompts: str
  hps_styles: Tuple[str, ...]
  geneval_metadata: str
  geneval_samples: int
  max_prompts: int
  output: str


def read_eval_settings(config, workdir: str) -> EvalSettings:
  """``config.evaluate``'s text-to-image settings, checked (a ``ValueError`` names the flag)."""
  ec = config.get("evaluate", None) or {}
  raw = str(ec.get("suite", "hps,geneval")).replace(" ", "")
  suites = SUITES if raw == "both" else tuple(s for s in raw.split(",") if s)
  unknown = [s for s in suites if s not in SUITES]
  if not suites or unknown:
    raise ValueError(f"config.evaluate.suite={raw!r}: choose hps, geneval or hps,geneval")
  hps_prompts = str(ec.get("hps_prompts", "") or "")
  geneval_metadata = str(ec.get("geneval_metadata", "") or "")
  if "hps" in suites and not hps_prompts:
    raise ValueError(f"config.evaluate.hps_prompts is not set; {ps.HPS_HINT}")
  if "geneval" in suites and not geneval_metadata:
    raise ValueError(f"config.evaluate.geneval_metadata is not set; {ps.GENEVAL_HINT}")
  styles = tuple(ec.get("hps_styles", ps.HPS_STYLES))
  bad = [s for s in styles if s not in ps.HPS_STYLES]
  if bad:
    raise ValueError(f"config.evaluate.hps_styles has {bad}; HPS v2's styles are {list(ps.HPS_STYLES)}")
  samples = int(ec.get("geneval_samples", ps.GENEVAL_SAMPLES))
  max_prompts = int(ec.get("max_prompts", 0))
  if samples < 1 or max_prompts < 0:
    raise ValueError(f"config.evaluate.geneval_samples must be >= 1 and max_prompts >= 0 (0: all), "
                     f"got {samples} and {max_prompts}")
  output = str(ec.get("output", "") or "") or os.path.join(workdir, DEFAULT_OUTPUT)
  return EvalSettings(suites, hps_prompts, styles, geneval_metadata, samples, max_prompts, output)


# ---------------------------------------------------------------------------- the images to draw


class Job(NamedTuple):
  """One image: where it goes, its prompt, its seed and its suite."""
  path: str
  prompt: str
  seed: int
  suite: str = ""


def plan(es: EvalSettings, seed: int) -> Tuple[List[Job], Dict[str, str], Dict[str, Any]]:
  """Reads the prompt files (stopping on a bad one) -> ``(jobs, metadata files, suites)``:
  every image of the asked suites, GenEval's ``metadata.jsonl`` contents by path, and what
  ``settings.json`` records per suite."""
  jobs: List[Job] = []
  metadata: Dict[str, str] = {}
  suites: Dict[str, Any] = {}
  cut = (lambda xs: xs[:es.max_prompts]) if es.max_prompts else (lambda xs: xs)
  if "hps" in es.suites:
    by_style = ps.read_hps_prompts(es.hps_prompts, es.hps_styles)
    folder = os.path.join(es.output, HPS_DIR)
    for style, prompts in by_style.items():
      if len(prompts) != ps.HPS_PROMPTS_PER_STYLE:
        logging.warning("%s.json holds %d prompts, not the benchmark's %d: the scores are not the "
                        "paper's", style, len(prompts), ps.HPS_PROMPTS_PER_STYLE)
      jobs += [Job(ps.hps_image_path(folder, style, i), p, seed + i, "hps") for i, p in enumerate(cut(prompts))]
    suites["hps"] = {
        "prompts": os.path.abspath(es.hps_prompts), "styles": list(by_style),
        "prompts_sha1": {s: file_sha1(os.path.join(es.hps_prompts, f"{s}.json")) for s in by_style},
        "num_prompts": {s: len(cut(p)) for s, p in by_style.items()}, "images_per_prompt": 1,
        "layout": "hps/<style>/<index:05d>.jpg", "jpeg_quality": JPEG_QUALITY,
        "seed_rule": "image <index> of every style draws with PRNGKey(seed + index)",
        "commands": ps.hps_commands(folder, es.hps_prompts)}
  if "geneval" in es.suites:
    entries = ps.read_geneval_metadata(es.geneval_metadata)
    if len(entries) != ps.GENEVAL_PROMPTS:
      logging.warning("%s holds %d prompts, not GenEval's %d: the scores are not the paper's",
                      es.geneval_metadata, len(entries), ps.GENEVAL_PROMPTS)
    folder = os.path.join(es.output, GENEVAL_DIR)
    for i, entry in enumerate(cut(entries)):
      metadata[ps.geneval_metadata_path(folder, i)] = entry.line
      jobs += [Job(ps.geneval_sample_path(folder, i, k), entry.prompt, seed + k, "geneval")
               for k in range(es.geneval_samples)]
    suites["geneval"] = {
        "metadata": os.path.abspath(es.geneval_metadata), "metadata_sha1": file_sha1(es.geneval_metadata),
        "num_prompts": len(cut(entries)), "images_per_prompt": es.geneval_samples,
        "layout": "geneval/<index:05d>/{metadata.jsonl, samples/<k:04d>.png}",
        "seed_rule": "sample k of every prompt draws with PRNGKey(seed + k) (seed reset per prompt)",
        "commands": ps.geneval_commands(folder, os.path.join(es.output, GENEVAL_RESULTS))}
  return jobs, metadata, suites


def folder_fingerprint(path: str, edge_bytes: int = 1 << 20) -> str:
  """A short digest of a network's folder (or file) as stored: every file's relative name and size,
  and the SHA-1 of its first and last ``edge_bytes`` (whole files up to twice that), so another
  conversion or checkpoint of the same layout differs without reading gigabytes."""
  import hashlib  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(os.fspath(path))
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if not f.startswith(".tmp"))
  h = hashlib.sha1()
  for name in files:
    size = os.path.getsize(name)
    h.update(f"{os.path.relpath(name, path)}:{size};".encode("utf-8"))
    with open(name, "rb") as f:
      h.update(f.read(edge_bytes))
      if size > 2 * edge_bytes:
        f.seek(size - edge_bytes)
      h.update(f.read(edge_bytes))
  return h.hexdigest()[:16]


def network_record(config, generator: str = "") -> Dict[str, Any]:
  """What ``settings.json`` records of the networks the images depend on: each folder's absolute
  path and ``folder_fingerprint``, and every dtype (the transformer is the one-step ``generator``
  folder when given)."""
  mc = config.meissonic
  folders = {"transformer": generator or mc.transformer, "vqvae": mc.vqvae, "text_encoder": mc.text_encoder,
             "tokenizer": mc.tokenizer}
  record: Dict[str, Any] = {name: {"path": os.path.abspath(os.fspath(folder)),
                                   "fingerprint": folder_fingerprint(folder)} for name, folder in folders.items()}
  for key, default in (("dtype", "bfloat16"), ("param_dtype", "bfloat16"), ("text_dtype", "float32"),
                       ("vq_dtype", "float32")):
    record[key] = str(mc.get(key, default))
  return record


def _diff(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
  """The dotted keys whose values differ between two nested dicts."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}")
  return out


def read_settings_file(path: str) -> Dict[str, Any]:
  """``settings.json`` of an output folder (``{}`` if none); unreadable, truncated or not an
  object: one ``ValueError`` line naming the file and the fix."""
  if not os.path.isfile(path):
    return {}
  fix = ("its images cannot be matched to any settings; delete the folder to start again, or pass another "
         "--config.evaluate.output")
  try:
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is damaged (truncated or not JSON: {e}); {fix}") from None
  if not isinstance(old, dict):
    raise ValueError(f"{path} does not hold a JSON object; {fix}")
  return old


def check_same_run(path: str, sampler: Dict[str, Any], suites: Dict[str, Any],
                   networks: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """The ``settings.json`` already in the output folder (``{}`` if none), after checking that it
  was written with the same sampler settings, networks (paths, fingerprints, dtypes) and prompt
  files (else a ``ValueError`` naming what differs: mixing two models' images would score
  neither). ``settings.json`` is left as it was."""
  old = read_settings_file(path)
  if not old:
    return {}
  diff = _diff(old.get("sampler") or {}, sampler)
  if networks is not None:
    diff += [f"networks.{d}" for d in _diff(old.get("networks") or {}, networks)]
  for name, now in suites.items():
    before = (old.get("suites") or {}).get(name, {})
    for key in ("prompts_sha1", "metadata_sha1", "images_per_prompt"):
      if key in before and before[key] != now.get(key):
        diff.append(f"{name}.{key}")
  if diff:
    raise ValueError(f"{path} was written with other settings ({', '.join(diff)}); its images "
                     "would mix with these. Pass another --config.evaluate.output, or delete the "
                     "folder to start again")
  return old


# ---------------------------------------------------------------------------- files


def _write_atomic(path: str, write) -> None:
  """``write(file object)`` into a temporary file beside ``path`` (its name starts with a dot, so
  neither scorer reads it), then renamed to ``path``."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.splitext(path)[1])
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_image(image: np.ndarray, path: str) -> None:
  """``image [H, W, 3]`` in ``[0, 1]`` -> ``path``: JPEG (quality ``JPEG_QUALITY``) for ``.jpg``,
  else PNG; pixels rounded as ``mode=sample``'s PNGs."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  pixels = np.round(np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
  fmt = "JPEG" if path.endswith(".jpg") else "PNG"
  extra = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
  _write_atomic(path, lambda f: Image.fromarray(pixels).save(f, format=fmt, **extra))


def write_metadata_files(metadata: Dict[str, str]) -> None:
  """GenEval's per-prompt ``metadata.jsonl`` (the line as read); one already there with another
  line stops (the folder was drawn from another metadata file)."""
  for path, line in metadata.items():
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        if f.read().strip() != line:
          raise ValueError(f"{path} holds another prompt than line {line!r}: this output folder was "
                           "drawn from another metadata file. Pass another --config.evaluate.output")
      continue
    _write_atomic(path, lambda f, line=line: f.write(line.encode("utf-8")))


# ---------------------------------------------------------------------------- run


@register("t2i_export")
def evaluate_t2i_export(req: Request) -> Result:
  """The evaluator ``t2i_export`` (see the module docstring): draws the images of the asked suites
  that are not written yet. Returns one row per suite (``images`` asked, ``written`` now,
  ``skipped`` as already there) and, under ``t2i``, the output folder, the counts, ``settings.json``'s
  per-suite records and the scoring commands (printed too)."""
  config, workdir = req.config, req.workdir
  if "meissonic" not in config:
    raise ValueError("text-to-image evaluation needs the meissonic section of configs/meissonic.py; "
                     "use --config=configs/meissonic.py")
  settings = sample_text.read_settings(config, workdir, require_prompts=False)
  es = read_eval_settings(config, workdir)
  sample_text.check_paths(config, settings)
  jobs, metadata, suites = plan(es, settings.seed)
  mc = config.meissonic
  sampler = sample_text.sampler_settings(settings)
  if not settings.generator:
    sampler["transformer"] = os.path.abspath(mc.transformer)
  preflight.check_write_targets([(es.output, sum(1 for j in jobs if not os.path.isfile(j.path)) * 3
                                  * settings.resolution ** 2, "config.evaluate.output")])
  settings_path = os.path.join(es.output, SETTINGS_FILE)
  networks = network_record(config, sample_text.resolve_generator(settings.generator)[1] if settings.generator else "")
  old = check_same_run(settings_path, sampler, suites, networks)
  merged = dict(old.get("suites", {}), **suites)
  commands = [c for s in SUITES if s in merged for c in merged[s]["commands"]]
  meta = {"sampler": sampler, "batch_size": settings.batch_size, "networks": networks,
          "suites": merged, "commands": commands}
  is_writer = jax.process_index() == 0
  if is_writer:  # first, so that a rerun after an interruption is checked against it
    _write_atomic(settings_path, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8")))
    write_metadata_files(metadata)
  todo = [j for j in jobs if not os.path.isfile(j.path)]
  logging.info("%d images asked, %d already written, %d to draw into %s", len(jobs),
               len(jobs) - len(todo), len(todo), es.output)

  if todo:
    t0 = time.perf_counter()
    nets = sample_text.load_networks(config, settings.resolution, settings.generator)
    logging.info("Loaded the Meissonic networks in %.1f s", time.perf_counter() - t0)
    micro = np.asarray(settings.micro_conds, np.float32)
    neg_cond = None
    if not settings.generator:
      neg = sample_text.encode_prompts(nets, [settings.negative_prompt], 1)
      neg_cond = {"text": neg["text"], "pooled": neg["pooled"], "micro": micro[None]}
    decode = sample_text.make_decoder(nets)
    batch = min(settings.batch_size, len(todo))
    t0 = time.perf_counter()
    for start in range(0, len(todo), batch):
      chunk = todo[start:start + batch]
      rows = chunk + [chunk[-1]] * (batch - len(chunk))  # one compiled shape: pad the last batch
      cond = sample_text.encode_prompts(nets, [j.prompt for j in rows], batch)
      cond["micro"] = np.broadcast_to(micro, (batch, micro.size))
      tokens = sample_text.draw_tokens(nets, settings, cond, neg_cond, [j.seed for j in rows])
      for job, ids in zip(chunk, tokens):
        image = decode(ids)
        if is_writer:
          save_image(image, job.path)
      done = start + len(chunk)
      if done == len(todo) or (start // batch) % 25 == 0:
        logging.info("%d / %d images (%.2f s per image)", done, len(todo),
                     (time.perf_counter() - t0) / done)

  if is_writer:
    print("Score the images with the official scorers (PyTorch; GenEval's in a checkout of "
          "github djghosh13/geneval):")
    for c in commands:
      print("  " + c)
  model = "generator" if settings.generator else "teacher"
  rows = []
  for suite in es.suites:
    asked = [j for j in jobs if j.suite == suite]
    drawn = sum(1 for j in todo if j.suite == suite)
    rows.append({"name": suite, "model": model, "steps": sampler["steps"], "images": len(asked),
                 "written": drawn, "skipped": len(asked) - drawn, "folder": os.path.join(es.output, suite)})
  return Result(rows, {"t2i": {"output": es.output, "written": len(todo), "skipped": len(jobs) - len(todo),
                               "suites": suites, "commands": commands}})
