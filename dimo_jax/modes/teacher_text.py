"""``mode=teacher`` for text-conditioned token data (``config.data.name='captioned_digits'``): trains
a Meissonic-architecture teacher (``networks.meissonic`` through ``networks.text_conditioning``)
on the captioned digits with ``method.mdm_text``; the finished teacher (parameters, EMA, config
with the model, text encoder and attribute thresholds) is written to the workdir.

Each step's batch and captions are pure functions of ``(config.seed, step)``. A workdir that
already holds the finished teacher is left as it is.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dimo_jax.core import sharding
from dimo_jax.data import captions, datasets
from dimo_jax.method import mdm_text
from dimo_jax.method.mdm import TeacherSettings
from dimo_jax.modes import loop
from dimo_jax.networks import meissonic, text_conditioning
from dimo_jax.storage import checkpoints


@dataclasses.dataclass
class CaptionedData:
  """The digits, their attribute values, the thresholds and every caption's condition."""
  ds: datasets.TokenDataset
  thresholds: captions.Thresholds
  train_attrs: np.ndarray  # [N, 2]
  table: dict  # caption id -> condition leaves
  encoder: object  # clip_text.CLIPTextConfig


def load_captioned(config) -> CaptionedData:
  dc, cc = config.data, config.captions
  ds = datasets.load_digits(levels=int(dc.levels), val_fraction=float(dc.val_fraction), seed=int(dc.seed))
  th = captions.Thresholds.fit(ds.train_tokens, ds.train_labels)
  enc = captions.encoder_config(width=int(cc.encoder_width), layers=int(cc.encoder_layers),
                                heads=int(cc.encoder_heads), mlp_dim=int(cc.encoder_mlp_dim),
                                projection_dim=int(config.model.num_heads) * int(config.model.head_dim))
  table = captions.condition_table(enc, int(cc.encoder_seed))
  return CaptionedData(ds, th, th.attributes(ds.train_tokens, ds.train_labels), table, enc)


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
  return config.teacher.get("checkpoint", "") or os.path.join(workdir, "teacher")


def is_finished(path: str, steps: int) -> bool:
  cfg = checkpoints.read_config(path) if os.path.isdir(path) else None
  return bool(cfg) and int(cfg.get("finished_step", -1)) >= steps


def train_text_teacher(config, workdir: str, *, stop_after: Optional[int] = None) -> dict:
  """Trains the captioned-digits teacher into ``workdir``; returns the final metrics."""
  tc = config.train
  steps = int(tc.steps)
  workdir = checkpoints.abspath(workdir)
  if is_finished(workdir, steps):
    logging.info("The teacher in %s is finished; nothing to train.", workdir)
    return {"step": steps}
  checkpoints.makedirs(workdir)
  data = load_captioned(config)
  mcfg = model_config(config, data)
  model = text_conditioning.build(mcfg, text_len=data.encoder.max_positions)
  mesh = sharding.make_mesh(int(config.mesh.get("data", -1)), int(config.mesh.get("fsdp", 1)))
  batch = int(tc.batch_size)
  sharding.check_batch(batch, mesh, "config.train.batch_size")
  settings = TeacherSettings.from_config(tc, steps)
  fns = mdm_text.compile_text_teacher(model, mesh, settings)
  state = fns.init(jnp.int32(int(config.seed)))
  cc = config.captions
  ds = data.ds
  logging.info("Captioned-digits teacher: Meissonic with %d parameters, %d steps at batch %d.",
               meissonic.count_params(state.params), steps, batch)
  last = stop_after or steps
  history, t0 = [], time.time()
  for step in range(last):
    rng = np.random.default_rng([int(config.seed), step])
    idx = rng.integers(0, ds.num_train, batch)
    cid = captions.training_captions(rng, ds.train_labels[idx], data.train_attrs[idx],
                                     attribute_dropout=float(cc.attribute_dropout), null_prob=float(cc.null_prob))
    cond = jax.device_put(captions.gather(data.table, cid), fns.batch_sharding)
    tokens = jax.device_put(jnp.asarray(ds.train_tokens[idx]), fns.batch_sharding)
    state, metrics = fns.step(state, tokens, cond)
    history.append(metrics)
    if (step + 1) % int(tc.get("log_every", 100)) == 0 or step + 1 == last:
      mean = {k: float(np.mean([float(m[k]) for m in history])) for k in ("loss", "acc_masked")}
      logging.info("teacher step %d: loss %.4f, masked accuracy %.3f (%.1fs)", step + 1, mean["loss"],
                   mean["acc_masked"], time.time() - t0)
      history = []
  final = {"step": last, "seconds": time.time() - t0}
  if last == steps:
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    stored = dict(cfg, meissonic=mcfg.to_dict(), text_encoder=dataclasses.asdict(data.encoder),
                  thresholds=dataclasses.asdict(data.thresholds), finished_step=steps, role="teacher")
    checkpoints.save_params(workdir, jax.device_get(state.params), stored,
                            ema_params=jax.device_get(state.ema_params), step=steps)
    logging.info("Teacher written to %s after %.1fs.", workdir, final["seconds"])
  return final


def load_text_teacher(path: str, *, use_ema: bool = True):
  """``(model, params, stored_config)`` of a finished captioned-digits teacher."""
  params, ema, stored = checkpoints.load_params(path)
  if not stored or "meissonic" not in stored:
    raise ValueError(f"{path}: not a text-conditioned teacher (its config.json has no 'meissonic' entry); "
                     "train one with --config=configs/captioned_digits.py --config.mode=teacher")
  mcfg = meissonic.MeissonicConfig.from_dict(stored["meissonic"])
  model = text_conditioning.build(mcfg, text_len=int(stored["text_encoder"]["max_positions"]))
  return model, (ema if use_ema and ema is not None else params), stored


run = loop.entry(train_text_teacher)
