"""Prompt-following scores of the captioned-digits task: the teacher with its own multi-step
sampler (``core.samplers.gumbel_ramp_sampler``, guidance against the empty prompt) at
several step counts and the Di[M]O generator at each step count up to what it was trained for
(``config.sample.generator_steps``), on every full prompt
(``data.captions.full_prompt_ids``), the prompts seen in distillation and those held out scored
apart.

Per row and prompt set: prompt accuracy (the digit, the thickness and the slant all as the
prompt says), each part's accuracy, FD-pixel (Frechet distance of the 64 grey values against the
real images with the same captions), FD-classifier (the same in the digit classifier's feature
space, which sees strokes rather than pixel marginals) and the diversity per prompt (mean pairwise L2 distance of the
grey values between samples of one prompt, averaged over prompts). The digit is read by the
project's token classifier (``evaluation.classifier_features``, trained on the digits' training
split and cached); the attributes are measured on the sample exactly as on the data
(``data.captions.Thresholds``, with the prompt's digit), so real images score 100% on them.

``evaluate_prompt_following`` is the evaluator ``prompt_following`` of ``mode=evaluate`` for
``config.family='captioned_digits'`` (``evaluation.evaluators``); ``evaluate_captioned`` runs it
on networks already in memory (the end of a distillation) and writes the table.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Sequence

import jax
import numpy as np

from dimo_jax.core import generator_steps as gen_steps
from dimo_jax.core import samplers
from dimo_jax.data import captions, image_grids
from dimo_jax.evaluation import classifier_features, metrics
from dimo_jax.evaluation.evaluators import Request, Result, evaluate, output_dir, register
from dimo_jax.evaluation.settings import generator_plan
from dimo_jax.networks import meissonic, text_conditioning
from dimo_jax.storage import checkpoints, loaders

SETS = ("seen", "held_out")


def diversity_per_prompt(tokens: np.ndarray, prompt_ids: np.ndarray) -> float:
  """Mean pairwise L2 distance of grey values between samples of one prompt, averaged over prompts."""
  tokens, prompt_ids = np.asarray(tokens, np.float64), np.asarray(prompt_ids)
  means = []
  for c in np.unique(prompt_ids):
    x = tokens[prompt_ids == c]
    if len(x) < 2:
      continue
    sq = np.sum(x * x, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    means.append(np.sum(np.sqrt(d2)) / (len(x) * (len(x) - 1)))
  return float(np.mean(means))


def prompt_sets() -> Dict[str, np.ndarray]:
  return {"seen": captions.distill_prompts(), "held_out": captions.held_out_prompts()}


def real_captions(tokens, labels, thresholds: captions.Thresholds) -> np.ndarray:
  """The full caption id of each real image."""
  a = thresholds.attributes(tokens, labels)
  return np.asarray(captions.caption_id(labels, a[:, 0], a[:, 1]), np.int32)


class Scorer:
  """Scores sample sets against the real digits (all of them, captioned with the thresholds)."""

  def __init__(self, ds, thresholds: captions.Thresholds, classifier_dir: str):
    self.thresholds = thresholds
    self.real = np.concatenate([ds.train_tokens, ds.val_tokens]).astype(np.int32)
    labels = np.concatenate([ds.train_labels, ds.val_labels])
    self.real_ids = real_captions(self.real, labels, thresholds)
    self.apply_fn, self.params, self.meta = classifier_features.load_or_train_classifier(ds, classifier_dir)
    self.real_features = classifier_features.predict(self.apply_fn, self.params, self.real)[0].astype(np.float64)

  def score(self, tokens: np.ndarray, prompt_ids: np.ndarray) -> Dict[str, Dict[str, float]]:
    tokens, prompt_ids = np.asarray(tokens), np.asarray(prompt_ids)
    parts = np.asarray([captions.caption_parts(c) for c in prompt_ids])
    feats, logits = classifier_features.predict(self.apply_fn, self.params, tokens)
    feats = feats.astype(np.float64)
    digit_ok = np.argmax(logits, -1) == parts[:, 0]
    attrs = self.thresholds.attributes(tokens, parts[:, 0])
    thick_ok, slant_ok = attrs[:, 0] == parts[:, 1], attrs[:, 1] == parts[:, 2]
    out = {}
    for name, ids in prompt_sets().items():
      sel = np.isin(prompt_ids, ids)
      if not sel.any():
        continue
      ref_sel = np.isin(self.real_ids, ids)
      ref = self.real[ref_sel].astype(np.float64)
      out[name] = {
          "prompt_acc": 100.0 * float(np.mean(digit_ok[sel] & thick_ok[sel] & slant_ok[sel])),
          "digit_acc": 100.0 * float(np.mean(digit_ok[sel])),
          "thickness_acc": 100.0 * float(np.mean(thick_ok[sel])),
          "slant_acc": 100.0 * float(np.mean(slant_ok[sel])),
          "fd_pixel": float(metrics.fid_from_features(tokens[sel].astype(np.float64), ref)),
          "fd_classifier": float(metrics.fid_from_features(feats[sel], self.real_features[ref_sel])),
          "diversity": diversity_per_prompt(tokens[sel], prompt_ids[sel]),
          "samples": int(sel.sum()),
      }
    return out


def eval_prompts(per_prompt: int) -> np.ndarray:
  """Every full prompt ``per_prompt`` times (prompt-major)."""
  return np.repeat(captions.full_prompt_ids(), int(per_prompt))


def teacher_samples(model, params, table, prompt_ids, *, steps: int, guidance: float, temperature,
                    seed: int, batch: int = 500) -> np.ndarray:
  apply_fn = model.sampler_apply_fn()
  neg = captions.gather(table, np.zeros((1,), np.int32))
  out = []
  for i, start in enumerate(range(0, len(prompt_ids), batch)):
    ids = prompt_ids[start:start + batch]
    cond = captions.gather(table, ids)
    toks = samplers.gumbel_ramp_sampler(
        apply_fn, params, jax.random.fold_in(jax.random.key(seed), i), cond, neg, seq_len=model.seq_len,
        mask_id=model.mask_id, codebook_size=model.codebook_size, steps=int(steps), guidance=float(guidance),
        temperature=tuple(float(t) for t in temperature))
    out.append(np.asarray(toks))
  return np.concatenate(out)


def generator_samples(model, params, table, prompt_ids, *, r_init: float, sigma: float, temperature: float,
                      seed: int, batch: int = 500, steps: int = 1, schedule="linear") -> np.ndarray:
  """The generator's samples, one per prompt id: one step through ``samplers.one_step_cond_sampler``,
  ``steps`` > 1 through ``core.generator_steps.generate`` with the re-masking levels of ``schedule``."""
  apply_fn = model.sampler_apply_fn()
  out = []
  for i, start in enumerate(range(0, len(prompt_ids), batch)):
    cond = captions.gather(table, prompt_ids[start:start + batch])
    key = jax.random.fold_in(jax.random.key(seed), i)
    if steps == 1:
      toks = samplers.one_step_cond_sampler(
          apply_fn, params, key, cond, seq_len=model.seq_len, mask_id=model.mask_id,
          codebook_size=model.codebook_size, r_init=float(r_init), noise_sigma=float(sigma),
          temperature=float(temperature))
    else:
      toks = gen_steps.generate(gen_steps.model_apply_fn(model, float(sigma)), params, key, cond, steps=int(steps), schedule=schedule,
                                seq_len=model.seq_len, codebook_size=model.codebook_size, r_init=float(r_init),
                                temperature=float(temperature), mask_id=model.mask_id)
    out.append(np.asarray(toks))
  return np.concatenate(out)


COLUMNS = (("prompt_acc", "prompt acc. % ↑", "{:.1f}"), ("digit_acc", "digit %", "{:.1f}"),
           ("thickness_acc", "thickness %", "{:.1f}"), ("slant_acc", "slant %", "{:.1f}"),
           ("fd_pixel", "FD-pixel ↓", "{:.1f}"), ("fd_classifier", "FD-classifier ↓", "{:.2f}"),
           ("diversity", "diversity/prompt", "{:.1f}"))


def format_table(rows: Sequence[dict]) -> str:
  """Markdown: one line per row and prompt set."""
  head = "| model | steps | prompts | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
  lines = [head, "|---|---|---|" + "---|" * len(COLUMNS)]
  for r in rows:
    for name in SETS:
      if name not in r["scores"]:
        continue
      s = r["scores"][name]
      cells = [r["model"], str(r["steps"]), name.replace("_", "-")] + [f.format(s[k]) for k, _, f in COLUMNS]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def goal_note(rows: Sequence[dict], prompt_set: str = "seen") -> str:
  """The generator (each of its step counts) against the teacher's best rows (best accuracy, best FD)
  on ``prompt_set``."""
  teacher = [r for r in rows if r["model"].startswith("teacher")]
  gen = [r for r in rows if r["model"].startswith("Di[M]O")]
  if not teacher or not gen:
    return ""
  best_acc = max(r["scores"][prompt_set]["prompt_acc"] for r in teacher)
  best_fd = min(r["scores"][prompt_set]["fd_pixel"] for r in teacher)
  notes = []
  for row in gen:  # one sentence per generator step count
    g, steps = row["scores"][prompt_set], int(row.get("steps", 1))
    notes.append(f"Di[M]O at {steps} step{'s' if steps > 1 else ''} on the {prompt_set} prompts: prompt accuracy "
                 f"{g['prompt_acc']:.1f}% (standard error {accuracy_se(g):.1f}) against the teacher's best "
                 f"{best_acc:.1f}% ({g['prompt_acc'] - best_acc:+.1f} points); FD-pixel {g['fd_pixel']:.1f} "
                 f"= {g['fd_pixel'] / best_fd:.2f}x the teacher's best {best_fd:.1f}.")
  return "\n".join(notes)


def accuracy_se(scores: Dict[str, float]) -> float:
  """Binomial standard error (points) of a row's prompt accuracy over its ``samples``."""
  p, n = scores["prompt_acc"] / 100.0, max(int(scores.get("samples", 0)), 1)
  return 100.0 * float(np.sqrt(p * (1.0 - p) / n))


