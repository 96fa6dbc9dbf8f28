"""Sampling from a trained model (``mode=sample``) for every family (``config.family``).

``classes``: ``run_sample`` loads the teacher stored in ``config.sample.checkpoint`` (or the
workdir; its parameters, EMA by default, and the ``config.json`` written beside them) or, with
``config.sample.model='generator'``, a distilled generator, draws ``config.sample.num`` token
sequences in batches with the confidence or ancestral sampler (or the generator's one step) and
writes ``<output>.npy`` (tokens ``[N, L]``), ``<output>_labels.npy`` (labels ``[N]``) and, when
the tokens are grey-level images or VQGAN codes, ``<output>.png``.

``meissonic``: a prompt file to one PNG per prompt (``evaluation.text_to_image``), from the
teacher's multi-step sampler or the one-step generator of ``config.sample.generator``.

``captioned_digits``: every prompt of the seen and held-out prompt sets (or of the file
``config.sample.prompts``) ``config.sample.per_prompt`` times from the teacher or the generator, one
PNG grid and ``.npy`` per prompt set and an ``index.json`` (``families.captioned_digits.write_samples``).

The sampler's settings are read once, by ``evaluation.settings.sampler_settings_from_config``.
"""

from __future__ import annotations

import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dimo_jax.core.sharding import host_array
from dimo_jax.data import image_grids, text
from dimo_jax.evaluation import text_eval, text_to_image
from dimo_jax.evaluation.sample_sets import generator_sample_fn, teacher_sample_fn
from dimo_jax.evaluation.settings import EvalSettings, generator_plan, r_init_value, sampler_settings_from_config
from dimo_jax.families import base as families
from dimo_jax.families import captioned_digits
from dimo_jax.modes import loop
from dimo_jax.networks import maskgit
from dimo_jax.networks.conditioning import balanced_labels
from dimo_jax.storage import checkpoints, loaders, preflight

SAMPLE_MODELS = ("teacher", "generator")


def family_of(config) -> str:
  """``config.family``, checked against ``families.base.FAMILIES`` (a missing or unknown name is a
  ``UserError`` naming the flag and the known families)."""
  return families.get_family(config).name


def parse_labels(spec: str, num: int, num_classes: int) -> np.ndarray:
  """Labels from ``config.sample.labels``: '' = balanced, or a comma list like '3,3,7' that is
  repeated cyclically to ``num`` entries."""
  spec = (spec or "").strip()
  if not spec:
    return balanced_labels(num, num_classes)
  if num_classes <= 0:
    raise ValueError(f"config.sample.labels={spec!r} but the model is unconditional (no classes); "
                     "leave config.sample.labels empty")
  values = []
  for part in spec.split(","):
    part = part.strip()
    try:
      value = int(part)
    except ValueError:
      raise ValueError(f"config.sample.labels={spec!r}: {part!r} is not an integer class; use a comma list "
                       f"of classes in [0, {num_classes}), e.g. '3,3,7'") from None
    if not 0 <= value < num_classes:
      raise ValueError(f"config.sample.labels={spec!r}: class {value} is outside [0, {num_classes}) "
                       f"(the model has {num_classes} classes)")
    values.append(value)
  return np.resize(np.asarray(values, np.int32), num).astype(np.int32)


# ---------------------------------------------------------------------------- output
def _atomic_save_npy(path: str, array: np.ndarray):
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".npy")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, array)
    checkpoints.apply_umask(tmp)  # mkstemp makes 0600; outputs get the user's umask
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def output_paths(output: str, workdir: str) -> dict:
  """``{'tokens', 'labels', 'image'}`` paths for ``config.sample.output`` (default
  ``<workdir>/samples.npy``)."""
  path = output or os.path.join(workdir, "samples.npy")
  if not path.endswith(".npy"):
    raise ValueError(f"config.sample.output={output!r} must name a .npy file, e.g. /tmp/samples.npy")
  stem = path[: -len(".npy")]
  return {"tokens": path, "labels": stem + "_labels.npy", "image": stem + ".png"}


