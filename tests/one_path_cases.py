"""Tiny models and configs of every family, shared by ``tests/data/make_one_path_golden.py`` (which
recorded what the per-family modes produced) and ``tests/test_same_outputs.py`` (which checks that
the one ``mode=sample`` / ``mode=evaluate`` produces the same).

Every builder is deterministic (fixed keys and seeds): called twice, it writes the same folders.
"""
import dataclasses
import hashlib
import json
import os
import pathlib

import jax
import numpy as np

from configs import captioned_digits, digits
from dimo_jax.storage import checkpoints

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "one_path_golden.json")
PROMPTS = ["a cat on a mat", "sat on a cat", "a mat"]
HPS = {"anime": ["a cat on a mat", "a cat"], "photo": ["cat"]}
TIMING_KEYS = ("ms_per_sample", "seconds")


def pixels_sha1(path) -> str:
  """SHA-1 of an image file's decoded pixels."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(path) as im:
    return hashlib.sha1(np.asarray(im).tobytes()).hexdigest()


def load_golden() -> dict:
  with open(GOLDEN, encoding="utf-8") as f:
    return json.load(f)


def comparable_rows(rows):
  """Result rows without their timings (what differs between two equal runs), as JSON reads them."""
  return json.loads(json.dumps([{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows],
                               default=float))


# ---------------------------------------------------------------------------- class-conditional tokens
def classes_setup(root) -> dict:
  """``test_evaluate``'s 4x4 grey-level data with 3 classes, a teacher and a distillation workdir
  with a generator."""
  from test_evaluate import _save_model, _synthetic_data  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(root)
  _synthetic_data(str(root))
  _save_model(str(root / "teacher"), 0, shift=0.01)
  _save_model(str(root / "distill" / "generator"), 1)
  return {"root": root, "teacher": str(root / "teacher"), "workdir": str(root / "distill")}


def classes_sample_config(setup, **sample):
  c = digits.get_config()
  c.mode = "sample"
  c.sample.checkpoint = setup["teacher"]
  c.sample.num = 10
  c.sample.batch_size = 4
  c.sample.steps = 4
  c.sample.update(sample)
  return c


def classes_evaluate_config(setup):
  """``test_evaluate``'s config without the entropy shift and timings, a shorter classifier run."""
  from test_evaluate import _config  # pylint: disable=import-outside-toplevel
  return _config(setup, entropy_samples=0, timing_repeats=0, classifier=dict(steps=60, feature_dim=32))


# ---------------------------------------------------------------------------- Meissonic
def meissonic_config(release, prompts_file, **sample):
  """``test_sample_text``'s ``configs/meissonic.py`` on its tiny converted release, 3 steps, seed 7."""
  from test_sample_text import _config  # pylint: disable=import-outside-toplevel
  return _config(release, prompts_file, **{"steps": 3, "seed": 7, **sample})


def write_prompts(folder) -> str:
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(str(folder), "prompts.txt")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(PROMPTS) + "\n")
  return path


def write_hps(folder) -> str:
  os.makedirs(folder, exist_ok=True)
  for style, lines in HPS.items():
    with open(os.path.join(str(folder), f"{style}.json"), "w", encoding="utf-8") as f:
      json.dump(lines, f)
  return str(folder)


# ---------------------------------------------------------------------------- captioned digits
def captioned_config():
  cfg = captioned_digits.get_config()
  cfg.model.num_layers = 1
  cfg.model.num_single_layers = 1
  cfg.evaluate.per_prompt = 2
  cfg.evaluate.teacher_steps = (1, 2)
  return cfg


def captioned_setup(workdir, cfg) -> dict:
  """A random-weight captioned-digits teacher (``<workdir>/teacher``, as ``mode=teacher`` writes
  it) and generator (``<workdir>/generator``); returns the two folders."""
  from dimo_jax.data import captions, datasets  # pylint: disable=import-outside-toplevel
  from dimo_jax.networks import meissonic, text_conditioning  # pylint: disable=import-outside-toplevel
  dc, cc, m = cfg.data, cfg.captions, cfg.model
  ds = datasets.load_digits(levels=int(dc.levels), val_fraction=float(dc.val_fraction), seed=int(dc.seed))
  th = captions.Thresholds.fit(ds.train_tokens, ds.train_labels)
  enc = captions.encoder_config(width=int(cc.encoder_width), layers=int(cc.encoder_layers),
                                heads=int(cc.encoder_heads), mlp_dim=int(cc.encoder_mlp_dim),
                                projection_dim=int(m.num_heads) * int(m.head_dim))
  fields = {f.name for f in dataclasses.fields(meissonic.MeissonicConfig)}
  kw = {k: m[k] for k in m.keys() if k in fields}
  kw["axes_dims_rope"] = tuple(kw.get("axes_dims_rope", ()))
  levels = int(ds.vocab_size)
  kw.update(codebook_size=levels, vocab_size=levels + 1, grid=int(ds.image_shape[0]), text_dim=enc.width,
            pooled_dim=int(m.num_heads) * int(m.head_dim))
  mcfg = meissonic.MeissonicConfig(**kw)
  model = text_conditioning.build(mcfg, text_len=enc.max_positions)
  stored = dict(cfg.to_dict(), meissonic=mcfg.to_dict(), text_encoder=dataclasses.asdict(enc),
                thresholds=dataclasses.asdict(th), finished_step=int(cfg.train.steps), role="teacher")
  folders = {"teacher": os.path.join(str(workdir), "teacher"), "generator": os.path.join(str(workdir), "generator")}
  t_params = jax.device_get(model.init_params(jax.random.key(3)))
  g_params = jax.device_get(model.init_params(jax.random.key(4)))
  checkpoints.save_params(folders["teacher"], t_params, stored, ema_params=t_params, step=int(cfg.train.steps))
  checkpoints.save_params(folders["generator"], g_params, dict(stored, role="generator"), ema_params=g_params,
                          step=1)
  return folders