def save_grid(tokens: np.ndarray, path: str, per_prompt: int, columns: int = 10, rows_per_prompt: int = 1):
  """The first sample of each full prompt as a PNG grid (prompt order: digit-major)."""
  first = np.asarray(tokens)[:: int(per_prompt)][:40]
  image_grids.save_image_grid(image_grids.tokens_to_images(first, 17, (8, 8)), path, ncols=columns)


# ---------------------------------------------------------------------------- the evaluator
CaptionedData = captions.CaptionedData


def load_text_network(path: str, *, use_ema: bool = True, with_config: bool = False):
  """``(model, params)`` of a captioned-digits teacher or generator folder (its ``config.json``
  names the network; with ``with_config`` also that ``config.json``); a folder of another family
  is a ``ValueError`` naming the fix."""
  params, ema, stored = checkpoints.load_params(path)
  if not stored or "meissonic" not in stored or "text_encoder" not in stored:
    raise ValueError(f"{path}: not a captioned-digits network (its config.json has no 'meissonic' entry); "
                     "train one with --config=configs/captioned_digits.py --config.mode=distill")
  model = text_conditioning.build(meissonic.MeissonicConfig.from_dict(stored["meissonic"]),
                                  text_len=int(stored["text_encoder"]["max_positions"]))
  return (model, ema if use_ema and ema is not None else params) + ((stored,) if with_config else ())


