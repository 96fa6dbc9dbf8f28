"""``config.family = "captioned_digits"``: the embedded text-to-image task. 8x8 digits with prompts
measured from each image ("a thick slanted seven", ``data.captions``), a small
Meissonic-architecture teacher (``networks.meissonic`` through ``networks.text_conditioning``)
trained with ``method.mdm_text``, and Di[M]O from the prompts alone.

The teacher's folder holds, in ``config.json``, its ``meissonic`` config, the ``text_encoder``
and the attribute ``thresholds`` beside the run's config and ``finished_step``. A distillation
whose ``config.teacher.checkpoint`` is empty trains the teacher into ``<workdir>/teacher`` first.

The conditions of a Di[M]O step are a pure function of ``(config.seed, step)``: ``batch_size``
prompts for the generator update and ``aux_updates x batch_size`` fresh ones for the auxiliary
updates, drawn uniformly from ``data.captions.distill_prompts(config.distill.prompt_set)``
(``full``: the 30 full prompts, the default; ``all``: also the 50 partial ones); the negative
prompt is the empty prompt (caption 0).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dimo_jax.core import sharding
from dimo_jax.data import captions, image_grids, text
from dimo_jax.evaluation import prompt_following
from dimo_jax.evaluation.settings import generator_plan, r_init_value, sampler_settings_from_config
from dimo_jax.families import base
from dimo_jax.method import mdm_text
from dimo_jax.method.mdm import TeacherSettings
from dimo_jax.networks import meissonic, text_conditioning
from dimo_jax.storage import checkpoints

GENERATOR_SUBDIR = "generator"


CaptionedData = captions.CaptionedData
load_captioned = captions.load_captioned
stored_encoder = captions.stored_encoder


def model_config(config, data: CaptionedData) -> meissonic.MeissonicConfig:
  """The teacher's ``MeissonicConfig``: ``config.model`` on the digits' grid and grey levels."""
  m = config.model
  fields = {f.name for f in dataclasses.fields(meissonic.MeissonicConfig)}
  kw = {k: m[k] for k in m.keys() if k in fields}
  kw["axes_dims_rope"] = tuple(kw.get("axes_dims_rope", ()))
  levels = int(data.ds.vocab_size)
  kw.update(codebook_size=levels, vocab_size=levels + 1, grid=int(data.ds.image_shape[0]),
            text_dim=data.encoder.width, pooled_dim=int(m.num_heads) * int(m.head_dim))
  return meissonic.MeissonicConfig(**kw)


def teacher_dir(config, workdir: str) -> str:
  """``config.teacher.checkpoint``, or ``<workdir>/teacher`` when it is empty."""
  return config.teacher.get("checkpoint", "") or os.path.join(workdir, "teacher")


def is_finished(path: str, steps: int) -> bool:
  cfg = checkpoints.read_config(path) if os.path.isdir(path) else None
  return bool(cfg) and int(cfg.get("finished_step", -1)) >= steps


def load_text_teacher(path: str, *, use_ema: bool = True):
  """``(model, params, stored_config)`` of a finished captioned-digits teacher."""
  params, ema, stored = checkpoints.load_params(path)
  if not stored or "meissonic" not in stored:
    raise ValueError(f"{path}: not a text-conditioned teacher (its config.json has no 'meissonic' entry); "
                     "train one with --config=configs/captioned_digits.py --config.mode=teacher")
  mcfg = meissonic.MeissonicConfig.from_dict(stored["meissonic"])
  model = text_conditioning.build(mcfg, text_len=int(stored["text_encoder"]["max_positions"]))
  return model, (ema if use_ema and ema is not None else params), stored


class PromptTable(base.ConditionSource):
  """Conditions gathered from a table of encoded prompts (module docstring)."""

  def __init__(self, table, prompts: np.ndarray, salt: int = 7):
    self.table = table
    self.prompts = np.asarray(prompts)
    self.salt = int(salt)
    self.spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), table)

  def step_conditions(self, seed: int, step: int, batch: int, aux_updates: int) -> dict:
    rng = np.random.default_rng([int(seed), self.salt, int(step)])
    gen = rng.choice(self.prompts, size=(batch,))
    aux = rng.choice(self.prompts, size=(aux_updates, batch))
    return {"gen": captions.gather(self.table, gen), "aux": captions.gather(self.table, aux),
            "neg": self.negative()}

  def negative(self):
    return captions.gather(self.table, np.zeros((1,), np.int32))


class CaptionedDigits(base.Family):
  """The embedded text-to-image task (module docstring)."""

  name = "captioned_digits"
  compute_fields = ()
  evaluators = ("prompt_following",)

  # -------------------------------------------------------------- mode=teacher
  def teacher_run(self, config, workdir: str, mesh) -> base.TeacherRun:
    tc = config.train
    steps = int(tc.steps)
    data = load_captioned(config)
    mcfg = model_config(config, data)
    model = text_conditioning.build(mcfg, text_len=data.encoder.max_positions)
    batch = int(tc.batch_size)
    sharding.check_batch(batch, mesh, "config.train.batch_size")
    fns = mdm_text.compile_text_teacher(model, mesh, TeacherSettings.from_config(tc, steps))
    cc, ds, seed = config.captions, data.ds, int(config.seed)

    def batches(start):
      for step in range(start, steps):
        rng = np.random.default_rng([seed, step])
        idx = rng.integers(0, ds.num_train, batch)
        cid = captions.training_captions(rng, ds.train_labels[idx], data.train_attrs[idx],
                                         attribute_dropout=float(cc.attribute_dropout),
                                         null_prob=float(cc.null_prob))
        yield (jax.device_put(jnp.asarray(ds.train_tokens[idx]), fns.batch_sharding),
               jax.device_put(captions.gather(data.table, cid), fns.batch_sharding))

    run_config = base.config_dict(config)

    def finish(state, step, final):
      stored = dict(run_config, meissonic=mcfg.to_dict(), text_encoder=dataclasses.asdict(data.encoder),
                    thresholds=dataclasses.asdict(data.thresholds), finished_step=steps, role="teacher")
      if jax.process_index() == 0:
        checkpoints.write_config(workdir, stored)
      return {}

    return base.TeacherRun(model=model, fns=fns, run_config=run_config, batches=batches,
                           describe=f"Meissonic architecture on the captioned digits, {ds.num_train} images",
                           finish=finish, finished=lambda: is_finished(workdir, steps))

  def teacher_to_train(self, config, workdir: str) -> Optional[str]:
    path = teacher_dir(config, workdir)
    if config.teacher.get("checkpoint", "") or is_finished(path, int(config.train.steps)):
      return None
    return path

  # -------------------------------------------------------------- networks
  def load_teacher(self, config, workdir: str) -> base.Loaded:
    return base.Loaded(*load_text_teacher(teacher_dir(config, workdir), use_ema=bool(config.teacher.use_ema)))

  def load_generator(self, config, path: str) -> base.Loaded:
    if os.path.isdir(os.path.join(path, GENERATOR_SUBDIR)):
      path = os.path.join(path, GENERATOR_SUBDIR)
    return base.Loaded(*load_text_teacher(path, use_ema=True))

  def condition_source(self, config, teacher: base.Loaded) -> base.ConditionSource:
    return PromptTable(load_captioned(config, teacher.stored).table,
                       captions.distill_prompts(str(config.distill.get("prompt_set", "full"))))

  def run_config(self, config, teacher: base.Loaded) -> dict:
    return dict(super().run_config(config, teacher), role="distill")

  def network_config(self, teacher: base.Loaded, model) -> dict:
    return {k: teacher.stored[k] for k in ("meissonic", "text_encoder", "thresholds")}

  # -------------------------------------------------------------- what a person looks at
  def decode(self, tokens, stored: dict):
    levels = int(stored["meissonic"]["codebook_size"])
    grid = int(stored["meissonic"]["grid"])
    return image_grids.tokens_to_images(tokens, levels, (grid, grid))

  def evaluate_table(self, config, workdir: str, teacher: base.Loaded, generator_params) -> Optional[str]:
    return prompt_following.evaluate_captioned(config, workdir, teacher=(teacher.model, teacher.params),
                                               generator=generator_params, data=load_captioned(config, teacher.stored))


# ---------------------------------------------------------------------------- mode=sample
SAMPLE_MODELS = ("teacher", "generator")
INDEX_FILE = "index.json"


def sample_source(config, workdir: str) -> str:
  """The folder ``mode=sample`` reads: ``config.sample.checkpoint``, or the teacher's folder
  (``teacher_dir``) for ``config.sample.model='teacher'`` and the workdir (its ``generator/``) for
  ``'generator'``."""
  sc = config.sample
  if sc.get("checkpoint", ""):
    return str(sc.checkpoint)
  return teacher_dir(config, workdir) if sample_model(config) == "teacher" else workdir


def sample_model(config) -> str:
  kind = str(config.sample.get("model", "teacher"))
  if kind not in SAMPLE_MODELS:
    raise ValueError(f"config.sample.model={kind!r} is not known; choose one of {SAMPLE_MODELS}")
  return kind


def sample_prompt_sets(config) -> dict:
  """``{set name: caption ids}``: the prompts of the file ``config.sample.prompts`` (one caption per
  line, each one of ``data.captions.all_captions()``) as ``prompts``, or, when it is empty, the
  prompts Di[M]O distils from (``seen``) and the held-out full prompts (``held_out``)."""
  path = config.sample.get("prompts", "")
  if not path:
    return {"seen": captions.distill_prompts(str(config.distill.get("prompt_set", "full"))),
            "held_out": captions.held_out_prompts()}
  known = {c: i for i, c in enumerate(captions.all_captions()) if c}
  ids = []
  for n, prompt in enumerate(text.read_prompts(path), 1):
    cid = known.get(" ".join(prompt.lower().split()))
    if cid is None:
      raise ValueError(f"config.sample.prompts={path}: prompt {n} {prompt!r} is not a caption of the captioned "
                       f"digits; write captions such as {captions.caption_text(captions.full_prompt_ids()[0])!r}, "
                       f"'an upright four' or 'a seven' (thick / thin, slanted / upright, a digit word)")
    ids.append(cid)
  return {"prompts": np.asarray(ids, np.int32)}


def write_samples(config, workdir: str) -> dict:
  """``mode=sample``: ``config.sample.per_prompt`` samples of every prompt of each prompt set
  (``sample_prompt_sets``) from the teacher (``core.samplers.gumbel_ramp_sampler`` at
  ``config.sample.steps`` with the teacher's guidance against the empty prompt) or the generator
  (``config.sample.generator_steps``; 0: what it was trained for), written to
  ``config.sample.output`` (default ``<workdir>/samples``): ``<set>.png`` (one row per prompt),
  ``<set>.npy`` (tokens, prompt-major) and ``index.json`` (the prompts of each row, the model and
  its settings). Set ``k`` draws from ``config.sample.seed + k``. Returns ``{"output", "index",
  "grids", "num"}``."""
  sc = config.sample
  kind, source = sample_model(config), sample_source(config, workdir)
  per_prompt = int(sc.get("per_prompt", 8))
  if per_prompt < 1:
    raise ValueError(f"config.sample.per_prompt must be >= 1, got {per_prompt}")
  sets = sample_prompt_sets(config)
  sp = sampler_settings_from_config(sc)
  if kind == "teacher":
    loaded = base.Loaded(*load_text_teacher(source, use_ema=bool(config.teacher.use_ema)))
  else:
    loaded = FAMILY.load_generator(config, source)
  table = load_captioned(config, loaded.stored).table
  batch = sp.batch_size or 500
  settings = {"model": kind, "checkpoint": os.path.abspath(source), "per_prompt": per_prompt, "seed": sp.seed}
  if kind == "teacher":
    guidance = float(config.teacher.guidance if sp.guidance is None else sp.guidance)
    temperature = tuple(float(t) for t in (sp.temperature or config.evaluate.teacher_temperature))
    settings.update(steps=sp.steps, guidance=guidance, temperature=list(temperature))
    draw = lambda ids, seed: prompt_following.teacher_samples(
        loaded.model, loaded.params, table, ids, steps=sp.steps, guidance=guidance, temperature=temperature,
        seed=seed, batch=batch)
  else:
    plan = generator_plan(loaded.stored, sp.generator_steps, f"the generator in {source}")
    r_init = r_init_value(sp.r_init, "config.sample.r_init")[0]
    if r_init is None:
      raise ValueError(f"config.sample.r_init={sp.r_init!r}: sampling takes one fixed ratio, e.g. 0.6")
    temperature = float(config.evaluate.gen_temp if sp.temperature is None else sp.temperature)
    settings.update(steps=plan.steps, r_init=r_init, sigma=sp.sigma, temperature=temperature)
    draw = lambda ids, seed: prompt_following.generator_samples(
        loaded.model, loaded.params, table, ids, r_init=r_init, sigma=sp.sigma, temperature=temperature, seed=seed,
        batch=batch, steps=plan.steps, schedule=plan.schedule_at(plan.steps))
  out = sc.get("output", "") or os.path.join(workdir, "samples")
  index = dict(settings, sets={})
  grids = {}
  for k, (name, ids) in enumerate(sets.items()):
    rows = np.repeat(np.asarray(ids, np.int32), per_prompt)
    tokens = draw(rows, sp.seed + k)
    grids[name] = os.path.join(out, f"{name}.png")
    if jax.process_index() == 0:
      os.makedirs(out, exist_ok=True)
      image_grids.save_image_grid(FAMILY.decode(tokens, loaded.stored), grids[name], ncols=per_prompt)
      checkpoints.atomic_write_bytes(os.path.join(out, f"{name}.npy"), _npy_bytes(tokens.astype(np.int32)))
    index["sets"][name] = {"grid": f"{name}.png", "tokens": f"{name}.npy", "seed": sp.seed + k,
                           "rows": [{"caption_id": int(c), "prompt": captions.caption_text(c)} for c in ids]}
  index_path = os.path.join(out, INDEX_FILE)
  if jax.process_index() == 0:
    checkpoints.atomic_write_bytes(index_path, (json.dumps(index, indent=2) + "\n").encode("utf-8"))
  num = per_prompt * sum(len(ids) for ids in sets.values())
  logging.info("Wrote %d samples of the %s in %s (%s) to %s", num, kind, source, ", ".join(sets), out)
  return {"output": out, "index": index_path, "grids": grids, "num": num}


def _npy_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, array)
  return buf.getvalue()


FAMILY = CaptionedDigits()