def decode_with_vqgan(vqgan_dir: str, tokens: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """Images ``[N, H, W, 3]`` in [0, 1] from code tokens ``[N, h*w]`` through a converted VQGAN."""
  module, variables = loaders.load_vqgan(vqgan_dir)
  decode = jax.jit(lambda v, t: module.apply(v, t, method="decode_tokens"))
  out = [np.asarray(decode(variables, jnp.asarray(tokens[i:i + batch_size])))
         for i in range(0, len(tokens), batch_size)]
  return np.concatenate(out)


def write_outputs(tokens: np.ndarray, labels: np.ndarray, paths: dict, *, vocab_size: int,
                  image_shape=None, vqgan_dir: str = "") -> dict:
  """Writes tokens, labels and a PNG grid (grey-level tokens when ``image_shape`` is set, or code
  tokens decoded through the VQGAN in ``vqgan_dir``, which also writes one PNG per sample)."""
  written = {"tokens": paths["tokens"], "labels": paths["labels"], "image": None}
  if jax.process_index() != 0:
    return written
  _atomic_save_npy(paths["tokens"], np.asarray(tokens, np.int32))
  _atomic_save_npy(paths["labels"], np.asarray(labels, np.int32))
  if vqgan_dir:
    pictures = decode_with_vqgan(vqgan_dir, np.asarray(tokens, np.int32))
    loop.save_grid(pictures, paths["image"], scale=1)
    folder = paths["image"][: -len(".png")] + "_images"
    for i, (image, label) in enumerate(zip(pictures, np.asarray(labels))):
      loop.save_grid(image[None], os.path.join(folder, f"{i:06d}_class{int(label)}.png"), ncols=1, scale=1)
    written["image"] = paths["image"]
    written["images_dir"] = folder
  elif image_shape is not None:
    loop.save_grid(image_grids.tokens_to_images(tokens, vocab_size, image_shape), paths["image"])
    written["image"] = paths["image"]
  return written


def _image_shape(stored_config: dict):
  """Grey-level image shape of the stored data (None for code tokens of converted models)."""
  if "converted" in stored_config:
    return None
  shape = (stored_config.get("dataset") or {}).get("image_shape")
  return None if shape is None else tuple(int(s) for s in shape)


# ---------------------------------------------------------------------------- sampling
def _check_common(sc, seq_len: int) -> int:
  num = int(sc.num)
  if num < 1:
    raise ValueError(f"config.sample.num must be >= 1, got {num}")
  if int(sc.get("batch_size", num)) < 1:
    raise ValueError(f"config.sample.batch_size must be >= 1, got {sc.batch_size}")
  return num


def _batched(fn, labels: np.ndarray, batch_size: int, seed: int) -> np.ndarray:
  """Runs ``fn(key, labels_batch)`` over fixed-size batches (the last one padded); batch i uses
  ``fold_in(key(seed), i)``."""
  num = labels.shape[0]
  batch_size = int(min(batch_size, num))
  base = jax.random.key(int(seed))
  out = []
  for i in range(math.ceil(num / batch_size)):
    lab = labels[i * batch_size:(i + 1) * batch_size]
    n = lab.shape[0]
    if n < batch_size:
      lab = np.concatenate([lab, np.resize(lab, batch_size - n)])
    tokens = fn(jax.random.fold_in(base, i), jnp.asarray(lab))
    out.append(host_array(tokens)[:n])
  return np.concatenate(out).astype(np.int32)


def sample_teacher(model, params, labels: np.ndarray, sample_cfg) -> np.ndarray:
  """Draws one sequence per label with the configured iterative sampler
  (``evaluation.sample_sets.teacher_sample_fn``)."""
  sp = sampler_settings_from_config(sample_cfg)
  fn, _ = teacher_sample_fn(model, params, sp.steps, sp, steps_flag="config.sample.steps")
  return _batched(fn, labels, sp.batch_size or labels.shape[0], sp.seed)


def _vqgan_dir(config) -> str:
  """``config.vqgan.checkpoint`` when the config has a VQGAN section (a missing folder is an error
  from the loader that names it and the convert command)."""
  return config.vqgan.get("checkpoint", "") if "vqgan" in config else ""


def _source(config, workdir: str) -> str:
  return config.sample.get("checkpoint", "") or workdir


def _run_sample_teacher(config, workdir: str) -> dict:
  sc = config.sample
  path = _source(config, workdir)
  overrides = maskgit.compute_overrides(config.model) if "model" in config else None
  use_ema = bool(sc.get("use_ema", config.teacher.get("use_ema", True) if "teacher" in config else True))
  model, params, stored_config = loaders.load_teacher(path, use_ema=use_ema, overrides=overrides)
  num = _check_common(sc, model.seq_len)
  labels = parse_labels(sc.get("labels", ""), num, model.num_classes)
  paths = output_paths(sc.get("output", ""), workdir or path)
  tokens = sample_teacher(model, params, labels, sc)
  written = write_outputs(tokens, labels, paths, vocab_size=model.codebook_size, image_shape=_image_shape(stored_config),
                          vqgan_dir=_vqgan_dir(config))
  logging.info("Wrote %d samples from %s to %s", num, path, written)
  return dict(written, num=num)


# ---------------------------------------------------------------------------- generator (distilled)
def _run_sample_generator(config, workdir: str) -> dict:
  """Samples from a distilled generator (``loaders.load_generator``) at ``config.sample.generator_steps``
  steps (0: what it was trained for, its folder's ``distill.generator_steps``; more is allowed and
  warned about) with the re-masking schedule it was trained with (``evaluation.sample_sets.generator_sample_fn``:
  ``samplers.one_step_generate`` at one step, ``core.generator_steps.generate`` at more)."""
  sc = config.sample
  path = _source(config, workdir)
  model, params, stored_config = loaders.load_generator(path)
  num = _check_common(sc, model.seq_len)
  labels = parse_labels(sc.get("labels", ""), num, model.num_classes)
  paths = output_paths(sc.get("output", ""), workdir or path)
  sp = sampler_settings_from_config(sc)
  r_init_value(sp.r_init, "config.sample.r_init")
  plan = generator_plan(stored_config, sp.generator_steps, f"the generator in {path}")
  fn, _ = generator_sample_fn(model, params, EvalSettings(r_init=sp.r_init, sigma=sp.sigma), sp,
                              float(1.0 if sp.temperature is None else sp.temperature), plan.steps,
                              plan.schedule_at(plan.steps))
  tokens = _batched(fn, labels, sp.batch_size or num, sp.seed)
  written = write_outputs(tokens, labels, paths, vocab_size=model.codebook_size,
                          image_shape=_image_shape(stored_config or {}), vqgan_dir=_vqgan_dir(config))
  logging.info("Wrote %d samples of the generator in %s at %d step(s) (trained for %d) to %s", num, path,
               plan.steps, plan.trained, written)
  return dict(written, num=num, generator_steps=plan.steps)


def _run_sample_tokens(config, workdir: str) -> dict:
  kind = config.sample.get("model", "teacher")
  if kind == "teacher":
    return _run_sample_teacher(config, workdir)
  if kind == "generator":
    return _run_sample_generator(config, workdir)
  raise ValueError(f"config.sample.model={kind!r} is not known; choose one of {SAMPLE_MODELS}")


SAMPLE_WRITERS = {  # family -> run(config, workdir): what mode=sample writes for it
    "classes": _run_sample_tokens,
    "meissonic": text_to_image.write_prompt_images,
    "captioned_digits": captioned_digits.write_samples,
    "text": text_eval.write_text_samples,
}


def run_sample(config, workdir: str) -> dict:
  """``mode=sample`` for ``config.family``: writes samples; returns the written paths
  (``classes``: ``tokens``, ``labels``, ``image``; ``meissonic``: ``output``, ``images``,
  ``index``, ``grid``; ``captioned_digits``: ``output``, ``index``, ``grids``) and ``num``."""
  family = family_of(config)
  for path, generator in stored_runs(config, workdir, family):
    loop.check_stored_run(path, "sample", generator=generator)
  preflight.check_write_targets(output_targets(config, workdir, family))
  return SAMPLE_WRITERS[family](config, workdir)


def output_targets(config, workdir: str, family: str):
  """``(folder, bytes, what)`` of what ``mode=sample`` writes, for ``preflight.check_write_targets``:
  the classes' token and label files (``num`` rows of the stored ``seq_len``), Meissonic's PNGs
  (at most 3 bytes a pixel per prompt of ``config.sample.prompts``)."""
  sc = config.sample
  if family == "classes":
    source = _source(config, workdir)
    tokens = output_paths(sc.get("output", ""), workdir or source)["tokens"]
    stored = {}
    for folder in (source, loaders.generator_dir(source)):
      if source and os.path.isfile(os.path.join(folder, checkpoints.CONFIG_FILE)):
        stored = checkpoints.read_config(folder) or {}
        break
    seq_len = int((stored.get("dataset") or {}).get("seq_len", 0) or 0)
    return [(os.path.dirname(tokens) or ".", max(int(sc.num), 0) * (4 * seq_len + 4), "config.sample.output")]
  if family == "meissonic":
    folder = sc.get("output", "") or os.path.join(workdir, "samples")
    prompts = sc.get("prompts", "")
    count = len(text.read_prompts(prompts)) if prompts and os.path.isfile(prompts) else 0
    return [(folder, count * 3 * int(sc.get("resolution", 1024)) ** 2, "config.sample.output")]
  return []


def stored_runs(config, workdir: str, family: str):
  """``(folder, is_generator)`` of each stored run ``mode=sample`` reads for ``family``: the
  classes' checkpoint (or workdir), Meissonic's ``config.sample.generator`` (its teacher is a
  converted folder, no run), the captioned digits' teacher or generator."""
  if family == "classes":
    return [(_source(config, workdir), config.sample.get("model", "teacher") == "generator")]
  if family == "meissonic" and config.sample.get("generator", ""):
    return [(str(config.sample.generator), True)]
  if family == "captioned_digits":
    return [(captioned_digits.sample_source(config, workdir), captioned_digits.sample_model(config) == "generator")]
  return []


run = loop.entry(run_sample)  # what ``dimo_jax.main`` calls for ``config.mode='sample'``