def prompt_following_rows(config, out_dir: str, teacher, generator, data: CaptionedData, plan=None) -> Result:
  """The rows of the real digits, the teacher (its sampler at ``config.evaluate.teacher_steps``)
  and the generator (at 1 .. ``plan.steps`` steps, ``evaluation.settings.generator_plan``; None:
  the step count of ``config.distill``), each scored on the seen and held-out prompts; grids of the
  teacher's first and last step counts and of the generator at each step count in ``out_dir``."""
  ec = config.evaluate
  model, t_params = teacher
  scorer = Scorer(data.ds, data.thresholds, os.path.join(out_dir, "classifier"))
  ids = eval_prompts(int(ec.per_prompt))
  rows = [{"name": "real", "model": "real digits", "steps": 0, "scores": scorer.score(scorer.real, scorer.real_ids)}]
  for steps in ec.teacher_steps:
    t0 = time.time()
    toks = teacher_samples(model, t_params, data.table, ids, steps=int(steps), guidance=float(config.teacher.guidance),
                           temperature=tuple(ec.teacher_temperature), seed=int(ec.seed))
    rows.append({"name": f"teacher_steps{int(steps)}", "model": "teacher (Meissonic sampler)", "steps": int(steps),
                 "scores": scorer.score(toks, ids), "seconds": time.time() - t0})
    if int(steps) in (1, max(ec.teacher_steps)):
      save_grid(toks, os.path.join(out_dir, f"teacher_{int(steps)}.png"), int(ec.per_prompt))
  if plan is None:
    plan = generator_plan({"distill": dict(config.distill)}, int(config.sample.get("generator_steps", 0))
                          if "sample" in config else 0)
  for steps in plan.step_counts():
    toks = generator_samples(model, generator, data.table, ids, r_init=float(ec.r_init), sigma=float(ec.sigma),
                             temperature=float(ec.gen_temp), seed=int(ec.seed), steps=steps,
                             schedule=plan.schedule_at(steps))
    rows.append({"name": "generator" if steps == 1 else f"generator_steps{steps}", "model": "Di[M]O generator",
                 "steps": steps, "scores": scorer.score(toks, ids)})
    save_grid(toks, os.path.join(out_dir, f"generator_{steps}.png"), int(ec.per_prompt))
  return Result(rows, {"classifier": {k: scorer.meta.get(k) for k in ("val_accuracy", "train_accuracy")}})


def markdown(results: dict) -> str:
  """The prompt-following table and the goal notes of the seen and held-out prompts."""
  rows = results["rows"]
  notes = [goal_note(rows, s) for s in SETS]
  return format_table(rows) + "\n\n" + "\n".join(n for n in notes if n)


@register("prompt_following")
def evaluate_prompt_following(req: Request, *, teacher=None, generator=None, data=None) -> Result:
  """The evaluator ``prompt_following``: the teacher of ``config.teacher.checkpoint`` (default
  ``<workdir>/teacher``) and the generator of ``<workdir>/generator``, unless given."""
  config, workdir = req.config, req.workdir
  use_ema = bool(config.teacher.get("use_ema", True))
  stored = None
  if teacher is None:
    *teacher, stored = load_text_network(config.teacher.get("checkpoint", "") or os.path.join(workdir, "teacher"),
                                         use_ema=use_ema, with_config=True)
    teacher = tuple(teacher)
  plan = None
  if generator is None:
    folder = loaders.generator_dir(workdir)
    generator = load_text_network(folder)[1]
    plan = generator_plan(checkpoints.read_config(folder), int(config.sample.get("generator_steps", 0))
                          if "sample" in config else 0, f"the generator in {folder}")
  req.format = markdown
  checkpoints.makedirs(req.out_dir)
  return prompt_following_rows(config, req.out_dir, teacher, generator, data or captions.load_captioned(config, stored), plan)


def evaluate_captioned(config, workdir: str, *, teacher=None, generator=None, data=None) -> str:
  """``mode=evaluate``'s prompt-following table of ``(model, params)`` ``teacher`` and the
  generator's ``params`` already in memory (loaded from ``workdir`` when None); writes
  ``results.json``, ``table.md`` and grids to ``config.evaluate.output_dir`` (default
  ``<workdir>/eval``), prints the table and returns it."""
  req = Request(config, workdir, output_dir(config, workdir), "captioned_digits")
  fn = lambda r: evaluate_prompt_following(r, teacher=teacher, generator=generator, data=data)  # noqa: E731
  results = evaluate(req, ["prompt_following"], evaluators={"prompt_following": fn})
  if jax.process_index() == 0:
    print(results["table"], flush=True)
  return results["table"]
